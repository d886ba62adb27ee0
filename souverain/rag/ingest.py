"""Add files and folders to a library, one file at a time, resumably.

Folders are walked recursively (hidden files and folders skipped, only supported extensions,
symlinked folders not followed). Each file is read, hashed and added on its own, so memory
stays bounded by the largest file. A file already in the library under the same name with the
same bytes and status 'done' is skipped: re-running after Ctrl-C or a crash finishes the rest.

A document's name is its path relative to the folder given (with the folder's own name in
front: ``contracts/2024/acme.pdf``), or the file name for a file given directly, so adding
the same folder again from anywhere finds the same documents.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from souverain.errors import RAGError
from souverain.rag.parse import SUPPORTED_EXTENSIONS
from souverain.rag.store import LibraryStore

MAX_BYTES = 100 * 1024 * 1024

# progress(done, total, path): called before each file (path) and once at the end (None)
Progress = Callable[[int, int, "Path | None"], None]


@dataclass
class IngestReport:
    added: list[Path] = field(default_factory=list)
    updated: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.failed)} failed"
        )


def _check_root(path: Path, shown: Path, roots: list[Path] | None) -> None:
    if roots is not None and not any(path == r or path.is_relative_to(r) for r in roots):
        raise RAGError(
            f"{shown} is outside the allowed folders "
            f"({', '.join(str(r) for r in roots)}); move it there or allow its "
            "folder."
        )


def _walk(folder: Path) -> Iterator[Path]:
    """Supported, non-hidden files under `folder`, in a stable order, lazily."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED_EXTENSIONS:
                yield Path(dirpath) / f


def _targets(paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    """(file as given or found, document name) for every file to ingest."""
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for f in _walk(p):
                yield f, (Path(p.resolve().name) / f.relative_to(p)).as_posix()
        else:
            yield p, p.name


def ingest_paths(
    store: LibraryStore,
    library: str,
    paths: list[Path],
    *,
    allowed_roots: list[Path] | None = None,
    tags: Iterable[str] = (),
    progress: Progress | None = None,
    max_bytes: int = MAX_BYTES,
) -> IngestReport:
    """Add files and folders (recursively) to `library`; see the module docstring.

    A path (or, after resolving symlinks, a file found in a folder) outside `allowed_roots`
    is a `RAGError`; so is a missing path or an unknown library, before anything is added.
    A file that cannot be added (too large, unsupported, corrupt, empty) is listed in
    `failed` with its sentence and the others go on."""
    lib = store.get_library(library)
    roots = (
        None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
    )
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise RAGError(f"{p}: no such file or folder; check the path.")
        _check_root(p.resolve(), p, roots)
    tags = list(tags)
    total = sum(1 for _ in _targets(paths))  # names only: cheap, and gives the bar its length
    report = IngestReport()
    for done, (path, name) in enumerate(_targets(paths)):
        if progress:
            progress(done, total, path)
        real = path.resolve()
        try:
            _check_root(real, path, roots)
            size = real.stat().st_size
            if size > max_bytes:
                raise RAGError(
                    f"{path} is {size / 2**20:.1f} MiB, over the "
                    f"{max_bytes / 2**20:g} MiB limit per file; split it or raise "
                    "the limit."
                )
            data = real.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            previous = store.find_document(lib.id, name)
            if previous is not None and previous.hash == digest and previous.status == "done":
                report.unchanged.append(path)
                continue
            doc = store.add_document(lib.id, data, name, tags=tags, source_path=str(real))
            del data
        except RAGError as exc:
            report.failed.append((path, str(exc)))
            continue
        except OSError as exc:
            why = f"{path}: cannot be read ({exc.strerror or exc}); check its permissions."
            report.failed.append((path, why))
            continue
        if doc.status != "done":
            report.failed.append((path, doc.error or f"{path}: processing did not finish."))
        elif previous is not None and previous.hash != digest:
            report.updated.append(path)
        else:
            report.added.append(path)
    store.optimize()
    if progress:
        progress(total, total, None)
    return report
