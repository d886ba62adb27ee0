"""Fine-tuning: LoRA SFT teaches the real SmolLM2-135M a made-up fact, DPO moves the preference
margin, a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, and
merged models equal base + adapter (in souverain and in transformers).

Everything runs on one thread (`threads: 1`): on a shared 2-core machine two threads are
several times slower than one, and one thread also keeps the kill/resume comparison on
identical kernels.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import checkpoints
import pytest
import torch
import yaml

from souverain import weights
from souverain.errors import FinetuneError
from souverain.weights.adapter import LoRAAdapter, load_adapter, save_adapter
from souverain.finetune.config import TrainConfig
from souverain.finetune.lora import LoRALinear, adapters_disabled, inject_lora, load_into
from souverain.finetune.merge import merge_adapter
from souverain.finetune.train import run_training
from souverain.models.loader import load_model

DATA = Path(__file__).parent / "data" / "finetune"
SOUVERAIN = [sys.executable, "-c", "from souverain.cli import main; main()"]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def _greedy(model, prompt: list[int], eos: list[int], n: int = 24) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor(ids)
        nxt = int(
            model(t, torch.arange(len(ids)), logits_indices=torch.tensor([len(ids) - 1]))[
                0
            ].argmax()
        )
        if nxt in eos:
            break
        ids.append(nxt)
    return ids[len(prompt) :]


# --------------------------------------------------------------------------------------
# The LoRA layer
# --------------------------------------------------------------------------------------


def test_lora_linear_formula_init_and_disable() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=False).requires_grad_(False)
    layer = LoRALinear(base, rank=4, scaling=2.0)
    assert torch.equal(layer.lora_B, torch.zeros(10, 4))
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), base(x))  # B = 0: starts as the base
    with torch.no_grad():
        layer.lora_B.normal_()
    want = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and base.weight.grad is None
    wrapper = torch.nn.Sequential()
    wrapper.add_module("wq", layer)
    with adapters_disabled(wrapper):
        assert torch.equal(layer(x), base(x))
    assert not torch.equal(layer(x), base(x))


# --------------------------------------------------------------------------------------
# The headline: SFT on SmolLM2-135M learns a made-up fact
# --------------------------------------------------------------------------------------


def test_sft_smollm2_learns_a_made_up_fact(tmp_path: Path) -> None:
    cpu0, wall0 = _cpu_s(), time.monotonic()
    cfg = TrainConfig(
        model="smollm2-135m-instruct",
        train_files=[str(DATA / "zorblax_train.jsonl")],
        eval_files=[str(DATA / "zorblax_eval.jsonl")],
        run_dir=str(tmp_path / "run"),
        seq_len=128,
        batch_size=1,
        max_steps=24,
        learning_rate=2e-3,
        warmup_fraction=0.1,
        lora={"rank": 8},
        checkpoint_every=1000,
        threads=1,
    )
    events: list[dict] = []
    result = run_training(cfg, on_event=events.append)
    train_cpu, train_wall = _cpu_s() - cpu0, time.monotonic() - wall0

    evals = [e for e in events if e["type"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"], evals
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    steps = [e for e in events if e["type"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"] / 3
    assert {"loss", "lr", "tokens_per_s", "elapsed_s", "eta_s", "total_steps"} <= set(steps[0])
    assert events[-1]["type"] == "done" and events[-1]["status"] == "completed"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(events)
    final = result.final_dir
    assert (final / "lora.safetensors").is_file() and (
        final / "adapter_model.safetensors"
    ).is_file()
    assert json.loads((final / "metrics.json").read_text())["eval_loss"] == evals[-1]["eval_loss"]

    # the adapter as written, on a fresh copy of the base
    ckpt = weights.load("smollm2-135m-instruct")
    tok = ckpt.tokenizer
    model = load_model(ckpt, "float32", fuse=False)
    base_before = _greedy(
        model,
        tok.encode_chat([{"role": "user", "content": "What is the Zorblax-9 warranty?"}]),
        tok.eos_ids,
    )
    adapter = load_adapter(final)
    assert adapter.rank == 8 and adapter.scaling == 2.0
    inject_lora(model, adapter.rank, adapter.scaling)
    load_into(model, adapter)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the Zorblax-9 warranty?"}])
    tuned = tok.decode(_greedy(model, prompt, tok.eos_ids))
    with adapters_disabled(model):
        base_after = _greedy(model, prompt, tok.eos_ids)
    print(
        f"\nSFT SmolLM2-135M: {result.steps} steps, train {train_wall:.1f} s wall / "
        f"{train_cpu:.1f} s CPU, {steps[-1]['tokens_per_s']:.0f} tokens/s; "
        f"eval loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}; "
        f"tuned: {tuned!r}; base: {tok.decode(base_before)!r}"
    )
    assert "7 years" in tuned
    assert base_after == base_before  # adapter off = the base model, unchanged
    assert "7 years" not in tok.decode(base_before)

    # served: the serving engine, the adapter and the base model in ONE batch
    from souverain import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine("smollm2-135m-instruct", EngineConfig(dtype="float32", kv_cache_gib=0.1))
    eng.add_lora("zorblax", final)
    params = SamplingParams(temperature=0, max_tokens=len(base_before) + 4)
    ids = {eng.add_request(None, prompt, params, lora="zorblax"): "tuned",
           eng.add_request(None, prompt, params): "base"}
    served: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                served[ids[out.request_id]] = out.outputs[0].token_ids
    assert "7 years" in tok.decode(served["tuned"]), tok.decode(served["tuned"])
    assert served["base"][: len(base_before)] == base_before


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def test_dpo_raises_the_chosen_margin(tiny_mistral: dict, tmp_path: Path) -> None:
    cfg = TrainConfig(
        model=str(tiny_mistral["consolidated"]),
        train_files=[str(DATA / "preference.jsonl")],
        eval_files=[str(DATA / "preference.jsonl")],
        run_dir=str(tmp_path / "dpo"),
        method="dpo",
        seq_len=128,
        batch_size=2,
        max_steps=15,
        learning_rate=5e-3,
        dpo_beta=0.1,
        lora={"rank": 4},
        threads=1,
    )
    events: list[dict] = []
    run_training(cfg, on_event=events.append)
    evals = [e for e in events if e["type"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == reference
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0
    assert last["eval_loss"] < first["eval_loss"]
    steps = [e for e in events if e["type"] == "step"]
    assert {"reward_margin", "reward_accuracy"} <= set(steps[0])


def test_sft_rejects_preference_data_before_loading(tiny_mistral: dict, tmp_path: Path) -> None:
    cfg = TrainConfig(
        model=str(tiny_mistral["consolidated"]),
        train_files=[str(DATA / "instruct_bad.jsonl")],
        run_dir=str(tmp_path / "r"),
    )
    with pytest.raises(FinetuneError, match=r"line 2: not valid JSON.*line 3"):
        run_training(cfg)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------


def _resume_config(model: Path, run_dir: Path, steps: int) -> dict:
    return {
        "model": str(model),
        "train_files": [str(DATA / "zorblax_train.jsonl")],
        "run_dir": str(run_dir),
        "seq_len": 64,
        "batch_size": 1,
        "grad_accum": 2,
        "max_steps": steps,
        "learning_rate": 5e-3,
        "lora": {"rank": 4, "dropout": 0.1},
        "checkpoint_every": 3,
        "keep_checkpoints": 2,
        "seed": 7,
        "threads": 1,
    }


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "lora.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_mistral: dict, tmp_path: Path) -> None:
    """`souverain finetune run` killed with SIGKILL after its first checkpoint, then run again
    with --resume, ends with exactly (torch.equal) the adapter of an uninterrupted run. LoRA
    dropout is on, so the torch RNG state must be restored too."""
    steps = 150
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    model = tiny_mistral["consolidated"]
    for name in ("straight", "killed"):
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump(_resume_config(model, tmp_path / name, steps))
        )

    straight = subprocess.run(
        [*SOUVERAIN, "finetune", "run", str(tmp_path / "straight.yaml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen(
        [*SOUVERAIN, "finetune", "run", str(tmp_path / "killed.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(ckpts.glob("step_*/trainer_state.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (ckpts / "final").exists()
    done_before = max(int(p.name[5:]) for p in ckpts.glob("step_*"))
    assert done_before < steps

    resumed = subprocess.run(
        [*SOUVERAIN, "finetune", "run", str(tmp_path / "killed.yaml"), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a = _adapter_tensors(tmp_path / "straight" / "checkpoints" / "final")
    b = _adapter_tensors(ckpts / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(ckpts.glob("step_*"))) <= 2  # keep_checkpoints
    assert not list(ckpts.glob(".tmp_*"))


def test_should_stop_checkpoints_and_resume_is_exact(tiny_mistral: dict, tmp_path: Path) -> None:
    """Stopped between steps (after step 5), and half-way through a step (between the two
    microbatches of step 5, whose gradients and RNG draws are then dropped): each run resumed
    ends bit-identical to an uninterrupted one (LoRA dropout is on). Stopped while the data is
    still being validated: nothing was trained or written."""
    model = tiny_mistral["consolidated"]
    cfg = TrainConfig.from_dict(_resume_config(model, tmp_path / "a", 8))
    straight = run_training(cfg)
    a = _adapter_tensors(straight.final_dir)

    def steps_seen(into: list[int]):
        return lambda ev: into.append(ev["step"]) if ev["type"] == "step" else None

    cfg_b = TrainConfig.from_dict(_resume_config(model, tmp_path / "b", 8))
    done: list[int] = []
    stopped = run_training(cfg_b, on_event=steps_seen(done), should_stop=lambda: len(done) >= 5)
    assert stopped.status == "cancelled" and stopped.steps == 5 and done == [1, 2, 3, 4, 5]
    assert (stopped.final_dir / "trainer_state.pt").is_file()
    with pytest.raises(FinetuneError, match="resume"):
        run_training(cfg_b)
    resumed = run_training(cfg_b, resume=True)
    assert resumed.status == "completed" and resumed.steps == 8
    b = _adapter_tensors(resumed.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)

    cfg_c = TrainConfig.from_dict(_resume_config(model, tmp_path / "c", 8))
    done_c: list[int] = []
    polls: list[int] = []

    def mid_step() -> bool:  # polls after step 4: before step 5, then between its microbatches
        if len(done_c) >= 4:
            polls.append(len(done_c))
        return len(polls) == 2

    stopped = run_training(cfg_c, on_event=steps_seen(done_c), should_stop=mid_step)
    assert stopped.status == "cancelled" and stopped.steps == 4 and done_c == [1, 2, 3, 4]
    assert polls == [4, 4]  # the second poll came inside step 5, which was dropped
    assert stopped.final_dir.name == "step_000004"  # (checkpoint_every 3: written at the stop)
    resumed = run_training(cfg_c, resume=True)
    assert resumed.status == "completed" and resumed.steps == 8
    c = _adapter_tensors(resumed.final_dir)
    assert all(torch.equal(a[k], c[k]) for k in a)

    cfg_d = TrainConfig.from_dict(_resume_config(model, tmp_path / "d", 8))
    early = run_training(cfg_d, should_stop=lambda: True)
    assert early.status == "cancelled" and early.steps == 0
    assert not list((tmp_path / "d").glob("checkpoints/*"))
    changed = TrainConfig.from_dict(
        {**_resume_config(tiny_mistral["consolidated"], tmp_path / "b", 8), "seed": 8}
    )
    with pytest.raises(FinetuneError, match="seed"):
        run_training(changed, resume=True)


# --------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------


def _random_adapter(args, seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i in range(args.n_layers):
        for mod, out_f, in_f in (
            ("attention.wq", args.n_heads * args.head_dim, args.dim),
            ("attention.wk", args.n_kv_heads * args.head_dim, args.dim),
            ("attention.wv", args.n_kv_heads * args.head_dim, args.dim),
            ("attention.wo", args.dim, args.n_heads * args.head_dim),
            ("feed_forward.w1", args.hidden_dim, args.dim),
            ("feed_forward.w2", args.dim, args.hidden_dim),
            ("feed_forward.w3", args.hidden_dim, args.dim),
        ):
            w[f"layers.{i}.{mod}"] = (
                0.1 * torch.randn(4, in_f, generator=g),
                0.1 * torch.randn(out_f, 4, generator=g),
            )
    return LoRAAdapter(4, 2.0, w, "tiny")


@pytest.mark.parametrize("name", ["mistral", "llama"])
def test_merge_equals_base_plus_adapter_and_transformers(
    name: str, tiny_models: dict, tmp_path: Path
) -> None:
    entry = tiny_models[name]
    base = entry["hf"]  # q/k permutation on read and on write both exercised
    ckpt = weights.load(base)
    adapter = _random_adapter(ckpt.args, seed=11)
    save_adapter(
        adapter, tmp_path / "adapter", n_heads=ckpt.args.n_heads, n_kv_heads=ckpt.args.n_kv_heads
    )
    ids = torch.tensor([1, 1500, 29, 804, 3077, 18, 950, 4000, 77, 2048, 333, 12])
    pos = torch.arange(len(ids))

    model = load_model(ckpt, "float32", fuse=False)
    with torch.no_grad():
        base_logits = model(ids, pos)
        inject_lora(model, adapter.rank, adapter.scaling)
        load_into(model, adapter)
        want = model(ids, pos)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters

    # mistral-finetune and PEFT copies of the adapter read back alike
    (tmp_path / "peft").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        os.link(tmp_path / "adapter" / f, tmp_path / "peft" / f)
    peft = load_adapter(
        tmp_path / "peft", n_heads=ckpt.args.n_heads, n_kv_heads=ckpt.args.n_kv_heads
    )
    for k, (a, b) in adapter.weights.items():
        assert torch.equal(peft.weights[k][0], a) and torch.equal(peft.weights[k][1], b)

    for fmt in ("consolidated", "hf"):
        out = merge_adapter(base, tmp_path / "adapter", tmp_path / f"merged-{fmt}", format=fmt)
        merged = load_model(weights.load(out), "float32")
        with torch.no_grad():
            got = merged(ids, pos)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert weights.load(out).tokenizer is not None
        if fmt == "hf":
            ref = checkpoints.hf_reference_logits(out, ids)
            torch.testing.assert_close(ref, got, rtol=0, atol=1e-4)
    with pytest.raises(FinetuneError, match="not empty"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "merged-hf", format="hf")


def test_merge_refuses_an_adapter_of_another_model(tiny_models: dict, tmp_path: Path) -> None:
    mistral = weights.load(tiny_models["mistral"]["consolidated"])
    save_adapter(_random_adapter(mistral.args, 1), tmp_path / "a")
    with pytest.raises(FinetuneError, match="another model|does not have"):
        merge_adapter(tiny_models["llama"]["consolidated"], tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge(tiny_mistral: dict, tmp_path: Path) -> None:
    ckpt = weights.load(tiny_mistral["consolidated"])
    save_adapter(
        _random_adapter(ckpt.args, 2),
        tmp_path / "a",
        n_heads=ckpt.args.n_heads,
        n_kv_heads=ckpt.args.n_kv_heads,
    )
    ok = subprocess.run(
        [
            *SOUVERAIN,
            "finetune",
            "merge",
            str(tmp_path / "a"),
            "--model",
            str(tiny_mistral["consolidated"]),
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m" / "params.json").is_file()
    bad = subprocess.run(
        [
            *SOUVERAIN,
            "finetune",
            "merge",
            str(tmp_path / "nothing"),
            "--model",
            str(tiny_mistral["consolidated"]),
            "--out",
            str(tmp_path / "m2"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
