"""`run_job`: one batch job, from claimed (or adopted) to its final status.

Read the inputs (the job's files, its inline requests) -> recover the `Journal` (requests an
earlier run of this job finished) -> run the others, at most ``concurrency`` at once, each
result journaled (fsync) before it counts -> the output and error files (files API, purpose
``batch``) -> SUCCESS. Between requests, and every ``poll_s`` seconds, the job's status and
deadline are read: a cancel request stops it (in-flight requests aborted: CANCELLED), the
deadline too (TIMEOUT_EXCEEDED); both keep every result finished so far in their files. A
server that stops (its task cancelled) aborts its in-flight requests and leaves the job
RUNNING without an owner, for the next server to resume.

``execute(line) -> (status_code, JSON body)`` is the caller's: the server runs the body
through the service code of its interactive route (`souverain.server.batch`). It must not
raise for a bad request (a 4xx is an answer); whatever it raises fails the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from souverain.batch.lines import InputLine, Journal, read_lines, result_line
from souverain.batch.store import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    FAILED,
    SUCCESS,
    TIMEOUT_EXCEEDED,
    BatchJobRecord,
    BatchStore,
)
from souverain.finetune.store import JobsError

log = logging.getLogger("souverain.batch")

Execute = Callable[[InputLine], Awaitable[tuple[int, dict[str, Any]]]]


class _Stop(Exception):
    def __init__(self, status: str):
        self.status = status


def job_inputs(store: BatchStore, job: BatchJobRecord) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the job's input files, then its inline requests; a `JobsError`
    naming a file that is gone."""
    sources = []
    for file_id in job.input_files:
        rec = store.jobs.get_file(file_id)
        try:
            sources.append((rec.filename, Path(rec.path).read_bytes()))
        except OSError as exc:
            raise JobsError(f"The bytes of input file {file_id} ({rec.filename}) cannot be "
                            f"read ({exc.strerror}); upload it again and create a new "
                            "job.") from None
    if job.inline_path:
        sources.append(("requests", Path(job.inline_path).read_bytes()))
    return sources


async def run_job(store: BatchStore, job: BatchJobRecord, execute: Execute, *,
                  concurrency: int = 4, poll_s: float = 1.0,
                  clock: Callable[[], float] = time.time) -> str:
    """Run ``job`` (held by this process) to its final status, which it returns."""
    journal = Journal(store.job_dir(job.id) / "journal.jsonl")
    if job.status == CANCELLATION_REQUESTED:
        return await _finish(store, job, journal, CANCELLED)
    if clock() >= job.deadline:
        return await _finish(store, job, journal, TIMEOUT_EXCEEDED)
    try:
        lines = await asyncio.to_thread(lambda: read_lines(job_inputs(store, job)))
    except (JobsError, OSError) as exc:
        return await _finish(store, job, journal, FAILED, errors=[{"message": str(exc),
                                                                   "count": 1}])
    done = await asyncio.to_thread(journal.recover)
    if done:
        log.info("batch %s: resuming, %d of %d requests already done", job.id, len(done),
                 len(lines))
    run = _Run(store, job, journal, execute, concurrency, clock)
    try:
        await run.progress()
        watcher = asyncio.create_task(run.watch(poll_s))
        try:
            await run.all([line for line in lines if line.index not in done])
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    except _Stop as stop:
        await run.drain()
        return await _finish(store, job, journal, stop.status)
    except asyncio.CancelledError:  # the server stops: the next one resumes the job
        await asyncio.shield(run.drain())
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.to_thread(store.release, job.id))
        raise
    except Exception as exc:
        log.exception("batch %s failed", job.id)
        await run.drain()
        return await _finish(store, job, journal, FAILED, errors=[{
            "message": f"The batch stopped on an internal error ({type(exc).__name__}: "
                       f"{exc}); the server log has the details.", "count": 1}])
    return await _finish(store, job, journal, SUCCESS)


class _Run:
    """The requests of one job in flight (see `run_job`)."""

    def __init__(self, store: BatchStore, job: BatchJobRecord, journal: Journal,
                 execute: Execute, concurrency: int, clock: Callable[[], float]):
        self.store, self.job, self.journal = store, job, journal
        self.execute, self.concurrency, self.clock = execute, max(1, concurrency), clock
        self.in_flight: set[asyncio.Task[None]] = set()
        self.stop: str | None = None

    async def all(self, lines: list[InputLine]) -> None:
        for line in lines:
            while len(self.in_flight) >= self.concurrency:
                await asyncio.wait(set(self.in_flight), return_when=asyncio.FIRST_COMPLETED)
                self._check()
            self._check()
            task = asyncio.create_task(self.one(line))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        while self.in_flight:
            await asyncio.wait(set(self.in_flight), return_when=asyncio.FIRST_COMPLETED)
            self._check()
        self._check()

    async def drain(self) -> None:
        """Cancel the requests in flight and wait until they are gone (their engine requests
        aborted; a result already being journaled is written first)."""
        tasks = list(self.in_flight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _check(self) -> None:
        """Raise `_Stop` once the job must stop (in-flight requests cancelled first)."""
        if self.stop is not None:
            for t in self.in_flight:
                t.cancel()
            raise _Stop(self.stop)
        for t in list(self.in_flight):
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def one(self, line: InputLine) -> None:
        if line.problem is not None:
            status: int | None = None
            body: dict[str, Any] | None = None
        else:
            status, body = await self.execute(line)
        ok, out = result_line(self.job.id, line, status, body)
        # (a cancel that arrives during the write leaves the line journaled: it counts)
        await asyncio.shield(asyncio.to_thread(self.journal.append, line.index, ok, out))
        await self.progress()

    async def progress(self) -> None:
        """Live counters + heartbeat; a cancel request or the deadline sets ``stop``."""
        done, ok = self.journal.counts()
        try:
            status = await asyncio.to_thread(self.store.progress, self.job.id,
                                             completed=done, succeeded=ok, failed=done - ok)
        except JobsError:  # the database busy for a moment: counters catch up next time
            return
        if status == CANCELLATION_REQUESTED:
            self.stop = CANCELLED
        elif self.clock() >= self.job.deadline:
            self.stop = TIMEOUT_EXCEEDED
        if self.stop is not None:
            for t in self.in_flight:
                if t is not asyncio.current_task():
                    t.cancel()

    async def watch(self, poll_s: float) -> None:
        while self.stop is None:
            await asyncio.sleep(poll_s)
            await self.progress()


async def _finish(store: BatchStore, job: BatchJobRecord, journal: Journal, status: str, *,
                  errors: list[dict[str, Any]] | None = None) -> str:
    """Output and error files from the journal, final counters, then ``status``."""

    def finish() -> str:
        journal.recover()
        good, bad, ok, failed = journal.outputs() if journal.path.exists() else (b"", b"", 0, 0)
        current = store.get(job.id)
        out_id, err_id = current.output_file, current.error_file
        if out_id is None and good:
            out_id = store.jobs.add_file(good, f"batch-{job.id}-output.jsonl", "batch",
                                         sample_type="batch_result", num_lines=ok,
                                         mimetype="application/jsonl").id
        if err_id is None and bad:
            err_id = store.jobs.add_file(bad, f"batch-{job.id}-error.jsonl", "batch",
                                         sample_type="batch_error", num_lines=failed,
                                         mimetype="application/jsonl").id
        store.set_files(job.id, output_file=out_id, error_file=err_id)
        store.progress(job.id, completed=ok + failed, succeeded=ok, failed=failed)
        if not store.finish(job.id, status, errors=errors):
            return store.get(job.id).status  # (finished meanwhile by someone else)
        journal.path.unlink(missing_ok=True)
        log.info("batch %s: %s (%d succeeded, %d failed)", job.id, status, ok, failed)
        return status

    return await asyncio.shield(asyncio.to_thread(finish))
