"""llama.cpp's runner (in its own child process, without torch): llama-cpp-python's `Llama`
for the batch-1 rows, and llama.cpp's own C batch API for concurrency, scheduled like
llama-server (every step carries one token per decoding sequence plus prompt chunks up to
``n_batch``). ``--llama-concurrency sequential`` (or ``both``) also measures plain
``Llama.generate`` one request after another, what llama-cpp-python's own server does.

Standard library + llama_cpp only: the child's RSS is llama.cpp's.
"""

from __future__ import annotations

import time
from typing import Any

from souverain.bench.measure import concurrency_result, decode_rate, prefill_rate, rss


def run_llama(spec: dict[str, Any], run: dict[str, Any], work: dict[str, Any],
              result: dict[str, Any]) -> None:
    """Load ``run["path"]`` (a GGUF file) and measure every row of the workload into ``result``."""
    import llama_cpp
    from llama_cpp import Llama

    threads = spec["threads"]
    flash_attn = spec.get("llama_flash_attn", False)
    result["version"] = llama_cpp.__version__
    n_ctx = max(1024, len(work["prefill_prompts"][0]) + 64,
                len(work["decode_prompt"]) + work["new_tokens"] + 64,
                len(work.get("copy_prompt") or []) + work["new_tokens"] + 64)
    t = time.perf_counter()
    llm = Llama(model_path=run["path"], n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                n_batch=512, n_ubatch=512, flash_attn=flash_attn, verbose=False)
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = rss()
    result["threads"] = threads
    result["mode"] = f"llama-cpp-python {llama_cpp.__version__}, flash_attn={flash_attn}"

    _generate(llm, work["warmup_prompt"], 4)
    result["prefill_tok_s"] = prefill_rate(work["prefill_prompts"], lambda p: _eval_seconds(llm, p))
    stamps = _generate(llm, work["decode_prompt"], work["new_tokens"])
    result["decode_tok_s"] = decode_rate(stamps)
    result["decode_tokens"] = len(stamps)
    if work.get("copy_prompt"):
        ids: list[int] = []
        stamps = _generate(llm, work["copy_prompt"], work["new_tokens"], ids)
        result["copy_tok_s"] = decode_rate(stamps)
        result["copy_ids"] = ids

    modes = spec.get("llama_concurrency", "batched")
    result["concurrent"] = {}
    if modes in ("batched", "both"):
        for n, prompts in work["concurrent"].items():
            result["concurrent"][n] = llama_batched(llm, prompts, work["new_tokens"], threads)
    if modes in ("sequential", "both"):
        key = "concurrent" if modes == "sequential" else "concurrent_sequential"
        result[key] = {n: _sequential(llm, prompts, work["new_tokens"])
                       for n, prompts in work["concurrent"].items()}


def _generate(llm: Any, prompt: list[int], n_new: int,
              ids: list[int] | None = None) -> list[float]:
    """Timestamps of ``n_new`` greedy tokens from a fresh context (the tokens into ``ids``)."""
    llm.reset()
    stamps: list[float] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())  # EOS does not stop Llama.generate
        if ids is not None:
            ids.append(int(tok))
        if len(stamps) == n_new:
            break
    return stamps


def _eval_seconds(llm: Any, prompt: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - t


def _sequential(llm: Any, prompts: list[list[int]], n_new: int) -> dict[str, Any]:
    """The requests one after another; each one's TTFT counts from the start of the level."""
    t0 = time.perf_counter()
    firsts, counts = [], []
    for p in prompts:
        s = _generate(llm, p, n_new)
        firsts.append(s[0])
        counts.append(len(s))
    t_end = time.perf_counter()
    return concurrency_result(counts, [t0] * len(prompts), firsts, t0, t_end,
                              "sequential Llama.generate, one request after another")


def llama_batched(llm: Any, prompts: list[list[int]], n_new: int, threads: int,
                  budget: int = 512, tokens_out: list[list[int]] | None = None,
                  unified: bool = False) -> dict[str, Any]:
    """Greedy continuous batching on llama.cpp's C API (what llama-server does): a context with
    ``n_seq_max = len(prompts)``, each step = one token for every decoding sequence + prompt
    chunks (arrival order) up to ``budget`` tokens.

    KV: one stream per sequence (``kv_unified = False``) by default. With a unified KV buffer
    (llama-cpp-python 0.3.36) greedy tokens diverged from ``Llama.generate`` run alone for 9
    of 16 sequences and it was 1.3x slower; per-sequence streams match exactly."""
    import llama_cpp

    n = len(prompts)
    ctx = _batched_context(llm, prompts, n_new, threads, budget, unified)
    batch = llama_cpp.llama_batch_init(budget + n, 0, 1)
    n_vocab = llm.n_vocab()
    try:
        t0 = time.perf_counter()
        state = _BatchedDecode(prompts, n_new, budget)
        while not state.done():
            state.step(ctx, batch, n_vocab)
        if tokens_out is not None:
            tokens_out.extend(state.generated)
        return concurrency_result([len(g) for g in state.generated], [t0] * n, state.first, t0,
                                  max(state.last), f"llama_batch API, n_seq_max={n}, "
                                  f"{'unified KV' if unified else 'one KV stream per sequence'}, "
                                  f"n_batch={budget}")
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()


def _batched_context(llm: Any, prompts: list[list[int]], n_new: int, threads: int, budget: int,
                     unified: bool) -> Any:
    """A second context on the loaded model, sized for every sequence at once."""
    import llama_cpp
    from llama_cpp import _internals

    n = len(prompts)
    if unified:  # one KV buffer shared by all sequences
        n_ctx = (sum(len(p) + n_new for p in prompts) + 256 + 255) // 256 * 256
    else:  # one KV stream per sequence: n_ctx / n_seq_max cells each
        n_ctx = n * ((max(len(p) for p in prompts) + n_new + 16 + 255) // 256 * 256)
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = n_ctx
    params.n_batch = budget
    params.n_ubatch = budget
    params.n_seq_max = n
    params.kv_unified = unified
    params.n_threads = threads
    params.n_threads_batch = threads
    return _internals.LlamaContext(model=llm._model, params=params, verbose=False)


class _BatchedDecode:
    """Per-sequence progress of `llama_batched`: prompt tokens consumed, tokens generated, and
    the times of each sequence's first and last token."""

    def __init__(self, prompts: list[list[int]], n_new: int, budget: int) -> None:
        self.prompts, self.n_new, self.budget = prompts, n_new, budget
        n = len(prompts)
        self.consumed = [0] * n
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.first = [0.0] * n
        self.last = [0.0] * n

    def done(self) -> bool:
        return all(len(g) >= self.n_new for g in self.generated)

    def step(self, ctx: Any, batch: Any, n_vocab: int) -> None:
        """One ``llama_decode``: fill the batch, decode, take the argmax of each output row."""
        import llama_cpp
        import numpy as np

        outputs = self._fill(batch)
        rc = llama_cpp.llama_decode(ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        now = time.perf_counter()
        for idx, s in outputs:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx),
                                        shape=(n_vocab,))
            self.generated[s].append(int(row.argmax()))
            if len(self.generated[s]) == 1:
                self.first[s] = now
            self.last[s] = now

    def _fill(self, batch: Any) -> list[tuple[int, int]]:
        """One token for each decoding sequence, then prompt chunks up to the budget; returns
        (batch row, sequence) of the rows whose logits are read."""
        k = 0
        outputs: list[tuple[int, int]] = []

        def add(tok: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal k
            batch.token[k] = tok
            batch.pos[k] = pos
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = 1 if logits else 0
            if logits:
                outputs.append((k, seq))
            k += 1

        prompts, generated = self.prompts, self.generated
        for s in range(len(prompts)):
            if generated[s] and len(generated[s]) < self.n_new:
                add(generated[s][-1], len(prompts[s]) + len(generated[s]) - 1, s, True)
        for s in range(len(prompts)):
            if k >= self.budget:
                break
            if self.consumed[s] < len(prompts[s]):
                take = min(self.budget - k, len(prompts[s]) - self.consumed[s])
                for j in range(self.consumed[s], self.consumed[s] + take):
                    add(prompts[s][j], j, s, j == len(prompts[s]) - 1)
                self.consumed[s] += take
        batch.n_tokens = k
        return outputs
