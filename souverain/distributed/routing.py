"""Which replica serves a request: prefix-aware routing, with load as the tie-breaker.

A front door in front of several `souverain serve` replicas sees request bodies, not token ids.
`PrefixAwareRouter` keeps, per replica, an approximate record of the prompt prefixes it has
served, in the spirit of vLLM production-stack's and llm-d's prefix-aware routers (each with its
own chunking):

* the request's *canonical prompt text* (`canonical_prompt`: the model name, then each chat
  message as role + text, or the completion / FIM prompt) is cut into fixed-size character
  chunks; each full chunk gets a chained hash (BLAKE2b of the previous chunk's hash and its
  text), so a chunk's hash pins down every character before it, as the engine's block hashes
  pin down every token before a KV block (souverain/engine/block_manager.py);
* a replica's record is an LRU set of chunk hashes with a bounded size (`capacity_chunks`; size
  it to the replica's KV cache with `chunks_for_kv_tokens`). A chain is touched head last, so
  the shared head of a prompt (the system prompt) is evicted after its tails, as the engine
  frees a sequence's blocks tail first;
* the live load of a replica is its requests in flight: `choose` counts one more, `finish`
  one less.

`PrefixAwareRouter.choose(replicas, request)`: among the healthy replicas, the one whose record
matches the longest prefix of the request's chunks wins, unless its load exceeds the least
loaded replica's by more than `imbalance_threshold` requests (then the least loaded wins, the
longest match breaking ties among those); equal matches go to the least loaded, then to the
first in round-robin order. The chosen replica's record then takes the request's chunks.
`RoundRobin` has the same interface (no prefix record), for comparison. Both are thread-safe
(one lock each), pure Python and do no I/O: the caller sends the request and calls `finish`.

Replicas are named by strings (a URL, a Ray Serve replica id); a name not seen before starts
with an empty record, healthy and idle. `mark_unhealthy` keeps a replica out of every choice
until `mark_healthy`; `forget` drops its record (a restarted replica's cache is cold).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

_SEED = b"souverain-routing-v1"
_ROLE_SEP = "\x1e"  # between a message's role and its text
_MESSAGE_END = "\x1f"  # after each message


class NoHealthyReplica(LookupError):
    """None of the replicas offered to `choose` is healthy (or none was offered)."""


@dataclass(frozen=True)
class Route:
    """A routing decision: the replica, and how many characters of the request's canonical
    prompt its record matched (0 for `RoundRobin`), out of `prompt_chars`."""

    replica: str
    matched_chars: int
    prompt_chars: int


class RoutingPolicy(Protocol):
    def choose(self, replicas: Sequence[str], request: Mapping[str, Any]) -> Route: ...

    def finish(self, replica: str) -> None: ...

    def mark_unhealthy(self, replica: str) -> None: ...

    def mark_healthy(self, replica: str) -> None: ...

    def route(self, replicas: Sequence[str],
              request: Mapping[str, Any]) -> AbstractContextManager[Route]: ...


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text of its chunks (other chunks, such as
    images, as sorted JSON so that the same image gives the same text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                parts.append(json.dumps(part, sort_keys=True, default=str))
        return "".join(parts)
    return json.dumps(content, sort_keys=True, default=str)


def canonical_prompt(request: Mapping[str, Any]) -> str:
    """The prompt text of a chat, completion or FIM request body, in the order a model reads it:
    the model name (replicas serving several models cache each one's KV apart), then each
    message (role, text, tool calls) or the prompt (and a FIM suffix)."""
    out = [str(request.get("model", "")), _MESSAGE_END]
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                out.append(_text(message))
                out.append(_MESSAGE_END)
                continue
            out += [str(message.get("role", "")), _ROLE_SEP, _text(message.get("content"))]
            if message.get("tool_calls"):
                out.append(json.dumps(message["tool_calls"], sort_keys=True, default=str))
            out.append(_MESSAGE_END)
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, list):  # a batch of prompts routes on the first
            prompt = prompt[0] if prompt else ""
        out.append(_text(prompt))
        if request.get("suffix"):
            out += [_MESSAGE_END, _text(request.get("suffix"))]
    return "".join(out)


def chunk_hashes(text: str, chunk_chars: int) -> list[bytes]:
    """Chained hashes of the full `chunk_chars`-character chunks of `text` (a partial last chunk
    has none: it may still grow, as a partial KV block is not cached)."""
    hashes, prev = [], _SEED
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        chunk = text[start:start + chunk_chars].encode("utf-8", "surrogatepass")
        prev = hashlib.blake2b(prev + chunk, digest_size=8).digest()
        hashes.append(prev)
    return hashes


def chunks_for_kv_tokens(kv_tokens: int, chunk_chars: int, chars_per_token: float = 4.0) -> int:
    """A record size (chunks) that covers about as much text as `kv_tokens` tokens of KV cache
    (`chars_per_token`: ~4 for English with a BPE tokenizer; lower for code or other scripts)."""
    return max(1, int(kv_tokens * chars_per_token) // chunk_chars)


@dataclass
class _ReplicaState:
    chunks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # LRU, oldest first
    in_flight: int = 0
    healthy: bool = True


class _Replicas:
    """Per-replica health and load, and the round-robin cursor (both policies)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, _ReplicaState] = {}
        self._turn = 0  # round-robin counter

    def _get(self, replica: str) -> _ReplicaState:
        state = self._state.get(replica)
        if state is None:
            state = self._state[replica] = _ReplicaState()
        return state

    def _healthy(self, replicas: Sequence[str]) -> list[str]:
        names = list(dict.fromkeys(replicas))  # duplicates once, order kept
        healthy = [r for r in names if self._get(r).healthy]
        if not healthy:
            raise NoHealthyReplica(f"no healthy replica among {names}")
        return healthy

    def _rotation(self, candidates: list[str]) -> list[str]:
        """`candidates` from the round-robin cursor on."""
        k = self._turn % len(candidates)
        return candidates[k:] + candidates[:k]

    def begin(self, replica: str) -> None:
        """A request went to `replica` without `choose` picking it (the caller's fallback):
        one more in flight there until its `finish`."""
        with self._lock:
            self._get(replica).in_flight += 1

    def finish(self, replica: str) -> None:
        """A request routed to `replica` ended (answered, failed or cancelled)."""
        with self._lock:
            state = self._get(replica)
            state.in_flight = max(0, state.in_flight - 1)

    def mark_unhealthy(self, replica: str) -> None:
        with self._lock:
            self._get(replica).healthy = False

    def mark_healthy(self, replica: str) -> None:
        with self._lock:
            self._get(replica).healthy = True

    def load(self, replica: str) -> int:
        with self._lock:
            return self._get(replica).in_flight

    @contextmanager
    def route(self, replicas: Sequence[str], request: Mapping[str, Any]) -> Iterator[Route]:
        """`choose`, then `finish` when the block ends (however it ends)."""
        route = self.choose(replicas, request)
        try:
            yield route
        finally:
            self.finish(route.replica)

    def choose(self, replicas: Sequence[str], request: Mapping[str, Any]) -> Route:
        raise NotImplementedError


class RoundRobin(_Replicas):
    """Each request to the next healthy replica in turn, whatever its prompt or load."""

    def choose(self, replicas: Sequence[str], request: Mapping[str, Any]) -> Route:
        with self._lock:
            healthy = self._healthy(replicas)
            replica = self._rotation(healthy)[0]
            self._turn += 1
            self._get(replica).in_flight += 1
            return Route(replica, 0, len(canonical_prompt(request)))


class PrefixAwareRouter(_Replicas):
    """Longest matched prompt prefix wins; load breaks ties and overrides a match whose replica
    has more than `imbalance_threshold` requests in flight above the least loaded one."""

    def __init__(self, *, chunk_chars: int = 128, capacity_chunks: int = 4096,
                 imbalance_threshold: int = 4) -> None:
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars={chunk_chars} must be >= 1")
        if capacity_chunks < 1:
            raise ValueError(f"capacity_chunks={capacity_chunks} must be >= 1")
        if imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold={imbalance_threshold} must be >= 0")
        super().__init__()
        self.chunk_chars = chunk_chars
        self.capacity_chunks = capacity_chunks
        self.imbalance_threshold = imbalance_threshold

    @staticmethod
    def _matched(state: _ReplicaState, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in state.chunks:
                break
            n += 1
        return n

    def _remember(self, state: _ReplicaState, hashes: list[bytes]) -> None:
        chunks = state.chunks
        for h in reversed(hashes):  # the head most recent: evicted after its tails
            chunks[h] = None
            chunks.move_to_end(h)
        while len(chunks) > self.capacity_chunks:
            chunks.popitem(last=False)

    def choose(self, replicas: Sequence[str], request: Mapping[str, Any]) -> Route:
        text = canonical_prompt(request)
        hashes = chunk_hashes(text, self.chunk_chars)
        with self._lock:
            healthy = self._rotation(self._healthy(replicas))
            matched = {r: self._matched(self._get(r), hashes) for r in healthy}
            load = {r: self._get(r).in_flight for r in healthy}
            least = min(load.values())
            # longest match, then least loaded, then round-robin order (stable sort)
            ranked = sorted(healthy, key=lambda r: (-matched[r], load[r]))
            best = ranked[0]
            if load[best] - least > self.imbalance_threshold:
                best = next(r for r in ranked if load[r] == least)
            self._turn += 1
            state = self._get(best)
            state.in_flight += 1
            self._remember(state, hashes)
            return Route(best, matched[best] * self.chunk_chars, len(text))

    def forget(self, replica: str) -> None:
        """Drop `replica`'s prefix record (it restarted: its cache is cold)."""
        with self._lock:
            self._get(replica).chunks.clear()

    def recorded_chunks(self, replica: str) -> int:
        with self._lock:
            return len(self._get(replica).chunks)
