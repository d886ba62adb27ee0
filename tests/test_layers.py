"""The layers of docs/architecture.md point one way: a module imports only from layers below.

The contract lives in pyproject.toml (`[tool.importlinter]`) and is checked by import-linter,
which reads every import statement, including those deferred inside functions and those under
`if TYPE_CHECKING:`. The second test proves the check can fail: it plants one upward import in
a copy of the package and expects the contract to break on exactly that line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the package under cwd, not the installed one
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_imports_point_down() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "souverain", tmp_path / "souverain",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "souverain" / "weights" / "registry.py"
    # an asset reaching up into the engine, deferred inside a function as real code would
    target.write_text(target.read_text()
                      + "\n\ndef _up() -> None:\n    import souverain.engine.engine  # noqa: F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "souverain.weights.registry -> souverain.engine.engine" in result.stdout
