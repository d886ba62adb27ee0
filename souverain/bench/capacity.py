"""`souverain plan predict`: from one replica's measured profile (`capacity_measure`) to a
deployment for a target load: replicas, tensor-parallel ranks per replica, machines, and the
TTFT / time per output token / throughput to expect. Pure arithmetic, standard library only.

The model (each assumption is also printed with every prediction, one line each):

* Users run a closed loop: send a request, read the answer, think ``think_seconds``, repeat.
  With latency L = TTFT + (A - 1) x TPOT, the request rate is U / (S + L), and by Little's law
  U x L / (S + L) requests are in flight across the replicas.
* A replica's TTFT p50/p95, TPOT p50/p95 and decode tok/s at concurrency c are the measured
  curve, interpolated linearly in c (extrapolated from its last two points beyond it: flagged).
* Prompt / answer lengths other than the profile's shift the curve by the prefill work: TTFT
  by (P_eff - P_meas) / prefill rate, TPOT by c x (P_eff / A - P_meas / A_meas) / prefill rate
  (each request's prefill is spread over its answer's decode steps); TPOT never below the
  batch-1 figure. P_eff = P x (1 - F): a share F of every prompt is found in the replica's
  prefix cache (only true when a conversation's requests stay on one replica, which the
  prefix-aware router does).
* Capacity: the largest concurrency c* whose TTFT p95 and TPOT p95 meet the SLOs; sizing
  plans for c = headroom x c* per replica and replicas = ceil(in flight / c).
* Speed scales with threads: a replica with t threads runs t / T_meas as fast as the profile
  (T_meas threads), capped by the machine's read bandwidth shared by the replicas on it: decode
  is memory-bandwidth bound, so two replicas on one machine each get half of it (the per-
  replica curve would have to be re-measured at cores / N threads; this scales it instead).
  A machine's bandwidth: ``machine_bandwidth_gbs``, else the profile's measured read bandwidth
  scaled by threads up to the profiled machine's cores and flat beyond (conservative).
* Memory of a replica: weights + KV + the runtime's own (peak RSS - weights - the KV the
  measurement used, or RSS after load - weights if larger);
  KV = kv bytes/token x (c x (P_eff + A) + P x F) (one copy of the shared prefix). When it
  exceeds 90 % of a machine's memory, K tensor-parallel ranks (one per machine, K dividing the
  heads and kv heads) each hold 1/K of weights and KV, read 1/K of the weights per step, and pay
  2 all-reduces per layer per step (``allreduce_us`` each, not measured here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from souverain.errors import SouverainError

PROFILE_VERSION = 1
GiB = 1024 ** 3
MEMORY_USABLE = 0.9  # of a machine's RAM: the OS, page cache and the server's other parts
CURVE_KEYS = ("concurrency", "decode_tok_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s",
              "tpot_p95_s")


class PlanError(SouverainError):
    """A user-fixable problem with the profile or the target (one sentence)."""


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read and check a profile written by `souverain plan measure`."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"profile {p} does not exist (write one with `souverain plan measure`)")
    try:
        prof = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"profile {p} is not valid JSON ({e})") from None
    check_profile(prof, str(p))
    return prof


def check_profile(prof: Any, name: str = "the profile") -> None:
    if not isinstance(prof, dict):
        raise PlanError(f"{name} is not a JSON object written by `souverain plan measure`")
    missing = [k for k in ("curve", "threads", "memory", "prompt_tokens", "answer_tokens",
                           "prefill_tok_s", "machine", "model_args") if k not in prof]
    if missing:
        raise PlanError(f"{name} lacks {', '.join(missing)}: not written by "
                        "`souverain plan measure`")
    curve = prof["curve"]
    if not isinstance(curve, list) or not curve:
        raise PlanError(f"{name} has no measured concurrency levels")
    for point in curve:
        if not isinstance(point, dict) or any(
                not isinstance(point.get(k), (int, float)) or point[k] < 0 for k in CURVE_KEYS):
            raise PlanError(f"{name} has a curve point without non-negative "
                            f"{', '.join(CURVE_KEYS)}")
    levels = [p["concurrency"] for p in curve]
    if len(set(levels)) != len(levels) or min(levels) < 1:
        raise PlanError(f"{name} has repeated concurrency levels or one below 1")
    mem = prof["memory"]
    if not isinstance(mem, dict) or not all(
            isinstance(mem.get(k), int) and mem[k] > 0
            for k in ("weight_bytes", "kv_bytes_per_token")):
        raise PlanError(f"{name} lacks positive memory.weight_bytes and "
                        "memory.kv_bytes_per_token")
    for k in ("threads", "prompt_tokens", "answer_tokens", "prefill_tok_s"):
        if not isinstance(prof[k], (int, float)) or prof[k] <= 0:
            raise PlanError(f"{name}: {k} must be a positive number")


@dataclass(frozen=True)
class Target:
    """The load to plan for, and the deployment to evaluate (``replicas`` set) or size."""

    users: int
    prompt_tokens: int
    answer_tokens: int
    think_seconds: float = 0.0
    prefix_share: float = 0.0
    ttft_slo: float | None = None  # seconds, on the p95
    tpot_slo: float | None = None  # seconds, on the p95
    machine_cores: int | None = None  # default: the profile's machine
    machine_memory_gib: float | None = None
    machine_bandwidth_gbs: float | None = None  # default: see predict
    headroom: float = 0.8
    replicas: int | None = None  # evaluate this many instead of sizing
    replicas_per_machine: int | None = None
    tensor_parallel: int | None = None  # evaluate K ranks of one machine per replica
    allreduce_us: float = 50.0

    def check(self) -> None:
        checks = [
            (self.users >= 1, f"--users must be at least 1, not {self.users}"),
            (self.prompt_tokens >= 1, "--prompt-tokens must be at least 1"),
            (self.answer_tokens >= 1, "--answer-tokens must be at least 1"),
            (self.think_seconds >= 0, "--think-seconds must not be negative"),
            (0 <= self.prefix_share < 1, "--prefix-share must be in [0, 1)"),
            (self.ttft_slo is None or self.ttft_slo > 0, "--ttft-slo must be positive"),
            (self.tpot_slo is None or self.tpot_slo > 0, "--tpot-slo must be positive"),
            (self.machine_cores is None or self.machine_cores >= 1,
             "--machine-cores must be at least 1"),
            (self.machine_memory_gib is None or self.machine_memory_gib > 0,
             "--machine-memory-gib must be positive"),
            (self.machine_bandwidth_gbs is None or self.machine_bandwidth_gbs > 0,
             "--machine-bandwidth-gbs must be positive"),
            (0 < self.headroom <= 1, "--headroom must be in (0, 1]"),
            (self.replicas is None or self.replicas >= 1, "--replicas must be at least 1"),
            (self.replicas_per_machine is None or self.replicas_per_machine >= 1,
             "--replicas-per-machine must be at least 1"),
            (self.tensor_parallel is None or self.tensor_parallel >= 1,
             "--tensor-parallel must be at least 1"),
            (self.allreduce_us >= 0, "--allreduce-us must not be negative"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PlanError(msg)


def _interp(curve: list[dict[str, Any]], key: str, c: float) -> float:
    """``key`` at concurrency c: linear between measured points, the first point below it,
    linear from the last two beyond it (never below 0)."""
    xs = [float(p["concurrency"]) for p in curve]
    ys = [float(p[key]) for p in curve]
    if c <= xs[0] or len(xs) == 1:
        return ys[0]  # one point: flat (flagged as extrapolated beyond it)
    for i in range(1, len(xs)):
        if c <= xs[i]:
            w = (c - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return max(0.0, ys[-1] + slope * (c - xs[-1]))


class _Replica:
    """One replica's figures at concurrency c, for the target's prompts, at a speed factor."""

    def __init__(self, prof: dict[str, Any], t: Target, speed: float, step_overhead_s: float):
        self.curve = sorted(prof["curve"], key=lambda p: p["concurrency"])
        self.prefill = float(prof["prefill_tok_s"])
        self.p_meas, self.a_meas = prof["prompt_tokens"], prof["answer_tokens"]
        self.p_eff = t.prompt_tokens * (1 - t.prefix_share)
        self.a = t.answer_tokens
        self.speed = speed
        self.overhead = step_overhead_s  # per step, not scaled by speed (all-reduces)
        self.tpot_floor = {q: float(self.curve[0][f"tpot_{q}_s"]) for q in ("p50", "p95")}

    def ttft(self, c: float, q: str) -> float:
        base = _interp(self.curve, f"ttft_{q}_s", c) + (self.p_eff - self.p_meas) / self.prefill
        return max(base, self.p_eff / self.prefill) / self.speed + self.overhead

    def tpot(self, c: float, q: str) -> float:
        extra = max(c, 1.0) * (self.p_eff / self.a - self.p_meas / self.a_meas) / self.prefill
        base = max(_interp(self.curve, f"tpot_{q}_s", c) + extra, self.tpot_floor[q])
        return base / self.speed + self.overhead

    def latency(self, c: float) -> float:
        return self.ttft(c, "p50") + (self.a - 1) * self.tpot(c, "p50")

    def meets(self, c: float, t: Target) -> bool:
        return ((t.ttft_slo is None or self.ttft(c, "p95") <= t.ttft_slo)
                and (t.tpot_slo is None or self.tpot(c, "p95") <= t.tpot_slo))

    def capacity(self, t: Target) -> float:
        """The largest concurrency (from 1, by 1/20 steps, up to the last measured level)
        with every level below it meeting the SLOs; 0 when batch 1 misses them."""
        top = float(self.curve[-1]["concurrency"])
        c, best = 1.0, 0.0
        while c <= top + 1e-9:
            if not self.meets(c, t):
                break
            best = c
            c += 0.05
        return best


def _in_flight(rep: _Replica, users_per_replica: float, think: float) -> float:
    """Per replica concurrency c solving c = u x L(c) / (S + L(c)) (closed loop, Little)."""
    if think == 0:
        return users_per_replica
    lo, hi = 0.0, users_per_replica
    for _ in range(60):
        mid = (lo + hi) / 2
        lat = rep.latency(mid)
        if users_per_replica * lat / (think + lat) > mid:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _ranks_for_memory(prof: dict[str, Any], need: float, usable: float,
                      overhead: float) -> int | None:
    """The fewest ranks K (dividing the heads and kv heads) with (need - overhead) / K +
    overhead within ``usable`` bytes; None when no K works."""
    args = prof["model_args"]
    heads, kv_heads = int(args.get("n_heads", 1)), int(args.get("n_kv_heads", 1))
    for k in range(1, kv_heads + 1):
        if heads % k or kv_heads % k:
            continue
        if (need - overhead) / k + overhead <= usable:
            return k
    return None


def predict(prof: dict[str, Any], t: Target) -> dict[str, Any]:
    """The deployment and its predicted figures (see the module docstring). Sizing (no
    ``replicas`` nor ``replicas_per_machine``) tries every packing of 1..cores replicas per
    machine and keeps the one that meets the SLOs on the fewest machines (then the lowest
    TTFT p95): on a bandwidth-bound machine, more replicas per machine is not more speed."""
    t.check()
    check_profile(prof)
    if t.replicas is not None or t.replicas_per_machine is not None:
        return _predict(prof, t)
    cores = t.machine_cores or int(prof["machine"].get("physical_cores") or prof["threads"])
    best: dict[str, Any] | None = None
    for n in range(1, min(cores, 64) + 1):
        res = _predict(prof, replace(t, replicas_per_machine=n))
        key = (not res["slo_met"], res["machines"], res["predicted"]["ttft_p95_s"])
        if best is None or key < (not best["slo_met"], best["machines"],
                                  best["predicted"]["ttft_p95_s"]):
            best = res
        if res["tensor_parallel"] > 1:
            break  # one rank per machine: packing does not apply
    assert best is not None
    return best


def _predict(prof: dict[str, Any], t: Target) -> dict[str, Any]:
    machine = prof["machine"]
    t_meas = int(prof["threads"])
    cores = t.machine_cores or int(machine.get("physical_cores") or t_meas)
    mem_bytes = (t.machine_memory_gib * GiB if t.machine_memory_gib
                 else float(machine.get("memory_bytes") or 0) or 16 * GiB)
    bw_meas = float(machine.get("read_gbs") or 0.0)
    prof_cores = int(machine.get("physical_cores") or t_meas)
    # read bandwidth grows with the threads reading, up to the profiled machine's cores; past
    # them nothing is known: flat (conservative) unless --machine-bandwidth-gbs says
    bandwidth = t.machine_bandwidth_gbs or (
        bw_meas * max(t_meas, min(cores, prof_cores)) / t_meas if bw_meas else None)
    usable = MEMORY_USABLE * mem_bytes
    mem = prof["memory"]
    weights = float(mem["weight_bytes"])
    kvb = float(mem["kv_bytes_per_token"])
    # the runtime's own memory: peak RSS less weights and the KV the measurement touched
    # (RSS after load undercounts memory-mapped weights not yet read)
    touched = kvb * max(p["concurrency"] for p in prof["curve"]) * (
        prof["prompt_tokens"] + prof["answer_tokens"])
    overhead = max(0.0, float(mem.get("rss_after_load_bytes", 0)) - weights,
                   float(mem.get("rss_peak_bytes", 0)) - weights - touched)
    layers = int(prof["model_args"].get("n_layers", 1))
    warnings: list[str] = []

    def kv_bytes(c: float) -> float:
        return kvb * (math.ceil(c) * (t.prompt_tokens * (1 - t.prefix_share) + t.answer_tokens)
                      + t.prompt_tokens * t.prefix_share)

    # 1. tensor parallelism: only when one replica does not fit a machine (or asked for)
    top = float(max(p["concurrency"] for p in prof["curve"]))
    k_local = t.tensor_parallel or 1
    replica_bytes = weights + kv_bytes(top) + overhead
    ranks = 1
    if t.tensor_parallel is None and replica_bytes > usable:
        found = _ranks_for_memory(prof, replica_bytes, usable, overhead)
        if found is None:
            raise PlanError(
                f"one replica needs {replica_bytes / GiB:.1f} GiB and no tensor-parallel "
                f"split of its {prof['model_args'].get('n_kv_heads')} kv heads fits "
                f"{mem_bytes / GiB:.1f} GiB machines: give bigger machines")
        ranks = found
    # 2. replicas per machine and threads per replica
    if ranks > 1:  # one rank per machine, all its cores
        per_machine, threads = 1, cores
    else:
        per_machine = t.replicas_per_machine or max(1, cores // min(t_meas, cores))
        if t.replicas is not None and t.replicas_per_machine is None:
            per_machine = min(per_machine, t.replicas)  # evaluating fewer than fit
        by_memory = max(1, int(usable // replica_bytes))
        if by_memory < per_machine:
            warnings.append(f"memory allows {by_memory} replica(s) per machine, not "
                            f"{per_machine}")
            per_machine = by_memory
        threads = max(1, cores // per_machine)
    speed = threads / t_meas
    if bandwidth and bw_meas:  # the machine's bandwidth, shared by its replicas
        speed = min(speed, bandwidth / bw_meas / per_machine)
    speed *= ranks  # each of K ranks reads 1/K of the weights
    step_overhead = 2 * layers * t.allreduce_us * 1e-6 if ranks > 1 or k_local > 1 else 0.0
    rep = _Replica(prof, t, speed, step_overhead)
    # 3. capacity under the SLOs, then the replicas
    cap = rep.capacity(t)
    feasible = cap > 0
    if not feasible:
        warnings.append("batch 1 already misses the SLOs: more replicas cannot help; "
                        "faster machines, tensor parallelism or a smaller/quantized model can")
    if t.replicas is not None:
        replicas = t.replicas
    else:
        c_plan = max(1.0, t.headroom * cap) if feasible else 1.0
        lat = rep.latency(c_plan)
        demand = t.users * lat / (t.think_seconds + lat)
        replicas = max(1, math.ceil(demand / c_plan - 1e-9))
    c = _in_flight(rep, t.users / replicas, t.think_seconds)
    lat = rep.latency(c)
    rate = t.users / (t.think_seconds + lat)
    if c > top:
        warnings.append(f"{c:.1f} requests in flight per replica is beyond the measured "
                        f"curve (up to {top:g}): extrapolated")
    machines = math.ceil(replicas / per_machine) * ranks
    kv = kv_bytes(max(c, 1.0))
    per_rank = (weights + kv) / ranks + overhead
    if per_rank * per_machine > usable:
        warnings.append(f"{per_machine} x {per_rank / GiB:.2f} GiB exceeds "
                        f"{usable / GiB:.1f} GiB usable per machine")
    ratio = (t.prompt_tokens / prof["prompt_tokens"], t.answer_tokens / prof["answer_tokens"])
    if not all(0.5 <= r <= 2 for r in ratio):
        warnings.append(f"target lengths {t.prompt_tokens}/{t.answer_tokens} are far from the "
                        f"profile's {prof['prompt_tokens']}/{prof['answer_tokens']}: re-measure "
                        "with --prompt-tokens/--answer-tokens close to them")
    capacity_tok_s = _interp(rep.curve, "decode_tok_s", max(c, 1.0)) * speed
    return {
        "replicas": replicas, "tensor_parallel": ranks if ranks > 1 else k_local,
        "replicas_per_machine": per_machine, "threads_per_replica": threads,
        "machines": machines,
        "machine": {"cores": cores, "memory_gib": round(mem_bytes / GiB, 2),
                    "bandwidth_gbs": round(bandwidth, 2) if bandwidth else None},
        "feasible": feasible,
        "slo_met": feasible and rep.meets(c, t),
        "per_replica": {
            "concurrency": round(c, 3), "capacity_concurrency": round(cap, 2),
            "speed_factor": round(speed, 4),
            "memory_gib": {"weights": round(weights / ranks / GiB, 4),
                           "kv": round(kv / ranks / GiB, 4),
                           "runtime": round(overhead / GiB, 4),
                           "total_per_rank": round(per_rank / GiB, 4)},
            "decode_tok_s_at_concurrency": round(capacity_tok_s, 2)},
        "predicted": {
            "ttft_p50_s": rep.ttft(c, "p50"), "ttft_p95_s": rep.ttft(c, "p95"),
            "tpot_p50_s": rep.tpot(c, "p50"), "tpot_p95_s": rep.tpot(c, "p95"),
            "latency_s": lat, "requests_per_s": rate,
            "decode_tok_s": rate * t.answer_tokens,
            "prefill_tok_s": rate * t.prompt_tokens * (1 - t.prefix_share)},
        "warnings": warnings,
        "assumptions": assumptions(prof, t, threads, speed, ranks, k_local),
    }


def assumptions(prof: dict[str, Any], t: Target, threads: int, speed: float, ranks: int,
                k_local: int) -> list[str]:
    """The prediction's assumptions, one line each."""
    lines = [
        f"closed loop: each of {t.users} users sends a request, reads the answer, thinks "
        f"{t.think_seconds:g} s; in flight = users x L / (think + L) (Little's law)",
        f"curve measured at {prof['prompt_tokens']}-token prompts / {prof['answer_tokens']}-"
        f"token answers, {prof['threads']} threads, on {prof['machine'].get('cpu', '?')}; "
        "linear between its levels",
        "other lengths shift TTFT by the extra prefill tokens / the measured prefill rate and "
        "TPOT by that prefill spread over the answer's steps (attention's growth with context "
        "ignored)",
        f"prefix sharing {t.prefix_share:.0%}: that share of each prompt is cached on the "
        "replica that serves the conversation (prefix-aware routing keeps it there)",
        f"{threads} threads per replica run {speed / max(ranks, 1):.2f}x the profile's speed: "
        "linear in threads, capped by the machine's read bandwidth shared by its replicas "
        "(decode is memory-bandwidth bound); re-measure at cores / N threads to confirm",
        "machine read bandwidth: " + (f"{t.machine_bandwidth_gbs:g} GB/s as given"
                                      if t.machine_bandwidth_gbs else
                                      "the profile's, scaled by threads up to its machine's "
                                      f"{prof['machine'].get('physical_cores', '?')} cores, "
                                      "flat beyond (give --machine-bandwidth-gbs)"),
        f"memory: weights + KV (kv bytes/token x tokens in flight, the shared prefix once) + "
        f"runtime (peak RSS - weights - KV measured); {MEMORY_USABLE:.0%} of a machine's RAM "
        "usable",
        f"SLOs on the p95: TTFT <= {t.ttft_slo if t.ttft_slo else 'none'} s, TPOT <= "
        f"{t.tpot_slo if t.tpot_slo else 'none'} s; sizing plans {t.headroom:.0%} of the "
        "largest concurrency that meets them",
        "requests spread evenly over replicas (the router's load threshold keeps them within "
        "a few requests); no preemption (the KV budget holds every sequence in flight)",
    ]
    if ranks > 1:
        lines.append(f"{ranks} tensor-parallel ranks, one machine each: 1/{ranks} of weights "
                     f"and KV per rank, {ranks}x less read per step, + 2 all-reduces per layer "
                     f"per step at {t.allreduce_us:g} us each (network latency, not measured)")
    elif k_local > 1:
        lines.append(f"{k_local} tensor-parallel ranks on one machine share its cores and "
                     f"bandwidth (no speed-up) + 2 all-reduces per layer per step at "
                     f"{t.allreduce_us:g} us each (gloo)")
    return lines
