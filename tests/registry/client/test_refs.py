"""registry.client.refs: every form of reference, and errors that say what is wrong as written."""

from __future__ import annotations

import pytest

from registry.client import Ref, parse_ref
from registry.common.errors import InvalidNameError

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("acme/math", Ref("acme", "math")),
        ("acme/math:prod", Ref("acme", "math", tag="prod")),
        ("acme/math:3", Ref("acme", "math", version=3)),
        ("acme/math@3", Ref("acme", "math", version=3)),
        (f"acme/math@{DIGEST}", Ref("acme", "math", digest=DIGEST)),
    ],
)
def test_every_form_round_trips(text, ref):
    assert parse_ref(text) == ref
    assert parse_ref(str(ref)) == ref


def test_pinned_means_a_number_or_a_digest():
    assert parse_ref("acme/math@3").pinned and parse_ref(f"acme/math@{DIGEST}").pinned
    assert not parse_ref("acme/math:prod").pinned and not parse_ref("acme/math").pinned


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("acme/math:@", "'acme/math:@': give a tag (':') or a version ('@'), not both"),
        ("acme/math@", "'acme/math@': nothing after '@'"),
        ("acme/math:", "'acme/math:': nothing after ':'"),
        (
            "acme/math@sha256:abc",
            "'acme/math@sha256:abc': a digest is sha256: followed by 64 lowercase hex digits",
        ),
        (
            "acme/math@prod",
            "'acme/math@prod': a version after '@' is a number or sha256:<64 hex> (use ':' for a tag)",
        ),
        ("math", "'math': not a reference: write namespace/name"),
        ("Acme/math", "invalid namespace 'Acme'"),
        ("acme/math@0", "'acme/math@0': invalid version number '0'"),
    ],
)
def test_a_malformed_reference_says_what_is_wrong_with_it(text, message):
    with pytest.raises(InvalidNameError) as info:
        parse_ref(text)
    assert str(info.value).startswith(message)
