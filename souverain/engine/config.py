"""`EngineConfig`: how the engine runs a model (CLI flags map 1:1 onto its fields), validated
when it is built, and the two decisions derived from it alone: the dtype and the context."""

from __future__ import annotations

from dataclasses import dataclass

from souverain.errors import RequestError
from souverain.runtime import default_dtype
from souverain.weights.args import ModelArgs


@dataclass
class EngineConfig:
    """How the engine runs a model; CLI flags map 1:1 onto these fields.

    KV budget: ``kv_cache_tokens`` or ``kv_cache_gib`` (one of them; default: 25% of the
    memory available after loading, at most 4 GiB, and no more than ``max_num_seqs`` full
    contexts). The budget is the only KV memory the engine ever uses; when it runs out,
    sequences are preempted and recomputed, never dropped.

    Speculative decoding (`souverain.engine.speculative`): ``speculative="ngram"`` drafts up to
    ``num_speculative_tokens`` tokens per decoding sequence by prompt lookup (suffixes of
    ``prompt_lookup_min``..``prompt_lookup_max`` tokens); any other value names a draft model
    (alias, file or folder with the same vocabulary; `souverain.engine.draft`, quantized as
    ``speculative_quantization``) that drafts greedily. Drafts are verified in the step's forward;
    greedy outputs are unchanged and sampled ones keep their distribution. It pauses while more than
    ``speculative_disable_batch_size`` sequences decode at once. The draft length of each
    sequence follows its acceptance rate and ``speculative_row_cost``, what one drafted token
    costs relative to a plain decode step: the extra verification row, plus the draft model's
    forward if there is one (None: measured when the engine starts); a cost of 1 or more
    (linear kernels that do not batch, a draft model not much smaller) turns speculation off.

    LoRA: at most ``max_loras`` adapters resident at once (and ``lora_budget_gib`` of their
    float32 weights, if set); loading one more evicts the least recently used adapter that no
    unfinished request uses.

    Tensor parallelism: ``tensor_parallel`` K > 1 runs the forward on K rank processes of this
    machine (`souverain.distributed`: gloo on the CPU), each holding 1/K of the heads and FFN
    units (and of every Mixtral expert) and a KV cache of its own kv heads; the engine process
    keeps scheduling and sampling, without the weights. K must divide the model's heads, kv
    heads and FFN size; LoRA adapters are refused. ``tensor_parallel_ray``: the ranks are Ray
    actors instead, on the cluster at that address (or "local": a Ray instance this process
    starts), placed on whichever machines Ray picks.
    """

    dtype: str = "auto"
    quantization: str = "none"
    threads: int | None = None
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_gib: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    max_loras: int = 8
    lora_budget_gib: float | None = None
    speculative: str | None = None
    num_speculative_tokens: int = 5
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    speculative_disable_batch_size: int = 8
    speculative_row_cost: float | None = None
    speculative_quantization: str = "none"
    tensor_parallel: int = 1
    tensor_parallel_ray: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"block_size={self.block_size} must be >= 1"),
            (self.max_num_seqs >= 1, f"max_num_seqs={self.max_num_seqs} must be >= 1"),
            (self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1"),
            (self.kv_cache_tokens is None or self.kv_cache_gib is None,
             "give kv_cache_tokens or kv_cache_gib, not both"),
            (self.kv_cache_tokens is None or self.kv_cache_tokens >= 2 * self.block_size,
             f"kv_cache_tokens={self.kv_cache_tokens} must be at least 2 blocks "
             f"({2 * self.block_size} tokens)"),
            (self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib must be > 0"),
            (self.max_loras >= 1, f"max_loras={self.max_loras} must be >= 1"),
            (self.tensor_parallel >= 1,
             f"tensor_parallel={self.tensor_parallel} must be >= 1"),
            (self.lora_budget_gib is None or self.lora_budget_gib > 0,
             "lora_budget_gib must be > 0"),
            (self.quantization in ("none", "int8", "int4"),
             f"quantization={self.quantization!r} must be none, int8 or int4"),
            (self.speculative is None or bool(str(self.speculative).strip()),
             "speculative must be 'ngram' (prompt lookup), a draft model, or unset"),
            (self.speculative_quantization in ("none", "int8", "int4"),
             f"speculative_quantization={self.speculative_quantization!r} must be none, "
             "int8 or int4"),
            (1 <= self.num_speculative_tokens <= 16,
             f"num_speculative_tokens={self.num_speculative_tokens} must be in 1..16"),
            (1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16,
             f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max="
             f"{self.prompt_lookup_max} must satisfy 1 <= min <= max <= 16"),
            (self.speculative_row_cost is None or self.speculative_row_cost >= 0,
             f"speculative_row_cost={self.speculative_row_cost} must be >= 0"),
            (self.speculative_disable_batch_size >= 1,
             f"speculative_disable_batch_size={self.speculative_disable_batch_size} "
             "must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(f"invalid engine setting: {message}.")

    def model_dtype(self, args: ModelArgs) -> str:
        """The dtype of the residual stream and KV cache: ``dtype``, unless "auto"."""
        if self.dtype != "auto":
            return self.dtype
        if self.quantization != "none":
            # int4's kernel computes in bf16 anyway: a bf16 residual stream and KV cache save
            # two casts per linear and half the KV memory (SmolLM2 int4, `souverain bench`:
            # peak RSS 1340 -> 643 MB, decode b=1 unchanged at 61 tok/s; logits rel. error vs
            # fp32 .021 -> .032, same greedy tokens). int8 quantizes its activations in fp32;
            # a bf16 stream measured the same speed there (batch 1 and 16) at half the KV.
            return "bfloat16"
        return default_dtype(args.n_params)

    def context(self, args: ModelArgs) -> int:
        """Most tokens per sequence before the KV budget is counted: ``max_model_len``, else
        the model's own context."""
        return self.max_model_len or args.max_seq_len or 32768
