"""Alembic environment: runs on the engine handed in by registry.schema, or on sqlalchemy.url.

On SQLite, foreign keys are switched off while the migrations run (and on again afterwards): a
batch migration rebuilds a table by copying it and dropping the original, and with foreign keys
on, that DROP deletes (ON DELETE CASCADE) every row of the tables referencing it. Before the
migrations commit, `PRAGMA foreign_key_check` must find no dangling reference.

Concurrent upgrades (replicas that all run `deltactl db upgrade` as they start) migrate once:
the others wait, then find the schema at head and do nothing. On PostgreSQL the migrations hold a
transaction-scoped advisory lock taken before the current revision is read; on SQLite their
transaction begins IMMEDIATE (it holds the write lock from the start, and the others queue).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from registry.server.db import BEGIN_IMMEDIATE, create_db_engine
from registry.server.models import Base

config = context.config
target_metadata = Base.metadata
#: The advisory lock key of deltastore's migrations: a fixed 63-bit number (the bytes of "dltastor").
MIGRATION_LOCK_KEY = int.from_bytes(b"dltastor", "big") >> 1


def _sqlite_foreign_keys(connection, on: bool) -> None:
    """Set SQLite's foreign-key enforcement on the raw DBAPI connection, outside any transaction
    (SQLite ignores the pragma inside one), and check that it took effect."""
    raw = connection.connection.dbapi_connection
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    (state,) = raw.execute("PRAGMA foreign_keys").fetchone()
    if bool(state) != on:
        raise RuntimeError(
            f"could not turn SQLite foreign keys {'on' if on else 'off'} for the migrations "
            "(was a transaction open on the connection?)"
        )


def _check_foreign_keys(connection) -> None:
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if dangling:
        raise RuntimeError(f"the migrations would leave rows referencing missing rows: {dangling[:10]}")


def _run(connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Released at commit or rollback; SQLite's migrations already hold its one write lock.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()
        if sqlite:
            _check_foreign_keys(connection)


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")  # set by registry.schema
    if engine is None:
        engine = create_db_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            _run(conn)
            conn.commit()
            return
        _sqlite_foreign_keys(conn, on=False)
        conn.execution_options(**{BEGIN_IMMEDIATE: True})
        try:
            _run(conn)
            conn.commit()
        finally:
            conn.rollback()  # nothing open after a commit; after a failure, the pragma needs no transaction
            _sqlite_foreign_keys(conn, on=True)  # the connection goes back to the engine's pool


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
