"""The byte string of every token id, and the llguidance tokenizer built from them.

llguidance matches a grammar against bytes, so it needs, for each id, exactly the bytes that id
adds to the text. Every tokenizer kind spells them differently:

- mistral-common SentencePiece (v1..v7): pieces with ``▁`` for a space, ``<0xXX>`` byte pieces;
  control pieces (``<s>``, ``[INST]``, ``[TOOL_CALLS]``...) are special.
- mistral-common tekken: the tiktoken byte pieces; ids below ``num_special_tokens`` are special.
- GGUF / Hugging Face byte-level BPE: vocabulary strings in GPT-2's byte<->unicode alphabet.
- GGUF / Hugging Face SentencePiece BPE: ``▁`` and ``<0xXX>`` byte-fallback pieces.

Special (control) tokens are marked special: llguidance never matches them as text, only where a
grammar names them (``<[id]>``).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import llguidance

from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.mistral import MistralCommonTokenizer
from souverain.tokenizer.template import TemplateTokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Mistral control tokens that must stay special even where a tokenizer.json forgot to say so.
_MISTRAL_CONTROL = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")

_cache: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_cache_lock = threading.RLock()


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of ``tokenizer``: built once (about a second for a 131k
    vocabulary), cached for the tokenizer's lifetime; immutable, so threads may share it."""
    with _cache_lock:
        found = _cache.get(tokenizer)
        if found is None:
            found = _cache[tokenizer] = _build(tokenizer)
        return found


def _build(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    tokens, special = cached_token_table(tokenizer)
    special = set(special)
    eos = [i for i in dict.fromkeys(int(e) for e in tokenizer.eos_ids) if 0 <= i < len(tokens)]
    special |= set(eos)
    encode = _ExactEncoder(tokenizer, tokens, special)
    wrapper = _Wrapper(tokens, sorted(special), eos, tokenizer.bos_id, encode)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), eos_token=eos or None)


class _Wrapper:
    """What `llguidance.TokenizerWrapper` reads (duck-typed, like its Hugging Face adapter)."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: list[int],
                 bos: int | None, encode: _ExactEncoder) -> None:
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = bos
        self._encode = encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # makes TokenizerWrapper hand us str, never raw bytes
            raise TypeError("text must be str")
        return self._encode(text)


class _ExactEncoder:
    """``text -> ids`` whose bytes are exactly ``text`` (llguidance tokenizes grammar literals
    with it): the tokenizer's own encoding when it is exact, else the same without the
    SentencePiece dummy-prefix space, else a greedy longest-match spelling."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: set[int]) -> None:
        self._tokens = tokens
        self._lookup: dict[bytes, int] = {}
        for i, b in enumerate(tokens):
            if b and i not in special:
                self._lookup.setdefault(b, i)
        self._longest = max((len(b) for b in self._lookup), default=1)
        self._encode = _plain_encoder(tokenizer)

    def __call__(self, text: str) -> list[int]:
        target = text.encode("utf-8")
        try:
            ids = [int(i) for i in self._encode(text)]
        except Exception:
            ids = []
        got = b"".join(self._tokens[i] if 0 <= i < len(self._tokens) else b"\0" for i in ids)
        if got == target:
            return ids
        if ids and got == b" " + target:  # SentencePiece's dummy prefix
            rest = self._tokens[ids[0]][1:]
            if not rest:
                return ids[1:]
            if rest in self._lookup:
                return [self._lookup[rest], *ids[1:]]
        return self._greedy(target)

    def _greedy(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for size in range(min(self._longest, len(data) - i), 0, -1):
                found = self._lookup.get(data[i:i + size])
                if found is not None:
                    out.append(found)
                    i += size
                    break
            else:  # a byte no token spells: skip it (llguidance falls back on its own)
                i += 1
        return out


def _plain_encoder(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """Encode text with no BOS and with special-token strings taken as plain text."""
    if isinstance(tokenizer, TemplateTokenizer):
        import tokenizers

        plain = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        plain.encode_special_tokens = True
        return lambda text: plain.encode(text, add_special_tokens=False).ids
    # mistral-common never parses control-token strings in text. The raw tokenizer, not
    # ``tokenizer``: the cached LLTokenizer keeps this function, and must not keep its own
    # cache key alive.
    if isinstance(tokenizer, MistralCommonTokenizer):
        raw = _mistral_raw(tokenizer)
        return lambda text: raw.encode(text, bos=False, eos=False)
    ref = weakref.ref(tokenizer)
    return lambda text: ref().encode(text, bos=False, eos=False)  # type: ignore[union-attr]


# -- byte strings -------------------------------------------------------------------------------


def token_table(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """``(bytes of every id, special ids)``; special tokens' entries are their names."""
    if isinstance(tokenizer, MistralCommonTokenizer):
        raw = _mistral_raw(tokenizer)
        table = _tekken_table(raw) if _is_tekken(raw) else _spm_table(raw)
    elif isinstance(tokenizer, TemplateTokenizer):
        table = _tokenizers_table(tokenizer.backend)
    else:
        raise TypeError(f"no byte table for {tokenizer!r}: unknown tokenizer kind")
    tokens, special = table
    special |= {int(i) for i in tokenizer.special_ids if 0 <= int(i) < len(tokens)}
    return tokens, special


def _mistral_raw(tokenizer: MistralCommonTokenizer) -> Any:
    """mistral-common's own tokenizer (SentencePiece or tekken) inside ``tokenizer``."""
    return tokenizer.mistral.instruct_tokenizer.tokenizer


def _is_tekken(raw: Any) -> bool:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return isinstance(raw, Tekkenizer)


def _tekken_table(raw: Any) -> tuple[list[bytes], set[int]]:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    n_special = raw.num_special_tokens
    tokens = [raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP) for i in range(n_special)]
    model = raw._model  # the tiktoken Encoding: one call per id, no per-call validation
    tokens += [model.decode_single_token_bytes(i) for i in range(raw.n_words - n_special)]
    return tokens, set(range(n_special))


def _spm_table(raw: Any) -> tuple[list[bytes], set[int]]:
    sp = raw._model  # sentencepiece.SentencePieceProcessor
    tokens: list[bytes] = []
    special: set[int] = set()
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special.add(i)
            tokens.append(piece.encode("utf-8"))
        elif sp.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
    return tokens, special


def _types(node: Any) -> list[dict[str, Any]]:
    """Every component (dict with a "type") inside a tokenizer.json normalizer/decoder tree."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "type" in node:
            found.append(node)
        for value in node.values():
            found += _types(value)
    elif isinstance(node, list):
        for value in node:
            found += _types(value)
    return found


def _tokenizers_table(backend: Any) -> tuple[list[bytes], set[int]]:
    from souverain.tokenizer.gguf_tokenizer import bytes_to_unicode

    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    parts = _types(spec.get("decoder")) + _types(spec.get("pre_tokenizer"))
    kinds = {p.get("type") for p in parts}
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or any(
        p.get("type") == "Replace" and "\u2581" in json.dumps(p, ensure_ascii=False)
        for p in parts + _types(spec.get("normalizer"))
    )
    byte_fallback = bool(model.get("byte_fallback"))
    unbyte = {c: b for b, c in bytes_to_unicode().items()}

    def spell(text: str) -> bytes:
        if byte_level and all(c in unbyte for c in text):
            return bytes(unbyte[c] for c in text)
        if byte_fallback:
            m = _BYTE_PIECE.fullmatch(text)
            if m:
                return bytes([int(m.group(1), 16)])
        if metaspace:
            text = text.replace("\u2581", " ")
        return text.encode("utf-8")

    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(max(vocab.values(), default=-1) + 1, backend.get_vocab_size(with_added_tokens=True))
    tokens = [b""] * size
    special: set[int] = set()
    for text, i in vocab.items():
        tokens[i] = spell(text)
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special or added.content in _MISTRAL_CONTROL:
            special.add(i)
            tokens[i] = added.content.encode("utf-8")
        elif not (byte_level and all(c in unbyte for c in added.content)):
            tokens[i] = added.content.encode("utf-8")  # matched and decoded as raw text
    for i, b in enumerate(tokens):
        if not b:
            special.add(i)  # an id no text maps to (hole in the vocabulary)
    return tokens, special


def token_bytes(tokenizer: Tokenizer, ids: Sequence[int]) -> bytes:
    """The bytes ``ids`` spell, special tokens omitted (what llguidance matches)."""
    tokens, special = cached_token_table(tokenizer)
    return b"".join(tokens[i] for i in ids if i not in special)


_tables: weakref.WeakKeyDictionary[Tokenizer, tuple[list[bytes], set[int]]] = \
    weakref.WeakKeyDictionary()


def cached_token_table(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """`token_table`, built once per tokenizer (do not modify what it returns)."""
    with _cache_lock:
        found = _tables.get(tokenizer)
        if found is None:
            found = _tables[tokenizer] = token_table(tokenizer)
        return found
