"""Check `souverain plan predict` against a real deployment on this machine: start
`souverain serve MODEL --replicas N [--tensor-parallel K]` (N > 1: a local Ray Serve instance
behind one URL), drive it with U closed-loop users (each sends a streamed chat request, reads
the answer, sends the next: no think time) and print what was measured (TTFT and time per
output token p50/p95, decode tok/s) as JSON, next to `plan predict`'s figures for the same
deployment when ``--profile`` is given.

    python scripts/plan_validate.py --replicas 1 --users 4 --profile profile.json
    python scripts/plan_validate.py --replicas 2 --users 4 --profile profile.json
    python scripts/plan_validate.py --url http://127.0.0.1:8000 --users 4   # a running server
    python scripts/plan_validate.py --write-model /tmp/tp-model   # for TP 1 vs 2 (see below)

SmolLM2-135M's 9 heads / 3 kv heads cannot be split over 2 ranks: ``--write-model DIR`` writes
a random Mistral-shaped checkpoint of SmolLM2's size that can (dim 576, 30 layers, 8 / 2 heads
of 64, FFN 1536, vocabulary 32768; 140M parameters, float32; tests/checkpoints.py's seeded
initialisation), to measure `souverain plan measure DIR --tensor-parallel 1` and `2` on.

Prompts are seeded random common words, distinct per request (no prefix-cache hits beyond the
chat template), sized to ``--prompt-tokens`` by one calibration request; every answer is
exactly ``--answer-tokens`` tokens (min_tokens = max_tokens, temperature 0). Each user's first
request is a warm-up (not counted in the percentiles; its tokens count in the throughput).
TPOT = (last chunk - first chunk) / (completion tokens - 1), at the client.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from souverain.bench.capacity import Target, load_profile, predict  # noqa: E402
from souverain.bench.machine import loadavg  # noqa: E402
from souverain.bench.measure import percentile  # noqa: E402
from souverain.eval.target import ServerProcess  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from "
         "at which but have an they you were her she there been one all we their has would "
         "when if so what out up into do no time only could new them man some these then two "
         "first may any like now my such make over our even most me state after also made "
         "many did must before back see through way where get much go well your know should "
         "down work year because come people just say each those take day good how long "
         "little use very great still own men here life both between old under last never "
         "place same another while high might part found world house small country").split()
NAME = "plan-validate"


def stream(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = last = None
    usage: dict[str, Any] = {}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
    if first is None or last is None:
        raise RuntimeError("no content came back")
    n = int(usage.get("completion_tokens") or 0)
    return {"start": start, "ttft": first - start, "end": last,
            "tpot": (last - first) / (n - 1) if n > 1 else 0.0, "completion_tokens": n,
            "prompt_tokens": int(usage.get("prompt_tokens") or 0)}


def body(rng: random.Random, words: int, answer: int) -> dict[str, Any]:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"model": NAME, "messages": [{"role": "user", "content": text}],
            "max_tokens": answer, "min_tokens": answer, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def drive(url: str, users: int, requests: int, prompt_tokens: int, answer: int,
          seed: int = 0) -> dict[str, Any]:
    client = httpx.Client(timeout=600)
    probe = stream(client, url, body(random.Random(seed), prompt_tokens, 2))
    words = max(1, round(prompt_tokens * prompt_tokens / max(1, probe["prompt_tokens"])))
    results: list[list[dict[str, Any]]] = [[] for _ in range(users)]
    errors: list[str] = []

    def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i + 1)
        with httpx.Client(timeout=600) as c:
            for _ in range(requests):
                try:
                    results[i].append(stream(c, url, body(rng, words, answer)))
                except Exception as e:  # reported, not hidden
                    errors.append(str(e))
                    return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    counted = [r for rs in results for r in rs[1:]]
    every = [r for rs in results for r in rs]
    if errors or not counted:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return {
        "users": users, "requests": len(every), "wall_s": wall,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in every) / len(every),
        "answer_tokens_mean": sum(r["completion_tokens"] for r in every) / len(every),
        "decode_tok_s": sum(r["completion_tokens"] for r in every) / wall,
        "ttft_p50_s": percentile([r["ttft"] for r in counted], 50),
        "ttft_p95_s": percentile([r["ttft"] for r in counted], 95),
        "tpot_p50_s": percentile([r["tpot"] for r in counted], 50),
        "tpot_p95_s": percentile([r["tpot"] for r in counted], 95),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", help="drive this running server instead of starting one")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, help="per replica (default: cores / replicas)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="per user, the first a warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--profile", help="also print plan predict's figures for this deployment")
    ap.add_argument("--write-model", metavar="DIR", help="write the TP-splittable checkpoint")
    args = ap.parse_args()
    if args.write_model:
        sys.path.insert(0, str(ROOT / "tests"))
        from checkpoints import build_hf_model, write_hf

        model = build_hf_model("mistral", hidden_size=576, intermediate_size=1536,
                               num_hidden_layers=30, num_attention_heads=8,
                               num_key_value_heads=2, head_dim=64, sliding_window=None)
        print(write_hf(model, args.write_model, max_shard_size="200MB"))
        return
    server = None
    if args.url is None:
        data = tempfile.mkdtemp(prefix="plan-validate-")
        flags = [args.model, "--name", NAME, "--replicas", str(args.replicas),
                 "--tensor-parallel", str(args.tensor_parallel), "--data-dir", data,
                 "--no-console", "--no-libraries", "--no-finetune", "--no-batch",
                 "--no-audit", "--embed-model", "none", "--log-level", "warning"]
        if args.threads:
            flags += ["--threads", str(args.threads)]
        t = time.perf_counter()
        server = ServerProcess(*flags, startup_timeout=600, env={"SOUVERAIN_HOME": data})
        print(f"started in {time.perf_counter() - t:.0f} s at {server.url}", file=sys.stderr)
    load_before = loadavg()
    try:
        measured = drive(args.url or server.url, args.users, args.requests,  # type: ignore
                         args.prompt_tokens, args.answer_tokens)
    finally:
        if server is not None:
            server.stop()
    out: dict[str, Any] = {"replicas": args.replicas, "tensor_parallel": args.tensor_parallel,
                           "loadavg_before_after": [load_before, loadavg()],
                           "measured": measured}
    if args.profile:
        res = predict(load_profile(args.profile), Target(
            users=args.users, prompt_tokens=round(measured["prompt_tokens_mean"]),
            answer_tokens=args.answer_tokens, replicas=args.replicas,
            replicas_per_machine=args.replicas, machine_cores=args.replicas * args.threads
            if args.threads else None,
            tensor_parallel=args.tensor_parallel if args.tensor_parallel > 1 else None))
        out["predicted"] = res["predicted"]
        out["per_replica"] = res["per_replica"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
