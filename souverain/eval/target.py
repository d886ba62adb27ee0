"""`ApiTarget`: the `Target` of every suite, over La Plateforme's HTTP API; `local_server`: a
real `souverain serve` subprocess for a local model, so that a local model is evaluated through
exactly the API a user's clients call.

Only the standard library (urllib, threads): the evaluation needs no HTTP client package.

Scoring text (`loglikelihood`, `loglikelihood_rolling`) uses OpenAI's legacy completions as
lm-evaluation-harness's ``local-completions`` does: ``POST /v1/completions`` with ``echo=true``,
``logprobs=1`` and ``max_tokens=0`` returns every prompt token with its logprob (the first
token, BOS where the tokenizer adds one, has none: ``null``).

Which tokens are the continuation's. lm-eval's convention (``TemplateLM._encode_pair``):
trailing whitespace of the context moves to the front of the continuation, then
``whole = tok(context + continuation)``, ``ctx = tok(context)`` and the continuation's tokens
are ``whole[len(ctx):]``. The client has no tokenizer, so each request sends the context alone
as well (one extra prompt per distinct context in the same HTTP call): its token count is
``len(ctx)``. The server's ``text_offset`` is not used: it accumulates token piece lengths,
which count BOS's ``<s>`` and SentencePiece's leading space, so it does not index into the
text. Where the boundary merges (the context's last token and the continuation's first
become one token, e.g. a context ending in the middle of a word), ``whole`` does not start
with ``ctx``: the split is then their longest common token prefix, so the merged token and
everything after it are scored as the continuation (the one token that carries the
continuation's first characters is never dropped). An empty context scores the continuation
after BOS (the tokenizer must add one: otherwise the first token has no logprob and the
request is refused with an `EvalError`).

Errors: 429 / 502 / 503 are retried after ``Retry-After`` (at most ``retries`` times); any
other refusal is an `EvalError` naming the endpoint, the server's message and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from souverain.eval import EvalError
from souverain.eval.http_scorer import _error_message, _retry_after
from souverain.eval.suite import ChatAnswer, Message

RETRYABLE = (429, 502, 503)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Scored:
    """One echoed prompt: its tokens' text pieces, logprobs (None for the first) and whether
    each token is the model's most likely one there."""

    tokens: list[str]
    logprobs: list[float | None]
    greedy: list[bool]


class NotFound(EvalError):
    """The server answered 404 (an unknown model or route)."""


def base_url(url: str) -> str:
    """``http(s)://host:port/v1`` for a URL given with or without ``/v1``."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EvalError(f"{url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    return base if base.endswith("/v1") else base + "/v1"


class ApiTarget:
    """A model behind La Plateforme's API (`souverain serve`, or any compatible server)."""

    def __init__(self, url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 300.0, *, concurrency: int = 4, retries: int = 5,
                 moderation_model: str = "mistral-moderation-latest",
                 batch_size: int = 16) -> None:
        self.url = base_url(url)
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.moderation_model = moderation_model
        self.batch_size = max(1, batch_size)

    def __repr__(self) -> str:
        return f"ApiTarget({self.url!r}, {self.model!r})"

    # -- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """One JSON call (``path`` below ``/v1``), retried on 429/502/503."""
        endpoint = self.url + path
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(payload).encode("utf-8")
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(endpoint, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                status, message = exc.code, _error_message(exc.read())
                if status in RETRYABLE and attempt < self.retries:
                    time.sleep(_retry_after(exc.headers.get("Retry-After"), attempt))
                    continue
                cls = NotFound if status == 404 else EvalError
                raise cls(self._refusal(endpoint, status, message)) from None
            except urllib.error.URLError as exc:
                raise EvalError(f"cannot reach {endpoint} ({exc.reason}); start the server "
                                f"(`souverain serve MODEL`) or fix the URL") from None
            except TimeoutError:
                raise EvalError(f"{endpoint} did not answer within {self.timeout_s:g} s; "
                                f"raise the timeout or lower the concurrency") from None
            try:
                return json.loads(body)
            except ValueError:
                raise EvalError(f"{endpoint} answered something that is not JSON; is the "
                                f"URL a La Plateforme-compatible server?") from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _refusal(self, endpoint: str, status: int, message: str) -> str:
        fix = {401: "pass an API key (--api-key or MISTRAL_API_KEY)",
               403: "use a key allowed for this model, or run on the server's machine",
               404: "check the model id (GET /v1/models lists the served models) and the URL"}
        return (f"{endpoint} refused the request (HTTP {status}: {message}); "
                f"{fix.get(status, 'see the server message')}")

    def post(self, path: str, payload: dict[str, Any]) -> Any:
        return self.request("POST", path, payload)

    # -- Target ----------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, response_format: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | None = None,
             extra: dict[str, Any] | None = None) -> ChatAnswer:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                "max_tokens": max_tokens, "temperature": temperature}
        if response_format is not None:
            body["response_format"] = response_format
        if tools is not None:
            body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        body.update(extra or {})
        start = time.perf_counter()
        answer = self.post("/chat/completions", body)
        latency = time.perf_counter() - start
        try:
            choice = answer["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"{self.url}/chat/completions answered without choices[0].message; "
                            f"expected La Plateforme's chat completion") from None
        calls = []
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            args: Any = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    pass  # kept as the model wrote it: the suite scores it as invalid
            calls.append({"name": fn.get("name"), "arguments": args})
        content = message.get("content")
        if isinstance(content, list):  # content chunks: the text ones, joined
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        return ChatAnswer(text=content or "", tool_calls=calls,
                          finish_reason=choice.get("finish_reason") or "stop",
                          latency_s=latency, usage=dict(answer.get("usage") or {}))

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> str:
        """A raw completion of ``prompt`` (no chat template), for generation tasks."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompt,
                                "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = list(stop)[:4]  # OpenAI's limit; the caller cuts at the others
        answer = self.post("/completions", body)
        text = answer["choices"][0]["text"]
        for s in stop or ():
            if s and s in text:
                text = text[:text.index(s)]
        return str(text)

    def _score(self, prompts: list[str]) -> list[Scored]:
        """Each prompt's tokens, their logprobs and whether each is the greedy one, in prompt
        order, in one HTTP call."""
        answer = self.post("/completions", {
            "model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True,
            "logprobs": 1, "temperature": 0})
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise EvalError(f"{self.url}/completions answered {len(choices)} choices for "
                            f"{len(prompts)} prompts; expected one per prompt (n=1)")
        out = []
        for choice in choices:
            lp = choice.get("logprobs") or {}
            values = lp.get("token_logprobs")
            tops = lp.get("top_logprobs")
            tokens = lp.get("tokens")
            if not (isinstance(values, list) and isinstance(tops, list)
                    and isinstance(tokens, list)):
                raise EvalError(f"{self.url}/completions answered without token_logprobs; "
                                f"the server must support echo with logprobs (OpenAI's "
                                f"legacy completions)")
            greedy = [v is not None and (not top or v >= max(top.values()) - 1e-6)
                      for v, top in zip(values, tops)]
            out.append(Scored(tokens, values, greedy))
        return out

    def _loglikelihood_batch(self, batch: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [_move_space(c, x) for c, x in batch]
        contexts = sorted({c for c, _ in pairs if c})
        scored = self._score(contexts + [c + x for c, x in pairs])
        ctx_tokens = {c: scored[i].tokens for i, c in enumerate(contexts)}
        results = []
        for (context, continuation), whole in zip(pairs, scored[len(contexts):]):
            values, greedy = whole.logprobs, whole.greedy
            if context:
                ctx_len = _common_prefix(ctx_tokens[context], whole.tokens)
            else:
                ctx_len = 1  # BOS
            cont = values[ctx_len:]
            if not cont:
                raise EvalError(f"the continuation {continuation!r} adds no token to its "
                                f"context; lm-eval tasks need a non-empty continuation")
            if any(v is None for v in cont):
                raise EvalError("the server returned no logprob for the first token; the "
                                "model's tokenizer adds no BOS, so an empty context cannot "
                                "be scored; give every request a context")
            results.append((float(sum(v for v in cont if v is not None)),
                            all(greedy[ctx_len:])))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        batches = [requests[i:i + self.batch_size]
                   for i in range(0, len(requests), self.batch_size)]
        return [r for part in self.map(self._loglikelihood_batch, batches) for r in part]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """Every token of each text scored given the ones before it. The first token (BOS
        where the tokenizer adds one) has no logprob: it is not counted; with BOS every
        character of the text is scored."""
        def one(batch: Sequence[str]) -> list[tuple[float, int]]:
            return [(float(sum(v for v in s.logprobs if v is not None)),
                     sum(1 for v in s.logprobs if v is not None))
                    for s in self._score(list(batch))]

        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        return [r for part in self.map(one, batches) for r in part]

    def moderate(self, texts: Sequence[str]) -> list[dict[str, float]] | None:
        try:
            answer = self.post("/moderations", {"model": self.moderation_model,
                                                "input": list(texts)})
        except NotFound:
            return None
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(texts):
            raise EvalError(f"{self.url}/moderations answered without one result per text; "
                            f"expected La Plateforme's moderation response")
        return [{k: float(v) for k, v in (r.get("category_scores") or {}).items()}
                for r in results]

    def models(self) -> list[dict[str, Any]]:
        """The server's model cards (``GET /v1/models``)."""
        return list(self.request("GET", "/models").get("data") or [])

    def map(self, fn: Callable[[T], R], items: Iterable[T],
            concurrency: int | None = None) -> list[R]:
        """``[fn(item) for item in items]`` on ``concurrency`` threads (the server batches the
        requests in flight), results in the items' order; the first error is raised."""
        items = list(items)
        workers = max(1, min(concurrency or self.concurrency, len(items)))
        if workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval") as pool:
            return list(pool.map(fn, items))


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's `_encode_pair`: the context's trailing whitespace goes to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def _common_prefix(ctx: list[str], whole: list[str]) -> int:
    """How many of ``whole``'s first tokens are the context's: ``len(ctx)`` unless the boundary
    merged, then the longest common prefix (tokens compared by their text pieces)."""
    n = 0
    for a, b in zip(ctx, whole):
        if a != b:
            break
        n += 1
    return max(1, n)  # the first token (BOS) is never scored


def served_models(url: str, api_key: str | None = None) -> list[str]:
    """The ids ``GET /v1/models`` lists."""
    return [str(m["id"]) for m in ApiTarget(url, "", api_key, timeout_s=30).models()]


# -- a local server ------------------------------------------------------------------------

class ServerStartError(EvalError, RuntimeError):
    """`souverain serve` exited or did not become healthy; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A `souverain serve` subprocess on 127.0.0.1 (``python -m souverain.cli serve ARGS
    --port P --host 127.0.0.1``): ready once ``/health`` answers 200, its output kept in a log
    file, stopped with SIGTERM (uvicorn drains in-flight requests first)."""

    def __init__(self, *args: str, startup_timeout: float = 180.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="souverain-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "souverain.cli", "serve", *args, "--port", str(self.port),
               "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(f"souverain serve exited with {self.proc.returncode}:\n"
                                       f"{self.tail()}")
            if self._healthy():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"souverain serve did not start in {startup_timeout:g} "
                                       f"s:\n{self.tail()}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@contextmanager
def local_server(model: str, *, extra_args: Sequence[str] = (),
                 data_dir: Path | None = None,
                 startup_timeout: float = 600.0) -> Iterator[str]:
    """Serve ``model`` (a path or an alias, as `souverain serve` takes it) on a free loopback
    port with its own data folder (a temporary one unless ``data_dir``), yield the server's
    base URL (``http://127.0.0.1:PORT``), stop it with SIGTERM on exit. A server that fails to
    start raises `ServerStartError` with the last lines of its log."""
    with tempfile.TemporaryDirectory(prefix="souverain-eval-") as tmp:
        folder = Path(data_dir) if data_dir is not None else Path(tmp)
        server = ServerProcess(str(model), *extra_args, "--data-dir", str(folder),
                               startup_timeout=startup_timeout)
        try:
            yield server.url
        finally:
            server.stop()
            server.log_path.unlink(missing_ok=True)
