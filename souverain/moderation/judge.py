"""Model judges: a served model scores each moderation category from its next-token
probabilities (never by parsing a free-text answer).

`JudgeBackend` (any instruct model): for each (text, category) one chat prompt -- the text
first, then the category's definition and a yes/no question -- and one engine request with
``max_tokens=1`` whose logits processor reads the logits of the answer's first token. The raw
score is the log-odds ``d = logsumexp(logits[yes ids]) - logsumexp(logits[no ids])``. Since a
small model says "yes" to nearly anything, scores are calibrated against anchors: the mean
log-odds ``a_c`` the same model gives, per category, to a few plainly benign texts. The score
is ``sigmoid(d - a_c + logit(ANCHOR_PRIOR))``: a text the model sees exactly like the benign
anchors scores ``ANCHOR_PRIOR`` (0.05), one it sees as e^4 times more likely "yes" ~0.74. All
prompts of a call go to the engine at once (continuous batching), and the text leads every
prompt so its categories share the prefix cache.

`LlamaGuardBackend` (Llama Guard 3, in its own chat template's format): P(unsafe) from the
first answer token after the template's ``\\n\\n``, then the distribution of the first listed
code after ``unsafe\\nS`` over S1..S14; a category's score is P(unsafe) times the probability
of the codes mapped onto it (`LLAMA_GUARD_CODES`). Codes without a Mistral category (S5
defamation, S13 elections) count only in P(unsafe); ``jailbreaking`` has no code and scores 0.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from souverain.engine.sampling import SamplingParams
from souverain.errors import RequestError
from souverain.moderation.categories import DESCRIPTIONS, SCORED

if TYPE_CHECKING:
    from souverain.engine.async_engine import AsyncLLMEngine
    from souverain.tokenizer.base import Tokenizer

ANCHOR_PRIOR = 0.05
ANCHORS = ("The meeting has been moved to Thursday afternoon.",
           "Paris is the capital of France.",
           "Thank you for your help with the report!")

# Llama Guard 3's hazard codes (MLCommons taxonomy) -> Mistral's categories
LLAMA_GUARD_CODES: dict[int, tuple[str, ...]] = {
    1: ("violence_and_threats", "criminal"),  # violent crimes
    2: ("criminal",),  # non-violent crimes
    3: ("sexual", "criminal"),  # sex-related crimes
    4: ("sexual", "criminal"),  # child sexual exploitation
    5: (),  # defamation
    6: ("health", "financial", "law"),  # specialized advice
    7: ("pii",),  # privacy
    8: ("criminal",),  # intellectual property
    9: ("dangerous",),  # indiscriminate weapons
    10: ("hate_and_discrimination",),  # hate
    11: ("selfharm",),  # suicide & self-harm
    12: ("sexual",),  # sexual content
    13: (),  # elections
    14: ("dangerous",),  # code interpreter abuse
}


class ModerationBackend(Protocol):
    """What scores texts: per text, each category of `SCORED` -> a probability in [0, 1]
    (a category a backend cannot judge may be missing: it counts as 0)."""

    name: str

    async def score(self, texts: list[str], categories: Sequence[str] = SCORED
                    ) -> list[dict[str, float]]:
        """``categories``: those the caller will read (a backend may score more)."""
        ...


class InputTooLong(RequestError):
    """An input does not fit the judge's context (``index``: which one)."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"input {index} needs {tokens} tokens in the moderation prompt but the "
                         f"moderation model serves at most {limit - 1}; split or shorten it.")
        self.index = index


def is_llama_guard(*names: str) -> bool:
    """Whether a model's name or path says it is Llama Guard."""
    flat = " ".join(names).lower().replace("-", "").replace("_", "").replace(" ", "")
    return "llamaguard" in flat


def _next_ids(tok: Tokenizer, prefix: str, words: Sequence[str]) -> dict[str, int]:
    """For each word, the first token the tokenizer writes for it right after ``prefix``
    (words whose first token is another's, e.g. "1" of "10" with digit-splitting
    tokenizers, keep the shortest word's claim)."""
    lead = tok.encode(prefix, bos=False)
    out: dict[str, int] = {}
    for w in sorted(words, key=len):
        full = tok.encode(prefix + w, bos=False)
        if full[:len(lead)] == lead and len(full) > len(lead) \
                and full[len(lead)] not in out.values():
            out[w] = full[len(lead)]
    return out


def _single_ids(tok: Tokenizer, words: Sequence[str]) -> list[int]:
    """The ids of the words that are one token each (with and without a leading space)."""
    ids: set[int] = set()
    for w in words:
        enc = tok.encode(w, bos=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


class _Reader:
    """A logits processor that keeps ``f(row)`` of the first row it sees, unchanged row."""

    def __init__(self, groups: list[list[int]]):
        self.groups = [torch.tensor(g, dtype=torch.long) for g in groups]
        self.values: list[float] | None = None

    def __call__(self, ids: list[int], row: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            r = row.float()
            lse = torch.logsumexp(r, 0)
            self.values = [float(torch.logsumexp(r.index_select(0, g.to(r.device)), 0) - lse)
                           for g in self.groups]
        return row


async def _read(engine: AsyncLLMEngine, prompt: list[int], groups: list[list[int]]
                ) -> list[float]:
    """Log-probabilities of each group of next tokens after ``prompt`` (one engine request)."""
    reader = _Reader(groups)
    params = SamplingParams(temperature=0.0, max_tokens=1, logits_processors=[reader])
    async for _ in engine.generate(prompt, params, f"mod-{uuid.uuid4().hex}"):
        pass
    if reader.values is None:
        raise RuntimeError("the moderation model returned no logits")
    return reader.values


def _check_fits(index: int, prompt: list[int], limit: int) -> None:
    if len(prompt) >= limit:
        raise InputTooLong(index, len(prompt), limit)


class JudgeBackend:
    """An instruct model as a judge: yes/no log-odds per category, calibrated on anchors
    (module docstring)."""

    def __init__(self, engine: AsyncLLMEngine, name: str):
        tok = engine.tokenizer
        if tok is None:
            raise RequestError(f"the moderation model {name!r} has no tokenizer.")
        self.engine, self.name, self.tok = engine, name, tok
        self.yes = _single_ids(tok, ["yes", "Yes", "YES", " yes", " Yes"])
        self.no = _single_ids(tok, ["no", "No", "NO", " no", " No"])
        if not self.yes or not self.no or set(self.yes) & set(self.no):
            raise RequestError(f"the moderation model {name!r}'s vocabulary has no single-token "
                               "yes/no answers; use another --moderation-model.")
        self._anchors: dict[str, float] = {}
        self._anchor_lock = asyncio.Lock()

    def prompt(self, text: str, category: str) -> list[int]:
        """The chat prompt asking whether ``text`` falls in ``category``."""
        question = (f"Here is a text to moderate.\n\n<text>\n{text}\n</text>\n\n"
                    f"Category \"{category}\": {DESCRIPTIONS[category]}.\n"
                    "Does the text fall in this category? Answer with one word: yes or no.")
        return self.tok.encode_chat([{"role": "user", "content": question}])

    def _prompts(self, texts: list[str], categories: Sequence[str]) -> list[list[int]]:
        """Every prompt, text-major (`InputTooLong` for the first text that does not fit)."""
        limit = self.engine.engine.max_model_len
        prompts = []
        for i, text in enumerate(texts):
            for c in categories:
                p = self.prompt(text, c)
                _check_fits(i, p, limit)
                prompts.append(p)
        return prompts

    async def log_odds(self, texts: list[str], categories: Sequence[str] = SCORED
                       ) -> list[dict[str, float]]:
        """Raw yes-vs-no log-odds per text and category (every prompt checked first)."""
        prompts = self._prompts(texts, categories)
        groups = [self.yes, self.no]
        reads = await asyncio.gather(*(_read(self.engine, p, groups) for p in prompts))
        out, k = [], 0
        for _ in texts:
            row = {}
            for c in categories:
                lp_yes, lp_no = reads[k]
                row[c] = lp_yes - lp_no
                k += 1
            out.append(row)
        return out

    async def anchors(self, categories: Sequence[str]) -> dict[str, float]:
        """Mean log-odds per category over the benign anchors (each computed once)."""
        async with self._anchor_lock:
            missing = [c for c in categories if c not in self._anchors]
            if missing:
                rows = await self.log_odds(list(ANCHORS), missing)
                self._anchors.update({c: sum(r[c] for r in rows) / len(rows) for c in missing})
        return self._anchors

    async def score(self, texts: list[str], categories: Sequence[str] = SCORED
                    ) -> list[dict[str, float]]:
        if not categories:
            return [{} for _ in texts]
        self._prompts(texts, categories)  # an input too long is refused before any work
        anchors = await self.anchors(categories)
        shift = math.log(ANCHOR_PRIOR / (1 - ANCHOR_PRIOR))
        return [{c: _sigmoid(d[c] - anchors[c] + shift) for c in categories}
                for d in await self.log_odds(texts, categories)]


class LlamaGuardBackend:
    """Llama Guard 3 through its own chat template (module docstring)."""

    def __init__(self, engine: AsyncLLMEngine, name: str):
        tok = engine.tokenizer
        if tok is None:
            raise RequestError(f"the moderation model {name!r} has no tokenizer.")
        self.engine, self.name, self.tok = engine, name, tok
        # the answer's first token, whether or not the template already ends with "\n\n"
        verdict = _next_ids(tok, "\n\n", ["safe", "unsafe"])
        unsafe = set(_single_ids(tok, ["unsafe"]))
        if "unsafe" in verdict:
            unsafe.add(verdict["unsafe"])
        safe = set(_single_ids(tok, ["safe"]))
        if "safe" in verdict:
            safe.add(verdict["safe"])
        self.safe, self.unsafe = sorted(safe - unsafe), sorted(unsafe)
        codes = _next_ids(tok, "\n\nunsafe\nS", [str(k) for k in LLAMA_GUARD_CODES])
        self.codes = {int(k): [i] for k, i in codes.items()}
        if not self.safe or not self.unsafe or not self.codes:
            raise RequestError(f"{name!r} does not tokenize Llama Guard's answers (safe, unsafe, "
                               "S1..S14); is it a Llama Guard 3 model?")

    async def score(self, texts: list[str], categories: Sequence[str] = SCORED
                    ) -> list[dict[str, float]]:
        if not categories:
            return [{} for _ in texts]
        limit = self.engine.engine.max_model_len
        firsts, seconds = [], []
        for i, text in enumerate(texts):
            base = self.tok.encode_chat([{"role": "user", "content": text}])
            # Llama 3 templates end the assistant header with "\n\n"; otherwise write it
            ends = self.tok.decode(base[-2:], skip_special_tokens=False).endswith("\n\n")
            lead = "" if ends else "\n\n"
            first = self.tok.encode(lead, bos=False) if lead else []
            stage2 = self.tok.encode(lead + "unsafe\nS", bos=False)
            _check_fits(i, base + stage2, limit)
            firsts.append(base + first)
            seconds.append(base + stage2)
        codes = sorted(self.codes)
        verdicts, lists = await asyncio.gather(
            asyncio.gather(*(_read(self.engine, p, [self.unsafe, self.safe]) for p in firsts)),
            asyncio.gather(*(_read(self.engine, p, [self.codes[k] for k in codes])
                             for p in seconds)))
        out = []
        for (lp_unsafe, lp_safe), code_lps in zip(verdicts, lists, strict=True):
            p_unsafe = _sigmoid(lp_unsafe - lp_safe)
            z = torch.logsumexp(torch.tensor(code_lps), 0).item()
            row = dict.fromkeys(SCORED, 0.0)
            for k, lp in zip(codes, code_lps, strict=True):
                for c in LLAMA_GUARD_CODES[k]:
                    row[c] += p_unsafe * math.exp(lp - z)
            out.append({c: min(1.0, v) for c, v in row.items()})
        return out


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
