"""Training data validation, loss masks, packing and configs (no model weights are read)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import checkpoints
import pytest

from souverain import weights
from souverain.errors import FinetuneError
from souverain.finetune.config import TrainConfig
from souverain.finetune.data import batch_tensors, load_dataset, pack, validate_file
from souverain.tokenizer import load_tokenizer_file

DATA = Path(__file__).parent / "data" / "finetune"
SOUVERAIN = [sys.executable, "-c", "from souverain.cli import main; main()"]


@pytest.fixture(scope="module")
def mistral_tok():
    return load_tokenizer_file(checkpoints.v3_tokenizer_path())


@pytest.fixture(scope="module")
def smol_tok():
    return weights.load("smollm2-135m-instruct").tokenizer


def _trained_text(tok, sample) -> str:
    return tok.decode(
        [t for t, m in zip(sample.tokens, sample.mask) if m], skip_special_tokens=False
    )


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_every_bad_line_is_reported_with_its_number(mistral_tok) -> None:
    r = validate_file(DATA / "instruct_bad.jsonl", mistral_tok, seq_len=256)
    by_line = {e.line: e.message for e in r.errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # line 1 is good
    assert "not valid JSON" in by_line[2]
    assert "last message is a user message" in by_line[3]
    assert "follows nothing" in by_line[4]
    assert "only one is allowed" in by_line[5]
    assert '"weight" must be 0 or 1' in by_line[6]
    assert "9 letters or digits" in by_line[7]
    assert "matches no earlier call" in by_line[8]
    assert "over seq_len 256" in by_line[9] and "not truncated" in by_line[9]
    assert "role is one of" in by_line[10]
    assert "nothing to learn" in by_line[11]
    assert r.n_samples == 1 and not r.ok


def test_file_level_errors(mistral_tok, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "is empty" in validate_file(empty, mistral_tok).errors[0].message
    big = validate_file(DATA / "zorblax_train.jsonl", mistral_tok, max_bytes=100)
    assert big.errors[0].line == 0 and "over the" in big.errors[0].message
    assert "does not exist" in validate_file(tmp_path / "nope.jsonl", mistral_tok).errors[0].message
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert "not UTF-8" in validate_file(tmp_path / "latin1.jsonl", mistral_tok).errors[0].message
    mixed = _write(
        tmp_path / "mixed.jsonl",
        [
            {"text": "a b c"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        ],
    )
    assert "own file" in validate_file(mixed, mistral_tok).errors[0].message
    pref = validate_file(DATA / "preference.jsonl", mistral_tok, method="sft")
    assert len(pref.errors) == 4 and "method dpo" in pref.errors[0].message
    sft_for_dpo = validate_file(DATA / "zorblax_train.jsonl", mistral_tok, method="dpo")
    assert "DPO needs preference samples" in sft_for_dpo.errors[0].message


def test_more_conversation_errors(mistral_tok, tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    lines = [
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call]},
            ]
        },  # no tools list
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "user", "content": "y"},
            ],
        },  # unanswered call
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{**call, "function": {"name": "g"}}]},
            ],
        },
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}],
                },
            ],
        },
        {
            "messages": [
                {"role": "user", "content": "x", "weight": 1},
                {"role": "assistant", "content": "y"},
            ]
        },
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "extra": 1,
        },
        [1, 2],
    ]
    r = validate_file(_write(tmp_path / "bad.jsonl", lines), mistral_tok)
    msgs = {e.line: e.message for e in r.errors}
    assert sorted(msgs) == list(range(1, 9))
    assert "no top-level" in msgs[1]
    assert "before the tool results" in msgs[2]
    assert "not in" in msgs[3]
    assert "not valid JSON" in msgs[4]
    assert "only assistant messages" in msgs[5]
    assert "non-empty string" in msgs[6]
    assert "unknown key(s) extra" in msgs[7]
    assert "JSON object" in msgs[8]


def test_mask_covers_assistant_answers_only_chatml(smol_tok, tmp_path: Path) -> None:
    line = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    r = validate_file(_write(tmp_path / "a.jsonl", [line]), smol_tok)
    assert r.ok and r.kind == "instruct"
    s = r.samples[0]
    assert _trained_text(smol_tok, s) == "Paris.<|im_end|>\n"  # weight 0 turn masked too
    assert r.n_trainable_tokens == sum(s.mask[1:])
    assert s.tokens == smol_tok.encode_chat(
        [{k: v for k, v in m.items() if k != "weight"} for m in line["messages"]],
        add_generation_prompt=False,
    )


def test_mask_mistral_multiturn_with_system_and_tools(mistral_tok) -> None:
    """Mistral formats put the system prompt and the tools in the last user turn, so the
    rendering of a prefix is not a prefix of the whole: the spans are still found."""
    r = validate_file(DATA / "function_calling.jsonl", mistral_tok)
    assert r.ok and r.kind == "function_calling"
    text = _trained_text(mistral_tok, r.samples[0])
    assert text.startswith('[TOOL_CALLS] [{"name": "get_weather"')
    assert text.count("</s>") == 3
    assert "It is 21 degrees in Paris.</s>" in text and text.endswith("pleasant.</s>")
    assert "[INST]" not in text and "weather bot" not in text and "temp" not in text


def test_pretrain_long_text_is_split(mistral_tok) -> None:
    r = validate_file(DATA / "pretrain.jsonl", mistral_tok, seq_len=64)
    assert r.ok and r.kind == "pretrain" and r.n_split >= 4
    assert all(len(s.tokens) <= 64 for s in r.samples)
    assert r.n_tokens == sum(len(s.tokens) for s in r.samples)


def test_preference_pairs(mistral_tok, tmp_path: Path) -> None:
    r = validate_file(DATA / "preference.jsonl", mistral_tok, method="dpo")
    assert r.ok and r.kind == "preference" and r.n_samples == 4
    pair = r.samples[0]
    assert _trained_text(mistral_tok, pair.chosen) == "Hello! Have a nice day.</s>"
    assert _trained_text(mistral_tok, pair.rejected) == "Go away.</s>"
    n = len(mistral_tok.encode_chat([{"role": "user", "content": "Say hello."}]))
    assert pair.chosen.tokens[:n] == pair.rejected.tokens[:n]
    bad = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "x", "chosen": "a", "rejected": "a"},
            {"prompt": "x", "chosen": "a"},
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ],
                "chosen": "a",
                "rejected": "b",
            },
            {"prompt": "x", "messages": [], "chosen": "a", "rejected": "b"},
            {
                "messages": [{"role": "user", "content": "x"}],
                "chosen": {"role": "assistant", "content": "a"},
                "rejected": ["b"],
            },
        ],
    )
    r = validate_file(bad, mistral_tok, method="dpo")
    msgs = {e.line: e.message for e in r.errors}
    assert sorted(msgs) == [1, 2, 3, 4]
    assert "same answer" in msgs[1] and '"rejected"' in msgs[2]
    assert "must end with a user" in msgs[3] and "one of the two" in msgs[4]


def test_load_dataset_raises_with_line_numbers(mistral_tok) -> None:
    with pytest.raises(
        FinetuneError,
        match=r"instruct_bad.jsonl has 10 invalid line\(s\): "
        r"line 2: not valid JSON",
    ):
        load_dataset([str(DATA / "instruct_bad.jsonl")], mistral_tok, method="sft", seq_len=256)


def test_packing_and_flat_batch(mistral_tok) -> None:
    assert pack([5, 5, 5, 9, 1], 10) == [[0, 1], [2], [3, 4]]
    r = validate_file(DATA / "zorblax_train.jsonl", mistral_tok)
    _, positions, targets, mask, lens = batch_tensors(r.samples[:3])
    assert lens == [len(s.tokens) - 1 for s in r.samples[:3]]
    assert positions.tolist()[: lens[0] + 1] == [*range(lens[0]), 0]  # each restarts at 0
    assert targets[: lens[0]].tolist() == r.samples[0].tokens[1:]
    assert int(mask.sum()) == sum(s.n_trainable for s in r.samples[:3])


def test_config_from_mistral_finetune_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "model_id_or_path: /models/m\n"
        "data:\n  instruct_data: train.jsonl,more.jsonl\n  eval_instruct_data: eval.jsonl\n"
        "lora:\n  rank: 64\n"
        "seq_len: 8192\nbatch_size: 1\nnum_microbatches: 8\nmax_steps: 300\n"
        "optim:\n  lr: 6.e-5\n  weight_decay: 0.1\n  pct_start: 0.05\n"
        "seed: 0\nlog_freq: 1\neval_freq: 100\nno_eval: False\nckpt_freq: 100\n"
        "save_adapters: True\nrun_dir: runs/x\nwandb:\n  project: null\n"
    )
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.model == "/models/m" and cfg.grad_accum == 8 and cfg.checkpoint_every == 100
    assert cfg.train_files == [str(tmp_path / "train.jsonl"), str(tmp_path / "more.jsonl")]
    assert cfg.eval_files == [str(tmp_path / "eval.jsonl")] and cfg.eval_every == 100
    assert cfg.learning_rate == 6e-5 and cfg.warmup_fraction == 0.05
    assert (
        cfg.lora.rank == 64 and cfg.lora.scaling == 2.0 and cfg.run_dir == str(tmp_path / "runs/x")
    )
    base = {"model": "m", "train_files": ["t.jsonl"], "run_dir": "r"}
    assert TrainConfig.from_dict({**base, "lora": {"rank": 8, "alpha": 32}}).lora.scaling == 4.0
    assert TrainConfig.from_dict({**base, "lora": {"rank": 8, "scaling": 1.5}}).lora.scaling == 1.5
    for bad, match in (
        ({"learnig_rate": 1}, "unknown config key 'learnig_rate'"),
        ({"optim": {"betas": 1}}, "optim.betas"),
        ({"lora": {"rnk": 2}}, "lora.rnk"),
        ({"max_steps": 10, "epochs": 1}, "only one"),
        ({"schedule": "linear"}, "schedule"),
        ({"wandb": {"project": "p"}}, "never sends"),
        ({"lora": {"target_modules": ["gate"]}}, "target_modules"),
    ):
        with pytest.raises(FinetuneError, match=match):
            TrainConfig.from_dict({**base, **bad})
    with pytest.raises(FinetuneError, match="lacks 'model'"):
        TrainConfig.from_dict({"train_files": ["t"], "run_dir": "r"})
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        TrainConfig.from_yaml(tmp_path / "broken.yaml")


def test_cli_validate(tiny_mistral: dict) -> None:
    model = str(tiny_mistral["consolidated"])
    bad = subprocess.run(
        [
            *SOUVERAIN,
            "finetune",
            "validate",
            str(DATA / "instruct_bad.jsonl"),
            "--model",
            model,
            "--seq-len",
            "256",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "instruct_bad.jsonl:2: not valid JSON" in bad.stderr
    assert "instruct_bad.jsonl:11:" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(
        [
            *SOUVERAIN,
            "finetune",
            "validate",
            str(DATA / "zorblax_train.jsonl"),
            "--model",
            model,
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert "estimated time per epoch" in good.stdout and "tokens/s" in good.stdout
    assert " 8 " in good.stdout  # samples column
