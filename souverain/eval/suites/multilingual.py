"""The multilingual suite: the same six instructions in ten languages. Does the model answer
in the language it was asked in, and does it follow an instruction whose result a program can
check?

The set (data/suites/multilingual.jsonl, written for souverain in en, fr, de, es, it, pt, nl,
pl, ro, sv): six instructions per language, each with a checkable constraint (IFEval's idea,
Zhou et al., 2023), ``check`` naming it:
- ``bullets`` (``count``): exactly that many lines that start with "-", "*" or "•"
  (IFEval's bullet rule: numbered lines are not bullets);
- ``one_word``: one word, punctuation around it ignored;
- ``include_word`` (``word``, ``stem``): a word starting with ``stem`` (inflected forms count:
  Polish "latarni" for "latarnia"), case-insensitive;
- ``max_words`` (``max``): at most that many words;
- ``json_key`` (``key``): the answer (a ```json fence allowed) is a JSON object with that key;
- ``starts_with`` (``options``): the first word is one of the options ("Oui" / "Non"; case
  and accents folded: "Si" for "Sí").

The answer's language is identified by `py3langid` (langid.py's naive Bayes model over byte
n-grams, bundled in the wheel) restricted to the set's languages. JSON answers are read as the
text of their string values, bullets without their markers; an answer of fewer than
`MIN_WORDS` words (a one-word reply) is too short to identify and gets no language sample.

Metrics: ``language_match_rate`` and ``instruction_following_rate`` (higher is better), each
also per language (``language_match_rate.fr``).
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from functools import lru_cache
from typing import Any

from souverain.eval import EvalError
from souverain.eval.metrics import metric_of
from souverain.eval.suite import Example, Metric, Progress, SuiteOptions, SuiteResult, Target
from souverain.eval.suites.dataset import (
    Item,
    clip,
    json_of,
    load_items,
    run_items,
    take_evenly,
    worst,
)

MAX_TOKENS = 128
MIN_WORDS = 4
CHECKS = ("bullets", "one_word", "include_word", "max_words", "json_key", "starts_with")

_BULLET = re.compile(r"^\s*(?:[-*•‣◦]|\u2013)\s+\S")
_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def _folded(word: str) -> str:
    """Case and accents folded: "Si" answers "Sí", "Nao" answers "Não"."""
    return "".join(c for c in unicodedata.normalize("NFD", word.casefold())
                   if not unicodedata.combining(c))


def follows(check: dict[str, Any], answer: str) -> bool:
    """Whether ``answer`` satisfies the instruction's ``check`` (see the module docstring)."""
    kind = check["type"]
    text = answer.strip()
    if kind == "bullets":
        return sum(1 for line in text.splitlines() if _BULLET.match(line)) == int(check["count"])
    if kind == "one_word":
        tokens = [t for t in (_EDGE.sub("", w) for w in text.split()) if t]
        return len(tokens) == 1
    if kind == "include_word":
        stem = re.escape(str(check.get("stem") or check["word"]))
        return re.search(rf"(?<!\w){stem}", text, re.IGNORECASE) is not None
    if kind == "max_words":
        return 0 < len(text.split()) <= int(check["max"])
    if kind == "json_key":
        value = json_of(text)
        return isinstance(value, dict) and check["key"] in value
    if kind == "starts_with":
        first = text.split()[0] if text.split() else ""
        return _folded(_EDGE.sub("", first.replace("*", ""))) in {
            _folded(str(o)) for o in check["options"]}
    raise EvalError(f"unknown check {kind!r}; use one of {', '.join(CHECKS)}")


def prose_of(answer: str) -> str:
    """The words of an answer to identify its language: a JSON answer's string values,
    bullet markers and markdown dropped."""
    value = json_of(answer)
    if isinstance(value, (dict, list)):
        strings: list[str] = []

        def walk(v: Any) -> None:
            if isinstance(v, str):
                strings.append(v)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk(value)
        return " ".join(strings)
    lines = [_BULLET.sub(lambda m: m.group(0)[-1], line) for line in answer.splitlines()]
    return re.sub(r"[*_#`>]+", " ", "\n".join(lines)).strip()


@lru_cache(maxsize=8)
def _identifier(languages: tuple[str, ...]) -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    try:
        ident.set_languages(list(languages))
    except ValueError as exc:
        raise EvalError(f"the multilingual set names a language py3langid does not know "
                        f"({exc}); use ISO 639-1 codes such as fr, de, sv") from None
    return ident


def identify(text: str, languages: tuple[str, ...]) -> str | None:
    """The language of ``text`` among ``languages``, or None when it has fewer than
    `MIN_WORDS` words."""
    if len(text.split()) < MIN_WORDS:
        return None
    language, _ = _identifier(tuple(sorted(languages))).classify(text)
    return str(language)


class MultilingualSuite:
    """Six checkable instructions in ten languages: answer language, instruction following."""

    name = "multilingual"
    description = ("the same instructions in 10 languages: answer in the prompt's language, "
                   "follow a checkable constraint")

    def items(self, options: SuiteOptions) -> list[Item]:
        items = load_items(self.name, options, ("language", "prompt", "check"))
        for item in items:
            check = item["check"]
            if not isinstance(check, dict) or check.get("type") not in CHECKS:
                raise EvalError(f"multilingual item {item['id']!r}: check.type must be one of "
                                f"{', '.join(CHECKS)}")
        return take_evenly(items, options.limit, lambda i: i["language"])

    def size(self, options: SuiteOptions) -> int:
        return len(self.items(options))

    def run(self, target: Target, options: SuiteOptions,
            progress: Progress | None = None) -> SuiteResult:
        start = time.perf_counter()
        items = self.items(options)
        # identify among every language of the whole set, not only those of a --limit
        languages = tuple(sorted({i["language"] for i in load_items(
            self.name, options, ("language", "prompt", "check"))}))

        def ask(item: Item) -> str:
            return target.chat([{"role": "user", "content": item["prompt"]}],
                               max_tokens=MAX_TOKENS, temperature=0.0).text

        answers = run_items(target, ask, items, options.concurrency, progress)
        rows = [score(item, answer, languages) for item, answer in zip(items, answers)]
        result = SuiteResult(self.name, target.model, metrics(items, rows),
                             worst([r["example"] for r in rows], 20),
                             settings={"max_tokens": MAX_TOKENS, "temperature": 0.0,
                                       "languages": list(languages), "items": len(items)})
        skipped = sum(1 for r in rows if r["language"] is None)
        result.notes.append(f"answer language identified by py3langid among "
                            f"{', '.join(languages)}; {skipped} answer(s) under {MIN_WORDS} "
                            f"words not identified")
        result.duration_s = time.perf_counter() - start
        return result


def score(item: Item, answer: str, languages: tuple[str, ...]) -> dict[str, Any]:
    followed = follows(item["check"], answer)
    found = identify(prose_of(answer), languages)
    match = None if found is None else found == item["language"]
    parts = [1.0 if followed else 0.0] + ([] if match is None else [1.0 if match else 0.0])
    example = Example(item["id"], item["prompt"], clip(answer), sum(parts) / len(parts),
                      expected=f"an answer in {item['language']} that satisfies "
                               f"{json.dumps(item['check'], ensure_ascii=False)}",
                      detail={"language": item["language"], "identified": found,
                              "followed": followed})
    return {"id": item["id"], "lang": item["language"], "followed": followed,
            "language": found, "match": match, "example": example}


def metrics(items: list[Item], rows: list[dict[str, Any]]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    languages = list(dict.fromkeys(i["language"] for i in items))
    for suffix, chosen in [("", rows)] + [(f".{lang}", [r for r in rows if r["lang"] == lang])
                                          for lang in languages]:
        name = f"language_match_rate{suffix}"
        out[name] = metric_of(name, {r["id"]: 1.0 if r["match"] else 0.0 for r in chosen
                                     if r["match"] is not None},
                              description="answers in the prompt's language (answers of "
                                          f"{MIN_WORDS}+ words)")
        name = f"instruction_following_rate{suffix}"
        out[name] = metric_of(name, {r["id"]: 1.0 if r["followed"] else 0.0 for r in chosen},
                              description="answers that satisfy the instruction's check")
    return out
