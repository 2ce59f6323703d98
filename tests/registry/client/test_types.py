"""registry.client.types: the client's wire types read what the server's schemas write. The client
may not import the server, so its dataclasses are its own; this test (which may) keeps the two in step."""

from __future__ import annotations

import dataclasses

import pytest

from registry.client.types import BaseInfo, LatestInfo, RepoInfo, TagInfo, VersionInfo, build
from registry.server import schemas

PAIRS = [
    (BaseInfo, schemas.BaseOut),
    (LatestInfo, schemas.LatestVersionOut),
    (RepoInfo, schemas.RepoOut),
    (VersionInfo, schemas.VersionOut),
    (TagInfo, schemas.TagOut),
]


@pytest.mark.parametrize(("client_type", "schema"), PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_every_client_field_is_a_field_the_server_sends(client_type, schema):
    client_fields = {f.name for f in dataclasses.fields(client_type)}
    assert client_fields <= set(schema.model_fields), client_fields - set(schema.model_fields)


def test_fields_a_newer_server_adds_are_ignored():
    tag = build(TagInfo, {"name": "prod", "version": 3, "added_in_v2": True})
    assert tag == TagInfo(name="prod", version=3)
