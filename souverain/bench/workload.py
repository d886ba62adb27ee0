"""The workload: seeded prompts (token ids), identical for every engine.

A quick workload is a smoke test (tiny sizes); the full one is the figures BENCHMARKS.md
reports: one 512-token prefill, 128 new tokens after a 32-token prompt, and at each
concurrency level N requests with prompts of 16..256 tokens, 128 new tokens each.
"""

from __future__ import annotations

import random
from typing import Any


def make_workload(vocab_size: int, quick: bool, concurrency: list[int], repeats: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """The prompts of every row, drawn from ``seed`` (JSON-serializable: it goes to each
    engine's subprocess)."""
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
