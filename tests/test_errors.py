"""Bad input gets one clear error naming the problem and the fix (library and CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from souverain import LLM, SamplingParams
from souverain.errors import CheckpointError, RequestError, TokenizerError, UnknownModelError
from souverain.weights import load


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_params_and_config(tmp_path):
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no params.json .* or config.json"):
        load(tmp_path)


def test_missing_weights_file(tiny_models, tmp_path):
    folder = _copy(tiny_models["mistral"]["consolidated"], tmp_path / "m")
    (folder / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file is missing"):
        load(folder)


def test_both_pth_and_safetensors(tiny_models, tmp_path):
    folder = _copy(tiny_models["mistral"]["consolidated"], tmp_path / "m")
    shutil.copy(tiny_models["mistral"]["pth"] / "consolidated.00.pth", folder)
    with pytest.raises(CheckpointError, match="both consolidated.safetensors and consolidated.00.pth"):
        load(folder)


def test_tensor_shape_mismatch(tiny_models, tmp_path):
    folder = _copy(tiny_models["mistral"]["consolidated"], tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    params["hidden_dim"] = 128  # weights have 160
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight has shape \[160, 64\] but params.json implies \[128, 64\]"):
        load(folder)


def test_missing_tensor(tiny_models, tmp_path):
    from safetensors.torch import load_file

    folder = _copy(tiny_models["llama"]["consolidated"], tmp_path / "m")
    sd = load_file(str(folder / "consolidated.safetensors"))
    del sd["layers.1.ffn_norm.weight"]
    save_file(sd, str(folder / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match="layers.1.ffn_norm.weight .*missing"):
        load(folder)


def test_unknown_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'qwen2' is not supported"):
        load(path)


@pytest.mark.parametrize("fmt", ["gguf_f32", "consolidated", "hf"])
def test_truncated_file(tiny_models, tmp_path, fmt):
    src = tiny_models["mistral"][fmt]
    if fmt == "gguf_f32":
        target = tmp_path / "cut.gguf"
        data = src.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        folder = target
    else:
        folder = _copy(src, tmp_path / "m")
        target = sorted(folder.glob("*.safetensors"))[0]
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(folder, dtype="float32")


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(path)


def test_unknown_alias_and_hub_id():
    with pytest.raises(UnknownModelError, match="neither an existing path nor a known model alias"):
        load("mistral-9000")
    with pytest.raises(UnknownModelError, match="never downloads models"):
        load("mistralai/Mistral-7B-Instruct-v0.3")


def test_checkpoint_without_tokenizer_serves_ids_but_not_text(tiny_models):
    llm = LLM(tiny_models["llama"]["gguf_f32"], dtype="float32")  # GGUF without tokenizer metadata
    assert llm.tokenizer is None
    assert llm.logits([1, 2, 3]).shape == (3, 32768)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        llm.generate("hello")
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_bad_requests(tiny_models):
    llm = LLM(tiny_models["llama"]["gguf_f32"], dtype="float32")
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 99999]])
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    long_prompt = [5] * 600  # the GGUF says context_length 512
    with pytest.raises(RequestError, match="never truncates"):
        llm.generate([long_prompt])


def test_generation_stops_at_context_with_model_length(tiny_models):
    llm = LLM(tiny_models["llama"]["gguf_f32"], dtype="float32")
    assert llm.context == 512
    out = llm.generate([[5] * 508], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "model_length"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "souverain.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["inspect", "/nonexistent/model"], "neither an existing path nor a known model alias"),
    (["inspect", "mistralai/Mixtral-8x7B-v0.1"], "never downloads models"),
    (["generate", "/nonexistent", "hi"], "neither an existing path"),
])
def test_cli_errors_are_one_sentence_exit_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_corrupt_checkpoint_exit_2(tiny_models, tmp_path):
    folder = _copy(tiny_models["mistral"]["consolidated"], tmp_path / "m")
    (folder / "params.json").write_text("{not json")
    r = _cli("generate", str(folder), "hi")
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr


def test_cli_text_needs_tokenizer_exit_2(tiny_models):
    r = _cli("generate", str(tiny_models["llama"]["gguf_f32"]), "hello", "-n", "2")
    assert r.returncode == 2 and "has no tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_flag_value_exit_2():
    r = _cli("generate", "smollm2-135m-instruct", "hi", "--temperature", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_in_thread_turns_stopiteration_into_an_error_not_a_hang() -> None:
    """asyncio cannot set a StopIteration on a future: with plain ``asyncio.to_thread`` a bare
    ``next()`` on an empty iterator in a blocking call left the request hanging forever (issue
    15's upload of b"\\x1d"). Every blocking call of the server goes through ``in_thread``."""
    import asyncio

    from souverain.server.errors import in_thread

    async def call() -> None:
        await asyncio.wait_for(in_thread(lambda: next(iter(()))), timeout=30)

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(call())
    assert asyncio.run(in_thread(lambda a, b=0: a + b, 2, b=3)) == 5
