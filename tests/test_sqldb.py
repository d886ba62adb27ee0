"""Servers starting together on one new PostgreSQL database (the replicas of `serve --replicas`
on a shared --jobs-db / --libraries-db do exactly that): each creates the tables it needs, and
none fails. ``CREATE TABLE IF NOT EXISTS`` races on PostgreSQL (the loser gets ``relation ...
already exists`` or a unique violation on ``pg_type``); `souverain.sqldb.create_schema` takes an
advisory lock first. Real PostgreSQL (scripts/postgres.sh), real stores, real threads."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from souverain.batch.store import BatchStore
from souverain.finetune.eval_runs import EvalRunStore
from souverain.finetune.lifecycle import LifecycleStore
from souverain.finetune.store import JobStore
from souverain.rag.library_db import LibraryDB
from souverain.sqldb import add_missing_columns, create_schema

STARTERS = 6  # processes starting at once; 2 already lost the race in CI


def fresh_database(pg_url: str) -> str:
    """A new, empty database on the test cluster: its URL."""
    name = f"race_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return pg_url.rsplit("/", 1)[0] + "/" + name


def start_together(n: int, start: Any) -> list[BaseException]:
    """``start(i)`` in ``n`` threads released by one barrier; the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            start(i)
        except BaseException as exc:  # noqa: BLE001 (collected, asserted on below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_servers_starting_together_on_a_new_jobs_database_all_open_it(
        pg_url: str, tmp_path: Path) -> None:
    url = fresh_database(pg_url)
    jobs: list[JobStore] = []
    others: list[Any] = []

    def start(i: int) -> None:  # what one server's start-up opens, in its order
        store = JobStore(url, root=tmp_path / str(i))
        jobs.append(store)
        BatchStore(store)
        others.append(LifecycleStore(engine=store.engine))
        others.append(EvalRunStore(engine=store.engine, root=tmp_path / str(i)))

    assert start_together(STARTERS, start) == []
    assert len(jobs) == STARTERS
    # and the database works: a file recorded through one server is read through another
    record = jobs[0].add_file(b'{"messages": []}\n', "t.jsonl", "fine-tune")
    assert jobs[-1].get_file(record.id).filename == "t.jsonl"
    for s in others + jobs:
        s.close()


def test_servers_starting_together_on_a_new_libraries_database_all_open_it(
        pg_url: str) -> None:
    url = fresh_database(pg_url)
    dbs: list[LibraryDB] = []
    assert start_together(STARTERS, lambda i: dbs.append(LibraryDB(url))) == []
    assert len(dbs) == STARTERS
    for d in dbs:
        d.close()


def test_a_column_added_since_the_database_was_made_is_added_once(pg_url: str) -> None:
    """An old database (a table without a newer column) opened by several servers at once:
    the column is added by one, and the others find it (no "column already exists")."""
    url = fresh_database(pg_url)
    old, new = sa.MetaData(), sa.MetaData()
    sa.Table("t", old, sa.Column("id", sa.Integer, primary_key=True))
    t_new = sa.Table("t", new, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("owner", sa.Text))
    engine = sa.create_engine(url)
    old.create_all(engine)

    def start(_i: int) -> None:
        e = sa.create_engine(url)
        try:
            create_schema(e, new, migrate=lambda conn: add_missing_columns(conn, [t_new]))
        finally:
            e.dispose()

    assert start_together(STARTERS, start) == []
    assert {c["name"] for c in sa.inspect(engine).get_columns("t")} == {"id", "owner"}
    engine.dispose()
