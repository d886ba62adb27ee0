"""The built-in suites of `souverain eval run`, by name: ``SUITES`` maps each name to the
``"module:Class"`` that implements it (`souverain.eval.suite.Suite`), and `get_suite` imports
one on demand, so that listing the names (``--help``, a policy check) imports no suite.

  quality       perplexity on the user's text files; lm-evaluation-harness tasks from local files
  safety        refusal of harmful requests, over-refusal of safe look-alikes
  bias          counterfactual pairs (refusal, sentiment, choice, length gaps); ambiguous questions
  multilingual  the same instructions in 10+ languages: answer language, instruction following
  structured    JSON validity, schema validity, tool-call accuracy
  grounding     answers over a library cite passages that hold the fact (faithfulness)
"""

from __future__ import annotations

import importlib

from souverain.eval import EvalError
from souverain.eval.suite import Suite

SUITES: dict[str, str] = {
    "quality": "souverain.eval.suites.quality:QualitySuite",
    "safety": "souverain.eval.suites.safety:SafetySuite",
    "bias": "souverain.eval.suites.bias:BiasSuite",
    "multilingual": "souverain.eval.suites.multilingual:MultilingualSuite",
    "structured": "souverain.eval.suites.structured:StructuredSuite",
    "grounding": "souverain.eval.suites.grounding:GroundingSuite",
}


def get_suite(name: str) -> Suite:
    """A fresh instance of the suite called ``name``; EvalError naming the known suites when
    there is no such suite."""
    spec = SUITES.get(name)
    if spec is None:
        raise EvalError(f"unknown suite {name!r}; choose among {', '.join(SUITES)}")
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise EvalError(f"suite {name!r} is not installed in this souverain "
                        f"({module_name} is missing)") from None
    cls = getattr(module, class_name, None)
    if cls is None:  # a renamed class: the one whose `name` is the suite's
        found = [v for v in vars(module).values() if isinstance(v, type)
                 and getattr(v, "name", None) == name and callable(getattr(v, "run", None))]
        if len(found) != 1:
            raise EvalError(f"suite {name!r}: {module_name} defines no class {class_name}")
        cls = found[0]
    suite: Suite = cls()
    return suite
