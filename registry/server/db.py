"""Engines and sessions for SQLite (WAL, foreign keys on, BEGIN IMMEDIATE for writers) and
PostgreSQL (psycopg 3), and the schema check the server runs before it starts.

    db = Database.from_url("sqlite:///reg.db")
    with db.write() as session:   # one transaction; on SQLite it holds the write lock from BEGIN
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

#: Execution option of SQLite connections whose transactions write: they begin IMMEDIATE (see below).
BEGIN_IMMEDIATE = "deltastore_begin_immediate"


def _sqlite_engine(url: str, *, echo: bool) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, echo=echo, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=16
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy emit BEGIN itself (below), so writers can take the lock up front.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY when
        # another writer committed in between; writers therefore begin IMMEDIATE and queue instead.
        immediate = conn.get_execution_options().get(BEGIN_IMMEDIATE)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def create_db_engine(url: str, *, echo: bool = False) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url, echo=echo)
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """One engine and two session factories: readers, and writers that serialize per transaction."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False, autoflush=False)
        writer = engine.execution_options(**{BEGIN_IMMEDIATE: True})
        self._write = sessionmaker(writer, expire_on_commit=False, autoflush=False)

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False) -> Database:
        return cls(create_db_engine(url, echo=echo))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction committed on success, rolled back on any exception."""
        with self._write() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
