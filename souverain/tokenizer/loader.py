"""Finding and opening the tokenizer of a model folder or file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from souverain.errors import TokenizerError
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.huggingface import load_hf_tokenizer
from souverain.tokenizer.mistral import load_mistral_file

# Versioned mistral-common files: tokenizer.model.v3, mistral_instruct_tokenizer_240323.model.v3,
# tokenizer.model.v7m1, ... and tekken.json / tekken_240911.json.
_VERSIONED_SPM = re.compile(r"\.model\.v\d+(m\d+)?$")


def _is_tekken_name(name: str) -> bool:
    return "tekken" in name and name.endswith(".json")


def mistral_tokenizer_files(folder: Path) -> list[Path]:
    """The versioned mistral-common tokenizer files in ``folder`` (a bare tokenizer.model is not
    counted: Hugging Face folders ship it beside tokenizer.model.v3 as a copy)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (_VERSIONED_SPM.search(p.name) or _is_tekken_name(p.name))
    )


def find_tokenizer_in_dir(folder: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer of a model folder, or None when the folder holds none.

    Order: a mistral-common file (``tokenizer.model.vN``, ``tekken.json``), which is what Mistral's
    own stack uses and gives exact chat/tool/FIM formats; else Hugging Face ``tokenizer.json``;
    else a bare ``tokenizer.model`` (the v1 tokenizer of Mistral 7B v0.1 consolidated folders).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(
            f"Model folder {folder} does not exist or is not a folder; pass the folder that holds "
            "the model's tokenizer files."
        )
    found = mistral_tokenizer_files(folder)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise TokenizerError(
            f"{folder} holds several mistral-common tokenizers ({names}), so which one the model "
            "uses is ambiguous; keep only the one the model was trained with (see its model card) "
            "and move the others out of the folder."
        )
    if found:
        return load_mistral_file(found[0])
    if (folder / "tokenizer.json").is_file():
        return load_hf_tokenizer(folder)
    if (folder / "tokenizer.model").is_file():
        return load_mistral_file(folder / "tokenizer.model")
    return None


def load_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    """Open a tokenizer given by path: a mistral-common file (tokenizer.model[.vN], tekken.json),
    a Hugging Face tokenizer.json, a .gguf file, or a model folder."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(
            f"Tokenizer file {path} does not exist; pass the path of a tokenizer file "
            "(tokenizer.model.v3, tekken.json, tokenizer.json or a .gguf) or of a model folder."
        )
    if path.is_dir():
        tokenizer = find_tokenizer_in_dir(path)
        if tokenizer is None:
            raise TokenizerError(
                f"{path} holds no tokenizer (no tokenizer.model.vN, tekken.json, tokenizer.json or "
                "tokenizer.model); copy the model's tokenizer file into it or pass that file."
            )
        return tokenizer
    if path.name.endswith(".json") and not _is_tekken_name(path.name):
        return load_hf_tokenizer(path.parent, path)
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path)
    return load_mistral_file(path)


def _load_gguf(path: Path) -> Tokenizer:
    import gguf

    from souverain.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct errors/IndexError on bad files
        raise TokenizerError(
            f"{path} could not be read as a GGUF file ({err}); it is corrupt or truncated: "
            "download it again."
        ) from err
    tokenizer = tokenizer_from_gguf(reader)
    if tokenizer is None:
        raise TokenizerError(
            f"{path} has no tokenizer metadata (tokenizer.ggml.*); pass the model's own "
            "tokenizer file instead."
        )
    return tokenizer
