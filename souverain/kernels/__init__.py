"""Fused CPU kernels for the decoder's small ops and decode attention, with PyTorch as fallback.

At batch 1 a decode step of a small model is ~1500 eager ATen ops, and the time goes into
their count, not their work: on SmolLM2-135M the RMSNorms (seven ops each on the CPU) and
the rotary embeddings took 2.3 of a 12.6 ms int4 step, and attention (gather, SDPA) ~1.6.
`fused.cpp` does each of these jobs in one call, in float32, rounding once to the
activation dtype:

- ``rms_norm(x, weight, eps)`` and ``add_rms_norm(x, residual, weight, eps)`` (the residual
  add of a block fused with the next norm; returns the norm and the new residual stream);
- ``rotary_(x, rope)``: the interleaved-pair rotation, in place on the q|k columns;
- ``paged_attention(q, k_cache, v_cache, block_tables, lo, hi, block_size)``: one query per
  row attending to its keys straight from the KV pages (no gather, no padding to the
  longest sequence), exact float32 softmax, GQA by head groups; AVX-512 for head_dim 64/128.

- ``q4_linear(x, qs, dm)``: int4 weights (GGUF's Q4 block order, float16 d and m per block
  of 32) times int16-quantized activations on the integer dot units (AVX2 ``vpmaddwd``,
  AVX-512 VNNI ``vpdpwssd``), for `Int4Linear`'s "q4" layout (souverain/models/int4_linear.py).
The extension is compiled on first use with the machine's C++ compiler
(``torch.utils.cpp_extension``, ~30 s once, then cached under ``~/.cache/souverain/kernels``,
one build per source, flags and CPU). Without a compiler, with ``SOUVERAIN_KERNELS=0``, on
other devices or where autograd needs the graph (fine-tuning), the same maths runs as
PyTorch ops. Each row (each sequence and kv head, for attention) is computed by the same
loop at any batch size or thread count, so the kernels keep the engine bitwise batch
invariant.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from souverain.paths import kernels_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str (why the fallback runs)


def _cpu_tag() -> str:
    """What the compiled code depends on besides its source: -march=native targets this CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()} {flags} torch {torch.__version__}"


def _build() -> None:
    from torch.utils.cpp_extension import load

    # -march=native (below): this CPU's vector units. -fno-trapping-math: the softmax's exp
    # loop vectorizes (nothing here traps on floating-point exceptions). -ffp-contract=off:
    # no fused multiply-adds the source did not write, so int8_planes rounds exactly as the
    # PyTorch ops do. -fopenmp: at::parallel_for runs on torch's own OpenMP threads (the
    # libgomp.so.1 torch has loaded); without it parallel_for is serial.
    flags = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    key = _SOURCE.read_bytes() + " ".join(flags + [_cpu_tag()]).encode()
    tag = hashlib.sha256(key).hexdigest()[:12]
    build_dir = kernels_dir() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("ninja") is None:  # the ninja wheel's binary, in a venv not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # torch's load raises "Ninja is required": the reason the log shows
    if not any(build_dir.glob("*.so")):
        log.warning("building souverain's fused CPU kernels in %s (once per machine, ~30 s)",
                    build_dir)
    load(name=f"souverain_kernels_{tag}", sources=[str(_SOURCE)], extra_cflags=flags,
         extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
         verbose=False)


def available() -> bool:
    """Whether the compiled kernels are loaded (building them on the first call)."""
    ok = _state.get("ok")
    if ok is not None:
        return bool(ok)
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if os.environ.get("SOUVERAIN_KERNELS", "1").strip().lower() in ("0", "false", "no"):
            _state.update(ok=False, reason="disabled by SOUVERAIN_KERNELS=0")
        elif hasattr(torch.ops.souverain, "paged_attention"):
            _state.update(ok=True, reason="")  # another copy already registered them
        else:
            try:
                _build()
                _state.update(ok=hasattr(torch.ops.souverain, "paged_attention"), reason="")
            except Exception as exc:  # no compiler, no headers, read-only home...
                lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
                hint = next((ln for ln in lines if any(
                    k in ln for k in ("error:", "fatal", "not found", "No such file"))),
                    lines[0] if lines else "")
                reason = f"{type(exc).__name__}: {hint[:300]}"
                _state.update(ok=False, reason=f"could not be built ({reason})")
                log.warning("souverain's fused CPU kernels %s; running the PyTorch ops "
                            "instead (slower at small batch). They need a C++ compiler (g++) "
                            "and ninja.", _state["reason"])
    return bool(_state["ok"])


def status() -> str:
    """One line: whether the kernels run, or why the PyTorch ops run instead."""
    return "fused CPU kernels loaded" if available() else f"fused CPU kernels off: {_state['reason']}"


def usable(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the compiled kernels serve ``x`` (and ``weight``): CPU tensors with no autograd
    graph to record, and the kernels built (building them on the first call)."""
    # kept cheap: at batch 1 this check runs ~120 times per decode step. Autograd and
    # other devices are ruled out first, so a training-only process never builds the kernels.
    if not x.is_cpu or (torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad))):
        return False
    return bool(_state.get("ok") or available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2) + eps) * weight`` in float32, in ``x``'s dtype."""
    if usable(x, weight):
        return torch.ops.souverain.rms_norm.default(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return (F.rms_norm(x.float(), weight.shape, None, eps) * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (in their dtype) and ``rms_norm(h)``: returns ``(norm, h)``."""
    if usable(x, weight) and not residual.requires_grad and x.dtype == residual.dtype:
        return torch.ops.souverain.add_rms_norm.default(x, residual, weight, eps)
    h = x + residual
    return rms_norm(h, weight, eps), h


def rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, heads, head_dim) rotated by ``rope``, the complex factors
    ``exp(i * angle)`` (rows, 1, head_dim / 2) of `Rotary.factors`: pair (x0, x1) as
    x0 + i x1, times exp(i angle). The fused kernel rotates ``x`` in place and returns it
    (``x`` is a fresh matmul output); the fallback returns a new tensor."""
    if usable(x) and x.stride(-1) == 1:
        torch.ops.souverain.rotary_.default(x, torch.view_as_real(rope).view(x.shape[0], -1, 2))
        return x
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope).flatten(-2).type_as(x)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` for ``x = gate|up`` (..., 2H) -> (..., H): one kernel in
    float32, rounded once to ``x``'s dtype."""
    if usable(x) and x.stride(-1) == 1:
        return torch.ops.souverain.silu_mul.default(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """One query per row of ``q`` (B, H, D) attending, in place in the paged cache
    (slots, KVH, D), to the keys at positions ``[lo[b], hi[b])`` counted from the first block
    of ``block_tables[b]``; softmax scale 1/sqrt(D), GQA by head groups. Kernels only: the
    caller checks `usable` first."""
    return torch.ops.souverain.paged_attention.default(
        q, k_cache, v_cache, block_tables, lo, hi, block_size, q.shape[-1] ** -0.5)


def int8_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Int8Linear`'s activation planes: uint8 ``(2m, K)`` (zero point 128) and the row
    maxima ``(m, 1)`` float32, for ``x`` (..., K) of any float dtype. Kernels only."""
    return torch.ops.souverain.int8_planes.default(x)


def has_vnni() -> bool:
    """Whether the kernels are built (building them on the first call) with AVX-512 VNNI,
    which `int8_linear` needs."""
    if "vnni" not in _state:
        _state["vnni"] = available() and bool(torch.ops.souverain.has_vnni.default())
    return bool(_state["vnni"])


def int8_linear(x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, s127: torch.Tensor,
                out_features: int) -> torch.Tensor:
    """`Int8Linear` on its VNNI-packed weight in one call: ``x`` (..., K) quantized into its
    two planes, times the weight, the planes summed and scaled, in ``x``'s dtype. Kernels
    only (`has_vnni`)."""
    return torch.ops.souverain.int8_linear.default(x, packed, comp, s127, out_features)


def int8_epilogue_(out: torch.Tensor, acc: torch.Tensor, amax: torch.Tensor) -> None:
    """``out <- (acc[:m] + acc[m:] / 254) * amax`` in ``out``'s dtype (``out`` may be a
    column block of a wider matrix). Kernels only."""
    torch.ops.souverain.int8_epilogue_.default(out, acc, amax)
