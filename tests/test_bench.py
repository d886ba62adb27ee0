"""Smoke test of `souverain bench` (`python -m souverain.bench --quick`): souverain only, on a
tiny random checkpoint. No timing assertions: it checks the bench runs end to end and reports
every row."""

from __future__ import annotations

import json

from souverain.bench import command as bench


def test_bench_quick_souverain_only(tiny_mistral: dict, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", str(tiny_mistral["gguf_f32"]), "--engines", "souverain",
                     "--threads", "1", "--quick", "--no-bandwidth", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["engine"] == "souverain" and "error" not in run, run
    assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0
    assert run["decode_tokens"] == report["workload"]["new_tokens"]
    assert set(run["concurrent"]) == {"2", "4"}
    for level in run["concurrent"].values():
        assert level["new_tokens"] == level["requests"] * report["workload"]["new_tokens"]
        assert 0 < level["ttft_p50_s"] <= level["ttft_p95_s"]
    assert run["peak_rss"] >= run["rss_load"] > 0
    assert report["formats"]["model-f32.gguf"]["bytes_per_token"] > 0
    assert "souverain · quant none" in capsys.readouterr().out


def test_bench_speculative_rows_and_copy_workload(tiny_mistral: dict, tmp_path, capsys) -> None:
    """--speculative none,ngram: one souverain run without, one with prompt lookup; the
    extraction (copy) row needs a tokenizer (the consolidated folder has the v3 one), and
    the bench checks the greedy copy answers agree."""
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", str(tiny_mistral["consolidated"]), "--engines", "souverain",
                     "--threads", "1", "--quick", "--no-bandwidth", "--json", str(out),
                     "--speculative", "none,ngram", "--concurrency", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    run, spec = report["runs"]
    assert (run["speculative"], spec["speculative"]) == (None, "ngram")
    assert report["workload"]["copy_prompt_len"] > 100
    assert run["copy_tok_s"] > 0 and spec["copy_tok_s"] > 0
    assert run["copy_ids"] == spec["copy_ids"]
    assert len(run["copy_ids"]) == report["workload"]["new_tokens"]
    printed = capsys.readouterr().out
    assert "speculation, souverain · quant none · ngram vs souverain · quant none" in printed
    assert "same greedy answer" in printed
