"""`AsyncLLMEngine`: the engine on a background thread, one async stream per request.

The engine loop runs in its own thread (torch releases the GIL inside its kernels, so the
event loop stays responsive); requests are encoded and validated in the caller, so bad input
raises at once, then handed over through a queue. Leaving the ``async for`` early (client
disconnect, ``break``, cancellation) aborts the request and frees its KV blocks immediately.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq

from souverain.engine.config import EngineConfig
from souverain.engine.engine import LLMEngine
from souverain.engine.sampling import SamplingParams
from souverain.engine.sequence import RequestOutput
from souverain.errors import RequestError
from souverain.models.loader import ProgressFn
from souverain.tokenizer import Tokenizer
from souverain.weights.adapter import LoRAAdapter


class AsyncLLMEngine:
    def __init__(self, model: str | os.PathLike[str] = "smollm2-135m-instruct",
                 config: EngineConfig | None = None, progress: ProgressFn | None = None,
                 engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(model, config, progress)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="souverain-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    async def generate(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                       request_id: str | None = None, *,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a `RequestOutput` after every step that advanced this request, the last one
        with ``finished=True``. ``lora``: a loaded adapter's name (see `add_lora`)."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        req = self.engine.prepare_request(request_id, prompt, params, lora=lora)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if req.request_id in self._streams:
                raise RequestError(f"request id {req.request_id!r} is already in use.")
            self._streams[req.request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", req))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(req.request_id, None)
            if not finished:
                self.abort(req.request_id)

    def add_lora(self, name: str, adapter: LoRAAdapter | str | os.PathLike[str]) -> None:
        """`LLMEngine.add_lora` (thread-safe; blocks for at most one engine step)."""
        self.engine.add_lora(name, adapter)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._closed = True
        self._commands.put(("stop", None))
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.close()  # the tensor-parallel ranks, if any

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while True:
            while True:
                try:
                    kind, arg = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "stop":
                    return
                if kind == "add":
                    if arg.request_id in engine.requests:
                        self._deliver(arg.request_id, RuntimeError("duplicate request id"))
                    else:
                        try:
                            engine.submit(arg)
                        except RequestError as exc:  # its adapter was evicted meanwhile
                            self._deliver(arg.request_id, exc)
                elif kind == "abort":
                    engine.abort(arg)
            if not engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except BaseException as exc:  # a bug, not bad input: fail every open stream loudly
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    self._deliver(request_id, exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return  # the consumer left; its abort is already queued
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's event loop is closed
