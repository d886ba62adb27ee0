"""Past one process: tensor parallelism over ``torch.distributed`` ranks (Megatron style), the
engine's ``--tensor-parallel K`` (`EngineConfig.tensor_parallel`: local ranks), and routing
requests over replicas.

- `souverain.distributed.tensor_parallel`: `shard_model_` splits a loaded `Transformer`
  (float, int8 or int4) into rank r of K's shard: heads and FFN (and Mixtral's experts)
  column- / row-parallel, one all-reduce per block half;
- `souverain.distributed.worker`: `TPWorker` (a rank's shard + its own paged KV cache, one
  `run(StepInputs) -> logits` per engine step, inputs broadcast from rank 0), `load_shard`,
  `init_process_group`;
- `souverain.distributed.launch`: `LocalTensorParallel` (K spawned processes on this machine,
  gloo on 127.0.0.1 or NCCL) and the ``torchrun`` entry point (``python -m
  souverain.distributed``);
- `souverain.distributed.routing`: which replica serves a request (`PrefixAwareRouter`: the
  longest cached prompt prefix, load as the tie-breaker; `RoundRobin`), from request bodies
  alone; pure Python, not yet wired into a front door.

Importing this package imports nothing heavy; import the modules you use.
"""
