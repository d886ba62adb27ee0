"""`souverain serve --replicas N`: the same HTTP API served by N replicas on Ray Serve.

One Ray Serve application, ``souverain``, of two deployments:

* `SouverainReplica` (``num_replicas=N``): each replica builds the very app `souverain serve`
  builds (its models, engines, workers; `souverain.cli.serve.replica_app`) in its own data
  folder ``DATA_DIR/replicas/<slot>`` and answers requests forwarded to it through an in-process
  ASGI bridge (`ASGIBridge`): the request in (method, path, headers, body), the ASGI messages
  out as a stream, so streamed answers stream through Ray;
* `FrontDoor` (the HTTP ingress, one replica, no CPU reserved): reads the request, forwards it
  through a `DeploymentHandle` whose request router is `PrefixRequestRouter` (the prefix-aware
  policy of `souverain.distributed.routing` over Ray Serve's replicas: requests sharing a prompt
  prefix go to the replica that holds it in its prefix cache, load breaking ties), and streams
  the answer back. It also answers ``GET /metrics`` with every replica's metrics, each sample
  labelled ``replica="<id>"``, plus its own (`souverain_replica_info`, routed requests, matched
  prefix characters, requests lost with a replica).

Shared between replicas: API keys (the same keys file), fine-tuning and batch jobs (one jobs
database), document libraries (one libraries folder and metadata database), rate limits (one
named actor, `RateLimitActor`, holding every key's token buckets: each replica asks it once per
request and charges tokens to it after; if it cannot be reached within 2 s the request is let
through and a warning logged: the limit fails open, availability first). Not shared: each
replica's KV cache (which is why routing follows prefixes), its audit log file (under its own
folder), its metrics (labelled, merged by the front door).

A replica that dies is restarted by Ray Serve's controller; requests on the others go on. A
request in flight on the dead one gets a 503 ``replica_unavailable`` with ``Retry-After``
(or, when its streamed answer had begun, a last SSE event carrying that error): never a hang.

A request may be pinned to one replica with the header ``x-souverain-replica: <id>`` (the id
the response header ``x-souverain-replica`` and ``/metrics`` show): 503 if no such replica runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import RequestRouter
from starlette.responses import StreamingResponse

from souverain.distributed.routing import PrefixAwareRouter
from souverain.server.ratelimit import RateLimiter

log = logging.getLogger("souverain.replicas")

APP_NAME = "souverain"
NAMESPACE = "souverain"
PIN_HEADER = "x-souverain-replica"
LIMITER_TIMEOUT_S = 2.0
_PIN_WAIT_S = 30.0  # a pinned request whose replica never answers


# -- the request as it travels from the front door to a replica -------------------------------
@dataclass
class ForwardedRequest:
    """An HTTP request, picklable: what the front door sends a replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    pin: str | None = None  # a replica id: only that replica may take it
    token: str = ""  # this request's own id (the router's record of where it went)
    routing: dict[str, Any] | None = field(default=None, repr=False)  # the JSON body, if any


# the routes whose requests change nothing (generation, scoring, reads): safe to send again
_PURE_POSTS = frozenset({
    "/v1/chat/completions", "/v1/fim/completions", "/v1/completions", "/v1/embeddings",
    "/v1/moderations", "/v1/chat/moderations", "/v1/classifications",
    "/v1/chat/classifications"})


def idempotent(method: str, path: str) -> bool:
    """Whether a request may be sent to a second replica when the first died before answering."""
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and path in _PURE_POSTS)


def routing_body(method: str, body: bytes, content_type: str) -> dict[str, Any] | None:
    """The JSON body of a generation request (what the prefix policy reads), else None."""
    if method != "POST" or not body or "json" not in content_type:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


# -- the ASGI bridge inside a replica -----------------------------------------------------------
class ASGIBridge:
    """Runs an ASGI app in this process: its lifespan (`startup` / `shutdown`), and one request
    at a time per `request` call, whose ASGI messages come out as ``("start", status, headers)``
    then ``("body", bytes)`` items. Closing the iterator early (the client went away) is the
    client's disconnect: the app sees ``http.disconnect`` and aborts the generation."""

    def __init__(self, app: Any, *, extra_headers: list[tuple[bytes, bytes]] | None = None):
        self.app = app
        self.extra_headers = extra_headers or []
        self._state: dict[str, Any] = {}
        self._lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan_task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self._state}
        self._lifespan_task = asyncio.create_task(
            self.app(scope, self._lifespan_in.get, self._lifespan_out.put))
        await self._lifespan_in.put({"type": "lifespan.startup"})
        msg = await self._lifespan_out.get()
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the server failed to start: {msg.get('message', msg)}")

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._lifespan_task is None or self._lifespan_task.done():
            return
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._lifespan_out.get(), timeout_s)

    async def request(self, req: ForwardedRequest) -> AsyncIterator[tuple[Any, ...]]:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": req.method, "scheme": "http",
            "path": req.path, "raw_path": req.path.encode(), "query_string": req.query,
            "root_path": "", "headers": req.headers, "client": req.client,
            "server": None, "state": dict(self._state),
        }
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, out.put)
            except Exception:
                log.exception("unhandled error in %s %s", req.method, req.path)
                await out.put({"type": "http.response.start", "status": 500, "headers": []})
                await out.put({"type": "http.response.body", "body": json.dumps(
                    {"object": "error", "message": "Internal server error.",
                     "type": "internal_error", "param": None, "code": None}).encode()})
            finally:
                await out.put(None)

        task = asyncio.create_task(run())
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        started = False
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    if started:
                        continue  # an error after the answer began: the stream just ends
                    started = True
                    headers = [(bytes(k), bytes(v)) for k, v in msg.get("headers", [])]
                    yield ("start", int(msg["status"]), headers + self.extra_headers)
                elif msg["type"] == "http.response.body" and started:
                    if body := msg.get("body", b""):
                        yield ("body", bytes(body))
                    if not msg.get("more_body", False):
                        break
        finally:
            gone.set()  # answered, or the client went away: either way the app may finish


# -- the replica ------------------------------------------------------------------------------
class SouverainReplica:
    """One replica: the app `build` returns, behind `ASGIBridge` (Ray Serve deployment body)."""

    async def __init__(self, build: Callable[[], tuple[Any, Any, str]]) -> None:  # type: ignore[misc]
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.rank = getattr(getattr(context, "rank", None), "rank", None)
        # build the app in a thread: model loading is long and must not block Serve's loop
        app, self._lock, self.data_dir = await asyncio.to_thread(build)
        self.bridge = ASGIBridge(app, extra_headers=[(PIN_HEADER.encode(),
                                                      self.replica_id.encode())])
        await self.bridge.startup()
        log.info("replica %s serving (pid %d, data folder %s)", self.replica_id, os.getpid(),
                 self.data_dir)

    async def handle(self, req: ForwardedRequest) -> AsyncIterator[tuple[Any, ...]]:
        async for item in self.bridge.request(req):
            yield item

    def info(self, pin: str | None = None) -> dict[str, Any]:
        """Who this replica is (the front door's ``souverain_replica_info``)."""
        return {"replica": self.replica_id, "pid": os.getpid(), "host": socket.gethostname(),
                "rank": self.rank, "data_dir": str(self.data_dir)}

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose server stopped is replaced."""
        task = self.bridge._lifespan_task
        if task is None or task.done():
            raise RuntimeError("the replica's server has stopped")

    async def __del__(self) -> None:
        # (a replica whose __init__ failed has no bridge, and maybe no lock, to give back)
        if (bridge := getattr(self, "bridge", None)) is not None:
            await bridge.shutdown()
        if (lock := getattr(self, "_lock", None)) is not None:
            lock.release()


# -- the request router: prefix-aware over Ray Serve's replicas (imports Ray: this module is
# imported only by `serve --replicas`) ---------------------------------------------------------
_ROUTERS: list[Any] = []  # the routers of this process (the front door's handle makes them)


def _routers() -> list[Any]:
    """This process's `_ROUTERS`, looked up in the module itself: Ray Serve ships the router
    and ingress classes by value, each copy with its own globals, so a plain global would not
    be shared between them."""
    import souverain.server.replicas as this

    return this._ROUTERS


def _pending(pending_request: Any) -> tuple[str | None, dict[str, Any] | None, str]:
    """The pin and the routing body of a routed call: a `ForwardedRequest` (matched by its
    fields: Ray Serve ships this module's classes by value, so the router's copy of the class
    is not the ingress's), or a replica id (`info`)."""
    args = list(getattr(pending_request, "args", None) or [])
    first: Any = args[0] if args else None
    if isinstance(first, str):
        return first, None, ""
    if hasattr(first, "pin") and hasattr(first, "routing"):
        return first.pin, first.routing, getattr(first, "token", "")
    return None, None, ""


class PrefixRequestRouter(RequestRouter):
    """Ray Serve request router: `PrefixAwareRouter` over the running replicas; a pinned
    request (``x-souverain-replica``) goes to its replica only."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.policy = PrefixAwareRouter(**kwargs)
        self._chosen: dict[str, str] = {}  # token -> replica, while its answer lasts
        self.routed: dict[str, int] = {}
        self.matched_chars = 0
        self.prompt_chars = 0
        _routers().append(self)

    def replica_ids(self) -> list[str]:
        return sorted(r.unique_id for r in self.curr_replicas)

    async def choose_replicas(self, candidate_replicas: list[Any],
                              pending_request: Any = None) -> list[list[Any]]:
        if not candidate_replicas:
            return []
        pin, body, token = _pending(pending_request)
        if pin is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pin]]
        available = self.select_available_replicas(candidate_replicas) or candidate_replicas
        by_name = {r.replica_id.unique_id: r for r in available}
        if token and (previous := self._chosen.pop(token, None)) is not None:
            self.policy.finish(previous)  # chosen again (the first choice was full)
        route = self.policy.choose(list(by_name), body or {})  # counts one more in flight
        if token:
            self._chosen[token] = route.replica
        self.matched_chars += route.matched_chars
        self.prompt_chars += route.prompt_chars
        first = by_name[route.replica]
        return [[first], [r for r in available if r is not first]]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        name = replica_id.unique_id
        self.routed[name] = self.routed.get(name, 0) + 1
        _, _, token = _pending(pending_request)
        chosen = self._chosen.get(token) if token else None
        if chosen is not None and chosen != name:  # Ray fell back to another replica
            self.policy.finish(chosen)
            self.policy.begin(name)
            self._chosen[token] = name

    def finished(self, token: str) -> None:
        """The front door's answer for `token` ended: its replica has one less in flight."""
        chosen = self._chosen.pop(token, None)
        if chosen is not None:
            self.policy.finish(chosen)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)  # its successor starts cold


# -- rate limits shared by every replica --------------------------------------------------------
class RateLimitActor:
    """The one `RateLimiter` of an application (a named Ray actor): every replica's requests
    take from and charge to the same buckets, so a key's limit is global."""

    def __init__(self, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    def check_request(self, key_id: str) -> float | None:
        return self.limiter.check_request(key_id)

    def charge_tokens(self, key_id: str, n: int) -> None:
        self.limiter.charge_tokens(key_id, n)


class RemoteRateLimiter(RateLimiter):
    """A replica's view of `RateLimitActor`: the same interface as `RateLimiter`; fails open
    (logged) when the actor cannot answer within `LIMITER_TIMEOUT_S`."""

    def __init__(self, actor: Any, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        super().__init__(requests_per_minute, tokens_per_minute)
        self.actor = actor

    def check_request(self, key_id: str) -> float | None:
        import ray

        try:
            wait: float | None = ray.get(self.actor.check_request.remote(key_id),
                                         timeout=LIMITER_TIMEOUT_S)
            return wait
        except Exception as exc:
            log.warning("shared rate limiter unreachable (%s); request let through", exc)
            return None

    async def check_request_async(self, key_id: str) -> float | None:
        if not self.enabled:
            return None
        try:
            wait: float | None = await asyncio.wait_for(
                self.actor.check_request.remote(key_id), LIMITER_TIMEOUT_S)
            return wait
        except Exception as exc:
            log.warning("shared rate limiter unreachable (%s); request let through", exc)
            return None

    def charge_tokens(self, key_id: str, n: int) -> None:
        if self.tokens_per_minute and n > 0:
            self.actor.charge_tokens.remote(key_id, n)  # not awaited: the answer is sent


def limiter_actor_name(app_name: str = APP_NAME) -> str:
    return f"{app_name}-ratelimit"


# -- /metrics: every replica's, labelled ------------------------------------------------------
def merge_metrics(texts: Mapping[str, str], own: str = "") -> str:
    """Prometheus text of every replica (``{replica id: text}``), each sample labelled
    ``replica="<id>"``, families grouped (one HELP/TYPE each, as prometheus_client writes
    them), then the front door's own lines."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, fam)
            samples = list(fam.samples)
            if merged is fam:
                fam.samples = []
            merged.samples.extend(s._replace(labels={"replica": replica, **s.labels})
                                  for s in samples)

    class Merged:
        def collect(self) -> Any:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry).decode() + own


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# -- the front door ---------------------------------------------------------------------------
def _error(status: int, message: str, code: str, retry_after: int | None = None) -> Any:
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"object": "error", "message": message, "type": code, "param": None,
                         "code": code}, status_code=status, headers=headers)


class FrontDoor:
    """The HTTP ingress (Ray Serve deployment body): forwards each request to a replica chosen
    by `PrefixRequestRouter`, streams the answer back, merges ``/metrics``."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas  # a DeploymentHandle to SouverainReplica
        self.streams = replicas.options(stream=True)  # one handle: one router, one record
        self.lost = 0  # requests whose replica died under them
        self._warm: asyncio.Task[Any] | None = None

    def _router(self) -> Any | None:
        routers = _routers()
        return routers[-1] if routers else None

    async def replica_ids(self) -> list[str]:
        """The running replicas' ids (the handle's router learns them from the controller)."""
        if self._router() is None:  # the router is made on the handle's first request
            if self._warm is None:
                self._warm = asyncio.ensure_future(self.replicas.info.remote())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._warm), _PIN_WAIT_S)
        router = self._router()
        return router.replica_ids() if router is not None else []

    async def __call__(self, request: Any) -> Any:
        body = await request.body()
        client = (request.client.host, request.client.port) if request.client else None
        pin = request.headers.get(PIN_HEADER)
        fwd = ForwardedRequest(
            method=request.method, path=request.url.path, query=request.url.query.encode(),
            headers=[(k, v) for k, v in request.headers.raw if k.lower() != PIN_HEADER.encode()],
            body=body, client=client, pin=pin, token=uuid.uuid4().hex,
            routing=routing_body(request.method, body, request.headers.get("content-type", "")))
        if request.method == "GET" and request.url.path == "/metrics" and pin is None:
            return await self._metrics(fwd)
        if pin is not None and pin not in await self.replica_ids():
            return _error(503, f"No replica {pin!r} is running; drop the {PIN_HEADER} header "
                               "or use an id from /metrics.", "replica_unavailable", 1)
        return await self._forward(fwd)

    def _finished(self, fwd: ForwardedRequest) -> None:
        router = self._router()
        if router is not None and fwd.token:
            router.finished(fwd.token)

    async def _forward(self, fwd: ForwardedRequest) -> Any:
        try:
            response = await self._forward_once(fwd)
        except BaseException:
            self._finished(fwd)
            raise
        if not isinstance(response, _Streamed):
            self._finished(fwd)
        return response

    async def _forward_once(self, fwd: ForwardedRequest) -> Any:
        import ray.exceptions

        lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        # a request with no side effect whose replica died before answering goes to another
        # one (Ray's router drops a dead replica from the candidates at once); others get 503
        attempts = 1 if fwd.pin or not idempotent(fwd.method, fwd.path) else 3
        for attempt in range(attempts):
            stream = self.streams.handle.remote(fwd)
            try:
                first = await (asyncio.wait_for(stream.__anext__(), _PIN_WAIT_S) if fwd.pin
                               else stream.__anext__())
                break
            except (*lost, asyncio.TimeoutError) as exc:
                with contextlib.suppress(Exception):
                    stream.cancel()  # (a pinned request its replica never took)
                log.warning("replica lost under %s %s (attempt %d): %s", fwd.method, fwd.path,
                            attempt + 1, exc)
                self.lost += 1
                if attempt + 1 < attempts:
                    continue
                return _error(503, "The replica serving this request stopped (it is being "
                                   "restarted); retry the request.", "replica_unavailable", 1)
            except StopAsyncIteration:
                return _error(503, "The replica closed the request without an answer; retry "
                                   "it.", "replica_unavailable", 1)
        _, status, headers = first
        sse = any(k.lower() == b"content-type" and b"text/event-stream" in v
                  for k, v in headers)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for kind, chunk in stream:
                    if kind == "body":
                        yield chunk
            except lost as exc:
                self.lost += 1
                log.warning("replica lost mid-answer of %s %s: %s", fwd.method, fwd.path, exc)
                if sse:
                    err = {"object": "error", "type": "replica_unavailable",
                           "code": "replica_unavailable", "param": None,
                           "message": "The replica serving this request stopped mid-answer; "
                                      "retry the request."}
                    yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                self._finished(fwd)

        response = _Streamed(rest(), status_code=status)
        response.raw_headers = [(k, v) for k, v in headers
                                if k.lower() not in (b"content-length", b"transfer-encoding")]
        return response

    async def _metrics(self, fwd: ForwardedRequest) -> Any:
        from starlette.responses import Response

        ids = await self.replica_ids()
        texts: dict[str, str] = {}
        infos: list[dict[str, Any]] = []

        async def one(rid: str) -> None:
            pinned = ForwardedRequest(fwd.method, fwd.path, fwd.query, fwd.headers, b"",
                                      fwd.client, pin=rid)
            chunks: list[bytes] = []
            status = 0
            stream = self.streams.handle.remote(pinned)
            async for item in stream:
                if item[0] == "start":
                    status = item[1]
                    if status != 200:
                        raise _NotOK(status, item[2])
                else:
                    chunks.append(item[1])
            texts[rid] = b"".join(chunks).decode()
            infos.append(await self.replicas.info.remote(rid))

        # one replica after the other: Ray Serve gives every call made while handling one
        # request the same internal request id, and its router loses track of a second call
        # routed while the first is (it spins without ever assigning it)
        results: list[BaseException | None] = []
        for rid in ids:
            try:
                await asyncio.wait_for(one(rid), _PIN_WAIT_S)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        for rid, r in zip(ids, results):
            if isinstance(r, Exception) and not isinstance(r, _NotOK):
                log.warning("no metrics from replica %s: %r", rid, r)
        for r in results:
            if isinstance(r, _NotOK):  # 401/403: the replica's auth answers for all
                return await self._forward(fwd)
        router = self._router()
        own = [
            "# HELP souverain_replica_info A running replica: its id, process and host.",
            "# TYPE souverain_replica_info gauge",
            *(f'souverain_replica_info{{replica="{i["replica"]}",pid="{i["pid"]}",'
              f'host="{_escape_label(i["host"])}",rank="{i["rank"]}"}} 1'
              for i in sorted(infos, key=lambda i: str(i["replica"]))),
            "# HELP souverain_replica_scrape_ok Whether the replica's metrics came back in "
            "time (0: it is missing from this page).",
            "# TYPE souverain_replica_scrape_ok gauge",
            *(f'souverain_replica_scrape_ok{{replica="{rid}"}} {int(rid in texts)}'
              for rid in ids),
            "# HELP souverain_frontdoor_routed_requests_total Requests the front door routed, "
            "per replica.",
            "# TYPE souverain_frontdoor_routed_requests_total counter",
            *(f'souverain_frontdoor_routed_requests_total{{replica="{k}"}} {v}'
              for k, v in sorted((router.routed if router else {}).items())),
            "# HELP souverain_frontdoor_prefix_matched_chars_total Prompt characters of routed "
            "requests found in the chosen replica's prefix record.",
            "# TYPE souverain_frontdoor_prefix_matched_chars_total counter",
            f"souverain_frontdoor_prefix_matched_chars_total {router.matched_chars if router else 0}",
            "# HELP souverain_frontdoor_prompt_chars_total Prompt characters of routed requests.",
            "# TYPE souverain_frontdoor_prompt_chars_total counter",
            f"souverain_frontdoor_prompt_chars_total {router.prompt_chars if router else 0}",
            "# HELP souverain_frontdoor_replica_lost_requests_total Requests whose replica "
            "stopped under them (sent again to another replica when they change nothing, "
            "else answered 503 replica_unavailable).",
            "# TYPE souverain_frontdoor_replica_lost_requests_total counter",
            f"souverain_frontdoor_replica_lost_requests_total {self.lost}",
        ]
        text = merge_metrics(texts, "\n".join(own) + "\n")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


class _Streamed(StreamingResponse):
    """A replica's answer on its way (its end tells the router the replica is free)."""


class _NotOK(Exception):
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]):
        super().__init__(status)
        self.status = status


# -- the driver: `souverain serve --replicas N` ------------------------------------------------
@dataclass
class ReplicaPlan:
    """How the application is laid out (what `run` deploys)."""

    replicas: int
    build: Callable[[], tuple[Any, Any, str]]  # picklable: runs in each replica
    host: str
    port: int
    ray_address: str | None
    cpus_per_replica: float
    max_ongoing_requests: int
    rate_limit_rpm: float | None
    rate_limit_tpm: float | None
    routing: dict[str, Any] = field(default_factory=dict)  # PrefixAwareRouter's settings


def deploy(plan: ReplicaPlan) -> None:
    """Start (or join) Ray, the shared rate limiter and the application; return when every
    replica answers. `shutdown` undoes it."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if not ray.is_initialized():
        if plan.ray_address:
            ray.init(address=plan.ray_address, namespace=NAMESPACE, log_to_driver=True)
        else:
            cores = os.cpu_count() or 1
            need = plan.replicas * plan.cpus_per_replica
            # this machine only: Ray's ports on loopback, not on the network
            ray.init(namespace=NAMESPACE, include_dashboard=False, _node_ip_address="127.0.0.1",
                     num_cpus=max(cores, int(need + 0.999)), log_to_driver=True)
    serve.start(http_options={"host": plan.host, "port": plan.port})
    if plan.rate_limit_rpm or plan.rate_limit_tpm:
        ray.remote(RateLimitActor).options(
            name=limiter_actor_name(), namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, max_restarts=-1, num_cpus=0,
        ).remote(plan.rate_limit_rpm, plan.rate_limit_tpm)
    router: Any = PrefixRequestRouter
    replica = serve.deployment(
        name="SouverainReplica", num_replicas=plan.replicas,
        max_ongoing_requests=plan.max_ongoing_requests,
        ray_actor_options={"num_cpus": plan.cpus_per_replica},
        health_check_period_s=5, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30,
        request_router_config=RequestRouterConfig(
            request_router_class=router, request_router_kwargs=plan.routing),
    )(SouverainReplica)
    door = serve.deployment(
        name="FrontDoor", num_replicas=1, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0})(FrontDoor)
    serve.run(door.bind(replica.bind(plan.build)), name=APP_NAME, route_prefix="/",
              blocking=False)


def shared_limiter(rpm: float | None, tpm: float | None) -> RemoteRateLimiter | None:
    """In a replica: the application's `RateLimitActor`, or None without limits."""
    if not (rpm or tpm):
        return None
    import ray

    return RemoteRateLimiter(ray.get_actor(limiter_actor_name(), namespace=NAMESPACE), rpm, tpm)


def shutdown(local: bool) -> None:
    """Delete the application and the limiter; stop Serve and Ray if this process started
    them (a local instance)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    with contextlib.suppress(Exception):
        ray.kill(ray.get_actor(limiter_actor_name(), namespace=NAMESPACE))
    if local:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def wait_forever(poll_s: float = 1.0) -> None:
    """Block the driver until SIGINT/SIGTERM (the application runs in Ray)."""
    import signal

    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(poll_s)
