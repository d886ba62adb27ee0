"""`souverain bench`: the same workload on souverain, llama.cpp and transformers, one table.

Each engine runs in its own subprocess, one after the other; the parent plans, launches and
reports. Importing this package (or `souverain.bench.command`) does not import torch.

- command.py: `bench_app` (typer, the flags) and `main(argv) -> exit code`
- plan.py: `BenchOptions` (one field per flag) -> the runs, GGUF files and vocabulary size
- session.py: `run_bench`: bandwidth, every run in turn, the report, the exit code
- launch.py / child.py: one run, parent side / child side (``python -m souverain.bench.child``)
- run_souverain.py, run_llama_cpp.py, run_transformers.py: one runner per engine;
  run_bandwidth.py: the read-bandwidth probe
- measure.py: RSS, decode / prefill rates, concurrency figures (standard library only)
- machine.py: load average, other processes' CPU share, waiting for a quiet machine
- workload.py: the seeded prompts, identical for every engine
- bytes_per_token.py: bytes of weights read per token (a GGUF file or a torch model)
- report.py: the table (rich or Markdown) and its notes
- capacity.py: `souverain plan predict`'s model (a profile + a target load -> replicas,
  ranks, machines, predicted figures, assumptions); capacity_measure.py: `plan measure` (one
  replica's curve and memory figures, in process)
- mistral_1b.py: the random ~1B Mistral-shaped checkpoint (HF folder + GGUF files), once
- formats.py: format conventions shared with tests/checkpoints.py (q/k permutation, GGUF
  names and metadata, SentencePiece vocabulary)
"""
