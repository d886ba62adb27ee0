"""The SQLite half of the document libraries: libraries and documents rows (``meta.sqlite``).

`LibraryDB` owns the connections (one per thread, WAL, foreign keys on) and every SQL
statement about libraries and documents; it returns `LibraryInfo` / `DocumentInfo` records, or
None where a row does not exist. Checking names, error messages, the document files and the
chunk table are `LibraryStore`'s (store.py).

Erasure is write-ahead: deleting a document (or a library) removes its rows and records an
``erasures`` row in the same transaction; the store then deletes the chunks and files and only
then drops the ``erasures`` row, so an erasure a crash interrupted is finished at the next
start (`pending_erasures`). The rows are the source of truth: what has no row is not shown.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

Status = Literal["todo", "in_progress", "done", "error"]

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS libraries (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    library_id TEXT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    name TEXT NOT NULL, mime_type TEXT, extension TEXT, size INTEGER NOT NULL,
    hash TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, number_of_pages INTEGER,
    tokens_processing_total INTEGER NOT NULL DEFAULT 0, nb_chunks INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '[]', source_path TEXT);
CREATE INDEX IF NOT EXISTS documents_by_name ON documents(library_id, name);
CREATE TABLE IF NOT EXISTS erasures (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('document', 'library')),
    library_id TEXT NOT NULL, requested_at TEXT NOT NULL);
"""


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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _document_info(row: sqlite3.Row) -> DocumentInfo:
    return DocumentInfo(
        row["id"],
        row["library_id"],
        row["name"],
        row["mime_type"],
        row["extension"],
        int(row["size"]),
        row["hash"],
        datetime.fromisoformat(row["created_at"]),
        datetime.fromisoformat(row["updated_at"]),
        row["status"],
        row["error"],
        row["number_of_pages"],
        int(row["tokens_processing_total"]),
        int(row["nb_chunks"]),
        json.loads(row["tags"]),
        row["source_path"],
    )


class LibraryDB:
    """Libraries and documents in one SQLite file. Thread-safe: each thread gets its own
    connection; writes run in ``BEGIN IMMEDIATE`` transactions (`tx`)."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.con().executescript(_SCHEMA_SQL)

    def con(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA synchronous=NORMAL")
            # deleted rows are overwritten, not left in free pages (names are personal data)
            con.execute("PRAGMA secure_delete=ON")
            self._local.con = con
            with self._lock:
                self._conns.append(con)
        return con

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        con = self.con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        """Close every connection (the database is unusable afterwards)."""
        with self._lock:
            for con in self._conns:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
            self._local = threading.local()

    # -- libraries ------------------------------------------------------------------------------

    def _library_info(self, row: sqlite3.Row) -> LibraryInfo:
        n, size = (
            self.con()
            .execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM documents WHERE library_id = ?",
                (row["id"],),
            )
            .fetchone()
        )
        return LibraryInfo(
            row["id"],
            row["name"],
            row["description"],
            datetime.fromisoformat(row["created_at"]),
            datetime.fromisoformat(row["updated_at"]),
            int(n),
            int(size),
        )

    def insert_library(self, library_id: str, name: str, description: str | None) -> None:
        """Raises `sqlite3.IntegrityError` when the name is taken."""
        now = now_iso()
        with self.tx() as con:
            con.execute(
                "INSERT INTO libraries VALUES (?, ?, ?, ?, ?)",
                (library_id, name, description, now, now),
            )

    def libraries(self) -> list[LibraryInfo]:
        rows = self.con().execute("SELECT * FROM libraries ORDER BY created_at, name").fetchall()
        return [self._library_info(r) for r in rows]

    def library(self, id_or_name: str) -> LibraryInfo | None:
        """The library with that id or, failing that, that name."""
        row = (
            self.con()
            .execute(
                "SELECT * FROM libraries WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                (id_or_name, id_or_name, id_or_name),
            )
            .fetchone()
        )
        return None if row is None else self._library_info(row)

    def update_library(self, library_id: str, name: str, description: str | None) -> None:
        """Raises `sqlite3.IntegrityError` when the name is taken."""
        with self.tx() as con:
            con.execute(
                "UPDATE libraries SET name = ?, description = ?, updated_at = ? WHERE id = ?",
                (name, description, now_iso(), library_id),
            )

    def document_ids(self, library_id: str) -> list[str]:
        rows = self.con().execute("SELECT id FROM documents WHERE library_id = ?", (library_id,))
        return [r[0] for r in rows]

    def delete_library(self, library_id: str) -> list[str]:
        """Delete the library's row and its documents' rows, and record their erasure (one
        transaction); returns the ids of the documents deleted."""
        now = now_iso()
        with self.tx() as con:
            ids = [r[0] for r in con.execute(
                "SELECT id FROM documents WHERE library_id = ?", (library_id,))]
            con.executemany(
                "INSERT OR REPLACE INTO erasures VALUES (?, 'document', ?, ?)",
                [(i, library_id, now) for i in ids])
            con.execute("INSERT OR REPLACE INTO erasures VALUES (?, 'library', ?, ?)",
                        (library_id, library_id, now))
            con.execute("DELETE FROM documents WHERE library_id = ?", (library_id,))
            con.execute("DELETE FROM libraries WHERE id = ?", (library_id,))
        return ids

    # -- documents ------------------------------------------------------------------------------

    def newest_document(
        self, library_id: str, name: str, sha256: str | None = None
    ) -> DocumentInfo | None:
        """The newest document of that name (and those bytes, given their ``sha256``)."""
        sql = "SELECT * FROM documents WHERE library_id = ? AND name = ?"
        args = [library_id, name]
        if sha256 is not None:
            sql += " AND hash = ?"
            args.append(sha256)
        row = self.con().execute(sql + " ORDER BY created_at DESC LIMIT 1", args).fetchone()
        return None if row is None else _document_info(row)

    def document(self, library_id: str, id_or_name: str) -> DocumentInfo | None:
        """The document with that id or, failing that, the newest of that name."""
        row = (
            self.con()
            .execute(
                "SELECT * FROM documents WHERE library_id = ? AND (id = ? OR name = ?) "
                "ORDER BY id = ? DESC, created_at DESC LIMIT 1",
                (library_id, id_or_name, id_or_name, id_or_name),
            )
            .fetchone()
        )
        return None if row is None else _document_info(row)

    def insert_document(self, values: dict[str, Any]) -> None:
        """A new document row (status 'todo'); its library's ``updated_at`` moves too."""
        cols = ", ".join(values)
        with self.tx() as con:
            con.execute(
                f"INSERT INTO documents ({cols}, status) "
                f"VALUES ({', '.join('?' for _ in values)}, 'todo')",
                tuple(values.values()),
            )
            con.execute(
                "UPDATE libraries SET updated_at = ? WHERE id = ?",
                (values["updated_at"], values["library_id"]),
            )

    def update_document(self, doc_id: str, **fields: Any) -> bool:
        """Set ``fields`` (column -> value) and ``updated_at``; False when the row is gone
        (the document was deleted)."""
        cols = {**fields, "updated_at": now_iso()}
        with self.tx() as con:
            cur = con.execute(
                f"UPDATE documents SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?",
                (*cols.values(), doc_id),
            )
            return cur.rowcount > 0

    def status(self, doc_id: str) -> Status | None:
        """The document's status, or None when it does not exist (any more)."""
        row = self.con().execute("SELECT status FROM documents WHERE id = ?", (doc_id,))
        found = row.fetchone()
        return None if found is None else found[0]

    def done_ids(self, doc_ids: Iterable[str]) -> set[str]:
        """Those of ``doc_ids`` whose document exists and is 'done' (searchable)."""
        ids, out = list(dict.fromkeys(doc_ids)), set[str]()
        con = self.con()
        for i in range(0, len(ids), 500):  # SQLite caps the number of parameters
            part = ids[i : i + 500]
            rows = con.execute(
                f"SELECT id FROM documents WHERE status = 'done' AND id IN "
                f"({', '.join('?' for _ in part)})", part)
            out.update(r[0] for r in rows)
        return out

    def unfinished(self) -> list[tuple[str, str]]:
        """(library id, document id) of every document 'todo' or 'in_progress', oldest first."""
        rows = self.con().execute(
            "SELECT library_id, id FROM documents WHERE status IN ('todo', 'in_progress') "
            "ORDER BY created_at, id")
        return [(r[0], r[1]) for r in rows.fetchall()]

    def all_documents(self) -> list[DocumentInfo]:
        """Every document of every library (for `LibraryStore.verify`)."""
        rows = self.con().execute("SELECT * FROM documents ORDER BY library_id, created_at")
        return [_document_info(r) for r in rows.fetchall()]

    def library_ids(self) -> set[str]:
        return {r[0] for r in self.con().execute("SELECT id FROM libraries")}

    def older_versions(self, doc: DocumentInfo) -> list[str]:
        """Ids of the other documents of ``doc``'s name in its library, created before it."""
        rows = self.con().execute(
            "SELECT id FROM documents WHERE library_id = ? AND name = ? AND id != ? AND "
            "created_at <= ?",
            (doc.library_id, doc.name, doc.id, doc.created_at.isoformat()),
        )
        return [r[0] for r in rows.fetchall()]

    def documents(
        self, library_id: str, search: str | None, offset: int, limit: int, order: str
    ) -> tuple[list[DocumentInfo], int]:
        """One page of a library's documents in ``order`` (an ORDER BY clause the caller
        checked), and how many there are; ``search`` matches a part of the name."""
        where, args = "library_id = ?", [library_id]
        if search:
            where += " AND name LIKE ? ESCAPE '\\'"
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        con = self.con()
        total = con.execute(f"SELECT COUNT(*) FROM documents WHERE {where}", args).fetchone()[0]
        rows = con.execute(
            f"SELECT * FROM documents WHERE {where} ORDER BY {order}, name, id "
            "LIMIT ? OFFSET ?",
            (*args, max(0, limit), max(0, offset)),
        )
        return [_document_info(r) for r in rows.fetchall()], int(total)

    def delete_document(self, doc_id: str) -> bool:
        """Delete the document's row and record its erasure (one transaction); False when
        there was no such row (the erasure is recorded all the same: it is idempotent)."""
        with self.tx() as con:
            row = con.execute("SELECT library_id FROM documents WHERE id = ?",
                              (doc_id,)).fetchone()
            con.execute("INSERT OR REPLACE INTO erasures VALUES (?, 'document', ?, ?)",
                        (doc_id, row[0] if row else "", now_iso()))
            cur = con.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            return cur.rowcount > 0

    # -- erasures -------------------------------------------------------------------------------

    def pending_erasures(self) -> list[tuple[str, str, str]]:
        """(kind, id, library id) of every erasure not finished yet, oldest first."""
        rows = self.con().execute(
            "SELECT kind, id, library_id FROM erasures ORDER BY requested_at, id")
        return [(r[0], r[1], r[2]) for r in rows.fetchall()]

    def erasure_done(self, ids: Iterable[str]) -> None:
        """The chunks and files of these erasures are gone: forget them, and move the WAL
        (which still holds the deleted rows' old pages) into the database and truncate it;
        best effort: a reader still on an old snapshot keeps it until the next erasure."""
        with self.tx() as con:
            con.executemany("DELETE FROM erasures WHERE id = ?", [(i,) for i in ids])
        self.con().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
