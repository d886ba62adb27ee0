"""The SQL half of the document libraries: libraries and documents rows, the erasures not
finished yet, and the processes that own work in them.

SQLAlchemy Core over ``sqlite:///PATH`` (default: ``meta.sqlite`` in the libraries folder; WAL,
foreign keys on, a busy timeout, deleted rows overwritten) or ``postgresql+psycopg://...``
(`souverain serve --libraries-db`: several servers share one set of libraries; its tables,
``libraries``, ``documents``, ``erasures`` and ``library_owners``, live beside the jobs
database's ``ft_*`` ones without clashing). A data folder made before these columns existed
opens unchanged: the missing ones are added (nullable).

`LibraryDB` owns every SQL statement about libraries and documents; it returns `LibraryInfo` /
`DocumentInfo` records, or None where a row does not exist. Checking names, error messages, the
document files and the chunk table are `LibraryStore`'s (store.py). Every transaction is short
(SQLite: a write starts with ``BEGIN IMMEDIATE``, a read with a deferred ``BEGIN`` that WAL never
blocks); nothing slow runs inside one.

Erasure is write-ahead: deleting a document (or a library) removes its rows and records an
``erasures`` row in the same transaction; the store then deletes the chunks and files and only
then drops the ``erasures`` row, so an erasure a crash interrupted is finished at the next
start (`pending_erasures`, `claim_erasures`). The rows are the source of truth: what has no row
is not shown.

Ownership (several processes on one database): a document queued or being ingested, and an
erasure under way, name their ``owner``, the token of the `LibraryStore` doing it; each store
with work registers a ``library_owners`` row (host, pid, heartbeat) and holds an `OwnerLock`
under the libraries folder. Work changes hands only by compare-and-set on its owner
(`claim_document`, `claim_erasures`), so two processes never both take it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from souverain.errors import RAGError
from souverain.sqldb import READ, add_missing_columns, create_schema, open_engine, safe_url

Status = Literal["todo", "in_progress", "done", "error"]

metadata = sa.MetaData()
libraries_t = sa.Table(
    "libraries", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("description", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False),  # ISO 8601, UTC (sorts as text)
    sa.Column("updated_at", sa.Text, nullable=False),
)
documents_t = sa.Table(
    "documents", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("library_id", sa.Text, sa.ForeignKey("libraries.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("mime_type", sa.Text),
    sa.Column("extension", sa.Text),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("number_of_pages", sa.Integer),
    sa.Column("tokens_processing_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("nb_chunks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tags", sa.Text, nullable=False, server_default="[]"),  # JSON list
    sa.Column("source_path", sa.Text),
    # the store that queued or is ingesting it ('todo', 'in_progress'); NULL: nobody
    sa.Column("owner", sa.Text),
    sa.Index("documents_by_name", "library_id", "name"),
)
erasures_t = sa.Table(
    "erasures", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, sa.CheckConstraint("kind IN ('document', 'library')"),
              nullable=False),
    sa.Column("library_id", sa.Text, nullable=False),
    sa.Column("requested_at", sa.Text, nullable=False),
    sa.Column("owner", sa.Text),  # the store finishing it; NULL: rows of older versions
)
owners_t = sa.Table(
    "library_owners", metadata,
    sa.Column("token", sa.String(64), primary_key=True),  # its `OwnerLock`'s token
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),  # its clock, epoch seconds
)


class NameTaken(Exception):
    """Another library has that name (names are unique)."""


@dataclass(frozen=True)
class LibraryInfo:
    id: str
    name: str
    description: str | None
    created_at: datetime
    updated_at: datetime
    nb_documents: int
    total_size: int


@dataclass(frozen=True)
class DocumentInfo:
    id: str
    library_id: str
    name: str
    mime_type: str | None
    extension: str | None
    size: int
    hash: str
    created_at: datetime
    updated_at: datetime
    status: Status
    error: str | None
    number_of_pages: int | None
    tokens_processing_total: int
    nb_chunks: int
    tags: list[str] = field(default_factory=list)
    source_path: str | None = None


@dataclass(frozen=True)
class Owner:
    """A `library_owners` row: a process that owns (or owned) work in the libraries."""

    token: str
    host: str
    pid: int
    heartbeat_at: float


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def default_url(root: Path) -> str:
    """The metadata of the libraries folder ``root``: its ``meta.sqlite``."""
    return f"sqlite:///{root / 'meta.sqlite'}"


def _document_info(row: Any) -> DocumentInfo:
    return DocumentInfo(
        row.id,
        row.library_id,
        row.name,
        row.mime_type,
        row.extension,
        int(row.size),
        row.hash,
        datetime.fromisoformat(row.created_at),
        datetime.fromisoformat(row.updated_at),
        row.status,
        row.error,
        row.number_of_pages,
        int(row.tokens_processing_total),
        int(row.nb_chunks),
        json.loads(row.tags),
        row.source_path,
    )


_DOC_COLUMNS = [c for c in documents_t.c if c.name != "owner"]


def _open_error(url: str, exc: BaseException) -> RAGError:
    if isinstance(exc, (sa.exc.ArgumentError, ImportError)):  # a bad URL or a missing driver
        return RAGError(f"Cannot open the libraries database {safe_url(url)} ({exc}); use "
                        "sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST/DB.")
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return RAGError(f"Cannot open the libraries database {safe_url(url)}: {reason}; check "
                    "that it is reachable, or pass another --libraries-db.")


class LibraryDB:
    """Libraries, documents, erasures and owners in one SQL database (see the module
    docstring). Thread-safe: every call takes a pooled connection for one short
    transaction."""

    def __init__(self, url: str | Path, busy_timeout_s: float = 30.0):
        """``url``: a SQLAlchemy URL, or the path of a SQLite file. Raises `RAGError` (one
        sentence) when the database cannot be opened."""
        self.url = url if isinstance(url, str) else f"sqlite:///{url}"
        try:
            self.engine = open_engine(self.url, busy_timeout_s, foreign_keys=True,
                                      secure_delete=True)  # (names are personal data)
            create_schema(self.engine, metadata, migrate=lambda conn: add_missing_columns(
                conn, [documents_t, erasures_t]))
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            raise _open_error(self.url, exc) from None
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self.engine.begin() as c:
            yield c

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (SQLite: deferred, which a writer never blocks)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READ: True})
            with conn.begin():
                yield conn

    def close(self) -> None:
        """Close every connection (the database is unusable afterwards)."""
        self.engine.dispose()

    # -- libraries ------------------------------------------------------------------------------

    def _libraries(self, where: Any = None, order: Any = None, limit: int | None = None
                   ) -> list[LibraryInfo]:
        d = documents_t
        counts = (sa.select(d.c.library_id, sa.func.count().label("n"),
                            sa.func.coalesce(sa.func.sum(d.c.size), 0).label("size"))
                  .group_by(d.c.library_id).subquery())
        q = (sa.select(libraries_t, counts.c.n, counts.c.size)
             .select_from(libraries_t.outerjoin(counts, counts.c.library_id == libraries_t.c.id)))
        if where is not None:
            q = q.where(where)
        q = q.order_by(*(order if order is not None else
                         (libraries_t.c.created_at, libraries_t.c.name)))
        if limit is not None:
            q = q.limit(limit)
        with self.read() as c:
            rows = c.execute(q).all()
        return [LibraryInfo(r.id, r.name, r.description, datetime.fromisoformat(r.created_at),
                            datetime.fromisoformat(r.updated_at), int(r.n or 0),
                            int(r.size or 0)) for r in rows]

    def insert_library(self, library_id: str, name: str, description: str | None) -> None:
        """Raises `NameTaken` when the name is taken."""
        now = now_iso()
        try:
            with self.tx() as c:
                c.execute(libraries_t.insert().values(
                    id=library_id, name=name, description=description, created_at=now,
                    updated_at=now))
        except sa.exc.IntegrityError:
            raise NameTaken(name) from None

    def libraries(self) -> list[LibraryInfo]:
        return self._libraries()

    def library(self, id_or_name: str) -> LibraryInfo | None:
        """The library with that id or, failing that, that name."""
        t = libraries_t
        found = self._libraries(sa.or_(t.c.id == id_or_name, t.c.name == id_or_name),
                                [sa.case((t.c.id == id_or_name, 0), else_=1)], 1)
        return found[0] if found else None

    def update_library(self, library_id: str, name: str, description: str | None) -> None:
        """Raises `NameTaken` when the name is taken."""
        try:
            with self.tx() as c:
                c.execute(libraries_t.update().where(libraries_t.c.id == library_id)
                          .values(name=name, description=description, updated_at=now_iso()))
        except sa.exc.IntegrityError:
            raise NameTaken(name) from None

    def document_ids(self, library_id: str) -> list[str]:
        with self.read() as c:
            return list(c.execute(sa.select(documents_t.c.id)
                                  .where(documents_t.c.library_id == library_id)).scalars())

    def delete_library(self, library_id: str, owner: str | None = None) -> list[str]:
        """Delete the library's row and its documents' rows, and record their erasure (one
        transaction, the erasures owned by ``owner``); returns the ids of the documents
        deleted."""
        now = now_iso()
        with self.tx() as c:
            ids = list(c.execute(sa.select(documents_t.c.id)
                                 .where(documents_t.c.library_id == library_id)).scalars())
            _record_erasures(c, [(i, "document", library_id) for i in ids]
                             + [(library_id, "library", library_id)], now, owner)
            c.execute(documents_t.delete().where(documents_t.c.library_id == library_id))
            c.execute(libraries_t.delete().where(libraries_t.c.id == library_id))
        return ids

    # -- documents ------------------------------------------------------------------------------

    def _documents(self, where: Any, order: Iterable[Any] = (), limit: int | None = None,
                   offset: int | None = None) -> list[DocumentInfo]:
        q = sa.select(*_DOC_COLUMNS).where(where).order_by(*order)
        if limit is not None:
            q = q.limit(limit)
        if offset is not None:
            q = q.offset(offset)
        with self.read() as c:
            return [_document_info(r) for r in c.execute(q).all()]

    def newest_document(
        self, library_id: str, name: str, sha256: str | None = None
    ) -> DocumentInfo | None:
        """The newest document of that name (and those bytes, given their ``sha256``)."""
        d = documents_t
        where = sa.and_(d.c.library_id == library_id, d.c.name == name)
        if sha256 is not None:
            where = sa.and_(where, d.c.hash == sha256)
        found = self._documents(where, [d.c.created_at.desc()], 1)
        return found[0] if found else None

    def document(self, library_id: str, id_or_name: str) -> DocumentInfo | None:
        """The document with that id or, failing that, the newest of that name."""
        d = documents_t
        found = self._documents(
            sa.and_(d.c.library_id == library_id,
                    sa.or_(d.c.id == id_or_name, d.c.name == id_or_name)),
            [sa.case((d.c.id == id_or_name, 0), else_=1), d.c.created_at.desc()], 1)
        return found[0] if found else None

    def insert_document(self, values: dict[str, Any], owner: str | None = None) -> None:
        """A new document row (status 'todo', queued by ``owner``); its library's
        ``updated_at`` moves too."""
        with self.tx() as c:
            c.execute(documents_t.insert().values(**values, status="todo", owner=owner))
            c.execute(libraries_t.update().where(libraries_t.c.id == values["library_id"])
                      .values(updated_at=values["updated_at"]))

    def update_document(self, doc_id: str, *, held_by: str | None = None,
                        **fields: Any) -> bool:
        """Set ``fields`` (column -> value) and ``updated_at``; False when the row is gone
        (the document was deleted) or, given ``held_by``, no longer owned by it. A status
        other than 'in_progress' releases the document (its owner is cleared)."""
        cols = {**fields, "updated_at": now_iso()}
        if cols.get("status") not in (None, "in_progress"):
            cols.setdefault("owner", None)
        where = documents_t.c.id == doc_id
        if held_by is not None:
            where = sa.and_(where, documents_t.c.owner == held_by)
        with self.tx() as c:
            return c.execute(documents_t.update().where(where).values(**cols)).rowcount > 0

    def status(self, doc_id: str) -> Status | None:
        """The document's status, or None when it does not exist (any more)."""
        found = self.holder(doc_id)
        return None if found is None else found[0]

    def holder(self, doc_id: str) -> tuple[Status, str | None] | None:
        """(status, owner) of the document, or None when it does not exist (any more)."""
        with self.read() as c:
            row = c.execute(sa.select(documents_t.c.status, documents_t.c.owner)
                            .where(documents_t.c.id == doc_id)).first()
        return None if row is None else (row[0], row[1])

    def claim_document(self, doc_id: str, owner: str, seen: tuple[str, str | None]) -> bool:
        """Mark the document 'in_progress', owned by ``owner``, if its (status, owner) are
        still ``seen`` (compare-and-set: of two processes, one wins)."""
        d = documents_t
        status, was = seen
        where = sa.and_(d.c.id == doc_id, d.c.status == status,
                        d.c.owner.is_(None) if was is None else d.c.owner == was)
        with self.tx() as c:
            return c.execute(d.update().where(where).values(
                status="in_progress", owner=owner, error=None, updated_at=now_iso())
            ).rowcount == 1

    def release_queued(self, owner: str) -> int:
        """Documents ``owner`` queued and did not start are anybody's again."""
        d = documents_t
        with self.tx() as c:
            return c.execute(d.update().where(d.c.owner == owner, d.c.status == "todo")
                             .values(owner=None)).rowcount

    def done_ids(self, doc_ids: Iterable[str]) -> set[str]:
        """Those of ``doc_ids`` whose document exists and is 'done' (searchable)."""
        ids, out = list(dict.fromkeys(doc_ids)), set[str]()
        d = documents_t
        with self.read() as c:
            for i in range(0, len(ids), 500):  # SQLite caps the number of parameters
                out.update(c.execute(sa.select(d.c.id).where(
                    d.c.status == "done", d.c.id.in_(ids[i : i + 500]))).scalars())
        return out

    def unfinished(self) -> list[tuple[str, str, str | None]]:
        """(library id, document id, owner) of every document 'todo' or 'in_progress',
        oldest first."""
        d = documents_t
        with self.read() as c:
            rows = c.execute(sa.select(d.c.library_id, d.c.id, d.c.owner)
                             .where(d.c.status.in_(("todo", "in_progress")))
                             .order_by(d.c.created_at, d.c.id)).all()
        return [(r[0], r[1], r[2]) for r in rows]

    def all_documents(self) -> list[DocumentInfo]:
        """Every document of every library (for `LibraryStore.verify`)."""
        d = documents_t
        return self._documents(sa.true(), [d.c.library_id, d.c.created_at])

    def library_ids(self) -> set[str]:
        with self.read() as c:
            return set(c.execute(sa.select(libraries_t.c.id)).scalars())

    def older_versions(self, doc: DocumentInfo) -> list[str]:
        """Ids of the other documents of ``doc``'s name in its library, created before it."""
        d = documents_t
        with self.read() as c:
            return list(c.execute(sa.select(d.c.id).where(
                d.c.library_id == doc.library_id, d.c.name == doc.name, d.c.id != doc.id,
                d.c.created_at <= doc.created_at.isoformat())).scalars())

    def documents(
        self, library_id: str, search: str | None, offset: int, limit: int, order: str
    ) -> tuple[list[DocumentInfo], int]:
        """One page of a library's documents in ``order`` (``"<column> ASC|DESC"``, a column
        the caller checked), and how many there are; ``search`` matches a part of the name."""
        d = documents_t
        where = d.c.library_id == library_id
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where = sa.and_(where, d.c.name.like(f"%{escaped}%", escape="\\"))
        column, direction = order.split()
        key = d.c[column].desc() if direction.upper() == "DESC" else d.c[column].asc()
        with self.read() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(d).where(where)).scalar()
        page = self._documents(where, [key, d.c.name, d.c.id], max(0, limit), max(0, offset))
        return page, int(total or 0)

    def delete_document(self, doc_id: str, owner: str | None = None) -> bool:
        """Delete the document's row and record its erasure, owned by ``owner`` (one
        transaction); False when there was no such row (the erasure is recorded all the same:
        it is idempotent)."""
        with self.tx() as c:
            lib = c.execute(sa.select(documents_t.c.library_id)
                            .where(documents_t.c.id == doc_id)).scalar()
            _record_erasures(c, [(doc_id, "document", lib or "")], now_iso(), owner)
            return c.execute(documents_t.delete().where(documents_t.c.id == doc_id)
                             ).rowcount > 0

    # -- erasures -------------------------------------------------------------------------------

    def pending_erasures(self) -> list[tuple[str, str, str, str | None]]:
        """(kind, id, library id, owner) of every erasure not finished yet, oldest first."""
        e = erasures_t
        with self.read() as c:
            rows = c.execute(sa.select(e.c.kind, e.c.id, e.c.library_id, e.c.owner)
                             .order_by(e.c.requested_at, e.c.id)).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def claim_erasures(self, owner: str, alive: Callable[[str], bool], own: bool = True
                       ) -> list[tuple[str, str, str]]:
        """Take over the erasures whose owner is gone (or, with ``own``, ``owner``'s own, left
        unfinished; ``alive(owner)`` must then say True):
        (kind, id, library id) of those taken; one compare-and-set each on its owner, so of
        two processes finishing erasures, each takes a different one."""
        e = erasures_t
        out = []
        for kind, i, lib, was in self.pending_erasures():
            if was is not None and (was != owner or not own) and alive(was):
                continue  # under way in a live process
            with self.tx() as c:
                res = c.execute(e.update().where(
                    e.c.id == i, e.c.owner.is_(None) if was is None else e.c.owner == was)
                    .values(owner=owner))
            if res.rowcount == 1:
                out.append((kind, i, lib))
        return out

    def erasure_done(self, ids: Iterable[str]) -> None:
        """The chunks and files of these erasures are gone: forget them. SQLite: then move the
        WAL (which still holds the deleted rows' old pages) into the database and truncate it;
        best effort: a reader still on an old snapshot keeps it until the next erasure."""
        keys = list(ids)
        with self.tx() as c:
            for n in range(0, len(keys), 500):
                c.execute(erasures_t.delete().where(erasures_t.c.id.in_(keys[n : n + 500])))
        if self.is_sqlite:
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                cur.fetchall()
                cur.close()
            finally:
                raw.close()

    # -- owners ---------------------------------------------------------------------------------

    def register_owner(self, token: str, host: str, pid: int) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(owners_t.insert().values(token=token, host=host, pid=pid,
                                               started_at=now, heartbeat_at=now))

    def beat(self, token: str, host: str, pid: int) -> None:
        """``token`` is alive now (its row made again if someone pruned it)."""
        now = time.time()
        with self.tx() as c:
            if c.execute(owners_t.update().where(owners_t.c.token == token)
                         .values(heartbeat_at=now)).rowcount == 0:
                c.execute(owners_t.insert().values(token=token, host=host, pid=pid,
                                                   started_at=now, heartbeat_at=now))

    def owner(self, token: str) -> Owner | None:
        with self.read() as c:
            r = c.execute(owners_t.select().where(owners_t.c.token == token)).first()
        return None if r is None else Owner(r.token, r.host, int(r.pid), float(r.heartbeat_at))

    def drop_owner(self, token: str) -> None:
        with self.tx() as c:
            c.execute(owners_t.delete().where(owners_t.c.token == token))

    def prune_owners(self, alive: Callable[[str], bool]) -> int:
        """Forget the owners that are gone and own nothing any more."""
        with self.read() as c:
            tokens = list(c.execute(sa.select(owners_t.c.token)).scalars())
            used = set(c.execute(sa.select(documents_t.c.owner).distinct()).scalars()) | set(
                c.execute(sa.select(erasures_t.c.owner).distinct()).scalars())
        gone = [t for t in tokens if t not in used and not alive(t)]
        if gone:
            with self.tx() as c:
                c.execute(owners_t.delete().where(owners_t.c.token.in_(gone)))
        return len(gone)


def _record_erasures(c: Connection, items: list[tuple[str, str, str]], now: str,
                     owner: str | None) -> None:
    """(id, kind, library id) erasures, replacing any recorded before under those ids."""
    ids = [i for i, _, _ in items]
    for n in range(0, len(ids), 500):
        c.execute(erasures_t.delete().where(erasures_t.c.id.in_(ids[n : n + 500])))
    if items:
        c.execute(erasures_t.insert(), [
            {"id": i, "kind": kind, "library_id": lib, "requested_at": now, "owner": owner}
            for i, kind, lib in items])
