"""Training data: mistral-finetune JSONL files, validated line by line, tokenized with a loss mask,
and packed into sequences of at most ``seq_len`` tokens.

Formats (one JSON object per line; one kind per file):

- pretrain ``{"text": "..."}``: every token is trained on. A text longer than ``seq_len`` is
  **split** into ``seq_len``-token pieces (as mistral-finetune chunks pretraining data), and
  the report counts the splits.
- instruct ``{"messages": [...]}``: an optional first ``system`` message, then ``user`` /
  ``assistant`` turns; the last message is an assistant's. An assistant message may carry
  ``"weight": 0`` (not trained on) or ``1`` (the default).
- function calling: the same plus top-level ``tools`` and assistant ``tool_calls`` (ids of 9
  letters/digits, as Mistral's format requires), each answered by a ``tool`` message with the
  matching ``tool_call_id``.
- preference (DPO) ``{"prompt": str | "messages": [...], "chosen": ..., "rejected": ...}``:
  the two answers are a string, an assistant message, or a one-message list.

A conversation longer than ``seq_len`` is an **error** (never truncated: a cut answer teaches
the model to stop mid-sentence). Every bad line is reported with its number and the fix (the
rules of one sample: sample_checks.py). Lines are read as jsonl.py says (the upload check
reads them the same way), one at a time; ``should_stop`` is polled before each line, so a
cancelled job stops validating within a line's work (`Stopped`).

Loss mask: only assistant tokens are trained on (``sum(CE * mask) / sum(mask)``). The span of
assistant message ``i`` is found by rendering the conversation up to it twice, as a prompt
(``messages[:i]`` + generation prompt) and with it (``messages[:i+1]``): the tokens the answer
adds are its span. Where the full rendering starts with the partial one (ChatML and most
templates), the span sits exactly there; Mistral formats move the system prompt and the tool
list into the last user turn, so there the span is searched in the full rendering right after
the same generation-prompt tokens. A conversation where neither holds is refused, clearly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from souverain.errors import FinetuneError, SouverainError
from souverain.finetune import jsonl
from souverain.finetune.sample_checks import (
    Kind,
    LineProblem,
    answer_message,
    check_keys,
    check_messages,
    check_tools,
    fits,
    kind_of,
)
from souverain.tokenizer import Tokenizer

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB per file


class Stopped(Exception):
    """``should_stop()`` turned true: the work was abandoned (cancel, shutdown), not failed."""


@dataclass
class LineError:
    line: int  # 1-based; 0 for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Sample:
    """One training sequence: token ids and, per token, whether predicting it is trained on."""

    tokens: list[int]
    mask: list[bool]
    line: int

    @property
    def n_trainable(self) -> int:
        return sum(self.mask[1:])  # the first token is never predicted


@dataclass
class PreferencePair:
    """A DPO pair: the same prompt with the chosen and the rejected answer; masks cover the
    answer only."""

    chosen: Sample
    rejected: Sample
    line: int


@dataclass
class DataReport:
    path: str
    kind: Kind | None
    n_samples: int = 0
    n_tokens: int = 0
    n_trainable_tokens: int = 0
    n_split: int = 0  # pretrain texts split into seq_len pieces
    errors: list[LineError] = field(default_factory=list)
    samples: list[Any] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, limit: int = 10) -> str:
        """One sentence naming the first errors (for FinetuneError)."""
        shown = "; ".join(str(e) for e in self.errors[:limit])
        more = f" (and {len(self.errors) - limit} more)" if len(self.errors) > limit else ""
        return f"{self.path} has {len(self.errors)} invalid line(s): {shown}{more}."


# --------------------------------------------------------------------------------------
# Rendering conversations and finding the assistant spans
# --------------------------------------------------------------------------------------


class ChatRenderer:
    """Renders conversations for training: a prompt (ends with a user or tool turn, plus the
    generation prompt) and a full conversation (ends with an assistant turn, closed).

    mistral-common tokenizers validate in *serving* mode (a last assistant message is refused),
    so full conversations go through a copy in mistral-common's *finetuning* mode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._full: Tokenizer = tokenizer
        self.mistral = False
        from souverain.tokenizer.mistral import MistralCommonTokenizer

        if isinstance(tokenizer, MistralCommonTokenizer):
            from mistral_common.protocol.instruct.validator import ValidationMode
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            ft = MistralTokenizer.from_file(str(tokenizer.path), mode=ValidationMode.finetuning)
            self._full = MistralCommonTokenizer(ft, tokenizer.path)
            self.mistral = True

    def prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        return self.tokenizer.encode_chat(messages, tools, add_generation_prompt=True)

    def full(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        return self._full.encode_chat(messages, tools, add_generation_prompt=False)

    def tokens_and_mask(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        trained: list[bool],
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and the mask of the assistant messages whose
        ``trained`` flag is set (``trained[i]`` per message; ignored for non-assistants)."""
        clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        full = self.full(clean, tools)
        mask = [False] * len(full)
        cursor = 0
        for i, m in enumerate(clean):
            if m["role"] != "assistant":
                continue
            before = self.prompt(clean[:i], tools)
            upto = self.full(clean[: i + 1], tools)
            if upto[: len(before)] != before:
                raise LineProblem(
                    f"the chat format renders the prompt before assistant message {i + 1} "
                    "differently from the conversation that contains it, so its tokens cannot "
                    "be found for the loss mask; use a model whose chat template renders "
                    "conversations incrementally"
                )
            span = upto[len(before) :]
            if full[: len(upto)] == upto:
                start = len(before)
            else:  # Mistral formats: system prompt / tools moved to the last user turn
                start = _find_after(full, span, before[-3:], cursor)
                if start < 0:
                    raise LineProblem(
                        f"assistant message {i + 1} cannot be located in the rendered "
                        "conversation for the loss mask; check the message order"
                    )
            if trained[i]:
                for j in range(start, start + len(span)):
                    mask[j] = True
            cursor = start + len(span)
        return full, mask


def _find_after(seq: list[int], span: list[int], lead: list[int], start: int) -> int:
    """First index ``p >= start`` where ``seq[p:]`` starts with ``span`` and ``seq[:p]`` ends
    with ``lead`` (the generation-prompt tokens), or -1."""
    n, k = len(span), len(lead)
    for p in range(max(start, k), len(seq) - n + 1):
        if seq[p : p + n] == span and seq[p - k : p] == lead:
            return p
    return -1


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def validate_file(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    method: Literal["sft", "dpo"] = "sft",
    seq_len: int = 512,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_line_bytes: int | None = None,
    renderer: ChatRenderer | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DataReport:
    """Check every line of a JSONL file and tokenize it; every bad line becomes a `LineError`
    (the report is complete, not stopped at the first; a line over ``max_line_bytes`` ends
    it). ``report.samples`` holds the `Sample`s (sft) or `PreferencePair`s (dpo) of the good
    lines. Raises `Stopped` when ``should_stop()`` (polled before each line) is true."""
    p = Path(path)
    report = DataReport(str(p), None)
    if not p.is_file():
        report.errors.append(LineError(0, f"{p} does not exist or is not a file"))
        return report
    size = p.stat().st_size
    if size > max_bytes:
        report.errors.append(
            LineError(
                0,
                f"{p} is {size / 2**20:.0f} MiB, over the "
                f"{max_bytes / 2**20:.0f} MiB limit; split it into "
                "several files",
            )
        )
        return report
    renderer = renderer or ChatRenderer(tokenizer)
    with open(p, "rb") as f:
        try:
            for n, line in jsonl.lines(f, max_line_bytes):
                if should_stop is not None and should_stop():
                    raise Stopped(f"validating {p} was stopped at line {n}")
                if jsonl.is_blank(line):
                    continue
                try:
                    _one_line(jsonl.parse(line, n), report, renderer, method, seq_len, n)
                except jsonl.JSONLError as exc:
                    report.errors.append(LineError(n, exc.reason.removeprefix("is ")))
                except LineProblem as exc:
                    report.errors.append(LineError(n, str(exc)))
        except jsonl.JSONLError as exc:  # a line over max_line_bytes
            report.errors.append(LineError(exc.line, exc.reason.removeprefix("is ")))
    if report.kind is None and not report.errors:
        report.errors.append(LineError(0, f"{p} is empty; write one JSON sample per line"))
    return report


def _one_line(
    obj: Any, report: DataReport, renderer: ChatRenderer, method: str, seq_len: int, n: int
) -> None:
    if not isinstance(obj, dict):
        raise LineProblem(f"a line must hold a JSON object, not a {type(obj).__name__}")
    kind = kind_of(obj)
    family = "messages" if kind in ("instruct", "function_calling") else kind
    if report.kind is None:
        if method == "dpo" and kind != "preference":
            raise LineProblem(
                "DPO needs preference samples "
                '{"prompt", "chosen", "rejected"}, not a ' + kind + " sample"
            )
        if method == "sft" and kind == "preference":
            raise LineProblem(
                "a preference sample (chosen/rejected) trains with method dpo, not sft"
            )
        report.kind = kind
    else:
        known = "messages" if report.kind in ("instruct", "function_calling") else report.kind
        if family != known:
            raise LineProblem(
                f"a {kind} sample in a file of {report.kind} samples; put each kind in its own file"
            )
        if kind == "function_calling":
            report.kind = kind
    try:
        if kind == "pretrain":
            _pretrain(obj, n, report, renderer.tokenizer, seq_len)
        elif kind == "preference":
            _preference(obj, n, report, renderer, seq_len)
        else:
            _conversation(obj, n, report, renderer, seq_len)
    except SouverainError as exc:  # the tokenizer refused the conversation
        raise LineProblem(str(exc).rstrip(".")) from None


def _pretrain(
    obj: dict[str, Any], n: int, report: DataReport, tokenizer: Tokenizer, seq_len: int
) -> None:
    check_keys(obj, {"text"})
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise LineProblem('"text" must be a non-empty string')
    ids = tokenizer.encode(text, bos=True, eos=True)
    pieces = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    pieces = [p for p in pieces if len(p) > 1]
    report.n_split += len(pieces) - 1
    for piece in pieces:
        _add(report, Sample(piece, [True] * len(piece), n))


def _conversation(
    obj: dict[str, Any], n: int, report: DataReport, renderer: ChatRenderer, seq_len: int
) -> None:
    check_keys(obj, {"messages", "tools"})
    tools = obj.get("tools")
    names = check_tools(tools) if tools is not None else None
    trained = check_messages(obj["messages"], names, final="assistant")
    tokens, mask = renderer.tokens_and_mask(obj["messages"], tools, trained)
    fits(len(tokens), seq_len, "conversation")
    _add(report, Sample(tokens, mask, n))


def _preference(
    obj: dict[str, Any], n: int, report: DataReport, renderer: ChatRenderer, seq_len: int
) -> None:
    check_keys(obj, {"prompt", "messages", "chosen", "rejected", "tools"})
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise LineProblem(f'a preference sample needs "{key}"')
    if ("prompt" in obj) == ("messages" in obj):
        raise LineProblem(
            'give the prompt as "prompt" (a string) or "messages" (a list '
            "ending with a user message), one of the two"
        )
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise LineProblem('"prompt" must be a non-empty string')
        prompt = [{"role": "user", "content": obj["prompt"]}]
    else:
        prompt = obj["messages"]
    tools = obj.get("tools")
    names = check_tools(tools) if tools is not None else None
    check_messages(prompt, names, final="prompt")
    chosen = answer_message(obj["chosen"], "chosen")
    rejected = answer_message(obj["rejected"], "rejected")
    if chosen["content"] == rejected["content"]:
        raise LineProblem('"chosen" and "rejected" are the same answer; a pair must differ')
    pair = []
    for answer in (chosen, rejected):
        msgs = [*prompt, answer]
        trained = [False] * len(prompt) + [True]
        tokens, mask = renderer.tokens_and_mask(msgs, tools, trained)
        fits(len(tokens), seq_len, "prompt + answer")
        pair.append(Sample(tokens, mask, n))
    report.kind = "preference"
    report.n_samples += 1
    for s in pair:
        report.n_tokens += len(s.tokens)
        report.n_trainable_tokens += s.n_trainable
    report.samples.append(PreferencePair(pair[0], pair[1], n))


def _add(report: DataReport, sample: Sample) -> None:
    report.n_samples += 1
    report.n_tokens += len(sample.tokens)
    report.n_trainable_tokens += sample.n_trainable
    report.samples.append(sample)


def load_dataset(
    paths: list[str],
    tokenizer: Tokenizer,
    *,
    method: Literal["sft", "dpo"],
    seq_len: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[Any], list[DataReport]]:
    """Validate and tokenize every file; raise `FinetuneError` with the first errors (line
    numbers included) if any file has one (`Stopped` when ``should_stop()``). Returns all
    samples, in file order."""
    renderer = ChatRenderer(tokenizer)
    reports = [
        validate_file(
            p,
            tokenizer,
            method=method,
            seq_len=seq_len,
            max_bytes=max_bytes,
            renderer=renderer,
            should_stop=should_stop,
        )
        for p in paths
    ]
    bad = [r for r in reports if not r.ok]
    if bad:
        raise FinetuneError(
            " ".join(r.summary(limit=5) for r in bad[:3]).rstrip(".")
            + "; fix them (see `souverain finetune validate`), nothing was trained."
        )
    samples: list[Any] = []
    for r in reports:
        samples += r.samples
    return samples, reports


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy packing, in order: consecutive samples share a pack while their lengths sum to
    at most ``seq_len``. Returns the sample indices of each pack (block-diagonal attention
    keeps them apart)."""
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > seq_len:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def batch_tensors(samples: list[Sample]) -> tuple[Any, Any, Any, Any, list[int]]:
    """Flat inputs of one forward: ``(tokens[T], positions[T], targets[T], mask[T], seq_lens)``
    where each sample contributes ``tokens[:-1]`` as input and ``tokens[1:]`` as targets."""
    import torch

    toks: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    msk: list[bool] = []
    lens = []
    for s in samples:
        n = len(s.tokens) - 1
        toks += s.tokens[:-1]
        tgt += s.tokens[1:]
        msk += s.mask[1:]
        pos += range(n)
        lens.append(n)
    return (
        torch.tensor(toks),
        torch.tensor(pos),
        torch.tensor(tgt),
        torch.tensor(msk, dtype=torch.bool),
        lens,
    )
