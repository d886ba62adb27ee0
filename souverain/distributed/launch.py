"""Start K tensor-parallel ranks: local processes here, or ``torchrun`` processes anywhere.

`LocalTensorParallel(TPConfig(model, world=K))` spawns K rank processes on this machine
(``torch.multiprocessing``, spawn), which rendezvous over TCP on 127.0.0.1 at a free port
(gloo; NCCL for ``device="cuda"`` where there are GPUs), each load the checkpoint and keep its
shard and its own KV cache (`souverain.distributed.worker`). The caller's process stays out of
the process group: it hands each step to rank 0 through a pipe (`run(step) -> logits`: one
call per engine step, what the engine's model runner makes under ``--tensor-parallel K``),
rank 0 broadcasts it to the others, and its logits come back. `close` (or leaving the ``with`` block) stops them. The
ranks never outlive the caller: each watches a pipe the caller alone holds open and exits when
it closes (the caller exited, or was killed), and they ignore SIGINT (a Ctrl-C in the terminal
is the caller's to handle: it drains, then closes them).

On several machines (or under any launcher that sets ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT``), each process calls `init_process_group` +
`load_shard` + `TPWorker` itself, and rank 0, which is the driver, calls ``worker.run(step)``
while the others call ``worker.serve()``; ``python -m souverain.distributed`` does exactly
that for a greedy continuation of a few token ids::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0|1} \\
        --master-addr HOST0 --master-port 29500 \\
        -m souverain.distributed --model /models/mistral --world 2 --prompt-ids 1,1500,2300

(Ray: one actor per rank running the same calls, rank 0's actor driven by the engine.)
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

import torch

from souverain.distributed.tensor_parallel import check_shardable
from souverain.distributed.worker import (
    StepInputs,
    TPWorker,
    init_process_group,
    load_shard,
    local_kv_cache,
)
from souverain.errors import SouverainError

__all__ = ["LocalTensorParallel", "RayTensorParallel", "TPConfig", "free_port", "greedy", "main"]


@dataclass(frozen=True)
class TPConfig:
    """What every rank needs to build its shard and its KV cache (picklable)."""

    model: str  # a folder, file or alias (`souverain.weights.load`)
    world: int  # K: the number of ranks
    dtype: str = "float32"
    quantization: str = "none"  # "none" | "int8" | "int4" (CPU)
    device: str = "cpu"  # "cuda": rank r on cuda:r, NCCL
    num_blocks: int = 64  # KV cache blocks per rank (block 0 is the zero padding block)
    block_size: int = 16
    threads: int | None = None  # torch threads per rank (None: this machine's cores / K)
    timeout_s: float = 600.0  # of a collective, and of a rank's answer


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTensorParallel:
    """K rank processes on this machine behind one `run(step) -> logits` (see module)."""

    def __init__(self, config: TPConfig):
        from souverain import weights

        check_shardable(weights.load(config.model).args, config.world)  # fail here, not in K
        self.config = config
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # the ranks' lifeline: only this process holds its write end, so its closing (this
        # process exits, however) is an EOF for every rank
        lifeline, self._lifeline = ctx.Pipe(duplex=False)
        port = free_port()
        self._procs = [ctx.Process(target=_rank_main, name=f"souverain-tp-rank{r}", daemon=True,
                                   args=(r, port, config, child if r == 0 else None, lifeline))
                       for r in range(config.world)]
        for p in self._procs:
            p.start()
        child.close()
        lifeline.close()
        try:
            ready = self._receive()  # once every rank holds its shard
        except BaseException:
            self.close()
            raise
        self.shard_bytes: int = int(ready["shard_bytes"])  # rank 0's weights (each rank alike)

    def run(self, step: StepInputs) -> torch.Tensor:
        """One forward of ``step`` on every rank: rank 0's float32 logits."""
        self._conn.send(step)
        return torch.from_numpy(self._receive())

    def close(self) -> None:
        """Stop the ranks (rank 0 releases the others), waiting a few seconds before ending
        any that does not exit."""
        if not self._procs:
            return
        try:
            if self._procs[0].is_alive():
                self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        for p in self._procs:
            p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._conn.close()
        self._lifeline.close()
        self._procs = []

    def __enter__(self) -> LocalTensorParallel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _receive(self) -> Any:
        """Rank 0's next answer; a rank that died or failed raises here instead of hanging."""
        waited = 0.0
        while not self._conn.poll(0.1):
            waited += 0.1
            dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead or waited > self.config.timeout_s:
                self.close()
                what = (f"rank {dead[0][0]} exited with code {dead[0][1]}" if dead
                        else f"no answer from rank 0 in {self.config.timeout_s:.0f} s")
                raise RuntimeError(f"tensor-parallel ranks stopped: {what}")
        try:
            kind, value = self._conn.recv()
        except EOFError:  # rank 0 is gone without a word
            self.close()
            raise RuntimeError("tensor-parallel ranks stopped: rank 0 closed its pipe") from None
        if kind == "error":
            exc, text = value
            self.close()
            if isinstance(exc, SouverainError):
                raise exc
            raise RuntimeError(f"tensor-parallel rank 0 failed:\n{text}")
        return value


def _rank_main(rank: int, port: int, config: TPConfig, conn: Connection | None,
               lifeline: Connection | None = None) -> None:
    """A spawned rank: join the group, build shard + cache, then serve (rank 0: from the
    pipe). Rank 0 reports any exception through the pipe; the others exit non-zero. Every
    rank ends at once when ``lifeline`` closes (its parent is gone)."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to handle (see module)
    if lifeline is not None:
        threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True,
                         name="souverain-tp-lifeline").start()
    try:
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // config.world))
        device = f"cuda:{rank}" if config.device == "cuda" else config.device
        init_process_group(rank, config.world, device=device, master_addr="127.0.0.1",
                           master_port=port, timeout_s=config.timeout_s)
        worker = _build_worker(config, rank, device)
        if conn is None:
            worker.serve()
        else:
            from souverain.models.quantize import quantized_bytes

            conn.send(("ok", {"shard_bytes": quantized_bytes(worker.model)}))
            while (step := conn.recv()) is not None:
                # numpy: a plain pickle (a tensor would cross as a shared-memory handle)
                conn.send(("ok", worker.run(step).cpu().numpy()))
            worker.stop()
        dist.destroy_process_group()
    except BaseException as exc:  # reported, then this process ends
        if conn is None:
            raise
        try:
            conn.send(("error", (_picklable(exc), traceback.format_exc())))
        except (BrokenPipeError, OSError):
            pass


def _exit_with_parent(lifeline: Connection) -> None:
    """Block until the parent's end of ``lifeline`` closes, then end this rank now (it may
    be waiting in a collective that will never complete)."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _build_worker(config: TPConfig, rank: int, device: str) -> TPWorker:
    from souverain import kernels

    model = load_shard(config.model, rank, config.world, dtype=config.dtype, device=device,
                       quantization=config.quantization)
    if model.device.type == "cpu":
        kernels.available()  # built (or loaded) before the first step, as the engine does
    return TPWorker(model, local_kv_cache(model, config.num_blocks, config.block_size))


def _picklable(exc: BaseException) -> BaseException | None:
    """``exc`` if it can cross the pipe, else None (the traceback text still does)."""
    import pickle

    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return None


def greedy(worker: TPWorker, prompt: list[int], max_tokens: int) -> list[int]:
    """Rank 0: a greedy continuation of ``prompt`` through ``worker`` (one sequence on blocks
    1, 2, ... of its cache): the smallest driver of a `TPWorker`."""
    bs = worker.cache.block_size
    total = len(prompt) + max_tokens
    if -(-total // bs) + 1 > worker.cache.num_blocks:
        raise ValueError(f"{total} tokens do not fit {worker.cache.num_blocks - 1} blocks of {bs}")
    from souverain.engine.paged_attention import SeqSlice

    table = list(range(1, -(-total // bs) + 1))
    step = StepInputs(list(prompt), list(range(len(prompt))),
                      [SeqSlice(0, len(prompt), table, len(prompt))], [len(prompt) - 1])
    out: list[int] = []
    while len(out) < max_tokens:
        token = int(worker.run(step)[-1].argmax())
        out.append(token)
        pos = len(prompt) + len(out) - 1
        step = StepInputs([token], [pos], [SeqSlice(pos, 1, table, len(prompt))], [0])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m souverain.distributed``: one rank of a greedy continuation, the ranks
    started by ``torchrun`` (or anything that sets RANK / WORLD_SIZE / MASTER_ADDR /
    MASTER_PORT); rank 0 prints the new token ids."""
    import argparse

    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m souverain.distributed",
                                     description=main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (rank on LOCAL_RANK)")
    parser.add_argument("--block-size", type=int, default=16)
    ns = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(rank, world, device=ns.device)
    device = (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if ns.device == "cuda" else ns.device)
    model = load_shard(ns.model, rank, world, dtype=ns.dtype, device=device,
                       quantization=ns.quantization)
    prompt = [int(t) for t in ns.prompt_ids.split(",")]
    blocks = -(-(len(prompt) + ns.max_tokens) // ns.block_size) + 1
    worker = TPWorker(model, local_kv_cache(model, blocks, ns.block_size))
    if rank == 0:
        print(",".join(str(t) for t in greedy(worker, prompt, ns.max_tokens)), flush=True)
        worker.stop()
    else:
        worker.serve()
    dist.destroy_process_group()
    return 0



# -- ranks as Ray actors (any machines of a Ray cluster) ---------------------------------------
class _RayRank:
    """One rank as a Ray actor: its node's address, then the process group and its shard,
    then rank 0 answers `run` while the others `serve` (one call that lasts their life)."""

    def __init__(self, rank: int, config: TPConfig):
        self.rank, self.config = rank, config
        self.worker: TPWorker | None = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the rendezvous: this node's IP and a free port on it."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, int(s.getsockname()[1])

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the group (every rank's `setup` runs at once), build the shard and the cache;
        the shard's bytes."""
        from souverain.models.quantize import quantized_bytes

        config = self.config
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // config.world))
        device = f"cuda:{self.rank}" if config.device == "cuda" else config.device
        init_process_group(self.rank, config.world, device=device, master_addr=master_addr,
                           master_port=master_port, timeout_s=config.timeout_s)
        self.worker = _build_worker(config, self.rank, device)
        return int(quantized_bytes(self.worker.model))

    def serve(self) -> int:
        assert self.worker is not None
        return self.worker.serve()

    def run(self, step: StepInputs) -> Any:
        assert self.worker is not None
        return self.worker.run(step).cpu().numpy()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


class RayTensorParallel:
    """K ranks as Ray actors, on whichever machines of the cluster Ray places them (a local
    Ray instance without ``address``), behind the same `run(step) -> logits` / `close` as
    `LocalTensorParallel`: rank 0's actor is driven by the caller, rank 0 broadcasts each step
    to the others over gloo (NCCL on GPUs), exactly as under ``torchrun``. Each actor reserves
    ``threads`` CPUs; a rank that dies makes the next `run` raise instead of hanging."""

    def __init__(self, config: TPConfig, address: str | None = None):
        import ray

        from souverain import weights

        check_shardable(weights.load(config.model).args, config.world)
        self.config = config
        if not ray.is_initialized() and address:
            ray.init(address=address, namespace="souverain", log_to_driver=True)
        elif not ray.is_initialized():  # a local instance on loopback, for this process's life
            ray.init(namespace="souverain", include_dashboard=False, log_to_driver=True,
                     _node_ip_address="127.0.0.1")
        threads = config.threads or max(1, (os.cpu_count() or 1) // config.world)
        rank_cls: Any = ray.remote(_RayRank)
        self.actors: list[Any] = [rank_cls.options(
            num_cpus=threads, num_gpus=1 if config.device == "cuda" else 0,
            name=None, max_restarts=0).remote(r, config) for r in range(config.world)]
        try:
            addr, port = ray.get(self.actors[0].address.remote(), timeout=config.timeout_s)
            sizes = ray.get([a.setup.remote(addr, port) for a in self.actors],
                            timeout=config.timeout_s)
        except BaseException:
            self.close()
            raise
        self.shard_bytes: int = int(sizes[0])
        self._serving = [a.serve.remote() for a in self.actors[1:]]  # until rank 0 stops

    def run(self, step: StepInputs) -> torch.Tensor:
        import ray

        try:
            out = ray.get(self.actors[0].run.remote(step), timeout=self.config.timeout_s)
        except ray.exceptions.RayError as exc:
            self.close()
            raise RuntimeError(f"tensor-parallel ranks stopped: {exc}") from None
        return torch.from_numpy(out)

    def close(self) -> None:
        """Stop rank 0 (which releases the others), then end every actor."""
        import ray

        if not getattr(self, "actors", None):
            return
        try:
            ray.get(self.actors[0].stop.remote(), timeout=10)
        except Exception:
            pass
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> RayTensorParallel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
