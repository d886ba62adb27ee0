"""Peak RSS while loading a model, against the size of the final weights.

    python benchmarks/load_memory.py [MODEL ...] [--dtype float32] [--synthetic-bf16 DIM]

Each model loads in a fresh subprocess. RSS is read from /proc: the peak (VmHWM) is reset
after imports (``clear_refs`` 5), so the figure is the load's own cost:
``(peak RSS while reading weights - RSS once the checkpoint is open) / bytes of the final
weights``; opening (metadata, tokenizer) is reported on its own as "open MB".
``--synthetic-bf16 DIM`` first writes a random Mistral-shaped consolidated checkpoint in bf16
(dim DIM, 8 layers) under /tmp to measure the safetensors path on a bigger model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
import souverain.llm  # all imports done before the baseline
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from souverain.weights import load
from souverain.models.loader import load_model
start = rss('VmRSS:')
t = time.perf_counter()
ckpt = load(sys.argv[1])  # opens files, parses metadata, builds the tokenizer
opened = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
model = load_model(ckpt, sys.argv[2])
secs = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"model": sys.argv[1], "dtype": sys.argv[2], "weights_mb": weights / 1e6,
                  "open_mb": (opened - start) / 1e6,
                  "peak_delta_mb": (rss('VmHWM:') - opened) / 1e6, "seconds": secs}))
"""


def write_synthetic(dim: int) -> str:
    import torch
    from safetensors.torch import save_file

    from souverain.weights.args import ModelArgs
    from souverain.weights.checkpoint import expected_shapes

    folder = f"/tmp/souverain-synthetic-{dim}"
    import os
    if os.path.exists(f"{folder}/consolidated.safetensors"):
        return folder
    os.makedirs(folder, exist_ok=True)
    params = {"dim": dim, "n_layers": 8, "head_dim": 128, "hidden_dim": dim * 11 // 4,
              "n_heads": dim // 128, "n_kv_heads": max(1, dim // 512), "norm_eps": 1e-5,
              "vocab_size": 32768, "rope_theta": 1e6}
    args = ModelArgs.from_params_json(params)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
          for k, s in expected_shapes(args).items()}
    save_file(sd, f"{folder}/consolidated.safetensors")
    with open(f"{folder}/params.json", "w") as f:
        json.dump(params, f)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m-instruct"])
    ap.add_argument("--dtype", action="append", help="dtype(s) to load in (default float32)")
    ap.add_argument("--synthetic-bf16", type=int, metavar="DIM", help="also a random bf16 model")
    a = ap.parse_args()
    models = list(a.models)
    if a.synthetic_bf16:
        models.append(write_synthetic(a.synthetic_bf16))
    print(f"{'model':<44} {'dtype':<9} {'open MB':>8} {'weights MB':>10} {'peak+ MB':>9} {'ratio':>6} {'s':>6}")
    for m in models:
        for dtype in a.dtype or ["float32"]:
            r = json.loads(subprocess.run([sys.executable, "-c", CHILD, m, dtype], check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(f"{m[-44:]:<44} {dtype:<9} {r['open_mb']:>8.0f} {r['weights_mb']:>10.0f} {r['peak_delta_mb']:>9.0f} "
                  f"{r['peak_delta_mb'] / r['weights_mb']:>6.2f} {r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
