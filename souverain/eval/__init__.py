"""Evaluation suites: labelled sets bundled with souverain, scorers, metrics and reports.

  moderation.py   the moderation evaluation set (data/moderation.jsonl): loading with checks,
                  scoring through any `score(texts) -> [{category: score}]`, per-category
                  precision / recall / F1 / AUROC, false positives on hard negatives, latency
  metrics.py      the maths shared by suites (confusion counts, F1, AUROC, percentiles)
  http_scorer.py  a scorer over HTTP `POST /v1/moderations` (souverain or La Plateforme)
  target.py       `ApiTarget` (a served model as a `Target`), `local_server` (a `souverain
                  serve` subprocess for a local model)
  harness.py      lm-evaluation-harness over a `Target` (imports lm_eval: import it lazily)

Cheap to import: no torch, no model. `souverain eval ...` (cli/eval.py) drives the suites.
"""

from __future__ import annotations

from souverain.errors import SouverainError


class EvalError(SouverainError):
    """An evaluation cannot run because of its input: a bad evaluation set line, a scorer
    that answers in the wrong shape, a server that refuses or cannot be reached."""
