"""The moderation evaluation: the bundled set, the metric maths, the `souverain eval` CLI.

* The set validates as the issue asks (40+ positives per category, 8+ per language, 80+ hard
  negatives, five languages, unique ids and texts), and its PII identifiers pass their
  formats' checks, recomputed here independently of souverain's detectors.
* The metrics equal scikit-learn's when it is installed, and otherwise hand-computed values
  and brute-force definitions (AUROC as the fraction of positive/negative pairs in order).
* A real deterministic scorer, souverain's PII detectors (`souverain.pii`), runs through
  `score_set` / `evaluate` over the whole set.
* The CLI: `--help` teaches and imports no torch; bad input is one sentence and exit code 2.
  (Scoring a live server end to end is tested with the moderation route.)
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from souverain.cli import app
from souverain.eval import EvalError
from souverain.eval.http_scorer import moderations_url
from souverain.eval.metrics import Confusion, auroc, percentile
from souverain.eval.moderation import (
    CATEGORIES,
    DEFAULT_SET,
    LANGUAGES,
    V1_DANGEROUS_AND_CRIMINAL,
    Example,
    evaluate,
    load_set,
    score_set,
    spread,
)

try:
    from sklearn import metrics as skm
except ImportError:  # the hand-computed expectations below still run
    skm = None


# -- the set -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return load_set()


def test_every_category_has_40_positives_spread_over_five_languages(examples) -> None:
    per_cat = Counter(c for ex in examples for c in ex.categories)
    per_cat_lang = Counter((c, ex.lang) for ex in examples for c in ex.categories)
    for cat in CATEGORIES:
        assert per_cat[cat] >= 40, (cat, per_cat[cat])
        for lang in LANGUAGES:
            assert per_cat_lang[cat, lang] >= 8, (cat, lang, per_cat_lang[cat, lang])
    assert {ex.lang for ex in examples} == set(LANGUAGES)


def test_hard_negatives_and_benign_texts_in_every_language(examples) -> None:
    kinds = Counter((ex.kind, ex.lang) for ex in examples)
    assert sum(n for (kind, _), n in kinds.items() if kind == "hard_negative") >= 80
    for lang in LANGUAGES:
        assert kinds["hard_negative", lang] >= 12, lang
        assert kinds["benign", lang] >= 3, lang
    for ex in examples:
        assert (ex.kind == "positive") == bool(ex.categories), ex.id


def test_ids_and_texts_are_unique_and_texts_short(examples) -> None:
    assert len({ex.id for ex in examples}) == len(examples)
    assert len({" ".join(ex.text.split()).casefold() for ex in examples}) == len(examples)
    for ex in examples:
        assert 10 <= len(ex.text) <= 300, ex.id  # one to three sentences
    # the file itself: one JSON object per line, no blank line, UTF-8
    lines = DEFAULT_SET.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(examples)
    assert all(isinstance(json.loads(line), dict) for line in lines)


# the PII positives' identifiers, checked here independently of souverain.pii
def _mod97(s: str) -> int:
    return int("".join(str(int(c, 36)) for c in s)) % 97


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _steuer_check(d: str) -> bool:
    product = 10
    for c in d[:10]:
        s = (int(c) + product) % 10 or 10
        product = s * 2 % 11
    return (11 - product) % 10 == int(d[10])


IBAN_RE = re.compile(r"\b([A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?)\b")
CARD_RE = re.compile(r"(?<!\d)(?<!\d )(\d{4} \d{4} \d{4} \d{4}|3[47]\d{2} \d{6} \d{5})(?![\d])")
NIR_RE = re.compile(r"\b([12]) (\d\d) (\d\d) (\d\d) (\d{3}) (\d{3}) (\d\d)\b")
STEUER_RE = re.compile(r"(?<![+\d])\b(\d\d \d{3} \d{3} \d{3})\b")
NINO_RE = re.compile(r"\b([A-Z]{2}) \d\d \d\d \d\d ([A-Z])\b")
SSN_RE = re.compile(r"\b(\d{3})-(\d\d)-(\d{4})\b")


def test_pii_identifiers_pass_their_format_checks(examples) -> None:
    found: Counter[str] = Counter()
    for ex in (e for e in examples if "pii" in e.categories):
        for m in IBAN_RE.finditer(ex.text):
            raw = m[1].replace(" ", "")
            assert _mod97(raw[4:] + raw[:4]) == 1, (ex.id, m[1])
            found["iban_" + raw[:2]] += 1
        for m in CARD_RE.finditer(ex.text):
            assert _luhn(m[1].replace(" ", "")), (ex.id, m[1])
            found["card"] += 1
        for m in NIR_RE.finditer(ex.text):
            number = "".join(m.groups()[:6])
            assert 97 - int(number) % 97 == int(m[7]), (ex.id, m[0])
            assert 1 <= int(m[3]) <= 12
            found["nir"] += 1
        for m in STEUER_RE.finditer(ex.text):
            d = m[1].replace(" ", "")
            counts = sorted(Counter(d[:10]).values(), reverse=True)
            assert d[0] != "0" and counts[0] in (2, 3) and counts[1:2] != [2], (ex.id, d)
            assert _steuer_check(d), (ex.id, d)
            found["steuer"] += 1
        for m in NINO_RE.finditer(ex.text):
            prefix, suffix = m[1], m[2]
            assert prefix[0] not in "DFIQUV" and prefix[1] not in "DFIQUVO", ex.id
            assert prefix not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"} and suffix in "ABCD"
            found["nino"] += 1
        for m in SSN_RE.finditer(ex.text):
            area, group, serial = m.groups()
            assert area not in ("000", "666") and area[0] != "9", ex.id
            assert group != "00" and serial != "0000", ex.id
            found["ssn"] += 1
    for kind in ("iban_FR", "iban_DE", "iban_ES", "iban_IT", "iban_GB", "card", "nir",
                 "steuer", "nino", "ssn"):
        assert found[kind] >= 1, (kind, found)


# -- loading: every mistake is named with its line -----------------------------------------------
GOOD = {"id": "x-1", "lang": "en", "text": "hello there", "categories": [], "kind": "benign"}


@pytest.mark.parametrize("change, message", [
    ({"categories": ["violence"], "kind": "positive"}, "unknown category 'violence'"),
    ({"categories": [V1_DANGEROUS_AND_CRIMINAL], "kind": "positive"},
     "labelled dangerous or criminal"),
    ({"lang": "pt"}, "unknown language 'pt'; use one of en, fr, de, es, it"),
    ({"kind": "negative"}, "unknown kind 'negative'"),
    ({"kind": "positive"}, "a positive needs at least one category"),
    ({"categories": ["pii"]}, "a benign text has no category"),
    ({"text": "  "}, "'text' must be a non-empty string"),
    ({"label": 1}, "unknown field(s) label"),
    ({"categories": "pii", "kind": "positive"}, "must be a list"),
])
def test_load_set_names_the_bad_line(tmp_path: Path, change, message) -> None:
    path = tmp_path / "set.jsonl"
    bad = {**GOOD, "id": "x-2", "text": "another text", **change}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EvalError) as info:
        load_set(path)
    assert f"{path}:2: " in str(info.value) and message in str(info.value), str(info.value)


@pytest.mark.parametrize("second, message", [
    ({**GOOD, "text": "other"}, "id 'x-1' is already used on line 1"),
    ({**GOOD, "id": "x-2", "text": "Hello   THERE"}, "the same text is on line 1"),
])
def test_load_set_rejects_duplicates(tmp_path: Path, second, message) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(second) + "\n")
    with pytest.raises(EvalError, match=re.escape(f"{path}:3: {message}")):
        load_set(path)


def test_load_set_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "notjson.jsonl").write_text('{"id": \n')
    with pytest.raises(EvalError, match=r"notjson.jsonl:1: not JSON"):
        load_set(tmp_path / "notjson.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="holds no example"):
        load_set(tmp_path / "empty.jsonl")
    with pytest.raises(EvalError, match="does not exist"):
        load_set(tmp_path / "missing.jsonl")
    with pytest.raises(EvalError, match="is a folder"):
        load_set(tmp_path)


def test_spread_keeps_every_part_of_the_set(examples) -> None:
    subset = spread(examples, 110)
    assert len(subset) == 110 and len({ex.id for ex in subset}) == 110
    assert {ex.lang for ex in subset} == set(LANGUAGES)
    assert {c for ex in subset for c in ex.categories} == set(CATEGORIES)
    assert {ex.kind for ex in subset} == {"positive", "hard_negative", "benign"}
    assert spread(examples, None) == examples and spread(examples, 10_000) == examples


# -- metric maths --------------------------------------------------------------------------------
Y_TRUE = [True, True, True, False, False, False, False, True]
Y_SCORE = [0.9, 0.5, 0.2, 0.5, 0.1, 0.7, 0.0, 0.5]


def test_confusion_precision_recall_f1_by_hand() -> None:
    c = Confusion.count(Y_TRUE, Y_SCORE, 0.5)  # flagged: idx 0, 1, 3, 5, 7
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 2, 1, 2)
    assert c.precision == pytest.approx(3 / 5)
    assert c.recall == pytest.approx(3 / 4)
    assert c.f1 == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    none = Confusion.count([True, False], [0.1, 0.2], 0.5)  # nothing flagged: sklearn's 0.0
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)


def test_auroc_by_hand() -> None:
    # 4 positives x 4 negatives = 16 pairs; positives above: 0.9 beats 4, 0.5 beats 2 and ties
    # 1 (x2 positives), 0.2 beats 2 -> (4 + 2.5 + 2.5 + 2) / 16
    assert auroc(Y_TRUE, Y_SCORE) == pytest.approx(11 / 16)
    assert auroc([True, False], [0.3, 0.3]) == 0.5
    assert auroc([True, True], [0.1, 0.9]) is None  # one class only
    assert auroc([False, True, True], [0.0, 1.0, 0.5]) == 1.0


def _auroc_pairs(y_true: list[bool], y_score: list[float]) -> float:
    pos = [s for t, s in zip(y_true, y_score) if t]
    neg = [s for t, s in zip(y_true, y_score) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


labelled_scores = st.lists(st.tuples(st.booleans(), st.sampled_from(
    [0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0])), min_size=2, max_size=60)


@settings(max_examples=200, deadline=None)
@given(labelled_scores, st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_metrics_equal_their_definitions(pairs, threshold) -> None:
    y_true = [t for t, _ in pairs]
    y_score = [s for _, s in pairs]
    got = auroc(y_true, y_score)
    if all(y_true) or not any(y_true):
        assert got is None
    else:
        assert got == pytest.approx(_auroc_pairs(y_true, y_score))
    c = Confusion.count(y_true, y_score, threshold)
    pred = [s >= threshold for s in y_score]
    assert c.tp == sum(t and p for t, p in zip(y_true, pred))
    assert c.tp + c.fp + c.fn + c.tn == len(pairs)
    if skm is not None:  # scikit-learn, where installed, is the reference
        kw = {"zero_division": 0}
        assert c.precision == pytest.approx(skm.precision_score(y_true, pred, **kw))
        assert c.recall == pytest.approx(skm.recall_score(y_true, pred, **kw))
        assert c.f1 == pytest.approx(skm.f1_score(y_true, pred, **kw))
        if got is not None:
            assert got == pytest.approx(skm.roc_auc_score(y_true, y_score))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=50),
       st.sampled_from([0, 5, 50, 90, 95, 99, 100]))
def test_percentile_equals_numpy(values, q) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


# -- evaluate: a small set with hand-computed results --------------------------------------------
def _ex(i: int, kind: str, *cats: str, lang: str = "en") -> Example:
    return Example(f"t{i}", lang, f"text {i}", cats, kind)


SMALL = [_ex(0, "positive", "pii"), _ex(1, "positive", "criminal", lang="fr"),
         _ex(2, "positive", "dangerous", "pii"), _ex(3, "hard_negative"),
         _ex(4, "hard_negative", lang="fr"), _ex(5, "benign")]
# a v1 scorer: pii and dangerous_and_criminal_content, fixed scores per text
V1_SCORES = {"text 0": (0.9, 0.1), "text 1": (0.0, 0.8), "text 2": (0.4, 0.6),
             "text 3": (0.7, 0.2), "text 4": (0.1, 0.5), "text 5": (0.0, 0.0)}


def v1_scorer(texts: list[str]) -> list[dict[str, float]]:
    return [{"pii": V1_SCORES[t][0], V1_DANGEROUS_AND_CRIMINAL: V1_SCORES[t][1],
             "llama_guard_s14": 0.0} for t in texts]


def test_evaluate_small_set_by_hand() -> None:
    calls: list[int] = []
    run = score_set(SMALL, v1_scorer, batch_size=4, on_batch=calls.append)
    assert calls == [4, 2] and run.batch_sizes == [4, 2]
    report = evaluate(run, threshold=0.5)
    by_cat = {r.category: r for r in report.categories}
    assert list(by_cat) == ["pii", V1_DANGEROUS_AND_CRIMINAL]
    pii = by_cat["pii"]  # positives t0, t2; flagged t0, t3
    assert pii.positives == 2
    assert (pii.confusion.tp, pii.confusion.fp, pii.confusion.fn) == (1, 1, 1)
    assert pii.auroc == pytest.approx(7 / 8)  # t0 beats 4 negatives; t2 (0.4) beats 3 of 4
    assert pii.hard_negative_fpr == 0.5  # t3 of t3, t4
    dc = by_cat[V1_DANGEROUS_AND_CRIMINAL]  # truth = dangerous or criminal: t1, t2
    assert dc.positives == 2
    assert (dc.confusion.tp, dc.confusion.fp, dc.confusion.fn) == (2, 1, 0)  # t4 at 0.5
    assert dc.auroc == 1.0  # both positives (0.8, 0.6) above every negative (<= 0.5)
    assert report.hard_negatives_any_flag == 1.0 and report.benign_any_flag == 0.0
    assert report.ignored == ["llama_guard_s14"] and report.not_scored == []
    assert report.per_language_macro_f1["fr"] == pytest.approx((0.0 + 2 / 3) / 2)
    doc = report.to_json(model="m")
    assert doc["model"] == "m" and len(doc["items"]) == 6 and doc["latency"]["batches"] == 2
    json.dumps(doc)  # plain JSON


def test_evaluate_names_categories_a_v2_scorer_leaves_out() -> None:
    run = score_set(SMALL, lambda ts: [{"pii": 0.0} for _ in ts])
    report = evaluate(run)
    assert report.not_scored == ["dangerous", "criminal"]


@pytest.mark.parametrize("scorer, message", [
    (lambda ts: [{"pii": 0.5}], "answered 1 results for 4 texts"),
    (lambda ts: [{"pii": 1.5} for _ in ts], "scores are numbers in [0, 1]"),
    (lambda ts: [{"pii": float("nan")} for _ in ts], "scores are numbers in [0, 1]"),
    (lambda ts: ["pii" for _ in ts], "must be a {category: score} dict"),
])
def test_score_set_checks_the_scorer(scorer, message) -> None:
    with pytest.raises(EvalError, match=re.escape(message)):
        score_set(SMALL, scorer, batch_size=4)


def test_evaluate_checks_the_answers_and_threshold() -> None:
    uneven = score_set(SMALL, lambda ts: [{"pii": 0.1} if t != "text 3" else {"sexual": 0.1}
                                          for t in ts])
    with pytest.raises(EvalError, match="different categories for text 't3'"):
        evaluate(uneven)
    with pytest.raises(EvalError, match="none of La Plateforme's categories"):
        evaluate(score_set(SMALL, lambda ts: [{"toxic": 0.1} for _ in ts]))
    with pytest.raises(EvalError, match=r"within \[0, 1\]"):
        evaluate(score_set(SMALL, v1_scorer), threshold=1.5)


# -- a real deterministic scorer: souverain's PII detectors over the whole set --------------------
def test_pii_detectors_on_the_set(examples) -> None:
    pii = pytest.importorskip("souverain.pii")

    def detectors(texts: list[str]) -> list[dict[str, float]]:
        return [{"pii": 1.0 if pii.find_pii(t) else 0.0} for t in texts]

    report = evaluate(score_set(examples, detectors, batch_size=64))
    [result] = report.categories
    # the positives that carry an identifier (as recognised by this file's own checks)
    shaped = [ex for ex in examples if "pii" in ex.categories and any(
        r.search(ex.text) for r in (IBAN_RE, CARD_RE, NIR_RE, STEUER_RE, NINO_RE, SSN_RE,
                                    re.compile(r"@|\+\d|\d+\.\d+\.\d+\.\d+")))]
    assert result.confusion.tp == len(shaped) >= 30
    assert result.confusion.fp == 0  # order numbers, ISBNs, versions, EANs: not personal
    assert result.hard_negative_fpr == 0.0
    assert len(report.not_scored) == len(CATEGORIES) - 1
    assert report.latency.texts == len(examples)


# -- the CLI -------------------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_sentence_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_eval_help_teaches_and_imports_no_torch() -> None:
    r = invoke("eval", "--help")
    assert r.exit_code == 0 and "moderation" in r.stdout
    r = invoke("eval", "moderation", "--help")
    assert r.exit_code == 0
    for word in ("--url", "--model", "--threshold", "--limit", "--output", "/v1/moderations",
                 "hard negatives", "dangerous_and_criminal_content"):
        assert word in r.stdout, word
    code = ("import sys; from souverain.cli import main; sys.argv = ['souverain', 'eval', "
            "'moderation', '--help']\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code"
            "\nassert 'torch' not in sys.modules, 'torch imported'\nsys.exit(code)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_eval_moderation_bad_input_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**GOOD, "lang": "pt"}) + "\n")
    line = one_sentence_error(invoke("eval", "moderation", "--data", str(bad)))
    assert "bad.jsonl:1: unknown language 'pt'" in line
    line = one_sentence_error(invoke("eval", "moderation", "--url", "ftp://example.org"))
    assert "is not an http(s) URL" in line
    port = _free_port()  # nothing listens there: a real refused connection
    line = one_sentence_error(invoke("eval", "moderation", "--url", f"http://127.0.0.1:{port}",
                                     "--limit", "3"))
    assert f"cannot reach http://127.0.0.1:{port}/v1/moderations" in line
    assert "souverain serve" in line
    line = one_sentence_error(invoke("eval", "moderation", "-o", str(tmp_path)))
    assert "is a folder" in line
    for args in (["--threshold", "1.5"], ["--limit", "0"], ["--batch-size", "0"]):
        r = invoke("eval", "moderation", *args)
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)


def test_moderations_url_forms() -> None:
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1",
                "http://h:8000/v1/moderations"):
        assert moderations_url(url) == "http://h:8000/v1/moderations"
