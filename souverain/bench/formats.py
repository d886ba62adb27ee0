"""The weight-format conventions shared by every synthetic checkpoint writer: the bench's
mistral-1b files (`souverain.bench.mistral_1b`) and the tests' tiny reference checkpoints
(tests/checkpoints.py).

It owns: q/k rows between Hugging Face's rotate-half RoPE layout and the interleaved-pair
layout of consolidated checkpoints and GGUF; llama.cpp's tensor names; the GGUF ``llama.*``
hyper-parameters of a ``params.json`` dict; the llama/SentencePiece vocabulary metadata; how
a float32 array is stored in each GGUF format; mistral-common's v3 tokenizer file.

torch, numpy, gguf and sentencepiece are imported where they are used: importing
``souverain.bench`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

# gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_0
GGUF_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}

# llama.cpp's name of each tensor of a layer: (mistral-inference, Hugging Face, GGUF)
_LAYER_NAMES = (
    ("attention_norm", "input_layernorm", "attn_norm"),
    ("attention.wq", "self_attn.q_proj", "attn_q"),
    ("attention.wk", "self_attn.k_proj", "attn_k"),
    ("attention.wv", "self_attn.v_proj", "attn_v"),
    ("attention.wo", "self_attn.o_proj", "attn_output"),
    ("ffn_norm", "post_attention_layernorm", "ffn_norm"),
    ("feed_forward.w1", "mlp.gate_proj", "ffn_gate"),
    ("feed_forward.w3", "mlp.up_proj", "ffn_up"),
    ("feed_forward.w2", "mlp.down_proj", "ffn_down"),
    ("feed_forward.gate", "block_sparse_moe.gate", "ffn_gate_inp"),
)
_GLOBAL_NAMES = (
    ("tok_embeddings", "model.embed_tokens", "token_embd"),
    ("norm", "model.norm", "output_norm"),
    ("output", "lm_head", "output"),
)
_TO_GGUF = {name: g for m, h, g in _LAYER_NAMES for name in (m, h)}
_GLOBAL_TO_GGUF = {name: g for m, h, g in _GLOBAL_NAMES for name in (m, h)}
# MoE experts are stacked [n_expert, rows, cols] in one GGUF tensor per projection
GGUF_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def v3_tokenizer_path() -> Path:
    """mistral-common's v3 SentencePiece model (32768 pieces), shipped in its wheel."""
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    path = data / "mistral_instruct_tokenizer_240323.model.v3"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (mistral-common's v3 tokenizer) is missing")
    return path


def permute_rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate-half: pairs (j, j + hd/2)) -> consolidated/GGUF (interleaved: pairs (2j, 2j+1)).

    Row ``2j`` of each head takes HF row ``j``, row ``2j+1`` takes HF row ``j + hd/2``.
    Identical to llama.cpp ``LlamaModel.permute``:
    ``w.reshape(n, 2, rows // n // 2, *rest).swapaxes(1, 2).reshape(w.shape)``."""
    head_dim = _head_dim(w, n_heads)
    heads = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
    return heads.transpose(1, 2).reshape(w.shape).contiguous()


def permute_interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rotate_half_to_interleaved` (transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``)."""
    head_dim = _head_dim(w, n_heads)
    heads = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
    return heads.transpose(1, 2).reshape(w.shape).contiguous()


def _head_dim(w: torch.Tensor, n_heads: int) -> int:
    rows = w.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"{rows} rows are not {n_heads} heads of an even size (shape "
                         f"{tuple(w.shape)})")
    return head_dim


def gguf_name(name: str) -> str:
    """llama.cpp's name of a tensor named the mistral-inference way
    (``layers.0.attention.wq.weight``) or the Hugging Face way
    (``model.layers.0.self_attn.q_proj.weight``)."""
    stem = name.removesuffix(".weight")
    if stem in _GLOBAL_TO_GGUF:
        return f"{_GLOBAL_TO_GGUF[stem]}.weight"
    layer, part = stem.removeprefix("model.").removeprefix("layers.").split(".", 1)
    return f"blk.{layer}.{_TO_GGUF[part]}.weight"


def add_llama_hparams(w: gguf.GGUFWriter, params: dict[str, Any], context_length: int) -> None:
    """GGUF ``llama.*`` hyper-parameters of a params.json dict (head_dim explicit, window
    under ``llama.attention.sliding_window``, which souverain reads and llama.cpp ignores)."""
    w.add_block_count(params["n_layers"])
    w.add_context_length(context_length)
    w.add_embedding_length(params["dim"])
    w.add_feed_forward_length(params["hidden_dim"])
    w.add_head_count(params["n_heads"])
    w.add_head_count_kv(params["n_kv_heads"])
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_key_length(params["head_dim"])
    w.add_value_length(params["head_dim"])
    w.add_rope_dimension_count(params["head_dim"])
    w.add_vocab_size(params["vocab_size"])
    if "moe" in params:
        w.add_expert_count(params["moe"]["num_experts"])
        w.add_expert_used_count(params["moe"]["num_experts_per_tok"])
    if params.get("sliding_window") is not None:
        w.add_sliding_window(params["sliding_window"])


def llama_gguf_writer(path: Path, name: str, params: dict[str, Any], context_length: int,
                      fmt: str) -> gguf.GGUFWriter:
    """A GGUF writer (architecture ``llama``) with the model's name, hyper-parameters and
    file type (``fmt`` in `GGUF_FILE_TYPES`) written; tensors and vocabulary come next."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    add_llama_hparams(w, params, context_length)
    w.add_file_type(GGUF_FILE_TYPES[fmt])
    return w


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, model_file: Path,
                            add_bos: bool | None = True) -> None:
    """llama/SPM tokenizer metadata (tokens, scores, types, bos/eos/unk) from a SentencePiece
    model, so llama.cpp accepts the file; ``add_bos=None`` leaves add_bos_token unwritten."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(_piece_type(sp, i))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)


def _piece_type(sp: Any, i: int) -> int:
    """gguf.TokenType of piece ``i``: NORMAL 1, UNKNOWN 2, CONTROL 3, UNUSED 5, BYTE 6."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    if sp.is_unused(i):
        return 5
    return 1


def add_gguf_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, fmt: str) -> None:
    """Store a float32 array as ``fmt``: ``f32``, ``f16``, or a block-quantized type (``q8_0``,
    ``q4_0``: quantized by the gguf package, as llama.cpp's converter does)."""
    import gguf
    import numpy as np

    if fmt == "f32":
        w.add_tensor(name, arr.astype(np.float32))
    elif fmt == "f16":
        w.add_tensor(name, arr.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[fmt.upper()]
        q = gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def finish_gguf(w: gguf.GGUFWriter) -> None:
    """Write the header, the metadata and the tensors, then close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
