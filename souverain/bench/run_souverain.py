"""souverain's runner (in its own child process): an `LLMEngine` (continuous batching); each
batch of requests is added before the first `step`, and every step's outputs are timestamped
per request."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from souverain.bench.bytes_per_token import find_module, torch_bytes_per_token
from souverain.bench.measure import (
    concurrency_result,
    decode_rate,
    prefill_rate,
    rss,
)

if TYPE_CHECKING:
    from souverain.engine import LLMEngine, RequestOutput


def run_souverain(spec: dict[str, Any], run: dict[str, Any], work: dict[str, Any],
                  result: dict[str, Any]) -> None:
    """Load ``run["path"]`` and measure every row of the workload into ``result``."""
    import torch

    import souverain
    from souverain.engine import EngineConfig, LLMEngine

    result["version"] = souverain.__version__
    t = time.perf_counter()
    engine = LLMEngine(run["path"], EngineConfig(
        dtype=run.get("dtype", "auto"), quantization=run.get("quantization", "none"),
        threads=spec["threads"], max_num_batched_tokens=512, max_num_seqs=64,
        speculative=run.get("speculative")))
    result["mode"] = "LLMEngine"
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = rss()
    result["threads"] = torch.get_num_threads()
    model = find_module(engine)
    if model is not None:
        result["bytes_per_token"] = torch_bytes_per_token(model)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
        quant = run.get("quantization", "none")
        result["format"] = "+".join(dtypes) + (f" ({quant})" if quant != "none" else "")

    batches = _Batches(engine)
    batches.run([work["warmup_prompt"]], 4)
    result["prefill_tok_s"] = prefill_rate(work["prefill_prompts"], batches.first_token_seconds)
    stamps, _, _ = batches.run([work["decode_prompt"]], work["new_tokens"])
    result["decode_tok_s"] = decode_rate(stamps[0])
    result["decode_tokens"] = len(stamps[0])
    if work.get("copy_prompt"):
        before = engine.stats()
        stamps, _, _ = batches.run([work["copy_prompt"]], work["new_tokens"])
        after = engine.stats()
        result["copy_tok_s"] = decode_rate(stamps[0])
        result["copy_ids"] = batches.last_ids[0]
        drafts = after["spec_draft_tokens"] - before["spec_draft_tokens"]
        if drafts:
            result["copy_acceptance"] = (after["spec_accepted_tokens"]
                                         - before["spec_accepted_tokens"]) / drafts
            result["copy_tokens_per_step"] = (
                (after["spec_emitted_tokens"] - before["spec_emitted_tokens"])
                / (after["spec_verify_steps"] - before["spec_verify_steps"]))
    result["concurrent"] = {}
    for n, prompts in work["concurrent"].items():
        stamps, arrival, t0 = batches.run(prompts, work["new_tokens"])
        t_end = max(s[-1] for s in stamps)
        result["concurrent"][n] = concurrency_result(
            [len(s) for s in stamps], arrival, [s[0] for s in stamps], t0, t_end,
            "continuous batching (LLMEngine)")


class _Batches:
    """Runs one batch of greedy requests (EOS ignored) to completion on the engine and
    timestamps every token of every request."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tags = itertools.count()  # request ids stay unique across batches
        self.last_ids: list[list[int]] = []  # the last batch's generated ids, per request

    def run(self, prompts: list[list[int]],
            n_new: int) -> tuple[list[list[float]], list[float], float]:
        """(per request token timestamps, arrival times, t0)."""
        from souverain.engine import SamplingParams

        params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
        stamps: list[list[float]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        arrival = []
        tag = next(self.tags)
        for i, p in enumerate(prompts):
            arrival.append(time.perf_counter())
            self.engine.add_request(f"b{tag}-{i}", p, params)
        seen = [0] * len(prompts)
        self.last_ids = [[] for _ in prompts]
        while self.engine.has_unfinished():
            outs = self.engine.step()
            now = time.perf_counter()
            for o in outs:
                _record(o, now, stamps, seen, arrival)
                if o.finished:
                    self.last_ids[int(o.request_id.rsplit("-", 1)[1])] = o.token_ids
        return stamps, arrival, t0

    def first_token_seconds(self, prompt: list[int]) -> float:
        """Time from submission to the first token of one request (its prefill)."""
        stamps, arrival, _t0 = self.run([prompt], 1)
        return stamps[0][0] - arrival[0]


def _record(o: RequestOutput, now: float, stamps: list[list[float]], seen: list[int],
            arrival: list[float]) -> None:
    """Timestamp the tokens one step added to request ``o``; its first token takes the
    engine's own first-token time (and arrival) where the output carries metrics."""
    i = int(o.request_id.rsplit("-", 1)[1])
    n = len(o.outputs[0].token_ids)
    if n <= seen[i]:
        return
    if seen[i] == 0:
        m = getattr(o, "metrics", None)
        ftt = getattr(m, "first_token_time", None) if m is not None else None
        arr = getattr(m, "arrival_time", None) if m is not None else None
        if arr:
            arrival[i] = arr
        stamps[i].extend([ftt or now] + [now] * (n - 1))
    else:
        stamps[i].extend([now] * (n - seen[i]))
    seen[i] = n
