"""The workload: seeded prompts (token ids), identical for every engine.

A quick workload is a smoke test (tiny sizes); the full one is the figures BENCHMARKS.md
reports: one 512-token prefill, 128 new tokens after a 32-token prompt, and at each
concurrency level N requests with prompts of 16..256 tokens, 128 new tokens each.
"""

from __future__ import annotations

import random
from typing import Any

# The extraction workload (speculative decoding's case): the answer copies spans of a long
# prompt, as RAG answers, form extraction and code edits do. A real chat model is asked to
# copy this record; prompt lookup drafts the copied spans.
COPY_DOCUMENT = """\
Incident report 2026-114, Lyon regional hospital, pharmacy department.
On 3 March 2026 at 14:20, a nurse on ward 4B noticed that the infusion pump in room 12 showed
a dose of 40 mg per hour instead of the prescribed 4 mg per hour. The pump was stopped at
once and the patient, a 67-year-old man admitted for pneumonia, was examined by the duty
physician, Dr. Claire Martin. No harm was found. The prescription in the electronic record
read 4 mg per hour; the order sent to the pump read 40 mg per hour. The pharmacy traced the
error to a unit conversion in the interface between the prescribing software and the pump
server, introduced by the software update of 28 February 2026. The vendor was informed on
4 March 2026 and shipped a correction on 6 March 2026. Until then, every infusion order was
checked by a second nurse before the pump was started. The safety committee reviewed the case
on 10 March 2026 and asked for an audit of all orders sent since 28 February 2026: 1,284
orders were checked and 3 more conversion errors were found, none of them harmful."""
COPY_INSTRUCTION = "Copy the incident report above exactly, word for word, line by line."


def copy_prompt(tokenizer: Any) -> list[int]:
    """The extraction workload's prompt in the model's own chat format."""
    return tokenizer.encode_chat([{"role": "user",
                                   "content": COPY_DOCUMENT + "\n\n" + COPY_INSTRUCTION}])


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
