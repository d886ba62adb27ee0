"""Prefix-aware routing (`souverain.distributed.routing`): the policy alone, no server.

What a front door needs from it: a conversation's turns stay on one replica (its KV is there),
different system prompts spread, a hot replica loses to load past the threshold, an unhealthy
replica is never chosen, the per-replica record stays within its size; `RoundRobin` answers the
same calls.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from souverain.distributed.routing import (
    NoHealthyReplica,
    PrefixAwareRouter,
    RoundRobin,
    RoutingPolicy,
    canonical_prompt,
    chunk_hashes,
    chunks_for_kv_tokens,
)

REPLICAS = ["http://a", "http://b", "http://c"]


def system_prompt(topic: str) -> str:
    return (f"You are the {topic} assistant of ACME. " + "Answer precisely and cite the "
            f"{topic} handbook, section by section. " * 20)


def chat(system: str, *turns: str) -> dict:
    """A chat body: the system prompt, then user / assistant turns alternating."""
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def conversation(system: str, n_turns: int, tag: str) -> list[dict]:
    """The bodies of one conversation's turns: each appends the last answer and a question."""
    history: list[str] = []
    bodies = []
    for k in range(n_turns):
        history.append(f"{tag}: question {k} about the weather in some far away city?")
        bodies.append(chat(system, *history))
        history.append(f"answer {k}: it is sunny, mostly, with a chance of rain later.")
    return bodies


def test_canonical_prompt_and_chunks() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "hello "},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}]}
    text = canonical_prompt(body)
    assert text.startswith("m\x1fsystem\x1eS\x1fuser\x1ehello there\x1f")
    assert '"name": "f"' in text
    # the model is part of the prefix: the same messages for another model share nothing
    assert canonical_prompt({**body, "model": "n"})[:8] != text[:8]
    fim = canonical_prompt({"model": "c", "prompt": "def f(", "suffix": "return 1"})
    assert fim == "c\x1fdef f(\x1freturn 1"
    assert canonical_prompt({"model": "c", "prompt": ["a", "b"]}) == "c\x1fa"
    # chained: equal chunks at different places hash apart; a shared head hashes alike
    h = chunk_hashes("abcdabcdab", 4)
    assert len(h) == 2 and h[0] != h[1]
    assert chunk_hashes("abcdabcdzz", 4) == h
    assert chunk_hashes("zbcdabcd", 4)[1] != h[1]
    assert chunks_for_kv_tokens(1024, 128) == 32


def test_one_conversation_lands_on_one_replica() -> None:
    router = PrefixAwareRouter(chunk_chars=64)
    # 6 conversations over 3 system prompts, turns interleaved as concurrent users send them
    convs = [conversation(system_prompt(t), 5, f"user{i}")
             for i, t in enumerate(["billing", "billing", "travel", "travel", "legal", "legal"])]
    where: dict[int, set[str]] = {i: set() for i in range(len(convs))}
    for k in range(5):
        for i, conv in enumerate(convs):
            with router.route(REPLICAS, conv[k]) as route:
                where[i].add(route.replica)
                if k > 0:  # the system prompt and the earlier turns were matched
                    assert route.matched_chars > len(conv[0]["messages"][0]["content"])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    # conversations sharing a system prompt share a replica (its prefix is cached there) ...
    assert where[0] == where[1] and where[2] == where[3] and where[4] == where[5]
    # ... and the three system prompts spread over the three replicas
    assert {r for s in where.values() for r in s} == set(REPLICAS)
    assert all(router.load(r) == 0 for r in REPLICAS)


def test_different_system_prompts_spread() -> None:
    router = PrefixAwareRouter(chunk_chars=64)
    topics = ["billing", "travel", "legal", "health", "code", "maths"]
    chosen = [router.choose(REPLICAS, chat(system_prompt(t), "hi")) for t in topics]
    assert all(c.matched_chars == 0 for c in chosen)  # nothing cached anywhere yet
    counts = {r: sum(c.replica == r for c in chosen) for r in REPLICAS}
    assert counts == dict.fromkeys(REPLICAS, 2)
    # requests finished: no load, new prompts still rotate over every replica
    for c in chosen:
        router.finish(c.replica)
    more = [router.choose(REPLICAS, chat(system_prompt(f"new{i}"), "hi")).replica
            for i in range(3)]
    assert sorted(more) == sorted(REPLICAS)


def test_hot_replica_loses_to_load_past_the_threshold() -> None:
    router = PrefixAwareRouter(chunk_chars=64, imbalance_threshold=2)
    hot = chat(system_prompt("billing"), "first")
    home = router.choose(REPLICAS, hot).replica  # in flight: 1
    # the same prefix keeps going home while home's load is within 2 of the idle replicas'
    for n in range(2):
        route = router.choose(REPLICAS, chat(system_prompt("billing"), f"q{n}"))
        assert route.replica == home and route.matched_chars > 0
    assert router.load(home) == 3
    # 3 in flight against 0: load wins, to an idle replica, matched nothing there
    spill = router.choose(REPLICAS, chat(system_prompt("billing"), "q2"))
    assert spill.replica != home and spill.matched_chars == 0
    # once home drains, the prefix is still best cached there (and now on spill's too)
    for _ in range(3):
        router.finish(home)
    back = router.choose(REPLICAS, chat(system_prompt("billing"), "q3"))
    assert back.replica in (home, spill.replica) and back.matched_chars > 0
    # between two replicas with the same match, the less loaded one wins
    assert back.replica == home  # spill still has one in flight


def test_ties_go_to_the_least_loaded_then_in_turn() -> None:
    router = PrefixAwareRouter(chunk_chars=64)
    busy = router.choose(REPLICAS, chat(system_prompt("a"), "x")).replica
    # nothing matches the new prompts anywhere: not the busy replica, and in turn otherwise
    r1 = router.choose(REPLICAS, chat(system_prompt("b"), "x")).replica
    r2 = router.choose(REPLICAS, chat(system_prompt("c"), "x")).replica
    assert busy not in (r1, r2) and r1 != r2


def test_unhealthy_replica_is_skipped() -> None:
    router = PrefixAwareRouter(chunk_chars=64)
    body = chat(system_prompt("billing"), "hello")
    home = router.choose(REPLICAS, body).replica
    router.finish(home)
    router.mark_unhealthy(home)
    for i in range(6):  # its prefix is cached there, but it is down
        route = router.choose(REPLICAS, chat(system_prompt("billing"), "hello", "ok", f"{i}"))
        assert route.replica != home
        router.finish(route.replica)
    router.mark_healthy(home)
    assert router.choose([home], body).replica == home
    for r in REPLICAS:
        router.mark_unhealthy(r)
    with pytest.raises(NoHealthyReplica):
        router.choose(REPLICAS, body)
    with pytest.raises(NoHealthyReplica):
        router.choose([], body)
    rr = RoundRobin()
    rr.mark_unhealthy("http://b")
    assert [rr.choose(REPLICAS, body).replica for _ in range(4)] == [
        "http://a", "http://c", "http://a", "http://c"]


def test_lru_eviction_bounds_memory() -> None:
    router = PrefixAwareRouter(chunk_chars=32, capacity_chunks=50)
    for i in range(40):  # 40 different prompts of ~30 chunks each, all to one replica
        router.choose(["only"], chat(system_prompt(f"topic {i}"), "hi"))
        assert router.recorded_chunks("only") <= 50
    assert router.recorded_chunks("only") == 50
    # the latest prompt is still matched from its head; the oldest is forgotten
    latest = router.choose(["only"], chat(system_prompt("topic 39"), "hi"))
    oldest = router.choose(["only"], chat(system_prompt("topic 0"), "hi"))
    assert latest.matched_chars > 0 and oldest.matched_chars == 0
    # the head of a chain is kept longest: a long prompt's tail goes before its head
    small = PrefixAwareRouter(chunk_chars=32, capacity_chunks=10)
    small.choose(["r"], chat(system_prompt("long"), "hi"))  # ~30 chunks into 10
    again = small.choose(["r"], chat(system_prompt("long"), "hi"))
    assert again.matched_chars == 10 * 32
    small.forget("r")
    assert small.choose(["r"], chat(system_prompt("long"), "hi")).matched_chars == 0


def test_round_robin_same_interface() -> None:
    policies: list[RoutingPolicy] = [RoundRobin(), PrefixAwareRouter()]
    body = chat(system_prompt("billing"), "hello")
    rr = policies[0]
    seen = [rr.choose(REPLICAS, body) for _ in range(6)]
    assert [r.replica for r in seen] == REPLICAS * 2
    assert all(r.matched_chars == 0 and r.prompt_chars == len(canonical_prompt(body))
               for r in seen)
    for policy in policies:
        with policy.route(REPLICAS, body) as route:
            assert route.replica in REPLICAS


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="chunk_chars"):
        PrefixAwareRouter(chunk_chars=0)
    with pytest.raises(ValueError, match="capacity_chunks"):
        PrefixAwareRouter(capacity_chunks=0)
    with pytest.raises(ValueError, match="imbalance_threshold"):
        PrefixAwareRouter(imbalance_threshold=-1)


def test_thread_safe_load_accounting() -> None:
    router = PrefixAwareRouter(chunk_chars=16, imbalance_threshold=1)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for k in range(200):
                with router.route(REPLICAS, chat(f"system {i % 3}", f"turn {k}")):
                    pass
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(router.load(r) == 0 for r in REPLICAS)


_names = st.sampled_from(["r0", "r1", "r2", "r3", "r4"])
_actions = st.lists(st.tuples(
    st.sampled_from(["choose", "finish", "down", "up"]), _names,
    st.sampled_from(["alpha", "beta", "gamma"]), st.text(max_size=80)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(replicas=st.lists(_names, max_size=5), actions=_actions,
       threshold=st.integers(0, 3), policy=st.sampled_from(["prefix", "rr"]))
def test_choose_always_returns_a_healthy_replica(replicas: list[str], actions: list,
                                                 threshold: int, policy: str) -> None:
    router: PrefixAwareRouter | RoundRobin = (
        PrefixAwareRouter(chunk_chars=8, capacity_chunks=20, imbalance_threshold=threshold)
        if policy == "prefix" else RoundRobin())
    healthy = dict.fromkeys(["r0", "r1", "r2", "r3", "r4"], True)
    for action, name, system, text in actions:
        if action == "down":
            router.mark_unhealthy(name)
            healthy[name] = False
        elif action == "up":
            router.mark_healthy(name)
            healthy[name] = True
        elif action == "finish":
            router.finish(name)
        else:
            body = chat(system, text)
            if not any(healthy[r] for r in replicas):
                with pytest.raises(NoHealthyReplica):
                    router.choose(replicas, body)
                continue
            loads = {r: router.load(r) for r in replicas if healthy[r]}
            route = router.choose(replicas, body)
            assert route.replica in replicas and healthy[route.replica]
            assert 0 <= route.matched_chars <= route.prompt_chars
            if policy == "prefix":  # never more than the threshold above the least loaded
                assert loads[route.replica] - min(loads.values()) <= threshold
            assert router.load(route.replica) == loads[route.replica] + 1
