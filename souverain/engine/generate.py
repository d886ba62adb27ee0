"""A batched generation loop over a contiguous KV cache.

Every step is one forward over the flat batch of all unfinished sequences (the first step
prefills all prompts together), then per-sequence sampling, detokenization and stop checks.
This is the loop `LLM` runs today; the continuous-batching engine with a paged cache replaces
it for serving, and is tested token-for-token against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from souverain.engine.sampling import SamplingParams, sample
from souverain.errors import RequestError
from souverain.models.attention import ContiguousKVCache
from souverain.models.transformer import Transformer
from souverain.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    """The result of one prompt: text, generated ids, and why generation stopped.

    ``finish_reason``: ``stop`` (EOS, a stop token or a stop string), ``length``
    (max_tokens reached) or ``model_length`` (the model's context is full).
    """

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Seq:
    out: CompletionOutput
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    stop_ids: set[int]
    limit: int  # total positions this sequence may reach (prompt + generated)
    held: str = ""  # text withheld because it could be the start of a stop string


def check_prompt(ids: Sequence[int], vocab_size: int, context: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise RequestError("the prompt is empty; give at least one token.")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(
            f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}); check the "
            "tokenizer matches this model."
        )
    if context is not None and len(ids) >= context:
        raise RequestError(
            f"the prompt has {len(ids)} tokens but the model's context is {context}: it leaves "
            "no room to generate; shorten the prompt (souverain never truncates it silently)."
        )
    return ids


def generate_stream(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    context: int | None,
) -> Iterator[tuple[list[CompletionOutput], list[str]]]:
    """Yield ``(outputs, text deltas)`` after every step until all sequences finish."""
    eos = set(tokenizer.eos_ids) if tokenizer is not None else set()
    seqs: list[_Seq] = []
    for ids, p in zip(prompts, params):
        ids = check_prompt(ids, model.args.vocab_size, context)
        limit = context if context is not None else len(ids) + (p.max_tokens or 4096)
        if p.max_tokens is not None:
            limit = min(limit, len(ids) + p.max_tokens)
        detok = (IncrementalDetokenizer(tokenizer, ids, p.skip_special_tokens)
                 if tokenizer is not None else None)
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
        seqs.append(_Seq(CompletionOutput(ids), p, p.make_generator(), detok, stop_ids, limit))
    if not seqs:
        return
    cache = ContiguousKVCache(
        model.args.n_layers, len(seqs), max(s.limit for s in seqs), model.args.n_kv_heads,
        model.args.head_dim, model.dtype, model.device,
    )
    with torch.inference_mode():
        active = list(range(len(seqs)))
        step_tokens = [seqs[i].out.prompt_token_ids for i in active]
        starts = [0] * len(active)
        while active:
            q_lens = [len(t) for t in step_tokens]
            tokens = torch.tensor([t for ts in step_tokens for t in ts], dtype=torch.long)
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)])
            last = torch.tensor(q_lens).cumsum(0) - 1
            logits = model(tokens.to(model.device), positions.to(model.device),
                           cache.batch(active, starts, q_lens), logits_indices=last)
            deltas = [""] * len(seqs)
            for row, i in enumerate(active):
                deltas[i] = _advance(seqs[i], logits[row])
            still = [i for i in active if not seqs[i].out.finished]
            step_tokens = [[seqs[i].out.token_ids[-1]] for i in still]
            starts = [len(seqs[i].out.prompt_token_ids) + len(seqs[i].out.token_ids) - 1
                      for i in still]
            active = still
            yield [s.out for s in seqs], deltas


def _advance(seq: _Seq, logits: torch.Tensor) -> str:
    """Sample one token for ``seq``, update its text, decide whether it is done; return the
    text that may now be shown."""
    out, p = seq.out, seq.params
    if len(out.token_ids) < p.min_tokens and seq.stop_ids:
        logits = logits.clone()
        logits[list(seq.stop_ids)] = float("-inf")
    token = sample(logits, p, seq.generator)
    out.token_ids.append(token)
    if token in seq.stop_ids:
        out.finish_reason = "stop"
        return _finish_text(seq)
    piece = seq.detok.add(token) if seq.detok is not None else ""
    text = seq.held + piece
    for s in p.stop:
        cut = text.find(s)
        if cut >= 0:
            out.finish_reason = "stop"
            out.text += text[:cut]
            seq.held = ""
            return text[:cut]
    # hold back a tail that could still become a stop string with the next tokens
    keep = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    shown, seq.held = text[: len(text) - keep], text[len(text) - keep:]
    out.text += shown
    total = len(out.prompt_token_ids) + len(out.token_ids)
    if total >= seq.limit:
        hit_max = p.max_tokens is not None and len(out.token_ids) >= p.max_tokens
        out.finish_reason = "length" if hit_max else "model_length"
        return shown + _finish_text(seq)
    return shown


def _finish_text(seq: _Seq) -> str:
    rest = seq.held + (seq.detok.flush() if seq.detok is not None else "")
    seq.held = ""
    seq.out.text += rest
    return rest
