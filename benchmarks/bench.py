"""Thin wrapper: ``python benchmarks/bench.py ...`` = ``python -m souverain.bench ...`` =
``souverain bench ...``. The implementation lives in ``souverain/bench/``."""

import sys

from souverain.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
