"""transformers' runner (in its own child process): ``AutoModelForCausalLM`` (a GGUF file is
dequantized by transformers itself); concurrency is one left-padded batch through
``model.generate``, so every request gets its first token at the same moment."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from souverain.bench.bytes_per_token import torch_bytes_per_token
from souverain.bench.measure import concurrency_result, decode_rate, prefill_rate, rss

if TYPE_CHECKING:
    import torch


def run_transformers(spec: dict[str, Any], run: dict[str, Any], work: dict[str, Any],
                     result: dict[str, Any]) -> None:
    """Load ``run["path"]`` and measure every row of the workload into ``result``."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    result["version"] = transformers.__version__
    dtype = getattr(torch, run.get("dtype", "float32"))
    t = time.perf_counter()
    model = _load(run, dtype)
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = rss()
    result["threads"] = torch.get_num_threads()
    result["bytes_per_token"] = torch_bytes_per_token(model)
    result["format"] = str(dtype).replace("torch.", "")
    result["mode"] = (f"transformers {transformers.__version__}, "
                      f"{model.config._attn_implementation} attention")

    _generate(model, [work["warmup_prompt"]], 4)
    result["prefill_tok_s"] = prefill_rate(work["prefill_prompts"],
                                           lambda p: _forward_seconds(model, p))
    stamps, _ = _generate(model, [work["decode_prompt"]], work["new_tokens"])
    result["decode_tok_s"] = decode_rate(stamps)
    result["decode_tokens"] = len(stamps)
    result["concurrent"] = {}
    for n, prompts in work["concurrent"].items():
        t0 = time.perf_counter()
        stamps, out = _generate(model, prompts, work["new_tokens"])
        t_end = time.perf_counter()
        new = out.shape[1] - max(len(p) for p in prompts)
        result["concurrent"][n] = concurrency_result(
            [new] * len(prompts), [t0] * len(prompts), [stamps[0]] * len(prompts), t0, t_end,
            "one left-padded batch through model.generate")


def _load(run: dict[str, Any], dtype: torch.dtype) -> Any:
    """The model in eval mode, its generation config set to pure greedy that never stops at
    EOS."""
    from transformers import AutoModelForCausalLM

    if run.get("gguf_file"):
        model = AutoModelForCausalLM.from_pretrained(run["path"], gguf_file=run["gguf_file"],
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(run["path"], dtype=dtype)
    model.eval()
    gc = model.generation_config
    gc.eos_token_id = None  # never stop at EOS
    gc.pad_token_id = 0
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    return model


def _forward_seconds(model: Any, prompt: list[int]) -> float:
    """One prefill forward (logits of the last position only)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t


def _generate(model: Any, prompts: list[list[int]], n_new: int) -> tuple[list[float], Any]:
    """Exactly ``n_new`` greedy tokens per prompt (left-padded batch): the time of each step
    and ``generate``'s output ids."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps every ``put`` (the prompt first, then one per generated step)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    clock = Clock()
    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens = cfg.min_new_tokens = n_new
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, streamer=clock,
                             generation_config=cfg)
    return clock.stamps[1:], out  # the first put() is the prompt
