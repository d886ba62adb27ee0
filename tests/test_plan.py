"""`souverain plan`: the capacity model's arithmetic on a hand-written profile, `plan measure`
on a tiny random checkpoint (the real engine), `plan predict`'s table / --json, and the user
errors (exit code 2, one sentence)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from souverain.bench.capacity import GiB, PlanError, Target, check_profile, predict
from souverain.cli import app

runner = CliRunner()


def profile(weight_gib: float = 1.0, memory_gib: float = 64.0) -> dict[str, Any]:
    """A replica that decodes 20 tok/s at batch 1 and saturates near 8 in flight."""
    curve = []
    for c, tok_s, ttft, tpot in ((1, 20.0, 0.10, 0.050), (2, 36.0, 0.12, 0.055),
                                 (4, 60.0, 0.20, 0.066), (8, 80.0, 0.50, 0.100),
                                 (16, 90.0, 1.50, 0.178)):
        curve.append({"concurrency": c, "decode_tok_s": tok_s, "ttft_p50_s": ttft,
                      "ttft_p95_s": ttft * 1.5, "tpot_p50_s": tpot, "tpot_p95_s": tpot * 1.2})
    return {
        "version": 1, "model": "hand-written", "threads": 4, "tensor_parallel": 1,
        "prompt_tokens": 64, "answer_tokens": 16, "prefill_tok_s": 400.0,
        "machine": {"cpu": "test CPU", "physical_cores": 4, "logical_cpus": 8,
                    "memory_bytes": int(memory_gib * GiB), "read_gbs": 20.0},
        "model_args": {"n_layers": 32, "dim": 4096, "n_heads": 32, "n_kv_heads": 8,
                       "head_dim": 128, "vocab_size": 32768},
        "memory": {"weight_bytes": int(weight_gib * GiB), "kv_bytes_per_token": 131072,
                   "rss_after_load_bytes": int(weight_gib * GiB) + 200 * 2**20},
        "curve": curve,
    }


def target(**kw: Any) -> Target:
    base: dict[str, Any] = {"users": 10, "prompt_tokens": 64, "answer_tokens": 16,
                            "think_seconds": 5.0}
    return Target(**{**base, **kw})


def test_replicas_grow_with_users_and_are_the_ceiling_of_the_load() -> None:
    prof = profile()
    prev = 0
    for users in (1, 5, 10, 20, 50, 100, 400):
        res = predict(prof, target(users=users, ttft_slo=1.0, tpot_slo=0.15))
        replicas = res["replicas"]
        assert replicas >= prev
        prev = replicas
        c_plan = 0.8 * res["per_replica"]["capacity_concurrency"]
        # ceil: R replicas hold the load within the planned concurrency, R - 1 would not
        assert res["per_replica"]["concurrency"] <= c_plan + 1e-6
        if replicas > 1:
            fewer = predict(prof, target(users=users, replicas=replicas - 1,
                                         replicas_per_machine=res["replicas_per_machine"]))
            assert fewer["per_replica"]["concurrency"] > c_plan
    assert prev > 1


def test_replicas_formula_with_zero_think_time() -> None:
    # no think time: every user has a request in flight; TPOT p95 (1.2 x p50) reaches 100 ms
    # at a concurrency of ~6 (p50 66 ms at 4, 100 ms at 8), planned at 80 %
    res = predict(profile(), target(users=32, think_seconds=0.0, tpot_slo=0.1))
    cap = res["per_replica"]["capacity_concurrency"]
    assert 6.0 <= cap < 8.0  # tpot p95 = 1.2 x interpolated tpot p50 <= 0.1
    assert res["replicas"] == math.ceil(32 / (0.8 * cap))
    assert res["slo_met"]
    assert res["predicted"]["tpot_p95_s"] <= 0.1


def test_slo_respected_and_more_replicas_when_slo_tightens() -> None:
    loose = predict(profile(), target(users=60, think_seconds=2.0, ttft_slo=3.0))
    tight = predict(profile(), target(users=60, think_seconds=2.0, ttft_slo=0.25))
    assert tight["replicas"] > loose["replicas"]
    for res, slo in ((loose, 3.0), (tight, 0.25)):
        assert res["slo_met"]
        assert res["predicted"]["ttft_p95_s"] <= slo
    impossible = predict(profile(), target(ttft_slo=0.01))
    assert not impossible["feasible"] and not impossible["slo_met"]
    assert any("batch 1" in w for w in impossible["warnings"])


def test_tensor_parallel_ranks_when_a_replica_exceeds_a_machine() -> None:
    fits = predict(profile(weight_gib=10), target(machine_memory_gib=64))
    assert fits["tensor_parallel"] == 1
    big = predict(profile(weight_gib=140), target(machine_memory_gib=64))
    # 140 GiB of weights over 0.9 x 64 GiB machines: 4 ranks (3 does not divide 8 kv heads)
    assert big["tensor_parallel"] == 4
    assert big["machines"] == big["replicas"] * 4
    assert big["per_replica"]["memory_gib"]["total_per_rank"] <= 0.9 * 64
    assert any("tensor-parallel ranks" in a for a in big["assumptions"])
    with pytest.raises(PlanError, match="no tensor-parallel split"):
        predict(profile(weight_gib=5000), target(machine_memory_gib=64))


def test_prefix_sharing_reduces_prefill_and_latency() -> None:
    plain = predict(profile(), target(users=40, prompt_tokens=120, think_seconds=1.0))
    shared = predict(profile(), target(users=40, prompt_tokens=120, think_seconds=1.0,
                                       prefix_share=0.75))
    assert shared["predicted"]["prefill_tok_s"] < plain["predicted"]["prefill_tok_s"]
    per_request = [r["predicted"]["prefill_tok_s"] / r["predicted"]["requests_per_s"]
                   for r in (plain, shared)]
    assert per_request == pytest.approx([120.0, 30.0])
    assert shared["predicted"]["ttft_p50_s"] < plain["predicted"]["ttft_p50_s"]
    assert shared["per_replica"]["memory_gib"]["kv"] < plain["per_replica"]["memory_gib"]["kv"]


def test_replicas_sharing_a_machine_share_its_speed() -> None:
    # 2 replicas on the profile's 4-core machine: 2 threads each, half the speed each
    one = predict(profile(), target(users=8, think_seconds=0.0, replicas=1))
    two = predict(profile(), target(users=8, think_seconds=0.0, replicas=2,
                                    replicas_per_machine=2))
    assert two["threads_per_replica"] == 2 and two["machines"] == 1
    assert two["per_replica"]["speed_factor"] == pytest.approx(0.5)
    assert two["per_replica"]["concurrency"] == 4
    # on separate machines (default: one 4-thread replica per 4-core machine): full speed
    apart = predict(profile(), target(users=8, think_seconds=0.0, replicas=2))
    assert apart["machines"] == 2
    assert apart["predicted"]["decode_tok_s"] > two["predicted"]["decode_tok_s"]
    assert one["predicted"]["tpot_p50_s"] < two["predicted"]["tpot_p50_s"]


def test_bad_profiles_and_targets() -> None:
    with pytest.raises(PlanError, match="no measured concurrency"):
        check_profile({**profile(), "curve": []})
    twice = profile()
    twice["curve"][1] = dict(twice["curve"][1], concurrency=1)
    with pytest.raises(PlanError, match="repeated concurrency"):
        check_profile(twice)
    with pytest.raises(PlanError, match="users"):
        predict(profile(), target(users=-1))
    with pytest.raises(PlanError, match="prefix-share"):
        predict(profile(), target(prefix_share=1.5))


def _cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_predict_cli_table_json_and_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    flags = ["plan", "predict", "--profile", str(path), "--users", "50", "--prompt-tokens",
             "64", "--answer-tokens", "16", "--think-seconds", "5", "--ttft-slo", "1"]
    res = _cli(*flags)
    assert res.exit_code == 0, res.output
    assert "replicas" in res.output and "assumptions:" in res.output
    assert "closed loop" in res.output
    res = _cli(*flags, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data == predict(profile(), target(users=50, ttft_slo=1.0))
    assert all(isinstance(a, str) and "\n" not in a for a in data["assumptions"])

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args, word in (
            (["--profile", str(tmp_path / "missing.json")], "does not exist"),
            (["--profile", str(bad)], "not valid JSON"),
            (["--profile", str(path), "--users", "-3"], "--users"),
    ):
        argv = ["plan", "predict", "--users", "5", "--prompt-tokens", "8",
                "--answer-tokens", "8", *args]
        res = _cli(*argv)
        assert res.exit_code == 2, res.output
        assert word in res.output and "Traceback" not in res.output
        assert res.output.strip().count("\n") == 0, res.output


def test_measure_cli_writes_a_valid_profile(tiny_mistral: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    res = _cli("plan", "measure", str(tiny_mistral["hf"]), "--threads", "1", "--concurrency",
               "1,2", "--prompt-tokens", "8", "--answer-tokens", "4", "--rounds", "1",
               "-o", str(out))
    assert res.exit_code == 0, res.output
    prof = json.loads(out.read_text())
    check_profile(prof)
    assert [p["concurrency"] for p in prof["curve"]] == [1, 2]
    assert [p["requests"] for p in prof["curve"]] == [1, 2]
    assert all(p["new_tokens"] == 4 * p["requests"] for p in prof["curve"])
    assert all(p["decode_tok_s"] > 0 and p["tpot_p50_s"] > 0 for p in prof["curve"])
    args = tiny_mistral["args"]
    # float32 K and V of every layer and kv head
    assert prof["memory"]["kv_bytes_per_token"] == (
        2 * 4 * args["n_layers"] * args["n_kv_heads"] * args["head_dim"])
    assert prof["memory"]["weight_bytes"] > 0 and prof["prefill_tok_s"] > 0
    assert prof["machine"]["read_gbs"] > 0
    res = _cli("plan", "predict", "--profile", str(out), "--users", "4", "--prompt-tokens",
               "8", "--answer-tokens", "4", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["replicas"] >= 1
