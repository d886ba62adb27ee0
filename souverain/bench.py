"""`souverain bench`: the same workload on souverain, llama.cpp and transformers, one table.

    python -m souverain.bench --model smollm2 --threads 2
    python -m souverain.bench --model mistral-1b --threads 2 --formats q4_0
    python -m souverain.bench --model ./any.gguf --engines souverain --quick

Workloads (``--model``):

* ``smollm2``: the bundled SmolLM2-135M-Instruct Q4_1 GGUF (all three engines read that file;
  transformers dequantizes it to float32).
* ``mistral-1b``: a random Mistral-shaped checkpoint (dim 2048, 16 layers, 32/8 heads, head_dim
  64, hidden 5632, vocab 32768, sliding window 4096, rope_theta 1e6; 0.86B parameters) written
  once into ``--cache-dir``: a Hugging Face folder (bf16 safetensors; transformers runs it) and
  F16 / Q8_0 / Q4_0 GGUF files of the same weights (souverain and llama.cpp run those).
* any path or alias souverain can load (llama.cpp only runs ``.gguf`` files).

Rows measured per engine (prompts are seeded random token ids, identical for every engine;
greedy decoding; EOS never stops a sequence):

* prefill: tok/s of one 512-token prompt (time to its first token's logits);
* decode at batch 1: 128 new tokens after a 32-token prompt, ``(128 - 1) / (t_last - t_first)``;
* concurrency N (8, 16, 32 by default): N requests submitted at once, prompts of 16..256 tokens,
  128 new tokens each; aggregate = N * 128 / wall time (prefills included); time to first token
  p50/p95 measured from submission;
* RSS: each engine runs in its own subprocess, one after the other: RSS after loading and
  peak RSS (VmHWM) over the whole run;
* GB/s = bytes of weights read per token at batch 1 (every weight once, one row of the token
  embedding; KV cache reads not counted) x decode tok/s, against a measured read bandwidth.

How concurrency runs on each engine:

* souverain: ``LLMEngine`` (continuous batching), all requests added before the first ``step``;
  until the engine exists, ``LLM.generate`` with all prompts (one batch formed at the start).
* llama.cpp: llama-cpp-python's ``Llama`` object runs one sequence at a time, so the batched
  rows drive llama.cpp's own C batch API (``llama_batch`` + ``llama_decode`` on a context with
  ``n_seq_max = N``, one KV stream per sequence), scheduled like llama-server: every step
  carries one token per decoding sequence plus prompt chunks up to ``n_batch = 512`` tokens.
  ``--llama-concurrency sequential`` (or ``both``) also measures plain ``Llama.generate`` one
  request after another (what llama-cpp-python's own server does).
* transformers: one padded (left-padded) batch through ``model.generate``; every request gets
  its first token at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LLAMA_CPP_INSTALL = ("llama-cpp-python is not installed: `pip install llama-cpp-python` "
                     "(it compiles llama.cpp, ~10 minutes on 2 cores); "
                     "skipping the llama.cpp column")

MISTRAL_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=5632,
                  vocab_size=32768, sliding_window=4096, rope_theta=1e6, norm_eps=1e-5,
                  max_position_embeddings=32768, init_std=0.02, seed=0)
GGUF_FORMATS = {"f16": 1, "q8_0": 7, "q4_0": 2}  # gguf.LlamaFileType MOSTLY_F16 / Q8_0 / Q4_0
ENGINES = ("souverain", "llama.cpp", "transformers")


# ==============================================================================================
# Small helpers (standard library only: this module is also loaded, without the souverain
# package, into the llama.cpp subprocess so that its RSS does not include torch)
# ==============================================================================================

def _rss(field: str = "VmRSS:") -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _concurrency_result(n_new: list[int], arrival: list[float], first: list[float],
                        t0: float, t_end: float, mode: str) -> dict[str, Any]:
    ttft = [f - a for f, a in zip(first, arrival)]
    wall = t_end - t0
    return {"requests": len(n_new), "new_tokens": sum(n_new), "wall_s": wall,
            "aggregate_tok_s": sum(n_new) / wall if wall > 0 else 0.0,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
            "mode": mode}


def _decode_rate(stamps: list[float]) -> float:
    """tok/s between the first and the last generated token."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return 0.0
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (``/proc/stat``; steal time
    counts as busy: it is capacity this machine did not get)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / hz, sum(vals) / hz


def _others_share(before: tuple[float, float] | None, after: tuple[float, float] | None,
                  own_cpu: float = 0.0) -> float | None:
    """Share of the machine's CPU capacity used by other processes between two samples."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return max(0.0, (after[0] - before[0] - own_cpu) / (after[1] - before[1]))


def _wait_quiet(max_wait: float, threshold: float = 0.15) -> float | None:
    """Sample other processes' CPU share for 3 s; while it is above ``threshold``, wait (at
    most ``max_wait`` seconds in all). Returns the last sample."""
    waited = 0.0
    while True:
        a = _cpu_seconds()
        time.sleep(3)
        share = _others_share(a, _cpu_seconds())
        if share is None or share < threshold or waited >= max_wait:
            if share is not None and share >= threshold:
                _log(f"other processes use {100 * share:.0f}% of the CPUs: timings will be noisy")
            return share
        _log(f"other processes use {100 * share:.0f}% of the CPUs; waiting for a quiet machine")
        time.sleep(20)
        waited += 23


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ==============================================================================================
# Workload: seeded prompts (token ids), identical for every engine
# ==============================================================================================

def make_workload(vocab_size: int, quick: bool, concurrency: list[int], repeats: int = 1,
                  seed: int = 0) -> dict:
    rng = random.Random(seed)
    # skip the low ids: control / special tokens live there in every vocabulary used here
    low = min(1000, vocab_size // 4)

    def ids(n: int) -> list[int]:
        return [rng.randrange(low, vocab_size) for _ in range(n)]

    if quick:
        prefill_len, decode_prompt, n_new, lengths = 64, 8, 8, (4, 16)
    else:
        prefill_len, decode_prompt, n_new, lengths = 512, 32, 128, (16, 256)
    work: dict[str, Any] = {
        # one distinct prompt per repeat: a repeated prompt would hit souverain's prefix cache
        "prefill_prompts": [ids(prefill_len) for _ in range(max(1, repeats))],
        "decode_prompt": ids(decode_prompt),
        "new_tokens": n_new,
        "warmup_prompt": ids(16 if not quick else 4),
        "concurrent": {},
        "prompt_lengths": list(lengths),
    }
    for n in concurrency:
        work["concurrent"][str(n)] = [ids(rng.randint(*lengths)) for _ in range(n)]
    return work


# ==============================================================================================
# The ~1B Mistral-shaped checkpoint, written once
# ==============================================================================================

def _hf_config_dict(c: dict) -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": c["dim"], "intermediate_size": c["hidden_dim"],
        "num_hidden_layers": c["n_layers"], "num_attention_heads": c["n_heads"],
        "num_key_value_heads": c["n_kv_heads"], "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"], "sliding_window": c["sliding_window"],
        "rope_theta": c["rope_theta"], "rms_norm_eps": c["norm_eps"],
        "max_position_embeddings": c["max_position_embeddings"], "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0, "initializer_range": c["init_std"], "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def _hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, hd, kv = c["dim"], c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (c["n_heads"] * hd, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, c["n_heads"] * hd),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.mlp.gate_proj.weight": (c["hidden_dim"], d),
            f"{p}.mlp.up_proj.weight": (c["hidden_dim"], d),
            f"{p}.mlp.down_proj.weight": (d, c["hidden_dim"]),
        })
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def _write_mistral_hf(folder: Path, c: dict) -> None:
    """Seeded random weights (normal(0, init_std), norms = 1, as transformers' own init) saved
    as bf16 safetensors + config.json + the v3 tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(c["seed"])
    state = {}
    for name, shape in _hf_shapes(c).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(shape, generator=gen) * c["init_std"]).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(_hf_config_dict(c), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}) + "\n")
    shutil.copyfile(_v3_tokenizer_path(), tmp / "tokenizer.model.v3")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _v3_tokenizer_path() -> Path:
    """mistral-common's v3 SentencePiece model (32768 pieces), shipped in its wheel."""
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    path = data / "mistral_instruct_tokenizer_240323.model.v3"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (mistral-common's v3 tokenizer) is missing")
    return path


def add_sentencepiece_vocab(writer: Any, model_file: Path, add_bos: bool | None = True) -> None:
    """llama/SPM tokenizer metadata (tokens, scores, types, bos/eos/unk) from a SentencePiece
    model, so llama.cpp accepts the file; ``add_bos=None`` leaves add_bos_token unwritten."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)


def _permute_qk(w: Any, n_heads: int) -> Any:
    """HF rotate-half rows -> GGUF interleaved pairs (llama.cpp ``LlamaModel.permute``)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _write_mistral_gguf(hf_folder: Path, path: Path, fmt: str, c: dict) -> None:
    """One GGUF (arch llama) of the HF folder's weights: 2-D tensors in ``fmt`` (all of them,
    token embedding and output included: a "pure" file), norms F32."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    Q = gguf.GGMLQuantizationType
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}.get(fmt)
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"souverain-bench-mistral-1b-{fmt}")
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_layer_norm_rms_eps(c["norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    w.add_sliding_window(c["sliding_window"])
    w.add_file_type(GGUF_FORMATS[fmt])
    add_sentencepiece_vocab(w, _v3_tokenizer_path())
    with safe_open(str(hf_folder / "model.safetensors"), framework="pt") as f:
        names = list(_hf_shapes(c))
        for name in names:
            arr = f.get_tensor(name).float().numpy()
            if name.endswith("q_proj.weight"):
                arr = _permute_qk(arr, c["n_heads"])
            elif name.endswith("k_proj.weight"):
                arr = _permute_qk(arr, c["n_kv_heads"])
            arr = np.ascontiguousarray(arr)
            gname = _gguf_name(name)
            if arr.ndim == 1:
                w.add_tensor(gname, arr.astype(np.float32))
            elif qtype is None:
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                q = gguf.quants.quantize(arr, qtype)
                w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def ensure_mistral_1b(cache_dir: Path, formats: list[str]) -> dict[str, Any]:
    """Write (once) the HF folder and the requested GGUF files; return their paths."""
    c = MISTRAL_1B
    root = cache_dir / "mistral-1b"
    hf = root / "hf"
    log_path = root / "written.json"
    written = json.loads(log_path.read_text()) if log_path.is_file() else {}
    root.mkdir(parents=True, exist_ok=True)
    if not (hf / "model.safetensors").is_file():
        _log(f"writing the random ~0.86B Mistral-shaped checkpoint into {hf} (once)")
        t = time.perf_counter()
        _write_mistral_hf(hf, c)
        written["hf_bf16_s"] = round(time.perf_counter() - t, 1)
        _log(f"  HF bf16 folder: {written['hf_bf16_s']} s")
    out: dict[str, Any] = {"hf": hf, "gguf": {}}
    for fmt in formats:
        path = root / f"mistral-1b-{fmt}.gguf"
        if not path.is_file():
            _log(f"writing {path.name} (once)")
            t = time.perf_counter()
            _write_mistral_gguf(hf, path, fmt, c)
            written[f"gguf_{fmt}_s"] = round(time.perf_counter() - t, 1)
            _log(f"  {path.name}: {written[f'gguf_{fmt}_s']} s")
        out["gguf"][fmt] = path
    log_path.write_text(json.dumps(written, indent=2) + "\n")
    out["written_s"] = written
    return out


# ==============================================================================================
# Bytes of weights read per token at batch 1
# ==============================================================================================

def gguf_bytes_per_token(path: Path) -> dict[str, Any]:
    """Every tensor once except the token embedding (one row per token), unless the file has
    no ``output.weight`` (tied embeddings: the embedding is read whole as the output head)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(sizes.values())
    tied = "output.weight" not in sizes
    per_token = total if tied else total - sizes.get("token_embd.weight", 0)
    main = max(types, key=types.get)
    return {"file_bytes": path.stat().st_size, "weights_bytes": total,
            "bytes_per_token": per_token, "format": main, "types": types}


def torch_bytes_per_token(module: Any) -> int:
    """Same rule for an in-memory torch model: unique parameters and buffers, minus the token
    embedding table when a separate output head exists."""
    import torch

    seen: set[int] = set()
    total = 0
    names: dict[str, int] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n = t.untyped_storage().nbytes()
        total += n
        names[name] = n
    from souverain.models.quantize import Int8Linear

    for name, m in module.named_modules():  # oneDNN-packed int8 weights are not buffers
        if isinstance(m, Int8Linear):
            names[f"{name}.qweight"] = m.packed_nbytes
            total += m.packed_nbytes
    embeds = [m for m in module.modules() if isinstance(m, torch.nn.Embedding)]
    has_head = any(k.split(".")[0] in ("output", "lm_head") or ".output." in k or "lm_head" in k
                   for k in names)
    if embeds and has_head:
        w = embeds[0].weight
        if w.untyped_storage().data_ptr() in seen:
            head_ptrs = {t.untyped_storage().data_ptr() for k, t in module.named_parameters()
                         if "lm_head" in k or k.startswith("output")}
            if w.untyped_storage().data_ptr() not in head_ptrs:
                total -= w.untyped_storage().nbytes()
    return total


def _find_module(obj: Any, depth: int = 3) -> Any:
    """The torch model inside an engine object (attribute names are not fixed yet)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if depth == 0:
        return None
    for attr in ("model", "runner", "model_runner", "executor", "worker", "llm"):
        found = _find_module(getattr(obj, attr, None), depth - 1) if hasattr(obj, attr) else None
        if found is not None:
            return found
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, torch.nn.Module):
            return v
    return None


# ==============================================================================================
# Children: one engine per subprocess
# ==============================================================================================

def _child_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    run, work = spec["run"], spec["workload"]
    result: dict[str, Any] = {"label": run["label"], "engine": run["engine"], "notes": []}
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    try:
        if run["engine"] == "bandwidth":
            result.update(_measure_bandwidth(spec["threads"], spec["bandwidth_mb"]))
        else:
            result["rss_start"] = _rss()
            fn: Callable[..., None] = {"souverain": _run_souverain, "llama.cpp": _run_llama,
                                       "transformers": _run_transformers}[run["engine"]]
            fn(spec, run, work, result)
            result["peak_rss"] = _rss("VmHWM:")
    except Exception as exc:  # report and keep the other engines going
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    Path(argv[1]).write_text(json.dumps(result))


def _measure_bandwidth(threads: int, mb: int) -> dict[str, Any]:
    """Read bandwidth over ``mb`` MiB of float32, two ways: ``sum`` (a pure stream) and a
    matrix-vector product (the decode kernel itself; it reads faster here, ~32 vs ~24-28 GB/s).
    The bound used for "% bound" is the best of both."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    w = x.view(1024, -1)
    v = torch.ones(w.shape[1])
    nbytes = x.numel() * 4
    out: dict[str, Any] = {"tensor_mb": nbytes / 1e6, "threads": threads}
    for name, fn in (("sum", x.sum), ("gemv", lambda: torch.mv(w, v))):
        fn()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[f"{name}_gbs_best"] = nbytes / min(times) / 1e9
        out[f"{name}_gbs_median"] = nbytes / statistics.median(times) / 1e9
    out["read_gbs_best"] = max(out["sum_gbs_best"], out["gemv_gbs_best"])
    out["read_gbs_median"] = max(out["sum_gbs_median"], out["gemv_gbs_median"])
    return out


# ---- souverain -------------------------------------------------------------------------------

def _run_souverain(spec: dict, run: dict, work: dict, result: dict) -> None:
    import itertools

    import torch

    import souverain
    from souverain.engine.sampling import SamplingParams

    threads = spec["threads"]
    result["version"] = souverain.__version__
    greedy = dict(temperature=0.0, ignore_eos=True)
    try:
        from souverain.engine import EngineConfig, LLMEngine  # type: ignore[attr-defined]
    except ImportError as exc:
        LLMEngine = None
        msg = (f"souverain.engine.LLMEngine is not available ({exc}); ran the fallback: "
               "LLM.generate (one batch formed at the start, contiguous KV cache)")
        _log(msg)
        result["notes"].append(msg)
    t = time.perf_counter()
    if LLMEngine is not None:
        engine = LLMEngine(run["path"], EngineConfig(
            dtype=run.get("dtype", "auto"), quantization=run.get("quantization", "none"),
            threads=threads, max_num_batched_tokens=512, max_num_seqs=64))
        result["mode"] = "LLMEngine"
        model = _find_module(engine)
    else:
        if run.get("quantization", "none") != "none":
            raise RuntimeError(
                f"quantization={run['quantization']} needs souverain.engine.LLMEngine")
        from souverain.engine.generate import generate_stream
        from souverain.llm import LLM

        llm = LLM(run["path"], dtype=run.get("dtype", "auto"), threads=threads)
        result["mode"] = "LLM.generate (fallback)"
        model = llm.model
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = _rss()
    result["threads"] = torch.get_num_threads()
    if model is not None:
        result["bytes_per_token"] = torch_bytes_per_token(model)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
        result["format"] = "+".join(dtypes) + (f" ({run['quantization']})"
                                               if run.get("quantization", "none") != "none" else "")

    batches = itertools.count()

    def run_batch(prompts: list[list[int]],
                  n_new: int) -> tuple[list[list[float]], list[float], float]:
        """Returns (per request token timestamps, arrival times, t0)."""
        params = SamplingParams(max_tokens=n_new, **greedy)
        stamps: list[list[float]] = [[] for _ in prompts]
        if LLMEngine is not None:
            t0 = time.perf_counter()
            arrival = []
            tag = next(batches)
            for i, p in enumerate(prompts):
                arrival.append(time.perf_counter())
                engine.add_request(f"b{tag}-{i}", p, params)
            seen = [0] * len(prompts)
            while engine.has_unfinished():
                outs = engine.step()
                now = time.perf_counter()
                for o in outs:
                    i = int(o.request_id.rsplit("-", 1)[1])
                    n = len(o.outputs[0].token_ids)
                    if n > seen[i]:
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
            return stamps, arrival, t0
        t0 = time.perf_counter()
        seen = [0] * len(prompts)
        for outs, _ in generate_stream(llm.model, llm.tokenizer, prompts, [params] * len(prompts),
                                       llm.context):
            now = time.perf_counter()
            for i, o in enumerate(outs):
                n = len(o.token_ids)
                if n > seen[i]:
                    stamps[i].extend([now] * (n - seen[i]))
                    seen[i] = n
        return stamps, [t0] * len(prompts), t0

    run_batch([work["warmup_prompt"]], 4)
    best = None
    for prompt in work["prefill_prompts"]:
        stamps, arrival, _t0 = run_batch([prompt], 1)
        dt = stamps[0][0] - arrival[0]
        best = dt if best is None else min(best, dt)
    result["prefill_tok_s"] = len(work["prefill_prompts"][0]) / best
    stamps, _, _ = run_batch([work["decode_prompt"]], work["new_tokens"])
    result["decode_tok_s"] = _decode_rate(stamps[0])
    result["decode_tokens"] = len(stamps[0])
    result["concurrent"] = {}
    for n, prompts in work["concurrent"].items():
        stamps, arrival, t0 = run_batch(prompts, work["new_tokens"])
        t_end = max(s[-1] for s in stamps)
        result["concurrent"][n] = _concurrency_result(
            [len(s) for s in stamps], arrival, [s[0] for s in stamps], t0, t_end,
            "continuous batching (LLMEngine)" if LLMEngine is not None
            else "one batch via LLM.generate (fallback)")


# ---- llama.cpp -------------------------------------------------------------------------------

def _run_llama(spec: dict, run: dict, work: dict, result: dict) -> None:
    import llama_cpp
    from llama_cpp import Llama

    threads = spec["threads"]
    result["version"] = llama_cpp.__version__
    n_ctx = max(1024, len(work["prefill_prompts"][0]) + 64,
                len(work["decode_prompt"]) + work["new_tokens"] + 64)
    t = time.perf_counter()
    llm = Llama(model_path=run["path"], n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                n_batch=512, n_ubatch=512, flash_attn=spec.get("llama_flash_attn", False),
                verbose=False)
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = _rss()
    result["threads"] = threads
    result["mode"] = (f"llama-cpp-python {llama_cpp.__version__}, "
                      f"flash_attn={spec.get('llama_flash_attn', False)}")

    def gen(prompt: list[int], n_new: int) -> list[float]:
        llm.reset()
        stamps = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())  # EOS does not stop Llama.generate
            if len(stamps) == n_new:
                break
        return stamps

    gen(work["warmup_prompt"], 4)
    best = None
    for prompt in work["prefill_prompts"]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    result["prefill_tok_s"] = len(work["prefill_prompts"][0]) / best
    stamps = gen(work["decode_prompt"], work["new_tokens"])
    result["decode_tok_s"] = _decode_rate(stamps)
    result["decode_tokens"] = len(stamps)

    modes = spec.get("llama_concurrency", "batched")
    result["concurrent"] = {}
    if modes in ("batched", "both"):
        for n, prompts in work["concurrent"].items():
            result["concurrent"][n] = _llama_batched(llm, prompts, work["new_tokens"], threads)
    if modes in ("sequential", "both"):
        key = "concurrent" if modes == "sequential" else "concurrent_sequential"
        result[key] = {}
        for n, prompts in work["concurrent"].items():
            t0 = time.perf_counter()
            firsts, counts = [], []
            for p in prompts:
                s = gen(p, work["new_tokens"])
                firsts.append(s[0])
                counts.append(len(s))
            t_end = time.perf_counter()
            result[key][n] = _concurrency_result(
                counts, [t0] * len(prompts), firsts, t0, t_end,
                "sequential Llama.generate, one request after another")


def _llama_batched(llm: Any, prompts: list[list[int]], n_new: int, threads: int,
                   budget: int = 512, tokens_out: list | None = None,
                   unified: bool = False) -> dict[str, Any]:
    """Greedy continuous batching on llama.cpp's C API (what llama-server does): a context with
    ``n_seq_max = len(prompts)``, each step = one token for every decoding sequence + prompt
    chunks (arrival order) up to ``budget`` tokens.

    KV: one stream per sequence (``kv_unified = False``) by default. With a unified KV buffer
    (llama-cpp-python 0.3.36) greedy tokens diverged from ``Llama.generate`` run alone for 9
    of 16 sequences and it was 1.3x slower; per-sequence streams match exactly."""
    import llama_cpp
    import numpy as np
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
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(budget + n, 0, 1)
    n_vocab = llm.n_vocab()
    consumed = [0] * n
    generated: list[list[int]] = [[] for _ in range(n)]
    first = [0.0] * n
    last = [0.0] * n
    try:
        t0 = time.perf_counter()
        while any(len(g) < n_new for g in generated):
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

            for s in range(n):  # one token for each decoding sequence
                if generated[s] and len(generated[s]) < n_new:
                    add(generated[s][-1], len(prompts[s]) + len(generated[s]) - 1, s, True)
            for s in range(n):  # then prompt chunks
                if k >= budget:
                    break
                if consumed[s] < len(prompts[s]):
                    take = min(budget - k, len(prompts[s]) - consumed[s])
                    for j in range(consumed[s], consumed[s] + take):
                        add(prompts[s][j], j, s, j == len(prompts[s]) - 1)
                    consumed[s] += take
            batch.n_tokens = k
            rc = llama_cpp.llama_decode(ctx.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            now = time.perf_counter()
            for idx, s in outputs:
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx),
                                            shape=(n_vocab,))
                generated[s].append(int(row.argmax()))
                if len(generated[s]) == 1:
                    first[s] = now
                last[s] = now
        if tokens_out is not None:
            tokens_out.extend(generated)
        return _concurrency_result([len(g) for g in generated], [t0] * n, first, t0, max(last),
                                   f"llama_batch API, n_seq_max={n}, "
                                   f"{'unified KV' if unified else 'one KV stream per sequence'}, "
                                   f"n_batch={budget}")
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()


# ---- transformers ----------------------------------------------------------------------------

def _run_transformers(spec: dict, run: dict, work: dict, result: dict) -> None:
    import copy

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    threads = spec["threads"]
    torch.set_num_threads(threads)
    result["version"] = transformers.__version__
    dtype = getattr(torch, run.get("dtype", "float32"))
    t = time.perf_counter()
    if run.get("gguf_file"):
        model = AutoModelForCausalLM.from_pretrained(run["path"], gguf_file=run["gguf_file"],
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(run["path"], dtype=dtype)
    model.eval()
    result["load_s"] = time.perf_counter() - t
    result["rss_load"] = _rss()
    result["threads"] = torch.get_num_threads()
    result["bytes_per_token"] = torch_bytes_per_token(model)
    result["format"] = str(dtype).replace("torch.", "")
    result["mode"] = (f"transformers {transformers.__version__}, "
                      f"{model.config._attn_implementation} attention")
    gc = model.generation_config
    gc.eos_token_id = None  # never stop at EOS
    gc.pad_token_id = 0
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(prompts: list[list[int]], n_new: int) -> tuple[list[float], Any]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        clock = Clock()
        cfg = copy.deepcopy(gc)
        cfg.max_new_tokens = cfg.min_new_tokens = n_new
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, streamer=clock,
                                 generation_config=cfg)
        return clock.stamps[1:], out  # the first put() is the prompt

    generate([work["warmup_prompt"]], 4)
    best = None
    for prompt in work["prefill_prompts"]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    result["prefill_tok_s"] = ids.shape[1] / best
    stamps, _ = generate([work["decode_prompt"]], work["new_tokens"])
    result["decode_tok_s"] = _decode_rate(stamps)
    result["decode_tokens"] = len(stamps)
    result["concurrent"] = {}
    for n, prompts in work["concurrent"].items():
        t0 = time.perf_counter()
        stamps, out = generate(prompts, work["new_tokens"])
        t_end = time.perf_counter()
        new = out.shape[1] - max(len(p) for p in prompts)
        result["concurrent"][n] = _concurrency_result(
            [new] * len(prompts), [t0] * len(prompts), [stamps[0]] * len(prompts), t0, t_end,
            "one left-padded batch through model.generate")


# ==============================================================================================
# Parent: plan the runs, launch the children one after the other, print one table
# ==============================================================================================

_BOOT = ("import importlib.util, sys; s = importlib.util.spec_from_file_location("
         "'_souverain_bench', sys.argv[1]); m = importlib.util.module_from_spec(s); "
         "sys.modules['_souverain_bench'] = m; s.loader.exec_module(m); "
         "m._child_main(sys.argv[2:])")


def _launch(spec: dict, timeout: float) -> dict[str, Any]:
    """Run one child in a fresh interpreter that loads this file standalone (the llama.cpp
    child therefore never imports torch or souverain)."""
    with tempfile.TemporaryDirectory(prefix="souverain-bench-") as d:
        spec_path, out_path = Path(d) / "spec.json", Path(d) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
                   TOKENIZERS_PARALLELISM="false")
        label = spec["run"]["label"]
        import resource

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = usage.ru_utime + usage.ru_stime
        stat0 = _cpu_seconds()
        t = time.perf_counter()
        try:
            sys.stderr.fileno()
            live = True  # the child's output (progress, warnings) goes straight to our stderr
        except (AttributeError, OSError, ValueError):
            live = False  # captured stderr (pytest): collect it and echo it afterwards
        try:
            proc = subprocess.run([sys.executable, "-c", _BOOT, str(Path(__file__).resolve()),
                                   str(spec_path), str(out_path)], env=env, timeout=timeout,
                                  stdout=sys.stderr if live else subprocess.PIPE,
                                  stderr=None if live else subprocess.STDOUT,
                                  text=None if live else True)
            if not live and proc.stdout:
                sys.stderr.write(proc.stdout)
        except subprocess.TimeoutExpired:
            return {"label": label, "engine": spec["run"]["engine"],
                    "error": f"timed out after {timeout:.0f} s"}
        if not out_path.is_file():
            return {"label": label, "engine": spec["run"]["engine"],
                    "error": f"the subprocess exited with code {proc.returncode} and no result"}
        res = json.loads(out_path.read_text())
        res["child_s"] = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = usage.ru_utime + usage.ru_stime - cpu0
        res["child_cpu_s"] = own
        res["others_cpu_share"] = _others_share(stat0, _cpu_seconds(), own)
        return res


def _llama_cpp_available() -> str | None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return "?"


def plan_runs(args: argparse.Namespace) -> tuple[list[dict], dict[str, Any], int]:
    """The runs (one subprocess each), the formats to describe, and the vocabulary size."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    quants = [q.strip() for q in args.quantization.split(",") if q.strip()]
    runs: list[dict] = []
    files: dict[str, Path] = {}
    if args.model == "mistral-1b":
        formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
        bad = [f for f in formats if f not in GGUF_FORMATS]
        if bad:
            raise SystemExit(f"unknown format(s) {bad}; choose from {', '.join(GGUF_FORMATS)}")
        paths = ensure_mistral_1b(Path(args.cache_dir).expanduser(), formats)
        vocab = MISTRAL_1B["vocab_size"]
        for fmt in formats:
            files[fmt.upper()] = paths["gguf"][fmt]
        for fmt in formats:
            p = paths["gguf"][fmt]
            if "souverain" in engines:
                for q in quants:
                    runs.append({"engine": "souverain", "path": str(p), "quantization": q,
                                 "dtype": args.dtype, "source": fmt.upper(),
                                 "label": f"souverain · {fmt.upper()} GGUF · quant {q}"})
            if "llama.cpp" in engines:
                runs.append({"engine": "llama.cpp", "path": str(p), "source": fmt.upper(),
                             "label": f"llama.cpp · {fmt.upper()} GGUF"})
        if "transformers" in engines:
            runs.append({"engine": "transformers", "path": str(paths["hf"]), "dtype": args.hf_dtype,
                         "source": "HF bf16 safetensors",
                         "label": f"transformers · HF folder · {args.hf_dtype}"})
    else:
        from souverain.weights import load, resolve

        name = "smollm2-135m-instruct" if args.model == "smollm2" else args.model
        path = resolve(name)
        vocab = load(path).args.vocab_size
        is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
        src = path.name
        if is_gguf:
            files[path.name] = path
        for q in quants:
            if "souverain" in engines:
                runs.append({"engine": "souverain", "path": str(path), "quantization": q,
                             "dtype": args.dtype, "source": src,
                             "label": f"souverain · quant {q}"})
        if "llama.cpp" in engines:
            if is_gguf:
                runs.append({"engine": "llama.cpp", "path": str(path), "source": src,
                             "label": "llama.cpp"})
            else:
                _log(f"llama.cpp runs GGUF files only; {path} is not one: skipped")
        if "transformers" in engines:
            r = {"engine": "transformers", "dtype": args.hf_dtype, "source": src,
                 "label": f"transformers · {args.hf_dtype}"}
            if is_gguf:
                r.update(path=str(path.parent), gguf_file=path.name)
            else:
                r.update(path=str(path))
            runs.append(r)
    if any(r["engine"] == "llama.cpp" for r in runs) and _llama_cpp_available() is None:
        _log(LLAMA_CPP_INSTALL)
        runs = [r for r in runs if r["engine"] != "llama.cpp"]
    return runs, files, vocab


def _fmt(x: Any, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def build_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    levels = report["concurrency"]
    bw = report.get("bandwidth", {}).get("read_gbs_best")
    header = ["engine · weights", "load s", "prefill tok/s", "decode b=1 tok/s",
              "MB/token", "GB/s (% bound)"]
    header += [f"x{n}: agg tok/s · TTFT p50/p95 s" for n in levels]
    header += ["RSS load / peak MB"]
    rows = []
    for r in report["runs"]:
        conc_sets = [("", r.get("concurrent") or {})]
        if r.get("concurrent_sequential"):
            conc_sets.append((" · sequential", r["concurrent_sequential"]))
        for suffix, conc in conc_sets:
            label = r["label"] + suffix
            if r.get("error"):
                rows.append([label, "error: " + r["error"][:120]] + [""] * (len(header) - 2))
                continue
            bpt = r.get("bytes_per_token")
            gbs = bpt * r["decode_tok_s"] / 1e9 if bpt and r.get("decode_tok_s") else None
            pct = f" ({100 * gbs / bw:.0f}%)" if gbs and bw else ""
            first = not suffix
            row = [label,
                   _fmt(r.get("load_s"), ".1f") if first else "",
                   _fmt(r.get("prefill_tok_s")) if first else "",
                   _fmt(r.get("decode_tok_s"), ".1f") if first else "",
                   _fmt(bpt / 1e6 if bpt else None) if first else "",
                   (_fmt(gbs, ".1f") + pct) if first else ""]
            for n in levels:
                c = conc.get(str(n))
                row.append("—" if not c else f"{c['aggregate_tok_s']:.0f} · "
                           f"{c['ttft_p50_s']:.2f}/{c['ttft_p95_s']:.2f}")
            rss = (r.get("rss_load") or 0) / 1e6, (r.get("peak_rss") or 0) / 1e6
            row.append(f"{rss[0]:.0f} / {rss[1]:.0f}" if first else "")
            rows.append(row)
    return header, rows


def print_report(report: dict, markdown: bool = False) -> None:
    header, rows = build_rows(report)
    title = (f"souverain bench · {report['model']} · {report['threads']} threads · "
             f"{'QUICK · ' if report['quick'] else ''}{report['host']}")
    try:
        if markdown:
            raise ImportError
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(200, Console().width), highlight=False)
        table = Table(title=title, title_justify="left", show_lines=False)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in report_notes(report):
            console.print(line, markup=False, soft_wrap=True)
    except ImportError:
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
        for line in report_notes(report):
            print(line)


def report_notes(report: dict) -> list[str]:
    lines = []
    bw = report.get("bandwidth") or {}
    if bw and "gemv_gbs_best" not in bw:  # a report saved before the GEMV figure existed
        lines.append(f"read bandwidth (torch.sum over {bw['tensor_mb']:.0f} MB, "
                     f"{bw['threads']} threads): best {bw['read_gbs_best']:.1f} GB/s")
    elif bw:
        lines.append(f"read bandwidth over {bw['tensor_mb']:.0f} MB of float32, {bw['threads']} "
                     f"threads (best / median): torch.sum {bw.get('sum_gbs_best', 0):.1f} / "
                     f"{bw.get('sum_gbs_median', 0):.1f} GB/s, fp32 GEMV "
                     f"{bw.get('gemv_gbs_best', 0):.1f} / {bw.get('gemv_gbs_median', 0):.1f} GB/s; "
                     f"bound = {bw['read_gbs_best']:.1f} GB/s")
    best = bw.get("read_gbs_best")
    for name, f in report.get("formats", {}).items():
        bound = f" -> bound {best * 1e9 / f['bytes_per_token']:.1f} tok/s" if best else ""
        lines.append(f"format {name} ({f['format']}): {f['bytes_per_token'] / 1e6:.0f} MB read "
                     f"per token at batch 1 (file {f['file_bytes'] / 1e6:.0f} MB){bound}")
    for r in report["runs"]:
        if r.get("bytes_per_token") and best and r["engine"] != "llama.cpp":
            lines.append(f"{r['label']}: in-memory weights {r.get('format', '?')}, "
                         f"{r['bytes_per_token'] / 1e6:.0f} MB/token -> bound "
                         f"{best * 1e9 / r['bytes_per_token']:.1f} tok/s")
    modes = {}
    for r in report["runs"]:
        for conc in (r.get("concurrent") or {}, r.get("concurrent_sequential") or {}):
            for c in conc.values():
                modes.setdefault(f"{r['engine']}: {c['mode']}", None)
        if r.get("mode"):
            modes.setdefault(f"{r['label']}: {r['mode']}", None)
        for note in r.get("notes", []):
            modes.setdefault(f"{r['label']}: {note}", None)
    lines += [f"· {m}" for m in modes]
    shares = [(r["label"], r["others_cpu_share"]) for r in report["runs"]
              if r.get("others_cpu_share") is not None]
    if shares:
        lines.append(f"CPU used by OTHER processes while each engine ran (share of all "
                     f"{os.cpu_count()} CPUs): "
                     + "; ".join(f"{label} {100 * v:.0f}%" for label, v in shares))
        noisy = [label for label, v in shares if v > 0.10]
        if noisy:
            lines.append("WARNING: other work shared the cores during " + ", ".join(noisy)
                         + ": those figures are not reliable (llama.cpp's spinning thread "
                         "barriers suffer most); rerun on a quiet machine (--wait-quiet 600)")
    lines.extend(_target_lines(report))
    w = report["workload"]
    lines.append(f"workload: prefill {w['prefill_len']} tokens; decode {w['new_tokens']} new "
                 f"tokens after {w['decode_prompt_len']}; concurrency {report['concurrency']} with "
                 f"prompts of {w['prompt_lengths'][0]}..{w['prompt_lengths'][1]} tokens, "
                 f"{w['new_tokens']} new "
                 "each; greedy, EOS ignored; aggregate = new tokens / wall time (prefill included)")
    lines.append(f"command: {report['command']}")
    return lines


def _target_lines(report: dict) -> list[str]:
    """Issue-3 target ratios against llama.cpp in this run (same file where possible)."""
    runs = [r for r in report["runs"] if not r.get("error")]
    out = []
    for s in (r for r in runs if r["engine"] == "souverain"):
        ref = next((r for r in runs if r["engine"] == "llama.cpp"
                    and r.get("source") == s.get("source")), None)
        if ref is None or not ref.get("decode_tok_s"):
            continue
        parts = [f"decode b1 {s['decode_tok_s'] / ref['decode_tok_s']:.2f}x (target >= 0.75x)",
                 f"prefill {s['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x (target >= 3x)"]
        c16 = (s.get("concurrent") or {}).get("16")
        if c16:
            ratio = c16["aggregate_tok_s"] / ref["decode_tok_s"]
            parts.append(f"agg x16 / llama.cpp b1 {ratio:.2f}x (target >= 4x)")
        out.append(f"targets, {s['label']} vs {ref['label']}: " + "; ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="souverain bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 | mistral-1b | a path or alias souverain loads")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine "
                    "(default: physical cores)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--quantization", default="none", help="souverain: none,int8,int4 (comma list)")
    ap.add_argument("--dtype", default="auto", help="souverain dtype (default auto)")
    ap.add_argument("--hf-dtype", default="float32", help="transformers dtype (default float32)")
    ap.add_argument("--formats", default="f16,q8_0,q4_0", help="mistral-1b GGUF formats")
    ap.add_argument("--concurrency", default="8,16,32", help="concurrent request counts")
    ap.add_argument("--llama-concurrency", default="batched",
                    choices=("batched", "sequential", "both"))
    ap.add_argument("--llama-flash-attn", action="store_true",
                    help="llama.cpp flash attention (llama-cpp-python's default is off)")
    ap.add_argument("--repeats", type=int, default=1, help="prefill runs (best is kept)")
    ap.add_argument("--cache-dir", default="~/.cache/souverain/bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only write the mistral-1b checkpoint files (once) and exit")
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth reference")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine subprocess")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each engine, wait up to this long for other processes to use "
                    "under 15%% of the CPUs (they are measured either way and reported)")
    ap.add_argument("--json", dest="json_path", help="also write the results here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--render", metavar="JSON", help="print the table of a saved --json report "
                    "(with --markdown for BENCHMARKS.md) and exit")
    args = ap.parse_args(argv)
    if args.render:
        print_report(json.loads(Path(args.render).read_text()), markdown=args.markdown)
        return 0

    if args.threads is None:
        from souverain.runtime import physical_cores

        args.threads = physical_cores()
    if args.prepare_only:
        if args.model != "mistral-1b":
            raise SystemExit("--prepare-only applies to --model mistral-1b")
        paths = ensure_mistral_1b(Path(args.cache_dir).expanduser(),
                                  [f.strip().lower() for f in args.formats.split(",") if f.strip()])
        print(json.dumps(paths, indent=2, default=str))
        return 0
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.quick and args.concurrency == "8,16,32":
        levels = [2, 4]
    runs, files, vocab = plan_runs(args)
    work = make_workload(vocab, args.quick, levels, args.repeats)
    report: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "quick": args.quick,
        "host": f"{platform.machine()} · {os.cpu_count()} CPUs",
        "command": "python -m souverain.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "concurrency": levels, "formats": {}, "runs": [],
        "workload": {"prefill_len": len(work["prefill_prompts"][0]),
                     "decode_prompt_len": len(work["decode_prompt"]),
                     "new_tokens": work["new_tokens"], "prompt_lengths": work["prompt_lengths"]},
        "versions": {"python": platform.python_version(),
                     "llama-cpp-python": _llama_cpp_available()},
    }
    for name, path in files.items():
        report["formats"][name] = gguf_bytes_per_token(path)
    base = {"threads": args.threads, "repeats": args.repeats, "workload": work,
            "llama_concurrency": args.llama_concurrency,
            "llama_flash_attn": args.llama_flash_attn, "bandwidth_mb": 64 if args.quick else 1024}
    if not args.no_bandwidth:
        _log(f"measuring read bandwidth ({base['bandwidth_mb']} MB, {args.threads} threads)")
        bw = _launch({**base, "run": {"engine": "bandwidth", "label": "bandwidth"}}, args.timeout)
        if not bw.get("error"):
            report["bandwidth"] = {k: v for k, v in bw.items() if k.endswith("_gbs_best")
                                   or k.endswith("_gbs_median") or k in ("tensor_mb", "threads")}
    for run in runs:  # sequentially, never in parallel
        _log(f"running {run['label']}")
        load_before = _loadavg()
        quiet = _wait_quiet(args.wait_quiet)
        res = _launch({**base, "run": run}, args.timeout)
        res["others_cpu_share_before"] = quiet
        res["source"] = run.get("source")
        res["loadavg_before_after"] = [load_before, _loadavg()]
        if run["engine"] == "llama.cpp":
            g = next((f for n, f in report["formats"].items()
                      if files[n] == Path(run["path"])), None)
            if g:
                res["bytes_per_token"] = g["bytes_per_token"]
                res["format"] = g["format"]
        if res.get("error"):
            _log(f"{run['label']} failed: {res['error']}")
        report["runs"].append(res)
        if args.json_path:  # keep partial results if a later engine dies
            Path(args.json_path).write_text(json.dumps(report, indent=2, default=str))
    print_report(report, markdown=args.markdown)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str))
    return 1 if any(r.get("error") for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
