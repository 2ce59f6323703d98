"""The consistency check (`deltactl fsck`, GET /v1/admin/fsck) finds every way the index and the
blob store can disagree, and calls a store that only has push leftovers consistent."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from cli.main import app as cli_app
from registry.server.blobstores import open_blob_store
from registry.server.db import Database
from registry.server.fsck import check_consistency
from registry.server.gc import collect_garbage
from registry.server.models import Tag, utcnow
from tests.support.corpus import delta_bytes, storage_form
from tests.support.harness import http_push, setup_repo

from .conftest import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def _fsck(settings, **kw):
    db = Database.from_url(settings.resolved_database_url)
    try:
        return check_consistency(db=db, store=open_blob_store(settings), settings=settings, **kw)
    finally:
        db.dispose()


def test_fsck_reports_each_kind_of_disagreement(client, make_settings):
    settings = make_settings()
    setup_repo(client, "acme/math")
    blobs = [storage_form(delta_bytes(i)) for i in range(4)]
    for blob in blobs:
        assert http_push(client, "acme/math", blob).status_code == 201
    report = client.get("/v1/admin/fsck").json()
    assert report["ok"] and report["clean"], report
    assert (report["versions"], report["blobs"], report["objects"]) == (4, 4, 4)
    assert report["bytes_verified"] == sum(b.size for b in blobs)

    root = settings.data_dir / "blobs"
    path = lambda b: root / "sha256" / b.digest[7:9] / b.digest[7:]  # noqa: E731
    flipped = bytearray(path(blobs[0]).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    path(blobs[0]).write_bytes(bytes(flipped))  # bit rot
    path(blobs[1]).unlink()  # lost object
    orphan = storage_form(delta_bytes(99))
    path(orphan).parent.mkdir(parents=True, exist_ok=True)
    path(orphan).write_bytes(orphan.data)  # a push that died after storing its bytes
    db = Database.from_url(settings.resolved_database_url)
    with db.write() as s:  # latest moved by hand to an older version
        s.execute(update(Tag).where(Tag.name == "latest").values(version_id=1))
    db.dispose()

    report = _fsck(settings)
    assert not report.ok
    assert (report.digest_mismatches, report.missing_objects, report.orphan_objects, report.tag_errors) == (
        1,
        1,
        1,
        1,
    )
    text = "\n".join(report.details)
    assert (
        blobs[0].digest in text
        and blobs[1].digest in text
        and orphan.digest[7:] in text
        and "latest is at 1" in text
    )

    api = client.get("/v1/admin/fsck").json()
    assert api["ok"] is False and api["digest_mismatches"] == 1
    quick = client.get("/v1/admin/fsck", params={"digests": "false"}).json()
    assert (
        quick["digests_checked"] is False
        and quick["digest_mismatches"] == 0
        and quick["missing_objects"] == 1
    )

    env = {
        "DELTASTORE_DATABASE_URL": settings.resolved_database_url,
        "DELTASTORE_DATA_DIR": str(settings.data_dir),
    }
    result = CliRunner().invoke(cli_app, ["fsck", "--json"], env=env)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["missing_objects"] == 1
    result = CliRunner().invoke(cli_app, ["fsck"], env=env)
    assert result.exit_code == 1 and "INCONSISTENT" in result.stdout


def test_leftovers_are_consistent_and_gc_makes_the_store_clean(client, make_settings):
    settings = make_settings()
    setup_repo(client, "acme/math")
    assert http_push(client, "acme/math", storage_form(delta_bytes(1))).status_code == 201
    pending = storage_form(delta_bytes(2))
    upload = client.post("/v1/repos/acme/math/uploads", json=pending.declaration()).json()
    assert client.put(upload["upload_url"], content=pending.data).status_code == 200  # never completed
    root = settings.data_dir / "blobs"
    (root / "staging" / ("f" * 32)).write_bytes(b"half")  # staged bytes of an upload row that is gone

    report = _fsck(settings)
    assert report.ok and not report.clean
    assert (report.pending_uploads, report.staging_leftovers) == (1, 1)

    later = utcnow() + dt.timedelta(seconds=settings.upload_ttl_seconds + settings.gc_grace_seconds + 60)
    assert _fsck(settings, now=later).stale_uploads == 1
    db = Database.from_url(settings.resolved_database_url)
    collect_garbage(db=db, store=open_blob_store(settings), settings=settings, now=later)
    db.dispose()
    report = _fsck(settings)
    assert report.clean and report.versions == 1 and report.pending_uploads == 0, report.details


def test_fsck_needs_an_admin(make_client):
    client = make_client(auth_enabled=True, admin_token="admin-secret")
    assert client.get("/v1/admin/fsck").status_code == 401
    assert client.get("/v1/admin/fsck", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
