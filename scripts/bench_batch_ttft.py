#!/usr/bin/env python
"""Interactive time to first token with and without a running batch job.

Starts a real `souverain serve` (the bundled SmolLM2 by default) on a throw-away data folder,
then, one after the other:
  1. ``--requests`` streamed chat requests, one at a time: TTFT = time from sending the
     request to the first SSE chunk that carries generated text (the first chunk, the role, is
     sent before the engine runs);
  2. a batch job of ``--batch-lines`` chat requests is created; once it runs, the same
     interactive requests again, while it runs (the job is cancelled afterwards).
Prints p50/p95 TTFT of both phases, the batch lines finished during phase 2, and the command.

  python scripts/bench_batch_ttft.py [--model smollm2-135m-instruct] [--requests 20]
      [--batch-lines 400] [--batch-concurrency 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?",
             "Say hello in Spanish.", "What is two plus two?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ttft(client: httpx.Client, model: str, question: str, max_tokens: int) -> float:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if first is None and delta.get("content"):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no content came back")
    return first


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def phase(client: httpx.Client, model: str, n: int, max_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        out.append(ttft(client, model, QUESTIONS[i % len(QUESTIONS)], max_tokens))
        time.sleep(0.2)  # a user's pause: the batch keeps the engine busy meanwhile
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch-lines", type=int, default=400)
    ap.add_argument("--batch-max-tokens", type=int, default=64)
    ap.add_argument("--batch-concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    home = tempfile.mkdtemp(prefix="souverain-bench-batch-")
    port = free_port()
    name = "bench"
    cmd = [sys.executable, "-m", "souverain.cli", "serve", args.model, "--name", name,
           "--port", str(port), "--data-dir", home, "--no-libraries", "--embed-model", "none",
           "--no-audit", "--batch-concurrency", str(args.batch_concurrency),
           "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(Path(home) / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "SOUVERAIN_HOME": home})
    url = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(base_url=url, timeout=300)
        deadline = time.monotonic() + 300
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {Path(home, 'serve.log')}")
            time.sleep(0.3)
        phase(client, name, 2, args.max_tokens)  # warm-up (kernels, caches)
        alone = phase(client, name, args.requests, args.max_tokens)

        lines = [{"custom_id": str(i), "body": {
            "messages": [{"role": "user", "content": f"Write a short story number {i}."}],
            "max_tokens": args.batch_max_tokens, "temperature": 0}}
            for i in range(args.batch_lines)]
        up = client.post("/v1/files", data={"purpose": "batch"}, files={"file": (
            "lines.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())})
        up.raise_for_status()
        job = client.post("/v1/batch/jobs", json={"input_files": [up.json()["id"]],
                                                  "endpoint": "/v1/chat/completions",
                                                  "model": name}).json()
        while client.get(f"/v1/batch/jobs/{job['id']}").json()["completed_requests"] < 1:
            time.sleep(0.1)
        t0 = time.perf_counter()
        before = client.get(f"/v1/batch/jobs/{job['id']}").json()["completed_requests"]
        busy = phase(client, name, args.requests, args.max_tokens)
        after = client.get(f"/v1/batch/jobs/{job['id']}").json()
        seconds = time.perf_counter() - t0
        client.post(f"/v1/batch/jobs/{job['id']}/cancel")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    def row(label: str, xs: list[float]) -> str:
        return (f"| {label} | {len(xs)} | {1000 * statistics.median(xs):.0f} | "
                f"{1000 * percentile(xs, 0.95):.0f} | {1000 * max(xs):.0f} |")

    done = after["completed_requests"] - before
    print(f"command: python scripts/bench_batch_ttft.py {shlex.join(sys.argv[1:])}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; model {args.model}")
    print("| interactive chat (stream, max_tokens "
          f"{args.max_tokens}) | requests | TTFT p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("alone", alone))
    print(row(f"beside a running batch job ({args.batch_concurrency} lines in flight)", busy))
    print(f"batch during phase 2: {done} lines of {args.batch_max_tokens} tokens in "
          f"{seconds:.1f} s ({after['status']} at the end)")


if __name__ == "__main__":
    main()
