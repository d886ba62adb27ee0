"""``python -m souverain.bench ...`` = ``souverain bench ...``: the same typer app."""

from souverain.bench.command import PROG, bench_app

bench_app(prog_name=PROG)
