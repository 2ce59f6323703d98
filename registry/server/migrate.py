"""The migrations of migrations/ applied from code: upgrade, current revision, and the check
that refuses to serve an out-of-date schema (naming the command that fixes it).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from registry.common.errors import SchemaOutOfDateError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
FIX_COMMAND = "deltactl db upgrade"


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for `migrations/` that runs on `engine` (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is None:
        return cfg
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDateError unless the database is at the migrations' head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDateError(
            f"the database {engine.url.render_as_string(hide_password=True)} "
            f"{_state(current)}, but this server needs "
            f"revision {head}; run `{FIX_COMMAND}` (with the same DELTASTORE_DATABASE_URL) and start again"
        )


def running_schema_error(engine: Engine) -> SchemaOutOfDateError | None:
    """For a running server whose database fell behind (or moved past) its code: the error to
    answer with, naming neither the database nor its address; None when the schema is at head."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    return SchemaOutOfDateError(
        f"the registry's database {_state(current)}, but this "
        f"server needs revision {head}; run `{FIX_COMMAND}` "
        "with this server's DELTASTORE_DATABASE_URL"
    )


def _state(current: str | None) -> str:
    return "has no deltastore schema" if current is None else f"is at schema revision {current}"
