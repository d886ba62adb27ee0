"""One bench session, from the options to the exit code: plan the runs, draw the workload,
measure the read bandwidth, run each engine in its own subprocess one after the other
(never in parallel), then print one table (and write the JSON report)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

from souverain.bench.bytes_per_token import gguf_bytes_per_token
from souverain.bench.launch import launch
from souverain.bench.machine import loadavg, wait_quiet
from souverain.bench.measure import log
from souverain.bench.mistral_1b import RANDOM_MODELS, ensure_random_model
from souverain.bench.plan import BenchOptions, llama_cpp_version, plan_runs
from souverain.bench.report import print_report
from souverain.bench.workload import copy_prompt, make_workload


def run_bench(o: BenchOptions, command: str) -> int:
    """Run what the options ask; ``command`` is recorded in the report. Returns the exit
    code: 1 if any engine failed."""
    if o.render:
        print_report(json.loads(Path(o.render).read_text()), markdown=o.markdown)
        return 0
    if o.threads is None:
        from souverain.runtime import physical_cores

        o = dataclasses.replace(o, threads=physical_cores())
    if o.prepare_only:
        if o.model not in RANDOM_MODELS:
            raise SystemExit("--prepare-only applies to --model mistral-1b | mistral-7b")
        paths = ensure_random_model(o.model, Path(o.cache_dir).expanduser(), o.format_list())
        print(json.dumps(paths, indent=2, default=str))
        return 0
    levels = o.concurrency_levels()
    runs, files, vocab, tokenizer = plan_runs(o)
    work = make_workload(vocab, o.quick, levels, o.repeats)
    if tokenizer is not None:  # the extraction workload needs the model's chat format
        work["copy_prompt"] = copy_prompt(tokenizer)
    report = _new_report(o, levels, work, command)
    for name, path in files.items():
        report["formats"][name] = gguf_bytes_per_token(path)
    base = {"threads": o.threads, "repeats": o.repeats, "workload": work,
            "llama_concurrency": o.llama_concurrency,
            "llama_flash_attn": o.llama_flash_attn, "bandwidth_mb": 64 if o.quick else 1024}
    if not o.no_bandwidth:
        log(f"measuring read bandwidth ({base['bandwidth_mb']} MB, {o.threads} threads)")
        bw = launch({**base, "run": {"engine": "bandwidth", "label": "bandwidth"}}, o.timeout)
        if not bw.get("error"):
            report["bandwidth"] = {k: v for k, v in bw.items()
                                   if k.endswith(("_gbs_best", "_gbs_median"))
                                   or k in ("tensor_mb", "threads")}
    for run in runs:  # sequentially, never in parallel
        report["runs"].append(_measure(o, base, run, report["formats"], files))
        if o.json_path:  # keep partial results if a later engine dies
            Path(o.json_path).write_text(json.dumps(report, indent=2, default=str))
    print_report(report, markdown=o.markdown)
    if o.json_path:
        Path(o.json_path).write_text(json.dumps(report, indent=2, default=str))
    return 1 if any(r.get("error") for r in report["runs"]) else 0


def _new_report(o: BenchOptions, levels: list[int], work: dict[str, Any],
                command: str) -> dict[str, Any]:
    """The report before any run: what was asked, on which machine, with which workload."""
    return {
        "model": o.model, "threads": o.threads, "quick": o.quick,
        "host": f"{platform.machine()} · {os.cpu_count()} CPUs",
        "command": command, "concurrency": levels, "formats": {}, "runs": [],
        "workload": {"prefill_len": len(work["prefill_prompts"][0]),
                     "decode_prompt_len": len(work["decode_prompt"]),
                     "new_tokens": work["new_tokens"], "prompt_lengths": work["prompt_lengths"],
                     "copy_prompt_len": len(work.get("copy_prompt") or [])},
        "versions": {"python": platform.python_version(),
                     "llama-cpp-python": llama_cpp_version()},
    }


def _measure(o: BenchOptions, base: dict[str, Any], run: dict[str, Any],
             formats: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """One run in its subprocess, with the machine's load around it; llama.cpp's weights are
    described by its GGUF file (it holds them as they are on disk)."""
    log(f"running {run['label']}")
    load_before = loadavg()
    quiet = wait_quiet(o.wait_quiet)
    res = launch({**base, "run": run}, o.timeout)
    res["others_cpu_share_before"] = quiet
    res["source"] = run.get("source")
    res["quantization"] = run.get("quantization")
    res["speculative"] = run.get("speculative")
    res["loadavg_before_after"] = [load_before, loadavg()]
    if run["engine"] == "llama.cpp":
        g = next((f for n, f in formats.items() if files[n] == Path(run["path"])), None)
        if g:
            res["bytes_per_token"] = g["bytes_per_token"]
            res["format"] = g["format"]
    if res.get("error"):
        log(f"{run['label']} failed: {res['error']}")
    return res
