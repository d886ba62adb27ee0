"""Rebuilding the tokenizer a GGUF file describes, with the `tokenizers` library.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges/scores, token types
and special ids as ``tokenizer.ggml.*`` metadata, and the chat template as
``tokenizer.chat_template``. Two kinds cover the Mistral/Llama family:

- ``model == "gpt2"``: byte-level BPE; ``tokenizer.ggml.pre`` names how text is split into words
  before BPE (one regex per llama.cpp pre-tokenizer name, as in the model's own tokenizer.json).
- ``model == "llama"``: SentencePiece BPE with byte fallback; merges are recovered from the
  token scores (a SentencePiece BPE merges the pair whose result has the highest score).

The approach follows transformers' GGUF converter (integrations/gguf), written independently
so that transformers is never imported at runtime. Where transformers and llama.cpp disagree we
follow llama.cpp, the format's reference (the pre-tokenizer regexes and ``ignore_merges``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from souverain.errors import TokenizerError
from souverain.tokenizer.template import TemplateTokenizer

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Word-splitting regexes of llama.cpp's BPE pre-tokenizers, as the original tokenizer.json
# files spell them (the `tokenizers` regex engine, Oniguruma, takes them as they are).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre name -> (regexes applied one after the other, ignore_merges, add_bos default).
# "default" (old converters) and unknown names get the plain GPT-2 split, as in transformers;
# llama.cpp refuses unknown names and has its own legacy set for "default".
# ignore_merges: a word that is itself in the vocabulary is one token (tiktoken-style), which
# llama.cpp turns on for the Llama 3 and tekken families, as their tokenizer.json files do.
_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "trillion", "granite-docling", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-es", "jina-de", "roberta-bpe"), ((_GPT2,), False, False)),
    # digits one by one, then GPT-2 words
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), ((r"\p{N}", _GPT2), False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), ((_LLAMA3,), True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), ((_LLAMA3,), False, False)),
    "tekken": ((_TEKKEN,), True, True),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan"), ((_QWEN2,), False, False)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), ((_GPT4O,), False, False)),
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (how byte-level BPE
    vocabularies spell bytes: "Ġ" is the space byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar or array metadata value, or None; strings decoded leniently (a few GGUFs in the
    wild carry tokens that are not valid UTF-8)."""
    field = reader.fields.get(key)
    if field is None or not field.types:
        return None
    kinds = field.types
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(kinds) > 1 and kinds[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [p.tolist()[0] for p in (field.parts[i] for i in field.data)]
    value = field.parts[field.data[0]].tolist()
    return value[0] if isinstance(value, list) else value


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> TemplateTokenizer | None:
    """The tokenizer described by a GGUF's ``tokenizer.*`` metadata; None when it has none.

    ``encode(text, bos=True)`` adds BOS only when ``tokenizer.ggml.add_bos_token`` says so
    (default: yes for SentencePiece and the Llama 3/tekken pre-tokenizers, no for other BPE), as
    llama.cpp and transformers do.
    """
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        return None
    types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(
            f"The GGUF lists {len(tokens)} tokens but {len(types)} token types; the file is "
            "corrupt: convert or download it again."
        )
    pre = _field(reader, "tokenizer.ggml.pre") or "default"

    dummy_prefix = False
    if model == "gpt2":
        known = pre in _PRE
        regexes, ignore_merges, default_bos = _PRE.get(pre, _PRE["default"])
        backend = _byte_level_bpe(
            tokens, _field(reader, "tokenizer.ggml.merges") or [], regexes, ignore_merges
        )
        kind = f"gguf gpt2 BPE (pre={pre}{'' if known else ', unknown: GPT-2 split'})"
    elif model == "llama":
        default_bos = True
        add_space = _field(reader, "tokenizer.ggml.add_space_prefix")
        dummy_prefix = True if add_space is None else bool(add_space)
        backend = _sentencepiece_bpe(
            tokens,
            types,
            _field(reader, "tokenizer.ggml.scores"),
            _field(reader, "tokenizer.ggml.merges"),
            _id(reader, "unknown", tokens),
            add_space_prefix=dummy_prefix,
        )
        kind = "gguf llama SentencePiece"
    else:
        raise TokenizerError(
            f"The GGUF's tokenizer model is {model!r}, which souverain cannot rebuild (it "
            "supports 'gpt2' byte-level BPE and 'llama' SentencePiece); use the model's Hugging "
            "Face folder with its tokenizer.json instead."
        )

    special = {
        "bos_token": _id(reader, "bos", tokens),
        "eos_token": _id(reader, "eos", tokens),
        "unk_token": _id(reader, "unknown", tokens),
        "pad_token": _id(reader, "padding", tokens),
    }
    _add_special_tokens(
        backend,
        tokens,
        types,
        [i for i in special.values() if i is not None],
        byte_level=model == "gpt2",
    )
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    return TemplateTokenizer(
        backend,
        kind=kind,
        bos_id=special["bos_token"],
        eos_id=special["eos_token"],
        add_bos=default_bos if add_bos is None else bool(add_bos),
        chat_template=_field(reader, "tokenizer.chat_template"),
        special_tokens={name: tokens[i] for name, i in special.items() if i is not None},
        extra_eos_ids=[_id(reader, "eot", tokens), _id(reader, "eom", tokens)],
        dummy_prefix=dummy_prefix,
    )


def _id(reader: gguf.GGUFReader, name: str, tokens: list[str]) -> int | None:
    value = _field(reader, f"tokenizer.ggml.{name}_token_id")
    # Some converters write -1 (as uint32: 4294967295) for "none".
    if value is None or not 0 <= int(value) < len(tokens):
        return None
    return int(value)


def _merge_pair(merge: str) -> tuple[str, str]:
    # merges are stored as "left right"; neither side contains a space (it is spelled "Ġ"/"▁")
    left, _, right = merge.partition(" ")
    return left, right


def _byte_level_bpe(
    tokens: list[str], merges: list[str], regexes: tuple[str, ...], ignore_merges: bool
) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Vocabulary entries are spelled in the byte alphabet; an added token stored as raw text
    # (e.g. one with non-ASCII letters) is respelled so BPE can still reach it.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    pairs = [_merge_pair(m) for m in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        ignore_merges=ignore_merges,
    )
    backend = tokenizers.Tokenizer(bpe)
    if regexes == (_GPT2,):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        splits: list[Any] = [
            pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes if r != _GPT2
        ]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=_GPT2 in regexes)
        backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str],
    types: list[int],
    scores: list[float] | None,
    merges: list[str] | None,
    unk_id: int | None,
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        pairs = [_merge_pair(m) for m in merges]
    else:
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(
                "The GGUF's SentencePiece tokenizer has neither merges nor one score per token; "
                "the file is corrupt or incomplete: convert or download it again."
            )
        pairs = _merges_from_scores(tokens, types, scores)
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
        dropout=None,
    )
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = None
    # SentencePiece writes spaces as "▁" and puts one before the text ("add_dummy_prefix").
    # "first": only before text at the very start, not after a special token, because chat
    # templates write "[INST] {{ content }}" expecting no extra space there (transformers'
    # choice; llama.cpp adds one after every special token and so encodes such prompts with a
    # doubled space). TemplateTokenizer.encode adds the "▁" Metaspace skips for text that
    # already starts with a space (see dummy_prefix).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces
    is a merge ranked by the piece's score (higher first), as SentencePiece's BPE decides.

    Only ordinary pieces take part: control, byte, unused and user-defined pieces are never
    produced by merging in SentencePiece (user-defined ones are matched whole, as added tokens).
    """
    normal = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t == _NORMAL}
    found: list[tuple[str, str, float]] = []
    for piece, index in normal.items():
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                local.append((left, right, scores[index]))
        # Same tie-breaking as transformers' generate_merges, for identical results.
        local.sort(key=lambda m: (normal[m[0]], normal[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(
    backend: tokenizers.Tokenizer,
    tokens: list[str],
    types: list[int],
    special_ids: list[int],
    byte_level: bool,
) -> None:
    """Register control tokens as special and user-defined ones as plain added tokens, so they
    are matched whole in text instead of being cut into pieces."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None

    def spelled_as_is(tok: str) -> bool:
        # In a byte-level vocabulary a token outside the byte alphabet was respelled above:
        # adding its raw text would create a new id past the model's vocabulary.
        return alphabet is None or set(tok) <= alphabet

    wanted = set(special_ids)
    control = [
        AddedToken(tok, special=True, normalized=False)
        for i, (tok, t) in enumerate(zip(tokens, types))
        if (t == _CONTROL or i in wanted) and spelled_as_is(tok)
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, t in zip(tokens, types)
        if t == _USER_DEFINED and spelled_as_is(tok)
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
