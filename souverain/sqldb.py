"""The SQL databases' common ground: one way to open an engine on ``sqlite:///PATH`` or
``postgresql+psycopg://...`` and one way to create their tables, shared by the fine-tuning and
batch jobs database (`souverain.finetune.jobs_db`) and the libraries' metadata
(`souverain.rag.library_db`).

SQLite: the folder is created; WAL, so readers never wait for the writer; a write transaction
starts with ``BEGIN IMMEDIATE`` (a deferred one that upgrades later can fail at once with
"database is locked" when another process writes), a read-only one (a connection with the
``READ`` execution option) with a plain deferred ``BEGIN``, which WAL never blocks.

PostgreSQL: connections are checked before use and time out when the server is unreachable.
Creating tables takes a transaction-level advisory lock first: servers (or the replicas of
``serve --replicas``) starting together on a new database would otherwise race, since
``CREATE TABLE IF NOT EXISTS`` is not atomic there (the loser gets ``relation ... already
exists`` or a unique violation on ``pg_type``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

READ = "souverain_read_only"  # execution option of a connection that only reads
# pg_advisory_xact_lock's key for creating or migrating souverain's tables (any bigint: this
# one is "souv" in ASCII, unlikely to meet another application's key on a shared database)
SCHEMA_LOCK_KEY = 0x736F7576


def safe_url(url: str) -> str:
    """The URL without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url.rsplit("@", 1)[-1]


def open_engine(url: str, busy_timeout_s: float = 30.0, *, foreign_keys: bool = False,
                secure_delete: bool = False) -> Engine:
    """An engine on ``url`` (see the module docstring). SQLite waits up to ``busy_timeout_s``
    for another writer's lock; ``foreign_keys`` and ``secure_delete`` (deleted rows
    overwritten, for personal data) turn on those pragmas. Raises
    `sqlalchemy.exc.ArgumentError` or `ImportError` for a bad URL or a missing driver."""
    if not url.startswith("sqlite"):
        connect = {"connect_timeout": max(1, int(busy_timeout_s))} \
            if url.startswith("postgresql") else {}
        return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=20,
                                connect_args=connect)
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s},
                              pool_size=5, max_overflow=20)
    pragmas = ["journal_mode=WAL", f"busy_timeout={int(busy_timeout_s * 1000)}",
               "synchronous=NORMAL"]
    pragmas += ["foreign_keys=ON"] if foreign_keys else []
    pragmas += ["secure_delete=ON"] if secure_delete else []

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi: Any, _record: Any) -> None:
        dbapi.isolation_level = None  # BEGIN is ours (below)
        cur = dbapi.cursor()
        for pragma in pragmas:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # a writer takes the write lock up front; a reader never asks for it
        read = conn.get_execution_options().get(READ, False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


def add_missing_columns(conn: Connection, tables: Iterable[sa.Table]) -> None:
    """Columns added to ``tables`` since the database was created (``create_all`` only creates
    missing tables): ``ALTER TABLE ... ADD COLUMN`` each (they are all nullable)."""
    inspector = sa.inspect(conn)
    for table in tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have:
                kind = col.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {kind}")


def create_schema(engine: Engine, metadata: sa.MetaData,
                  tables: list[sa.Table] | None = None,
                  migrate: Callable[[Connection], None] | None = None) -> None:
    """Create the missing ``tables`` of ``metadata`` (all when None), then ``migrate`` (e.g.
    `add_missing_columns`), in one transaction; on PostgreSQL under the advisory lock
    `SCHEMA_LOCK_KEY`, so that processes starting together do not race (SQLite's ``BEGIN
    IMMEDIATE`` already serialises them)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                         {"key": SCHEMA_LOCK_KEY})
        metadata.create_all(conn, tables=tables)
        if migrate is not None:
            migrate(conn)
