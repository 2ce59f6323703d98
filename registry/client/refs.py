"""References to versions as users write them: `namespace/name` (latest), `namespace/name:TAG`,
`namespace/name@N` (`:N` too) and `namespace/name@sha256:<hex>` (by digest), parsed into `Ref`.

    parse_ref("acme/math:prod")   # Ref(namespace='acme', name='math', tag='prod')
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.common import names
from registry.common.errors import InvalidNameError


@dataclass(frozen=True)
class Ref:
    """`namespace/name`, `namespace/name:TAG`, `namespace/name@VERSION` or `namespace/name@sha256:…`."""

    namespace: str
    name: str
    version: int | None = None
    tag: str | None = None
    digest: str | None = None

    @property
    def repo(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def api_ref(self) -> str:
        """The `{ref}` of `/versions/{ref}`: the number, the tag, or `latest` (a digest is looked
        up through the version list)."""
        return str(self.version) if self.version is not None else (self.tag or "latest")

    @property
    def explicit(self) -> bool:
        return self.version is not None or self.tag is not None or self.digest is not None

    @property
    def pinned(self) -> bool:
        """Names one version for good (a number or a digest; a tag can move)."""
        return self.version is not None or self.digest is not None

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repo}@{self.digest}"
        if self.version is not None:
            return f"{self.repo}@{self.version}"
        return f"{self.repo}:{self.tag}" if self.tag else self.repo


def _bad(text: str, why: str) -> InvalidNameError:
    return InvalidNameError(f"{text!r}: {why}")


def parse_ref(text: str) -> Ref:
    """`acme/math` (latest), `acme/math:prod`, `acme/math:3`, `acme/math@3` or
    `acme/math@sha256:<64 hex>` -> Ref. A malformed reference raises InvalidNameError saying what
    is wrong with it as written."""
    form = "write namespace/name, namespace/name:TAG, namespace/name@N or namespace/name@sha256:<64 hex>"
    repo, at, pinned = text.partition("@")
    repo, colon, tag = repo.partition(":")
    if at and colon:
        raise _bad(text, f"give a tag (':') or a version ('@'), not both; {form}")
    if "/" not in repo:
        raise _bad(text, f"not a reference: {form}")
    namespace, name = names.parse_repo_name(repo)  # its message names the segment that is wrong
    if at:
        if not pinned:
            raise _bad(text, "nothing after '@' (a version number or sha256:<64 hex>)")
        if pinned.startswith("sha256:"):
            if not names.DIGEST_RE.fullmatch(pinned):
                raise _bad(text, "a digest is sha256: followed by 64 lowercase hex digits")
            return Ref(namespace, name, digest=pinned)
        if not (pinned.isascii() and pinned.isdigit()):
            raise _bad(text, "a version after '@' is a number or sha256:<64 hex> (use ':' for a tag)")
    elif colon:
        if not tag:
            raise _bad(text, "nothing after ':' (a tag or a version number)")
        pinned = tag
    else:
        return Ref(namespace, name)
    try:
        parsed = names.parse_version_ref(pinned)
    except InvalidNameError as exc:
        raise _bad(text, str(exc)) from None
    return (
        Ref(namespace, name, version=parsed) if isinstance(parsed, int) else Ref(namespace, name, tag=parsed)
    )
