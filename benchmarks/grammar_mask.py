"""Per-token cost of grammar-constrained decoding: a JSON-object mask over SmolLM2's 49152-token
vocabulary, timed token by token along a real JSON answer.

    python benchmarks/grammar_mask.py
"""
import time, torch
from souverain.weights import load
from souverain.grammar import json_processor
tok = load("smollm2-135m-instruct").tokenizer
p = json_processor(tok, None, vocab_size=49152)
ids = tok.encode('{"name": "Felix", "age": 12, "colors": ["black", "white"], "indoor": true}', bos=False)
row = torch.zeros(49152); p([], row.clone())
ts = []
for n in range(1, len(ids) + 1):
    r = row.clone(); t = time.perf_counter(); p(ids[:n - 1], r); ts.append(time.perf_counter() - t)
ts.sort(); print(f"json_object mask per token: median {ts[len(ts)//2]*1e6:.0f} us, max {ts[-1]*1e6:.0f} us over {len(ts)} tokens")
