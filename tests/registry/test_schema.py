"""The schema exists only through migrations, the models agree with them, and the server refuses
an un-migrated database, naming the command that fixes it."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from typer.testing import CliRunner

from cli.main import app as cli_app
from registry.app import create_app
from registry.db import Database
from registry.errors import SchemaOutOfDateError
from registry.models import Base
from registry.schema import alembic_config, check_schema, current_revision, head_revision, upgrade
from registry.settings import Settings

from .conftest import BACKENDS

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
