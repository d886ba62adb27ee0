"""What one bench session runs: `BenchOptions` (the command's flags, one field each) ->
the list of runs (one engine on one file each, one subprocess each), the GGUF files to
describe, and the vocabulary size the prompts are drawn from."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from souverain.bench.measure import log
from souverain.bench.mistral_1b import GGUF_FORMATS, RANDOM_MODELS, ensure_random_model

ENGINES = ("souverain", "llama.cpp", "transformers")
LLAMA_CPP_INSTALL = ("llama-cpp-python is not installed: `pip install llama-cpp-python` "
                     "(it compiles llama.cpp, ~10 minutes on 2 cores); "
                     "skipping the llama.cpp column")
LlamaConcurrency = Literal["batched", "sequential", "both"]


@dataclass(frozen=True)
class BenchOptions:
    """The flags of `souverain bench` (see its ``--help``); comma lists stay strings."""

    model: str
    threads: int | None
    engines: str
    quantization: str
    dtype: str
    hf_dtype: str
    formats: str
    concurrency: str
    llama_concurrency: LlamaConcurrency
    llama_flash_attn: bool
    repeats: int
    cache_dir: str
    quick: bool
    prepare_only: bool
    no_bandwidth: bool
    timeout: float
    wait_quiet: float
    json_path: str | None
    markdown: bool
    render: str | None
    speculative: str = "none"
    safetensors: bool = False

    def speculative_modes(self) -> list[str | None]:
        """``--speculative``: souverain runs without (none) and with each mode (ngram)."""
        modes = [m.strip().lower() for m in self.speculative.split(",") if m.strip()]
        bad = [m for m in modes if m not in ("none", "ngram")]
        if bad:
            raise SystemExit(f"unknown --speculative mode(s) {bad}; choose from none, ngram")
        return [None if m == "none" else m for m in modes] or [None]

    def format_list(self) -> list[str]:
        """``--formats`` as a list (mistral-1b's GGUF files)."""
        return [f.strip().lower() for f in self.formats.split(",") if f.strip()]

    def concurrency_levels(self) -> list[int]:
        """``--concurrency``; ``--quick`` turns the default levels into 2 and 4."""
        if self.quick and self.concurrency == "8,16,32":
            return [2, 4]
        return [int(x) for x in self.concurrency.split(",") if x.strip()]


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version ("?" if unknown), None when it is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return "?"


class Plan(NamedTuple):
    runs: list[dict[str, Any]]  # one subprocess each
    files: dict[str, Path]  # the GGUF files to describe, by name
    vocab: int  # the prompts are drawn from it
    tokenizer: Any  # the model's (the extraction workload's prompt), None for random models


def plan_runs(o: BenchOptions) -> Plan:
    """The runs, the GGUF files, the vocabulary size and the tokenizer of a session."""
    engines = [e.strip() for e in o.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    quants = [q.strip() for q in o.quantization.split(",") if q.strip()]
    if o.model in RANDOM_MODELS:
        runs, files, vocab = _plan_random_model(o, engines, quants)
        tokenizer = None  # a random model copies nothing: no extraction workload
    else:
        runs, files, vocab, tokenizer = _plan_model(o, engines, quants)
    if any(r["engine"] == "llama.cpp" for r in runs) and llama_cpp_version() is None:
        log(LLAMA_CPP_INSTALL)
        runs = [r for r in runs if r["engine"] != "llama.cpp"]
    return Plan(runs, files, vocab, tokenizer)


def _plan_random_model(o: BenchOptions, engines: list[str], quants: list[str]
                       ) -> tuple[list[dict[str, Any]], dict[str, Path], int]:
    """souverain and llama.cpp on each GGUF format, transformers on the HF folder (and
    souverain on it too with ``--safetensors``)."""
    formats = o.format_list()
    bad = [f for f in formats if f not in GGUF_FORMATS]
    if bad:
        raise SystemExit(f"unknown format(s) {bad}; choose from {', '.join(GGUF_FORMATS)}")
    paths = ensure_random_model(o.model, Path(o.cache_dir).expanduser(), formats)
    files = {fmt.upper(): paths["gguf"][fmt] for fmt in formats}
    runs: list[dict[str, Any]] = []
    for fmt in formats:
        p = paths["gguf"][fmt]
        if "souverain" in engines:
            for q in quants:
                for spec in o.speculative_modes():
                    runs.append({"engine": "souverain", "path": str(p), "quantization": q,
                                 "dtype": o.dtype, "source": fmt.upper(), "speculative": spec,
                                 "label": f"souverain · {fmt.upper()} GGUF · quant {q}"
                                          + (f" · {spec}" if spec else "")})
        if "llama.cpp" in engines:
            runs.append({"engine": "llama.cpp", "path": str(p), "source": fmt.upper(),
                         "label": f"llama.cpp · {fmt.upper()} GGUF"})
    if "souverain" in engines and o.safetensors:
        for q in quants:
            runs.append({"engine": "souverain", "path": str(paths["hf"]), "quantization": q,
                         "dtype": o.dtype, "source": "HF bf16 safetensors",
                         "label": f"souverain · HF bf16 safetensors · quant {q}"})
    if "transformers" in engines:
        runs.append({"engine": "transformers", "path": str(paths["hf"]), "dtype": o.hf_dtype,
                     "source": "HF bf16 safetensors",
                     "label": f"transformers · HF folder · {o.hf_dtype}"})
    return runs, files, RANDOM_MODELS[o.model]["vocab_size"]


def _plan_model(o: BenchOptions, engines: list[str], quants: list[str]
                ) -> tuple[list[dict[str, Any]], dict[str, Path], int, Any]:
    """Every engine on the one file or folder souverain resolves (llama.cpp: GGUF only);
    also its vocabulary size and tokenizer."""
    from souverain.weights import load, resolve

    name = "smollm2-135m-instruct" if o.model == "smollm2" else o.model
    path = resolve(name)
    checkpoint = load(path)
    vocab = checkpoint.args.vocab_size
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    src = path.name
    files = {path.name: path} if is_gguf else {}
    runs: list[dict[str, Any]] = []
    for q in quants:
        if "souverain" in engines:
            for spec in o.speculative_modes():
                runs.append({"engine": "souverain", "path": str(path), "quantization": q,
                             "dtype": o.dtype, "source": src, "speculative": spec,
                             "label": f"souverain · quant {q}" + (f" · {spec}" if spec else "")})
    if "llama.cpp" in engines:
        if is_gguf:
            runs.append({"engine": "llama.cpp", "path": str(path), "source": src,
                         "label": "llama.cpp"})
        else:
            log(f"llama.cpp runs GGUF files only; {path} is not one: skipped")
    if "transformers" in engines:
        r = {"engine": "transformers", "dtype": o.hf_dtype, "source": src,
             "label": f"transformers · {o.hf_dtype}"}
        if is_gguf:
            r.update(path=str(path.parent), gguf_file=path.name)
        else:
            r.update(path=str(path))
        runs.append(r)
    return runs, files, vocab, checkpoint.tokenizer
