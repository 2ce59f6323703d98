"""Names: one validator per kind, applied to every path parameter; traversal is impossible."""

from __future__ import annotations

import pytest

from registry.common.errors import InvalidNameError
from registry.common.names import (
    check_segment,
    check_tag,
    parse_base_name,
    parse_ref,
    parse_repo_name,
    parse_version_ref,
)
from tests.registry.helpers import error_of

BAD_SEGMENTS = [
    "..",
    ".",
    "../etc",
    "a/b",
    "a\\b",
    "a\x00b",
    "-abc",
    "_abc",
    "",
    "A",
    "Math",
    "a b",
    "a" * 65,
    "ä",
    "a%2fb",
]


@pytest.mark.parametrize("bad", BAD_SEGMENTS)
def test_bad_segments_are_refused(bad):
    with pytest.raises(InvalidNameError):
        check_segment(bad)


@pytest.mark.parametrize("good", ["a", "acme", "math-v2", "m.e_t-a", "0day", "a" * 64])
def test_good_segments_pass(good):
    assert check_segment(good) == good


def test_refs_and_names_parse():
    assert parse_repo_name("acme/math") == ("acme", "math")
    assert parse_ref("acme/math:prod") == ("acme", "math", "prod")
    assert parse_ref("acme/math:3") == ("acme", "math", 3)
    assert parse_ref("acme/math") == ("acme", "math", "latest")
    assert parse_base_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    for bad in ["acme", "acme/math/x", "../x/y", "acme/"]:
        with pytest.raises(InvalidNameError):
            parse_repo_name(bad)
    for bad in ["llama", "a/b/c", "../b", "a/.."]:
        with pytest.raises(InvalidNameError):
            parse_base_name(bad)
    with pytest.raises(InvalidNameError):
        check_tag("123")  # numbers name versions
    with pytest.raises(InvalidNameError):
        parse_version_ref("0")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/repos/..%2F..%2Fetc/passwd",
        "/v1/repos/acme%2Fmath/x",
        "/v1/repos/acme/%2E%2E",
        "/v1/repos/acme/ma%00th",
        "/v1/repos/ACME/math",
        "/v1/repos/acme/math/versions/..%2F..%2Fsecret",
        "/v1/repos/acme/math/versions/1%00/download",
        "/v1/repos/acme/math/versions/%2E%2E/download",
        "/v1/bases/..%2F../x",
    ],
)
def test_api_refuses_traversal_and_bad_names(client, path, data_dir):
    # (literal ".." segments never reach a server: HTTP clients resolve them; encoded ones do)
    r = client.get(path)
    assert r.status_code in (400, 404, 422)
    err = error_of(r)
    assert err["code"] in ("invalid_name", "not_found", "invalid_request")
    # nothing was created anywhere outside the registry's own directories
    assert sorted(p.name for p in data_dir.iterdir()) == ["blobs"]


def test_bad_names_in_bodies_are_refused(client, base_fingerprint):
    r = client.post("/v1/bases", json={"name": "../x", "fingerprint": base_fingerprint})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_name"
    client.post("/v1/bases", json={"name": "org/base", "fingerprint": base_fingerprint})
    for ns, name in [("../x", "math"), ("acme", "a/b"), ("acme", "a\x00"), ("Acme", "math")]:
        r = client.post("/v1/repos", json={"namespace": ns, "name": name, "base": "org/base"})
        assert r.status_code == 400, (ns, name)
        assert error_of(r)["code"] == "invalid_name"
