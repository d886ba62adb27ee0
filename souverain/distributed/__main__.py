"""``python -m souverain.distributed``: one tensor-parallel rank under torchrun (see launch)."""

from souverain.distributed.launch import main

raise SystemExit(main())
