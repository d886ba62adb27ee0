"""Robustness of `souverain serve` over real HTTP: real server processes, no mocks.

* schemathesis (``st run``) over the whole of ``/openapi.json``, every check and phase on (no
  5xx, no timeout, La Plateforme error shapes, responses that conform to the document);
* no 500 for a client's input: non-finite numbers, integers out of range, bodies that are not
  UTF-8, too deep or not JSON, methods a path does not take (the exact requests of issue 15);
* 32 concurrent streaming clients, a third of them disconnecting mid-stream, then KV blocks,
  gauges and ``/metrics`` counters checked exactly; a non-streaming client that times out;
* API keys over HTTP (401/403, live revocation, no key in the log), per-key rate limit;
* limits: body size (413, with and without Content-Length), context (400, never truncated),
  admission queue (429 + Retry-After), unknown model (404), unknown field (422);
* graceful shutdown (SIGTERM lets an in-flight stream finish, exit code 0);
* several models with ``--lazy`` and a memory budget (idle models unloaded, busy -> 503).

The servers run the tiny random Mistral/Mixtral checkpoints (tests/checkpoints.py): cheap steps,
real v3 tokenizer. Each group of tests shares one server (class-scoped fixtures), so only the
servers of the running class are alive at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess

from souverain.server.auth import add_key, revoke_key

CHAT = "/v1/chat/completions"
TINY = "tiny"
THREADS = ("--threads", "1")  # the machine is shared: one core per server is plenty here


# -- helpers ---------------------------------------------------------------------------------
def chat_body(content: str = "Hello there", **kw: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], **kw}


def assert_error_shape(resp: Any, status: int | None = None) -> dict[str, Any]:
    """La Plateforme's error body: ``{"object": "error", "message": str, "type": str, ...}``.

    ``resp``: an httpx response, or a schemathesis one (whose header values are lists)."""
    if status is not None:
        assert resp.status_code == status, (resp.status_code, resp.text)
    content_type = {k.lower(): v for k, v in resp.headers.items()}["content-type"]
    if isinstance(content_type, list):
        (content_type,) = content_type
    assert content_type.startswith("application/json"), resp.headers
    body = resp.json()
    assert body["object"] == "error", body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["type"], str) and body["type"], body
    assert "param" in body and "code" in body, body
    if resp.status_code == 422:
        assert isinstance(body["detail"], list) and body["detail"], body
    return body


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for key, value in samples.items():
        m = _SAMPLE.match(key)
        if m is None or m["name"] != name:
            continue
        have = dict(_LABEL.findall(m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def wait_idle(server: ServerProcess, model: str = TINY, timeout: float = 15.0,
              headers: dict | None = None) -> dict[str, float]:
    """Poll /metrics until the model has no KV block used and nothing running or queued."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics(headers)
        state = {g: metric(m, f"souverain_{g}", model=model)
                 for g in ("kv_blocks_used", "running_sequences", "queue_depth")}
        if not any(state.values()):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"model {model} not idle after {timeout} s: {state}")
        time.sleep(0.1)


def parse_sse(text: str) -> list[Any]:
    """The events of a complete SSE body: JSON chunks, then the literal "[DONE]"."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream(events: list[Any], max_tokens: int | None = None) -> dict[str, int]:
    """A well-formed chat completion stream (one choice); returns its usage."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1], events[-3:]
    chunks = events[:-1]
    assert len(chunks) >= 2, chunks
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1, ids
    for c in chunks:
        assert c["object"] == "chat.completion.chunk", c
        assert c["model"] == TINY and len(c["choices"]) == 1, c
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant", chunks[0]
    for c in chunks[:-1]:
        assert c["choices"][0]["finish_reason"] is None, c
        assert "usage" not in c, c
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    usage = last["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, usage
    if max_tokens is not None:
        assert usage["completion_tokens"] <= max_tokens, usage
        if last["choices"][0]["finish_reason"] == "length":
            assert usage["completion_tokens"] == max_tokens, usage
    return usage


def tiny_server(tiny: dict, *args: str) -> ServerProcess:
    return ServerProcess(str(tiny["consolidated"]), "--name", TINY, *THREADS, *args)


@pytest.fixture(scope="class")
def stopper() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for s in servers:
        s.stop()


# -- 1. fuzzing /openapi.json + the limits a single server enforces --------------------------
MAX_LEN_A = 32
MAX_REQUEST_BYTES_A = 64 * 1024


@pytest.fixture(scope="class")
def server_a(tiny_mistral: dict, stopper: list) -> ServerProcess:
    """No keys (loopback clients only), a 32-token context and a 64 KiB body limit."""
    s = tiny_server(tiny_mistral, "--max-model-len", str(MAX_LEN_A),
                    "--max-request-mib", str(MAX_REQUEST_BYTES_A / (1 << 20)))
    stopper.append(s)
    return s


FUZZ_EXAMPLES = 60  # per operation and phase (CI time budget: the whole run takes ~2 minutes)
FUZZ_CONFIG = """\
max-stream-events = 100000

[checks]
enabled = true  # every check (`--checks all` on the command line would override the below)

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429"]

# Schema-valid bodies that the schema cannot fully judge: a prompt + max_tokens over the
# context, a file that is not JSONL training data, a document that is not one, a text to
# classify with a model that is no classifier. These answer
# 400 naming the problem, as their responses document.
[[operations]]
include-method = "POST"
include-path-regex = "^/v1/(chat/completions|fim/completions|embeddings|fine_tuning/jobs|classifications|chat/classifications)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]

# The uploads (multipart) too; and there every part is bytes on the wire, so a "type"
# mutation of the file part (an object or a number instead of binary) is still a valid file,
# rightly stored: the negative check cannot apply to them.
[[operations]]
include-method = "POST"
include-path-regex = "^/v1/(files|libraries/[{]library_id[}]/documents)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]
checks.negative_data_rejection.enabled = false
"""


FUZZ_CHECKS = {  # schemathesis 4.32's checks, all of them, and ours (schemathesis_hooks.py)
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
    "positive_data_acceptance", "missing_required_header", "unsupported_method",
    "allow_header_conformance", "use_after_free", "ensure_resource_availability",
    "ignored_auth", "object_level_authorization", "max_response_time",
    "la_plateforme_errors", "sse_chunks"}


@pytest.fixture(scope="class")
def fuzz_server(tiny_mistral: dict, tmp_path_factory: pytest.TempPathFactory,
                stopper: list) -> dict[str, Any]:
    """Every API family on (models, chat, FIM, embeddings, libraries, files, fine-tuning
    jobs and their worker), an API key (so that schemathesis checks that auth is enforced),
    its own data folder."""
    data = tmp_path_factory.mktemp("fuzz-data")
    keys = data / "keys.txt"
    _, key = add_key(keys, "fuzz")
    s = tiny_server(tiny_mistral, "--max-model-len", str(MAX_LEN_A), "--max-request-mib",
                    str(MAX_REQUEST_BYTES_A / (1 << 20)), "--data-dir", str(data),
                    "--api-keys-file", str(keys), "--libraries", "--finetune")
    stopper.append(s)
    return {"server": s, "key": key, "data": data}


class TestFuzz:
    def test_schemathesis_whole_api(self, fuzz_server: dict[str, Any], tmp_path: Path) -> None:
        """``st run`` over the whole of /openapi.json, every check on, every phase (examples,
        coverage, fuzzing, stateful through the create operations' links): no server error,
        no timeout, and the responses, statuses and headers the document promises. Our own
        checks (error shape, SSE chunks) and the served model in a third of the bodies come
        from tests/schemathesis_hooks.py."""
        server = fuzz_server["server"]
        schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
        operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
        assert {("POST", "/v1/libraries"), ("POST", "/v1/files"),
                ("GET", "/v1/fine_tuning/jobs"), ("POST", CHAT)} <= operations
        config = tmp_path / "schemathesis.toml"
        config.write_text(FUZZ_CONFIG)
        reports = tmp_path / "reports"
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               server.url + "/openapi.json", "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(FUZZ_EXAMPLES), "--seed", "15", "--workers", "1",
               # "nothing hangs": a generous bound, not a benchmark (a loaded CI machine
               # parses, embeds and trains while it answers)
               "--request-timeout", "60", "--max-response-time", "60",
               "--report", "json,ndjson", "--report-dir",
               str(reports), "--header", f"Authorization: Bearer {fuzz_server['key']}"]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                              os.environ.get("PYTHONPATH", "")]),
               "SOUVERAIN_FUZZ_MODEL": TINY, "SOUVERAIN_FUZZ_MAX_LEN": str(MAX_LEN_A),
               "NO_COLOR": "1"}
        t0 = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                             cwd=tmp_path)
        took = time.monotonic() - t0
        (report_path,) = reports.glob("json-*.json")
        report = json.loads(report_path.read_text())
        requests, checks = 0, set()
        (events,) = reports.glob("ndjson-*.ndjson")
        with events.open() as f:
            for line in f:
                finished = json.loads(line).get("ScenarioFinished")
                if finished:
                    requests += len(finished["recorder"].get("interactions") or ())
                    for results in (finished["recorder"].get("checks") or {}).values():
                        checks.update(c["name"] for c in results)
        cases = report["test_cases"]
        print(f"schemathesis: {requests} requests, {cases['generated']} test cases over "
              f"{len(operations)} operations in {took:.0f} s; phases "
              f"{ {k: v['status'] for k, v in report['phases'].items()} }")
        failed = run.returncode != 0 or report["failures"] or report["errors"]
        if failed:
            print(run.stdout[-20000:], run.stderr[-5000:], server.log()[-5000:], sep="\n")
        assert not report["failures"] and not report["errors"], (
            report["failures"], report["errors"])
        assert run.returncode == 0 and report["complete"], run.stdout[-3000:]
        statuses = {k: v["status"] for k, v in report["phases"].items()}
        assert all(statuses[p] == "success" for p in ("coverage", "fuzzing", "stateful")), \
            statuses
        assert requests >= 20 * len(operations), requests
        assert checks >= FUZZ_CHECKS, FUZZ_CHECKS - checks


class TestFuzzAndLimits:
    def test_loopback_without_keys(self, server_a: ServerProcess) -> None:
        r = httpx.get(server_a.url + "/v1/models", timeout=30)
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == [TINY, "souverain-embed",
                                                       "mistral-moderation-latest"]
        r = httpx.post(server_a.url + CHAT, json=chat_body(max_tokens=3), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3

    def test_body_over_limit_with_content_length(self, server_a: ServerProcess) -> None:
        body = json.dumps(chat_body("x" * (MAX_REQUEST_BYTES_A + 1000))).encode()
        r = httpx.post(server_a.url + CHAT, content=body,
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 413)
        assert str(MAX_REQUEST_BYTES_A) in err["message"]

    def test_body_over_limit_chunked(self, server_a: ServerProcess) -> None:
        body = json.dumps(chat_body("x" * (MAX_REQUEST_BYTES_A + 1000))).encode()

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        with httpx.Client(timeout=30) as client:
            req = client.build_request("POST", server_a.url + CHAT, content=chunks(),
                                       headers={"content-type": "application/json"})
            assert req.headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in req.headers
            r = client.send(req)
        err = assert_error_shape(r, 413)
        assert str(MAX_REQUEST_BYTES_A) in err["message"]
        # a chunked body under the limit still works
        small = json.dumps(chat_body(max_tokens=2)).encode()
        with httpx.Client(timeout=60) as client:
            r = client.post(server_a.url + CHAT, content=iter([small[:10], small[10:]]),
                            headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text

    def test_prompt_plus_max_tokens_over_context(self, server_a: ServerProcess) -> None:
        r = httpx.post(server_a.url + CHAT, json=chat_body("Hi", max_tokens=30), timeout=30)
        err = assert_error_shape(r, 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        m = re.search(r"prompt has (\d+) tokens and max_tokens is 30\b", err["message"])
        assert m, err["message"]
        prompt = int(m[1])
        assert prompt + 30 > MAX_LEN_A
        assert f"{prompt + 30} tokens" in err["message"]
        assert f"context of {MAX_LEN_A}" in err["message"]
        assert f"at most {MAX_LEN_A - prompt}" in err["message"]

    def test_prompt_alone_over_context(self, server_a: ServerProcess) -> None:
        before = server_a.metrics()
        r = httpx.post(server_a.url + CHAT, json=chat_body("word " * 60), timeout=30)
        err = assert_error_shape(r, 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        m = re.search(r"prompt has (\d+) tokens but the model's context is (\d+) tokens",
                      err["message"])
        assert m and int(m[1]) > MAX_LEN_A and int(m[2]) == MAX_LEN_A, err["message"]
        # without max_tokens too: refused, never truncated (nothing was generated)
        after = server_a.metrics()
        assert (metric(after, "souverain_prompt_tokens_total", model=TINY)
                == metric(before, "souverain_prompt_tokens_total", model=TINY))

    def test_unknown_model(self, server_a: ServerProcess) -> None:
        r = httpx.post(server_a.url + CHAT, json={**chat_body(), "model": "nope"}, timeout=30)
        err = assert_error_shape(r, 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert TINY in err["message"]
        r = httpx.get(server_a.url + "/v1/models/nope", timeout=30)
        assert_error_shape(r, 404)

    def test_unknown_field(self, server_a: ServerProcess) -> None:
        r = httpx.post(server_a.url + CHAT, json=chat_body(frobnicate=1), timeout=30)
        err = assert_error_shape(r, 422)
        assert any(d["loc"] == ["body", "frobnicate"] and d["type"] == "extra_forbidden"
                   for d in err["detail"]), err
        assert "frobnicate" in err["message"]
        # and a body that is not JSON at all
        r = httpx.post(server_a.url + CHAT, content=b"{not json",
                       headers={"content-type": "application/json"}, timeout=30)
        assert_error_shape(r, 422)


# -- 1b. no 500 for a client's input: the exact requests of issue 15 ---------------------------
def strict_json(resp: httpx.Response) -> Any:
    """The body, read as strict JSON (NaN / Infinity are refused, as every client does)."""
    def refuse(literal: str) -> None:
        raise AssertionError(f"{literal} in a response body: {resp.text[:300]}")

    return json.loads(resp.content, parse_constant=refuse)


NON_FINITE = [
    # (route, body with the bad number, the field the 422 names)
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"temperature": 1e309}', "temperature"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"top_p": NaN}', "top_p"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"presence_penalty": -Infinity}', "presence_penalty"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": NaN}]}',
     "messages.0.content"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"logit_bias": {"5": Infinity}}', "logit_bias.5"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
           '"metadata": {"a": [1, -1e400]}}', "metadata.a.1"),
    ("/v1/fim/completions", '{"model": "tiny", "prompt": "def", "temperature": -Infinity}',
     "temperature"),
    ("/v1/embeddings", '{"model": "souverain-embed", "input": [NaN]}', "input.0"),
    ("/v1/libraries", '{"name": "lib", "chunk_size": Infinity}', "chunk_size"),
    ("/v1/fine_tuning/jobs", '{"model": "tiny", "training_files": ["f"], '
                             '"hyperparameters": {"learning_rate": NaN}}',
     "hyperparameters.learning_rate"),
]


class TestNo500ForClientInput:
    @pytest.mark.parametrize("route,body,field", NON_FINITE)
    def test_non_finite_numbers_are_422_naming_the_field(self, server_a: ServerProcess,
                                                          route: str, body: str,
                                                          field: str) -> None:
        r = httpx.post(server_a.url + route, content=body.encode(),
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 422)
        strict_json(r)
        assert err["param"] == field and err["code"] == "finite_number", err
        assert f"{field}: " in err["message"] and "finite" in err["message"], err

    @pytest.mark.parametrize("route,body,field", [
        (CHAT, {"max_tokens": 10**30}, "max_tokens"),
        (CHAT, {"seed": 2**70}, "seed"),
        (CHAT, {"random_seed": -1}, "random_seed"),
        (CHAT, {"top_k": 10**30}, "top_k"),
        (CHAT, {"min_tokens": 2**31}, "min_tokens"),
        ("/v1/fim/completions", {"prompt": "x", "max_tokens": 2**63}, "max_tokens"),
    ])
    def test_integers_out_of_range_are_422(self, server_a: ServerProcess, route: str,
                                           body: dict, field: str) -> None:
        base = chat_body() if route == CHAT else {"model": TINY}
        r = httpx.post(server_a.url + route, json={**base, **body}, timeout=30)
        err = assert_error_shape(r, 422)
        strict_json(r)
        assert err["param"] == field, err

    def test_page_out_of_range_is_422(self, server_a: ServerProcess) -> None:
        r = httpx.post(server_a.url + "/v1/libraries", json={"name": "paging"}, timeout=30)
        assert r.status_code == 201, r.text
        lib = r.json()["id"]
        r = httpx.get(f"{server_a.url}/v1/libraries/{lib}/documents",
                      params={"page": 9223372036854775807}, timeout=30)
        err = assert_error_shape(r, 422)
        assert err["param"] == "query.page", err

    def test_body_not_utf8(self, server_a: ServerProcess) -> None:
        r = httpx.post(server_a.url + CHAT, content=b'{"model": "tin\xffy"}',
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 422)
        assert err["message"] == ("The request body is not valid JSON: it is not UTF-8 "
                                  "(byte 14 is 0xff); send JSON encoded as UTF-8."), err

    @pytest.mark.parametrize("depth", [101, 10_000])
    def test_body_too_deep(self, server_a: ServerProcess, depth: int) -> None:
        body = '{"model": "tiny", "metadata": ' + "[" * depth + "]" * depth + "}"
        r = httpx.post(server_a.url + CHAT, content=body.encode(),
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 422)
        assert err["code"] == "json_too_deep" and "deeper than 100 levels" in err["message"]

    def test_integer_too_long_to_parse(self, server_a: ServerProcess) -> None:
        body = '{"model": "tiny", "metadata": {"a": ' + "7" * 5000 + "}}"
        r = httpx.post(server_a.url + CHAT, content=body.encode(),
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 422)
        assert err["message"] == ("The request body is not valid JSON: a number has more "
                                  "than 4300 digits."), err

    def test_body_as_deep_as_allowed_is_read(self, server_a: ServerProcess) -> None:
        nested = "[" * 98 + "]" * 98  # + the body object and metadata's object = 100
        body = json.dumps(chat_body(max_tokens=2))[:-1] + ', "metadata": {"a": ' + nested + "}}"
        r = httpx.post(server_a.url + CHAT, content=body.encode(),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text

    @pytest.mark.parametrize("body,where", [
        ('{"model": "tiny", "messages": [], "top_p": 1 "n": 1}', "line 1 column 46"),
        ('{"model": "tiny",\n "messages": [\n  {"role": "user" "content": "hi"}]}',
         "line 3 column 19"),
    ])
    def test_json_decode_error_says_where(self, server_a: ServerProcess, body: str,
                                          where: str) -> None:
        r = httpx.post(server_a.url + CHAT, content=body.encode(),
                       headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_shape(r, 422)
        assert err["message"] == \
            f"The request body is not valid JSON: Expecting ',' delimiter at {where}.", err
        assert err["param"] is None and err["code"] == "json_invalid", err

    @pytest.mark.parametrize("path,allowed", [
        ("/v1/files", "GET, POST"), ("/v1/files/file-1", "DELETE, GET"),
        ("/v1/libraries", "GET, POST"), ("/v1/libraries/x", "DELETE, GET, PATCH, PUT"),
        ("/v1/libraries/x/documents", "GET, POST"),
        ("/v1/libraries/x/documents/y", "DELETE, GET, PATCH, PUT"),
        (CHAT, "POST"), ("/v1/models", "GET"),
    ])
    def test_405_lists_every_method_of_the_path(self, server_a: ServerProcess, path: str,
                                                allowed: str) -> None:
        for method in ("OPTIONS", "TRACE"):
            r = httpx.request(method, server_a.url + path, timeout=30)
            err = assert_error_shape(r, 405)
            assert r.headers["allow"] == allowed, r.headers
            assert allowed.replace(", ", " or ") in err["message"], err

    def test_validation_detail_never_echoes_what_json_cannot_carry(self) -> None:
        from souverain.server.errors import json_safe

        class Thing:
            def __str__(self) -> str:
                return "a thing"

        value = {"a": [float("inf"), float("-inf"), float("nan"), 1.5, 2, None, True],
                 "b": b"\xff\x00", "c": (Thing(), "x"), 3: {"d": Thing()}}
        safe = json_safe(value)
        assert safe == {"a": ["inf", "-inf", "nan", 1.5, 2, None, True], "b": "b'\\xff\\x00'",
                        "c": ["a thing", "x"], "3": {"d": "a thing"}}
        json.dumps(safe, allow_nan=False)

    def test_key_in_url_is_refused_and_redacted(self, server_a: ServerProcess) -> None:
        key = "sk-sov-" + "Zq7" * 14 + "x"
        r = httpx.get(f"{server_a.url}/v1/models?api_key={key}", timeout=30)
        err = assert_error_shape(r, 401)
        assert err["code"] == "api_key_in_url" and "Authorization: Bearer" in err["message"]
        assert key not in server_a.log() and "/v1/models?api_key=[SECRET]" in server_a.log()


# -- 2./3. concurrency, disconnects, KV accounting --------------------------------------------
@pytest.fixture(scope="class")
def server_b(tiny_mistral: dict, stopper: list) -> ServerProcess:
    s = tiny_server(tiny_mistral, "--max-model-len", "2048", "--kv-cache-gib", "0.05")
    stopper.append(s)
    return s


def _chat_200(m: dict[str, float]) -> float:
    return metric(m, "souverain_requests_total", route=CHAT, method="POST", status="200")


def wait_for(what: str, predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class TestLoad:
    N_CLIENTS = 32
    MAX_TOKENS = 48
    LONG = 1000  # forced length (min_tokens) of the streams that get dropped

    async def _clients(self, url: str) -> list[tuple[str, Any]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300),
                                     limits=limits) as client:

            async def one(i: int) -> tuple[str, Any]:
                drop = i % 3 == 0
                body = chat_body(f"Tell me story number {i}, please.", stream=True,
                                 temperature=0.7, random_seed=1000 + i,
                                 max_tokens=self.LONG if drop else self.MAX_TOKENS)
                if drop:
                    body["min_tokens"] = self.LONG  # still generating when the client leaves
                async with client.stream("POST", CHAT, json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    assert r.headers["content-type"].startswith("text/event-stream")
                    if drop:
                        events = 0
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                events += 1
                                if events == 3:
                                    break
                        return "dropped", events
                    raw = b"".join([chunk async for chunk in r.aiter_bytes()])
                return "done", raw.decode()

            return await asyncio.gather(*(one(i) for i in range(self.N_CLIENTS)))

    def test_concurrent_streams_with_disconnects(self, server_b: ServerProcess) -> None:
        before = wait_idle(server_b)
        results = asyncio.run(self._clients(server_b.url))
        assert httpx.get(server_b.url + "/health", timeout=10).status_code == 200

        dropped = [r for kind, r in results if kind == "dropped"]
        usages = [check_stream(parse_sse(text), self.MAX_TOKENS)
                  for kind, text in results if kind == "done"]
        assert len(dropped) == 11 and all(n == 3 for n in dropped)
        assert len(usages) == self.N_CLIENTS - 11

        after = wait_idle(server_b)  # every KV block back, nothing running or queued
        # The dropped requests are counted when their handler unwinds: wait for all 32.
        after = wait_for("32 chat requests in /metrics", lambda: (
            m if _chat_200(m := server_b.metrics()) - _chat_200(before) >= self.N_CLIENTS
            else None))

        def delta(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        # Every stream started with a 200 (the status is sent before the first token), the
        # dropped ones included.
        assert delta("souverain_requests_total", route=CHAT, method="POST",
                     status="200") == self.N_CLIENTS
        # Exact: each dropped stream was forced to LONG tokens and left after 3 events, so it
        # was still generating when its client went away; no completed stream counts.
        assert delta("souverain_requests_aborted_total", model=TINY) == len(dropped)
        # Token counters are charged when a stream finishes (its last chunk carries usage), so
        # aborted streams add nothing: the counters are exactly the completed streams' usage.
        assert delta("souverain_completion_tokens_total", model=TINY) == sum(
            u["completion_tokens"] for u in usages)
        assert delta("souverain_prompt_tokens_total", model=TINY) == sum(
            u["prompt_tokens"] for u in usages)
        assert metric(after, "souverain_kv_blocks_free", model=TINY) > 0

    def test_non_streaming_client_timeout_aborts(self, server_b: ServerProcess) -> None:
        before = wait_idle(server_b)
        body = chat_body("Talk for a long time.", max_tokens=1500, min_tokens=1500)
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server_b.url + CHAT, json=body, timeout=httpx.Timeout(30, read=1.0))

        def aborted() -> dict[str, float] | None:
            m = server_b.metrics()
            return m if (metric(m, "souverain_requests_aborted_total", model=TINY)
                         - metric(before, "souverain_requests_aborted_total", model=TINY)) else None

        wait_for("the abort", aborted)
        after = wait_idle(server_b)
        took = time.monotonic() - t0
        assert metric(after, "souverain_requests_aborted_total", model=TINY) == metric(
            before, "souverain_requests_aborted_total", model=TINY) + 1
        # nothing was charged for it, and the handler answered 499 (client closed request)
        assert metric(after, "souverain_completion_tokens_total", model=TINY) == metric(
            before, "souverain_completion_tokens_total", model=TINY)
        wait_for("the 499 in /metrics", lambda: metric(
            server_b.metrics(), "souverain_requests_total", route=CHAT, status="499") == metric(
            before, "souverain_requests_total", route=CHAT, status="499") + 1)
        # and the server still answers
        r = httpx.post(server_b.url + CHAT, json=chat_body(max_tokens=4), timeout=60)
        assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 4, r.text
        print(f"abort noticed and KV freed {took:.1f} s after the request was sent")


# -- 4. API keys over HTTP, and the per-key rate limit ----------------------------------------
RPM = 10


@pytest.fixture(scope="class")
def keyed(tiny_mistral: dict, tmp_path_factory: pytest.TempPathFactory,
          stopper: list) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys = {name: add_key(path, name, models)[1] for name, models in [
        ("alice", None), ("bob", None), ("carol", ["other-model"]), ("dave", None)]}
    s = tiny_server(tiny_mistral, "--max-model-len", "64", "--api-keys-file", str(path),
                    "--rate-limit-rpm", str(RPM), "--log-level", "debug")
    stopper.append(s)
    return {"server": s, "path": path, "keys": keys}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class TestAuth:
    def test_no_key_wrong_key_malformed(self, keyed: dict) -> None:
        url = keyed["server"].url
        for headers, code in [({}, "missing_api_key"),
                              (bearer("sk-sov-" + "x" * 43), "invalid_api_key"),
                              ({"Authorization": "Basic dXNlcjpwYXNz"},
                               "invalid_authorization_header")]:
            for r in (httpx.get(url + "/v1/models", headers=headers, timeout=30),
                      httpx.post(url + CHAT, json=chat_body(max_tokens=2), headers=headers,
                                 timeout=30)):
                err = assert_error_shape(r, 401)
                assert err["type"] == "authentication_error" and err["code"] == code, err
                assert r.headers["www-authenticate"] == "Bearer"

    def test_valid_key(self, keyed: dict) -> None:
        url, key = keyed["server"].url, keyed["keys"]["alice"]
        r = httpx.get(url + "/v1/models", headers=bearer(key), timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == TINY, r.text
        r = httpx.post(url + CHAT, json=chat_body(max_tokens=3), headers=bearer(key), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "chat.completion"

    def test_key_scoped_to_another_model(self, keyed: dict) -> None:
        url, key = keyed["server"].url, keyed["keys"]["carol"]
        r = httpx.post(url + CHAT, json=chat_body(max_tokens=2), headers=bearer(key), timeout=30)
        err = assert_error_shape(r, 403)
        assert err["code"] == "model_not_allowed" and TINY in err["message"], err

    def test_revoked_key_refused_within_two_seconds(self, keyed: dict) -> None:
        url, key = keyed["server"].url, keyed["keys"]["bob"]
        assert httpx.get(url + "/v1/models", headers=bearer(key), timeout=30).status_code == 200
        assert revoke_key(keyed["path"], "bob")
        t0 = time.monotonic()
        while True:
            r = httpx.get(url + "/v1/models", headers=bearer(key), timeout=30)
            if r.status_code != 200:
                break
            assert time.monotonic() - t0 < 2.0, "a revoked key still works after 2 s"
            time.sleep(0.25)
        err = assert_error_shape(r, 401)
        assert err["code"] == "invalid_api_key"
        # the other keys still work
        r = httpx.get(url + "/v1/models", headers=bearer(keyed["keys"]["alice"]), timeout=30)
        assert r.status_code == 200

    def test_rate_limit_per_key(self, keyed: dict) -> None:
        url, key = keyed["server"].url, keyed["keys"]["dave"]
        statuses = []
        for _ in range(RPM + 3):
            r = httpx.get(url + "/v1/models", headers=bearer(key), timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        # a full bucket holds one minute of requests; it refills by RPM/60 per second
        assert statuses[:RPM] == [200] * RPM and statuses[-1] == 429, statuses
        err = assert_error_shape(r, 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limited"
        retry = r.headers["retry-after"]
        assert retry.isdigit() and 1 <= int(retry) <= 60 / RPM + 1, retry
        # /metrics (Prometheus, the console's health page) spends no budget: still served,
        # and it still needs the key
        for _ in range(3):
            assert httpx.get(url + "/metrics", headers=bearer(key), timeout=30).status_code == 200
        assert httpx.get(url + "/metrics", timeout=30).status_code == 401
        # another key has its own bucket
        r = httpx.get(url + "/v1/models", headers=bearer(keyed["keys"]["alice"]), timeout=30)
        assert r.status_code == 200

    def test_keys_never_logged(self, keyed: dict) -> None:
        # runs last in the class: the log has every request above, at --log-level debug
        log = keyed["server"].log()
        assert "Authenticated key_id=" in log  # debug records are on
        for key in keyed["keys"].values():
            assert key not in log
            assert hashlib.sha256(key.encode()).hexdigest() not in log
        assert "x" * 43 not in log and "dXNlcjpwYXNz" not in log


# -- 5. admission queue ------------------------------------------------------------------------
def _start_stream(url: str, body: dict, out: dict) -> threading.Thread:
    """Stream ``body`` in a thread; ``out["first"]`` is set at the first event, ``out["text"]``
    holds the whole body at the end (``out["error"]`` any exception)."""
    out["first"] = threading.Event()

    def run() -> None:
        try:
            with httpx.Client(timeout=300) as client, client.stream(
                    "POST", url + CHAT, json={**body, "stream": True}) as r:
                out["status"] = r.status_code
                parts = []
                for chunk in r.iter_text():
                    parts.append(chunk)
                    out["first"].set()
                out["text"] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc
        finally:
            out["first"].set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class TestAdmission:
    def test_max_pending_answers_429_and_admits_the_rest(self, tiny_mistral: dict,
                                                         stopper: list) -> None:
        s = tiny_server(tiny_mistral, "--max-model-len", "512", "--max-pending", "2")
        stopper.append(s)
        slow = [{} for _ in range(2)]
        threads = [_start_stream(s.url, chat_body(f"slow {i}", max_tokens=120, min_tokens=120,
                                                  random_seed=i), out)
                   for i, out in enumerate(slow)]
        for out in slow:
            assert out["first"].wait(120) and "error" not in out, out
        # Both slots are held until the streams end: every further request is refused at once.
        with httpx.Client(timeout=60) as client:
            refused = [client.post(s.url + CHAT, json=chat_body(max_tokens=2)) for _ in range(4)]
            assert client.get(s.url + "/v1/models").status_code == 200  # not a generation
        for r in refused:
            err = assert_error_shape(r, 429)
            assert err["code"] == "queue_full" and "2 requests" in err["message"], err
            assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        for t in threads:
            t.join(120)
        for out in slow:
            assert out.get("status") == 200 and "error" not in out, out
            check_stream(parse_sse(out["text"]), 120)
        # slots given back: a new request is admitted
        r = httpx.post(s.url + CHAT, json=chat_body(max_tokens=2), timeout=60)
        assert r.status_code == 200, r.text

        # Clients that leave (a dropped stream, a timed-out request) give their slot back too:
        # drop two of each, then two slow requests at once are both admitted again.
        with httpx.Client(timeout=60) as client:
            for i in range(2):
                with client.stream("POST", s.url + CHAT, json=chat_body(
                        max_tokens=400, min_tokens=400, stream=True)) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())
        for i in range(2):  # leaves long before its 400 tokens are done (~0.7 s here)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + CHAT, json=chat_body(max_tokens=400, min_tokens=400),
                           timeout=httpx.Timeout(30, read=0.1))
        wait_for("4 aborts", lambda: metric(s.metrics(), "souverain_requests_aborted_total",
                                            model=TINY) == 4)
        wait_idle(s)
        again = [{} for _ in range(2)]
        threads = [_start_stream(s.url, chat_body(max_tokens=8), out) for out in again]
        for t in threads:
            t.join(120)
        for out in again:
            assert out.get("status") == 200 and "error" not in out, out
            check_stream(parse_sse(out["text"]), 8)
        wait_idle(s)
        m = s.metrics()
        assert metric(m, "souverain_requests_total", route=CHAT, status="429") == 4
        assert metric(m, "souverain_requests_total", route=CHAT, status="200") == 3 + 2 + 2
        assert metric(m, "souverain_requests_total", route=CHAT, status="499") == 2


# -- 6. graceful shutdown ----------------------------------------------------------------------
def test_sigterm_lets_the_stream_finish(tiny_mistral: dict) -> None:
    s = tiny_server(tiny_mistral, "--max-model-len", "512")
    try:
        out: dict[str, Any] = {}
        t = _start_stream(s.url, chat_body("Go on.", max_tokens=150, min_tokens=150), out)
        assert out["first"].wait(120) and "error" not in out, out
        rc: list[int] = []
        stopping = threading.Thread(target=lambda: rc.append(s.stop(timeout=120)))
        stopping.start()
        t.join(120)
        stopping.join(150)
        assert out.get("status") == 200 and "error" not in out, (out, s.log()[-3000:])
        usage = check_stream(parse_sse(out["text"]), 150)
        assert usage["completion_tokens"] == 150
        assert rc == [0], (rc, s.log()[-3000:])
    finally:
        s.stop()


# -- 7. several models, lazy loading, memory budget -------------------------------------------
def _health(s: ServerProcess) -> dict[str, str]:
    r = httpx.get(s.url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["models"]


class TestSeveralModels:
    # Each tiny model is ~4.4 M float32 parameters (16.6 MiB) and is estimated at that plus
    # its --kv-cache-gib (0.01 GiB) before loading: ~27 MiB. Once loaded it holds ~23 MiB. A
    # 0.035 GiB (35.8 MiB) budget fits either one but never both.
    BUDGET_GIB = 0.035

    def test_lazy_models_and_memory_budget(self, tiny_mistral: dict, tiny_mixtral: dict,
                                           stopper: list) -> None:
        from souverain.weights import load

        est = [load(t["consolidated"]).args.n_params * 4 + 0.01 * (1 << 30)
               for t in (tiny_mistral, tiny_mixtral)]
        assert max(est) < self.BUDGET_GIB * (1 << 30) < sum(est) - 0.01 * (1 << 30)
        s = tiny_server(tiny_mistral, "--model", f"other={tiny_mixtral['consolidated']}",
                        "--lazy", "--memory-budget-gib", str(self.BUDGET_GIB),
                        "--kv-cache-gib", "0.01", "--max-model-len", "256")
        stopper.append(s)

        r = httpx.get(s.url + "/v1/models", timeout=30)
        assert r.status_code == 200, r.text
        cards = {c["id"]: c for c in r.json()["data"]
                 if c["id"] not in ("souverain-embed", "mistral-moderation-latest")}
        assert list(cards) == [TINY, "other"]
        assert not cards[TINY]["loaded"] and not cards["other"]["loaded"]
        assert all(c["capabilities"]["completion_chat"] for c in cards.values())
        assert _health(s) == {TINY: "not loaded", "other": "not loaded"}

        def chat(model: str) -> httpx.Response:
            return httpx.post(s.url + CHAT, json={**chat_body(max_tokens=3), "model": model},
                              timeout=120)

        r = chat(TINY)
        assert r.status_code == 200 and r.json()["model"] == TINY, r.text
        assert _health(s) == {TINY: "loaded", "other": "not loaded"}

        # loading "other" unloads the idle "tiny" to stay within the budget
        r = chat("other")
        assert r.status_code == 200 and r.json()["model"] == "other", r.text
        assert _health(s) == {TINY: "not loaded", "other": "loaded"}
        cards = {c["id"]: c for c in httpx.get(s.url + "/v1/models", timeout=30).json()["data"]}
        assert cards["other"]["loaded"] and not cards[TINY]["loaded"]
        assert cards[TINY]["max_context_length"] > 0  # known without loading it

        # while "other" is busy it cannot be unloaded: "tiny" gets a 503, the stream goes on
        out: dict[str, Any] = {}
        t = _start_stream(s.url, {**chat_body("Keep going.", max_tokens=120, min_tokens=120),
                                  "model": "other"}, out)
        assert out["first"].wait(120) and "error" not in out, out
        r = chat(TINY)
        err = assert_error_shape(r, 503)
        assert err["type"] == "service_unavailable_error", err
        assert err["code"] == "model_load_failed" and "budget" in err["message"], err
        assert _health(s) == {TINY: "not loaded", "other": "loaded"}
        t.join(120)
        assert out.get("status") == 200 and "error" not in out, out
        events = parse_sse(out["text"])
        assert all(e == "[DONE]" or e["model"] == "other" for e in events)
        assert events[-2]["usage"]["completion_tokens"] == 120

        # idle again: "tiny" loads, "other" goes
        r = chat(TINY)
        assert r.status_code == 200, r.text
        assert _health(s) == {TINY: "loaded", "other": "not loaded"}
        wait_idle(s, TINY)
