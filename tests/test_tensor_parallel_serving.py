"""`--tensor-parallel 2` wired in: the engine's forward on two gloo rank processes, against the
same engine in one process.

- the engine (tiny Mixtral: experts sharded too) under staggered arrivals, chunked prefill, a
  prefix-cache hit, prompt logprobs and preemptions (a KV budget far below the demand): the same
  greedy tokens and scheduling as with one process, the weights not in the engine's process,
  LoRA refused, the ranks gone after `close`;
- `souverain serve TINY_MISTRAL --tensor-parallel 2` driven by the official SDKs: the greedy
  answers of the engine in this process, streamed too; /metrics names the size; the ranks
  exit when the server is killed (SIGKILL: no shutdown code runs);
- a size that does not divide the model: exit 2 and one sentence naming the sizes that work;
  `--lora-modules` with it: exit 2 naming both.
"""

from __future__ import annotations

import openai
import psutil
import pytest
from mistralai.client import Mistral
from server_utils import ServerProcess
from typer.testing import CliRunner

from souverain import LLM, SamplingParams
from souverain.cli import app
from souverain.engine.config import EngineConfig
from souverain.engine.engine import LLMEngine
from souverain.errors import RequestError
from souverain.weights.adapter import LoRAAdapter

SHARED = [1, 1500, 2300, 900, 17, 4000, 123, 31000, 555, 9000]  # 2 full blocks of 4 + 2
ARRIVALS = {  # request id: (the step it arrives at, prompt)
    "a": (0, SHARED + [4000, 123, 31000]),
    "b": (0, [1, 700, 8000, 29000, 64, 5, 11111, 42, 77]),
    "c": (3, SHARED + [9000, 17]),  # a's first blocks from the prefix cache
    "d": (4, [1, 6000, 6001, 12, 13, 20000, 3, 4, 25000, 555, 900, 17, 2300, 1500]),
    "e": (7, [1, 42, 43, 44, 45]),
}
MAX_TOKENS = 12


def _engine_config(k: int) -> EngineConfig:
    # 15 usable blocks of 4 (60 tokens) for 5 requests of ~25 tokens: preemptions
    return EngineConfig(dtype="float32", block_size=4, kv_cache_tokens=64,
                        max_num_batched_tokens=16, max_num_seqs=4, tensor_parallel=k)


def _drive(engine: LLMEngine) -> dict:
    """The arrivals above, step by step: ``{id: (tokens, prompt logprobs)}``."""
    done: dict = {}
    step = 0
    while len(done) < len(ARRIVALS):
        for rid, (at, prompt) in ARRIVALS.items():
            if at == step:
                engine.add_request(rid, prompt, SamplingParams(
                    temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                    prompt_logprobs=1 if rid == "d" else None))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.prompt_logprobs)
        step += 1
        assert step < 1000
    return done


@pytest.fixture(scope="module")
def one_rank(tiny_mixtral) -> tuple[dict, dict]:
    engine = LLMEngine(str(tiny_mixtral["consolidated"]), _engine_config(1))
    return _drive(engine), engine.stats()


def test_engine_on_two_ranks_matches_one_process(tiny_mixtral, one_rank) -> None:
    ref, ref_stats = one_rank
    engine = LLMEngine(str(tiny_mixtral["consolidated"]), _engine_config(2))
    try:
        assert engine.model is None and engine.cache is None  # the weights are in the ranks
        assert engine.weight_bytes() > 0
        procs = list(engine.runner.tp._procs)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        got = _drive(engine)
        stats = engine.stats()
        with pytest.raises(RequestError, match="cannot be served with tensor parallelism"):
            engine.add_lora("x", LoRAAdapter(rank=1, scaling=1.0))
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)
    assert stats["tensor_parallel"] == 2 and ref_stats["tensor_parallel"] == 1
    # the scenario did what it says, identically on both
    assert ref_stats["preemptions"] > 0 and ref_stats["prefix_cache_hits"] > 0
    for key in ("preemptions", "prefix_cache_hits", "prefix_cache_queries"):
        assert stats[key] == ref_stats[key], key
    for rid in ARRIVALS:
        assert got[rid][0] == ref[rid][0], rid
        assert len(ref[rid][0]) == MAX_TOKENS
    assert len({t for rid in ARRIVALS for t in ref[rid][0]}) > 10  # real continuations
    ref_lp, got_lp = ref["d"][1], got["d"][1]
    assert len(ref_lp) == len(got_lp) == len(ARRIVALS["d"][1]) and ref_lp[0] is None
    for a, b in zip(ref_lp[1:], got_lp[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_ranks_as_ray_actors_match_one_process(tiny_mixtral, one_rank) -> None:
    """The same scenario with the two ranks as Ray actors (a local Ray instance: on a cluster
    Ray places them on any machines), rendezvous at rank 0's node: the same tokens."""
    import dataclasses

    import ray

    ref, ref_stats = one_rank
    config = dataclasses.replace(_engine_config(2), tensor_parallel_ray="local")
    engine = LLMEngine(str(tiny_mixtral["consolidated"]), config)
    try:
        assert engine.model is None and len(engine.runner.tp.actors) == 2
        got = _drive(engine)
        stats = engine.stats()
    finally:
        engine.close()
        ray.shutdown()
    for key in ("preemptions", "prefix_cache_hits"):
        assert stats[key] == ref_stats[key], key
    for rid in ARRIVALS:
        assert got[rid][0] == ref[rid][0], rid


# --------------------------------------------------------------------------------------
# souverain serve --tensor-parallel 2, through the SDKs
# --------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Tell me about the harbour of Marseille."}]
FLAGS = ("--kv-cache-gib", "0.01")


@pytest.fixture(scope="module")
def server(tiny_mistral):
    srv = ServerProcess(str(tiny_mistral["consolidated"]), "--name", "tiny",
                        "--tensor-parallel", "2", *FLAGS, "--no-libraries", "--no-finetune",
                        "--no-batch", "--embed-model", "none", "--no-console", "--no-audit")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_mistral) -> LLM:
    return LLM(str(tiny_mistral["consolidated"]), kv_cache_gib=0.01)


def _ranks(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children()
            if any("spawn_main" in part for part in c.cmdline())]


def test_sdk_answers_equal_one_process_then_ranks_die_with_the_server(server, reference
                                                                       ) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=16)
    expected = reference.chat(MESSAGES, greedy)[0].text
    client = Mistral(api_key="unused-on-loopback", server_url=server.url)
    full = client.chat.complete(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16)
    assert full.choices[0].message.content == expected and expected.strip()
    chunks = [e.data for e in client.chat.stream(model="tiny", messages=MESSAGES,
                                                 temperature=0, max_tokens=16)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1  # streamed, not one piece

    oai = openai.OpenAI(api_key="unused-on-loopback", base_url=server.url + "/v1")
    prompt = "The harbour of Marseille"
    r = oai.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=8)
    assert r.choices[0].text == reference.generate(prompt, SamplingParams(
        temperature=0, max_tokens=8))[0].text
    assert server.metrics()['souverain_tensor_parallel_size{model="tiny"}'] == 2

    ranks = _ranks(server.proc.pid)
    assert len(ranks) == 2
    server.proc.kill()  # no shutdown code runs: the ranks see their lifeline close
    server.proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=20)
    assert not alive, f"rank processes left behind: {[p.pid for p in alive]}"


# --------------------------------------------------------------------------------------
# A size the model does not split into
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unshardable_size_exits_2_naming_the_sizes_that_work(tiny_mistral, command) -> None:
    path = str(tiny_mistral["consolidated"])
    args = ([path, "hello", "--tensor-parallel", "3"] if command == "generate" else
            [path, "--tensor-parallel", "4", "--lazy", "--no-libraries", "--no-finetune",
             "--no-audit", "--no-batch", "--embed-model", "none"])
    result = CliRunner().invoke(app, [command, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "cannot be split over" in lines[0] and "use a tensor-parallel size among 1, 2" \
        in lines[0]


def test_serve_refuses_lora_modules_with_tensor_parallel(tiny_mistral, tmp_path) -> None:
    result = CliRunner().invoke(app, [
        "serve", str(tiny_mistral["consolidated"]), "--tensor-parallel", "2", "--lazy",
        "--lora-modules", f"support={tmp_path}", "--no-libraries", "--no-finetune",
        "--no-audit", "--no-batch", "--embed-model", "none"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: --lora-modules cannot be served with --tensor-parallel 2: LoRA adapters are "
        "not split over ranks yet; use one or the other.")
