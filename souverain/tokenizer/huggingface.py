"""A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) without transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from souverain.errors import TokenizerError
from souverain.tokenizer.template import TemplateTokenizer


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerError(
            f"{path} is not valid JSON ({err}); the file is corrupt: download it again."
        ) from err
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template beside the config; older files keep it inside,
    # either as a string or as a list of named templates.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_hf_tokenizer(
    folder: str | Path, tokenizer_json: str | Path | None = None
) -> TemplateTokenizer:
    """The tokenizer of a Hugging Face model folder, read with the `tokenizers` library.

    BOS follows ``add_bos_token`` in tokenizer_config.json; without it, whatever the
    tokenizer.json post-processor adds (Llama/Mistral folders add ``<s>`` there). Stop ids are the
    EOS, every ``eos_token_id`` of generation_config.json, and the template's end-of-turn tokens.
    """
    folder = Path(folder)
    path = Path(tokenizer_json) if tokenizer_json is not None else folder / "tokenizer.json"
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise TokenizerError(
            f"{path} could not be read as a Hugging Face tokenizer ({err}); it is corrupt or "
            "truncated: download it again."
        ) from err
    config = _read_json(folder / "tokenizer_config.json")
    names = {
        name: _token_text(config.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    ids = {name: backend.token_to_id(text) if text else None for name, text in names.items()}
    bos_id, eos_id = ids["bos_token"], ids["eos_token"]

    add_bos = config.get("add_bos_token")
    if add_bos is None:
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    # We add BOS ourselves (see TemplateTokenizer.encode): the post-processor must not add it
    # again, so encoding always runs with add_special_tokens=False.

    generation = _read_json(folder / "generation_config.json").get("eos_token_id")
    extra = generation if isinstance(generation, list) else [generation]
    return TemplateTokenizer(
        backend,
        kind="huggingface tokenizer.json",
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(add_bos),
        chat_template=_chat_template(folder, config),
        special_tokens={name: text for name, text in names.items() if text},
        extra_eos_ids=[i for i in extra if isinstance(i, int)],
    )
