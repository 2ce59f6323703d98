"""The schema exists only through migrations, the models agree with them, and the server refuses
an un-migrated database, naming the command that fixes it."""

from __future__ import annotations

import multiprocessing

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from typer.testing import CliRunner

from cli.main import app as cli_app
from registry.common.errors import SchemaOutOfDateError
from registry.server.app import create_app
from registry.server.db import Database
from registry.server.migrate import alembic_config, check_schema, current_revision, head_revision, upgrade
from registry.server.models import Base
from registry.server.settings import Settings
from tests.registry.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def _diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_models_and_migrations_agree(database_url):
    db = Database.from_url(database_url)
    upgrade(db.engine)
    assert current_revision(db.engine) == head_revision()
    assert _diff(db.engine) == []
    db.dispose()


def test_downgrade_removes_everything_and_upgrade_restores_it(database_url):
    db = Database.from_url(database_url)
    upgrade(db.engine)
    command.downgrade(alembic_config(db.engine), "base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(db.engine)
    assert _diff(db.engine) == []
    db.dispose()


def _upgrade_when_all_are_ready(url: str, ready, results) -> None:
    """One replica starting: `db upgrade` of `url` the moment every other one is ready too."""
    engine = Database.from_url(url).engine
    ready.wait()
    try:
        upgrade(engine)
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()


def test_replicas_upgrading_at_once_migrate_once(database_url):
    """Six processes upgrade one fresh database at the same instant (replicas starting together):
    every one succeeds and the schema is at head, matching the models (before the migrations took
    a lock, all but one failed: a duplicate key on PostgreSQL, "database is locked" on SQLite)."""
    ctx = multiprocessing.get_context("spawn")
    n = 6
    ready, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_upgrade_when_all_are_ready, args=(database_url, ready, results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * n
    db = Database.from_url(database_url)
    assert current_revision(db.engine) == head_revision()
    assert _diff(db.engine) == []
    db.dispose()


def test_constraints_are_named(database_url):
    db = Database.from_url(database_url)
    upgrade(db.engine)
    insp = inspect(db.engine)
    uniques = {u["name"] for u in insp.get_unique_constraints("versions")}
    assert "uq_versions_repository_id_number" in uniques
    fks = {fk["name"] for fk in insp.get_foreign_keys("versions")}
    assert {"fk_versions_repository_id_repositories", "fk_versions_blob_digest_blobs"} <= fks
    db.dispose()


def test_server_refuses_an_unmigrated_database(database_url, tmp_path):
    db = Database.from_url(database_url)
    with pytest.raises(SchemaOutOfDateError, match="deltactl db upgrade"):
        check_schema(db.engine)
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url))
    with pytest.raises(SchemaOutOfDateError, match="deltactl db upgrade"):
        with TestClient(app):
            pass
    db.dispose()


def test_cli_serve_refuses_and_db_upgrade_fixes(database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTASTORE_DATABASE_URL", database_url)
    monkeypatch.setenv("DELTASTORE_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["serve", "--port", "1"])
    assert refused.exit_code != 0
    assert "deltactl db upgrade" in refused.output

    assert runner.invoke(cli_app, ["db", "current"]).output.strip().endswith("none")
    upgraded = runner.invoke(cli_app, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    current = runner.invoke(cli_app, ["db", "current"])
    assert current.exit_code == 0 and head_revision() in current.output


# --- downgrades keep the data ------------------------------------------------------------------
def _fill_every_table(engine) -> None:
    """Rows in every table of the head schema, every column set somewhere (NULLs and non-ASCII
    text included), several children per parent: what a downgrade could lose."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from registry.server.models import (
        ApiToken,
        AuditEvent,
        BaseModel,
        Blob,
        Repository,
        Tag,
        TokenScope,
        Upload,
        Version,
    )

    t0 = dt.datetime(2026, 11, 26, 9, 30, 15, 123456, tzinfo=dt.timezone.utc)
    at = [t0 + dt.timedelta(minutes=i) for i in range(20)]
    with Session(engine) as s, s.begin():
        bases = [
            BaseModel(
                name="org/llama",
                fingerprint="sha256:" + "a" * 64,
                architecture="LlamaForCausalLM",
                parameter_count=8_030_261_248,
                config={"hidden_size": 4096, "rope": {"theta": 5e5}},
                created_by="admin",
                created_at=at[0],
            ),
            BaseModel(
                name="org/tiny", fingerprint="sha256:" + "b" * 64, created_by="admin", created_at=at[1]
            ),
        ]
        s.add_all(bases)
        s.flush()
        repos = [
            Repository(
                namespace="acme",
                name="math",
                base_model_id=bases[0].id,
                description="maths — ünïcode",
                visibility="public",
                next_version=3,
                created_by="alice",
                created_at=at[2],
            ),
            Repository(
                namespace="acme",
                name="code",
                base_model_id=bases[0].id,
                description="",
                visibility="private",
                next_version=2,
                created_by="bob",
                created_at=at[3],
            ),
            Repository(
                namespace="other",
                name="tiny",
                base_model_id=bases[1].id,
                description="x",
                visibility="public",
                next_version=1,
                created_by="carol",
                created_at=at[4],
            ),
        ]
        blobs = [
            Blob(
                digest=f"sha256:{c * 64}",
                store_key=f"blobs/sha256/{c * 64}",
                size=100 + i,
                raw_digest=f"sha256:{c.upper() * 64}",
                raw_size=1000 + i,
                created_at=at[5 + i],
            )
            for i, c in enumerate("cde")
        ]
        s.add_all(repos + blobs)
        s.flush()
        versions = [
            Version(
                repository_id=repos[0].id,
                upload_id="1" * 32,
                number=1,
                state="ready",
                blob_digest=blobs[0].digest,
                codec="bitdelta",
                dtype="bfloat16",
                bits=1,
                size_ratio=10.5,
                fidelity={"loss": 2.25},
                header_metadata={"calibration": '{"steps": 20}'},
                description="first",
                created_by="alice",
                created_at=at[6],
                ready_at=at[7],
            ),
            Version(
                repository_id=repos[0].id,
                upload_id=None,
                number=2,
                state="ready",
                blob_digest=blobs[1].digest,
                codec="deltadq",
                dtype="float16",
                bits=2,
                size_ratio=5.0,
                created_by="alice",
                created_at=at[8],
                ready_at=at[9],
            ),
            Version(
                repository_id=repos[1].id,
                upload_id="2" * 32,
                number=1,
                state="ready",
                blob_digest=blobs[0].digest,
                created_by="bob",
                created_at=at[10],
                ready_at=at[11],
            ),
            Version(repository_id=repos[0].id, state="pending", created_by="alice", created_at=at[12]),
            Version(repository_id=repos[2].id, state="pending", created_by="carol", created_at=at[13]),
        ]
        s.add_all(versions)
        s.flush()
        s.add_all(
            [
                Tag(
                    repository_id=repos[0].id,
                    name="latest",
                    version_id=versions[1].id,
                    updated_by="alice",
                    updated_at=at[9],
                ),
                Tag(
                    repository_id=repos[0].id,
                    name="prod",
                    version_id=versions[0].id,
                    updated_by="alice",
                    updated_at=at[10],
                ),
                Tag(
                    repository_id=repos[1].id,
                    name="latest",
                    version_id=versions[2].id,
                    updated_by="bob",
                    updated_at=at[11],
                ),
                Upload(
                    id="3" * 32,
                    version_id=versions[3].id,
                    digest=blobs[2].digest,
                    size=102,
                    raw_digest=blobs[2].raw_digest,
                    raw_size=1002,
                    method="s3-multipart",
                    multipart_id="mpu-1",
                    part_size=8 << 20,
                    received_size=None,
                    received_digest=None,
                    created_by="alice",
                    created_at=at[12],
                    expires_at=at[19],
                ),
                Upload(
                    id="4" * 32,
                    version_id=versions[4].id,
                    digest=blobs[1].digest,
                    size=101,
                    raw_digest=blobs[1].raw_digest,
                    raw_size=1001,
                    method="stream",
                    received_size=101,
                    received_digest=blobs[1].digest,
                    created_by="carol",
                    created_at=at[13],
                    expires_at=at[18],
                ),
            ]
        )
        tokens = [
            ApiToken(
                name="ci",
                token_hash="f" * 64,
                prefix="dst_ab",
                created_by="admin",
                created_at=at[14],
                expires_at=at[19],
            ),
            ApiToken(
                name="old",
                token_hash="e" * 64,
                prefix="dst_cd",
                created_by="admin",
                created_at=at[15],
                revoked_at=at[16],
            ),
            ApiToken(
                name="forever", token_hash="d" * 64, prefix="dst_ef", created_by="admin", created_at=at[16]
            ),
        ]
        s.add_all(tokens)
        s.flush()
        s.add_all(
            [
                TokenScope(token_id=tokens[0].id, namespace="acme", permission="write"),
                TokenScope(token_id=tokens[0].id, namespace="other", permission="read"),
                TokenScope(token_id=tokens[1].id, namespace="*", permission="admin"),
                TokenScope(token_id=tokens[2].id, namespace="acme", permission="read"),
                AuditEvent(at=at[7], actor="alice", action="push", target="acme/math", detail={"version": 1}),
                AuditEvent(at=at[16], actor="admin", action="revoke", target="token:2", detail=None),
            ]
        )


def _snapshot(engine) -> dict[str, list[dict]]:
    """Every row of every table but alembic_version, by table, in primary-key order."""
    from sqlalchemy import MetaData, select

    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for name, table in meta.tables.items():
            if name != "alembic_version":
                order = list(table.primary_key.columns)
                out[name] = [dict(row._mapping) for row in conn.execute(select(table).order_by(*order))]
    return out


def _project(
    snapshot: dict[str, list[dict]], columns: dict[str, set[str]], dropped_become_null=False
) -> dict:
    """`snapshot` as a schema with `columns` per table holds it (with `dropped_become_null`: the
    columns `columns` lacks come back as NULL, as after an upgrade re-adds them)."""
    out = {}
    for table, rows in snapshot.items():
        keep = columns[table]
        out[table] = [
            {k: (v if k in keep else None) for k, v in row.items()}
            if dropped_become_null
            else {k: v for k, v in row.items() if k in keep}
            for row in rows
        ]
    return out


def test_downgrades_and_upgrades_keep_every_row(database_url):
    """At head with rows in every table, downgrade one revision at a time to 0001 and back: after
    each step every row the schema can hold is still there with the same values (SQLite rebuilds
    api_tokens in 0002's downgrade; its token_scopes rows must survive the rebuild), and foreign
    keys are enforced again afterwards."""
    from sqlalchemy.exc import IntegrityError

    db = Database.from_url(database_url)
    upgrade(db.engine)
    _fill_every_table(db.engine)
    full = _snapshot(db.engine)
    assert all(len(rows) >= 2 for rows in full.values()) and len(full) == len(Base.metadata.tables), {
        t: len(r) for t, r in full.items()
    }
    head_columns = {t: set(rows[0]) for t, rows in full.items()}
    cfg = alembic_config(db.engine)
    received = {"received_raw_digest", "received_raw_size", "received_token"}
    for revision, gone in (
        ("0003", {"uploads": received}),
        ("0002", {"uploads": received, "versions": {"upload_id"}}),
        ("0001", {"uploads": received, "versions": {"upload_id"}, "api_tokens": {"expires_at"}}),
    ):
        command.downgrade(cfg, revision)
        assert current_revision(db.engine) == revision
        columns = {t: cols - gone.get(t, set()) for t, cols in head_columns.items()}
        now = _snapshot(db.engine)
        assert {t: len(r) for t, r in now.items()} == {t: len(r) for t, r in full.items()}, revision
        assert now == _project(full, columns), revision

    command.upgrade(cfg, "head")
    assert current_revision(db.engine) == head_revision() and _diff(db.engine) == []
    assert _snapshot(db.engine) == _project(full, columns, dropped_become_null=True)

    # The migrations leave foreign keys enforced (SQLite: switched off only while they ran).
    with db.engine.connect() as conn, pytest.raises(IntegrityError):
        conn.exec_driver_sql(
            "INSERT INTO token_scopes (token_id, namespace, permission) VALUES (999, 'x', 'read')"
        )
    db.dispose()
