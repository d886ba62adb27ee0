"""`python -m souverain.cli ...` is the `souverain` command."""

from souverain.cli import main

main()
