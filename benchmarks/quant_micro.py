"""Quantized linears on the bundled SmolLM2-135M (Q4_1 GGUF): load memory, decode
speed, batch invariance. One short run (~2 minutes on 2 shared cores).

    python benchmarks/quant_micro.py [--tokens 64] [--configs fp32,bf16,int8,...]

Each configuration first loads alone in a fresh process (peak RSS above the opened checkpoint,
VmHWM reset after opening, as benchmarks/load_memory.py). Then one process holds every
configuration and runs decode-only loops on static contiguous KV caches: a chat prompt is
prefilled, 8 warm-up steps, then ``--tokens`` greedy steps at batch 1 and 8 steps of a batch of 8
(the same prompt 8 times), *interleaved* in rounds of 8 steps per configuration so that all of
them see the same machine load (the machine is shared): tok/s = 1 / median step time.

Configurations (model dtype = residual stream, norms, KV cache; int4 matmuls in bf16, int8
ones on the integer units with two int8 activation planes):
  fp32, bf16         the float model (GGUF dequantized at load)
  int8               blocks + head int8 per channel, fp32 model
  int4-deq           fp32 model loaded, then blocks int4 g32 re-quantized from the dequantized
                     weights by min/max (quantize_model_), head int8
  int4               blocks int4 straight from the Q4_1 blocks, head int8 (the default int4)
  int4-head4         same, head int4 g32 too
  int4-bf16          int4 with a bf16 model dtype
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = {
    # name: (dtype, load quantization, head, post-load quantize_model_ scheme)
    "fp32": ("float32", "none", None, None),
    "bf16": ("bfloat16", "none", None, None),
    "int8": ("float32", "int8", None, None),
    "int4-deq": ("float32", "none", None, "int4"),
    "int4": ("float32", "int4", None, None),
    "int4-head4": ("float32", "int4", "int4", None),
    "int4-bf16": ("bfloat16", "int4", None, None),
}

LOAD_CHILD = r"""
import json, sys, time
import torch
import souverain.llm  # all imports before the RSS baseline
from souverain.models.loader import load_model
from souverain.models.quantize import quantize_model_, quantized_bytes
from souverain.runtime import configure_threads
from souverain.weights import load

def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

name, dtype, quant, head, post, threads = sys.argv[1:7]
configure_threads(int(threads) or None)
ckpt = load("smollm2-135m-instruct")
opened = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
t = time.perf_counter()
model = load_model(ckpt, dtype, quantization=quant, head=None if head == "-" else head)
if post != "-":
    quantize_model_(model, post)
print(json.dumps({"load_s": time.perf_counter() - t, "weights_mb": quantized_bytes(model) / 1e6,
                  "peak_mb": (rss('VmHWM:') - opened) / 1e6}))
"""

DECODE_CHILD = r"""
import json, statistics, sys, time
import torch
from souverain.models.attention import ContiguousKVCache
from souverain.models.loader import load_model
from souverain.models.quantize import quantize_model_
from souverain.runtime import configure_threads
from souverain.weights import load

configs = json.loads(sys.argv[1])
n_tokens, threads = int(sys.argv[2]), int(sys.argv[3])
configure_threads(threads or None)
ckpt = load("smollm2-135m-instruct")
args = ckpt.args
prompt = ckpt.tokenizer.encode_chat([{"role": "user", "content":
    "Write a long story about a robot who learns to paint."}])
WARM, ROUND, B8_STEPS = 8, 8, 8


class Run:
    # one configuration: a model, a batch-1 and a batch-8 decode on static caches
    def __init__(self, name, dtype, quant, head, post):
        self.name = name
        self.model = load_model(ckpt, dtype, quantization=quant, head=head)
        if post:
            quantize_model_(self.model, post)
        self.b1 = self.start(1, WARM + n_tokens)
        self.b8 = self.start(8, WARM + B8_STEPS + 2)
        self.tokens, self.t1, self.t8 = [], [], []
        self.tokens8 = []

    def start(self, batch, steps):
        cache = ContiguousKVCache(args.n_layers, batch, len(prompt) + steps + 1, args.n_kv_heads,
                                  args.head_dim, self.model.dtype)
        q_lens = [len(prompt)] * batch
        logits = self.model(torch.tensor(prompt * batch), torch.arange(len(prompt)).repeat(batch),
                            cache.batch(range(batch), [0] * batch, q_lens),
                            logits_indices=torch.tensor(q_lens).cumsum(0) - 1)
        return {"cache": cache, "next": logits.argmax(-1), "pos": len(prompt), "batch": batch,
                "logits": [logits]}

    def step(self, st):
        b, pos = st["batch"], st["pos"]
        t0 = time.perf_counter()
        logits = self.model(st["next"], torch.full((b,), pos),
                            st["cache"].batch(range(b), [pos] * b, [1] * b))
        st["next"] = logits.argmax(-1)
        dt = time.perf_counter() - t0
        st["pos"] += 1
        if len(st["logits"]) < 3:
            st["logits"].append(logits)
        return dt, st["next"].tolist()


runs = [Run(*c) for c in configs]
with torch.inference_mode():
    for r in runs:
        for _ in range(WARM):
            r.tokens.append(r.step(r.b1)[1][0])
        for _ in range(2):
            r.tokens8.append(r.step(r.b8)[1])
    # interleaved rounds: every configuration sees the same machine load
    for i in range(n_tokens // ROUND):
        for r in runs:
            for _ in range(ROUND):
                dt, tok = r.step(r.b1)
                r.t1.append(dt)
                r.tokens.append(tok[0])
            if i < B8_STEPS:
                dt, tok = r.step(r.b8)
                r.t8.append(dt)
                r.tokens8.append(tok)
print(json.dumps([{
    "name": r.name, "tok_s": 1 / statistics.median(r.t1), "ms_b1": 1e3 * statistics.median(r.t1),
    "ms_b1_mean": 1e3 * statistics.mean(r.t1), "ms_b8": 1e3 * statistics.median(r.t8),
    "b8_rows_equal_b1": all(row == [t] * 8 for row, t in zip(r.tokens8, r.tokens)),
    "b8_logits_bitwise": all(torch.equal(l8[i], l1[0])
                             for l1, l8 in zip(r.b1["logits"], r.b8["logits"]) for i in range(8)),
    "tokens": r.tokens} for r in runs]))
"""

INVARIANCE = r"""
import sys, torch, torch.nn.functional as F
from souverain.models.int8_linear import Int8Linear
from souverain.models.int4_linear import Int4Linear
from souverain.runtime import configure_threads
configure_threads(int(sys.argv[1]) or None)
torch.manual_seed(0)
rows = {}
for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]:
    w = torch.randn(n, k) * 0.05
    x = torch.randn(16, k)
    i8, i4 = Int8Linear.from_float(w), Int4Linear.from_float(w)
    w16 = w.bfloat16()
    fns = {"fp32 F.linear": lambda a: F.linear(a, w),
           "bf16 F.linear": lambda a: F.linear(a.bfloat16(), w16),
           "int8 two planes (oneDNN int8 matmul)": i8,
           "int4 _weight_int4pack_mm_for_cpu": i4}
    for name, f in fns.items():
        full = f(x)
        ok = all(torch.equal(full[i], f(x[i:i + 1])[0]) for i in range(16))
        ok = ok and all(torch.equal(full[:m], f(x[:m])) for m in (2, 3, 5, 8))
        rows.setdefault(name, []).append(ok)
for name, oks in rows.items():
    print(f"| {name} | {'yes' if all(oks) else 'no'} ({sum(oks)}/{len(oks)} shapes) |")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: physical cores)")
    a = ap.parse_args()
    import os

    names = a.configs.split(",")
    print(f"load average before: {os.getloadavg()[0]:.2f}; "
          f"threads: {a.threads or 'physical cores'}\n")
    loads = {}
    for name in names:
        dtype, quant, head, post = CONFIGS[name]
        proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, name, dtype, quant, head or "-",
                               post or "-", str(a.threads)], capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            sys.exit(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
        loads[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.run(
        [sys.executable, "-c", DECODE_CHILD, json.dumps([[n, *CONFIGS[n]] for n in names]),
         str(a.tokens), str(a.threads)], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr)
    decode = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    ref = decode[names[0]]["tokens"]
    print("| config | load s | weights MB | peak+ MB | ratio | decode tok/s b1 | ms/step b1 "
          "(median / mean) | ms/step b8 | b8 tokens = b1 | b8 logits = b1 (bitwise) "
          f"| greedy = {names[0]} (of {len(ref)}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        ld, r = loads[name], decode[name]
        same = next((i for i, (x, y) in enumerate(zip(ref, r["tokens"])) if x != y), len(ref))
        print(f"| {name} | {ld['load_s']:.1f} | {ld['weights_mb']:.0f} | {ld['peak_mb']:.0f} | "
              f"{ld['peak_mb'] / ld['weights_mb']:.2f} | {r['tok_s']:.1f} | "
              f"{r['ms_b1']:.1f} / {r['ms_b1_mean']:.1f} | {r['ms_b8']:.1f} | "
              f"{r['b8_rows_equal_b1']} | {r['b8_logits_bitwise']} | {same} |")
    print("\nBatch invariance (row i of a batch-16 matmul bitwise equal to the row alone, and "
          "batches 2/3/5/8 equal to the first rows of 16):\n\n| kernel | invariant |\n|---|---|")
    print(subprocess.run([sys.executable, "-c", INVARIANCE, str(a.threads)], capture_output=True,
                         text=True, check=True).stdout, end="")


if __name__ == "__main__":
    main()
