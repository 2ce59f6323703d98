"""Names of repositories, bases, tags and refs: one validator each, applied to every path
parameter, so no user-supplied name can reach storage as anything but a plain key.

    namespace, name = parse_repo_name("acme/math")
    ref = parse_ref("acme/math:prod")        # -> ("acme", "math", "prod")
"""

from __future__ import annotations

import re

from codec.format import BASE_SEGMENT_RE  # base models keep the upstream spelling
from registry.common.errors import InvalidNameError

#: One segment of `namespace/name`: lowercase, starts alphanumeric, no slashes, at most 64 chars.
SEGMENT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
NUMBER_RE = re.compile(r"[1-9][0-9]{0,9}")
DIGEST_PATTERN = "^sha256:[0-9a-f]{64}$"
RESERVED_TAGS = frozenset({"latest"})
MAX_VERSION = 2**31 - 1

# The same rules as JSON-schema patterns for the OpenAPI document (anchored, ECMA syntax).
SEGMENT_PATTERN = "^[a-z0-9][a-z0-9._-]{0,63}$"
BASE_SEGMENT_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
BASE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
_TAG_BODY = "[a-z][a-z0-9._-]{0,63}|[0-9]+[a-z._-][a-z0-9._-]*"
TAG_PATTERN = f"^(?:{_TAG_BODY})$"  # with maxLength 64: starts alphanumeric, not all digits
REF_PATTERN = f"^(?:[1-9][0-9]{{0,8}}|{_TAG_BODY})$"
#: Free text (descriptions, names of tokens, search strings): anything but NUL, which PostgreSQL
#: cannot store in text.
TEXT_PATTERN = "^[^\\x00]*$"


def _show(value: str) -> str:
    return repr(value) if len(value) <= 80 else repr(value[:80] + "...")


def check_segment(value: str, *, what: str = "name") -> str:
    if not SEGMENT_RE.fullmatch(value):
        raise InvalidNameError(
            f"invalid {what} {_show(value)}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


def check_base_segment(value: str, *, what: str = "base model name") -> str:
    if not BASE_SEGMENT_RE.fullmatch(value):
        raise InvalidNameError(
            f"invalid {what} segment {_show(value)}: use 1-96 of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


def check_tag(value: str) -> str:
    if not TAG_RE.fullmatch(value) or value.isdigit():
        raise InvalidNameError(
            f"invalid tag {_show(value)}: use 1-64 of a-z 0-9 . _ -, not all digits (numbers name versions)"
        )
    return value


def parse_repo_name(full: str) -> tuple[str, str]:
    """`acme/math` -> ("acme", "math")."""
    namespace, slash, name = full.partition("/")
    if not slash:
        raise InvalidNameError(f"repository name {_show(full)} must be namespace/name")
    return check_segment(namespace, what="namespace"), check_segment(name, what="repository name")


def parse_base_name(full: str) -> str:
    """`org/model` -> the validated name."""
    parts = full.split("/")
    if len(parts) != 2:
        raise InvalidNameError(f"base model name {_show(full)} must be org/model")
    for part in parts:
        check_base_segment(part)
    return full


def base_namespace(name: str) -> str:
    """The namespace that owns a base model name, for auth: `org/model` -> `org` (lowercased)."""
    return name.split("/")[0].lower()


def parse_version_ref(ref: str) -> int | str:
    """A version reference: a number (`3`) or a tag (`prod`, `latest`)."""
    if NUMBER_RE.fullmatch(ref):  # ASCII digits only: no Unicode look-alike digits, no leading zeros
        number = int(ref)
        if number > MAX_VERSION:
            raise InvalidNameError(f"version number {ref} is out of range")
        return number
    if ref.isascii() and ref.isdigit():
        raise InvalidNameError(
            f"invalid version number {_show(ref)}: use 1 to {MAX_VERSION} without leading zeros"
        )
    return check_tag(ref)


def parse_ref(text: str) -> tuple[str, str, int | str]:
    """`acme/math:prod` / `acme/math:3` / `acme/math` (= latest) -> (namespace, name, ref)."""
    repo, colon, ref = text.partition(":")
    namespace, name = parse_repo_name(repo)
    return namespace, name, parse_version_ref(ref) if colon else "latest"
