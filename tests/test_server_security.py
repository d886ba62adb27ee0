"""API keys, rate limits, admission bound and Prometheus metrics of the HTTP server."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading

import pytest

from souverain.errors import SouverainError
from souverain.server.auth import (
    APIKeys,
    AuthError,
    add_key,
    authorize,
    generate_key,
    is_loopback,
    require_loopback,
    revoke_key,
)
from souverain.server.keyfile import ConfigError, KeyInfo
from souverain.server.metrics import ServerMetrics
from souverain.server.ratelimit import AdmissionQueue, RateLimiter, retry_after


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def bearer(key: str) -> str:
    return f"Bearer {key}"


# -- API keys ----------------------------------------------------------------------------------
def test_add_key_writes_only_a_hash_with_mode_0600(tmp_path):
    path = tmp_path / "conf" / "keys.txt"
    key_id, key = add_key(path, "alice")
    assert key.startswith("sk-sov-") and len(key) > 40
    text = path.read_text()
    assert key not in text
    assert APIKeys.hash_key(key) in text
    assert re.search(rf"^{key_id} alice sha256:[0-9a-f]{{64}}$", text, re.MULTILINE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    keys = APIKeys.from_file(path)
    info = keys.authenticate(bearer(key))
    assert info == KeyInfo(key_id=key_id, name="alice", models=None)
    # The scheme is case-insensitive and surrounding spaces are tolerated.
    assert keys.authenticate(f"  bearer   {key} ").key_id == key_id


def test_hash_key_format():
    h = APIKeys.hash_key("abc")
    assert h == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_generate_key_is_random():
    assert len({generate_key() for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "header, code",
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer sk-sov-wrong", "invalid_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization_header"),
        ("Bearer", "invalid_authorization_header"),
        ("Bearer two words", "invalid_authorization_header"),
        ("sk-sov-bare-without-scheme", "invalid_authorization_header"),
    ],
)
def test_authenticate_refusals_are_401(tmp_path, header, code):
    path = tmp_path / "keys"
    add_key(path, "alice")
    keys = APIKeys.from_file(path)
    with pytest.raises(AuthError) as exc_info:
        keys.authenticate(header)
    err = exc_info.value
    assert err.status == 401 and err.code == code
    body = err.to_dict()
    assert body == {
        "object": "error",
        "message": err.message,
        "type": "authentication_error",
        "param": None,
        "code": code,
    }
    assert body["message"].endswith(".")


def test_several_keys_each_authenticate_as_themselves(tmp_path):
    path = tmp_path / "keys"
    issued = [add_key(path, f"user{i}") for i in range(5)]
    keys = APIKeys.from_file(path)
    assert len(keys) == 5
    for key_id, key in issued:
        assert keys.authenticate(bearer(key)).key_id == key_id


def test_revoke_is_picked_up_without_restart(tmp_path):
    clock = FakeClock()
    path = tmp_path / "keys"
    alice_id, alice = add_key(path, "alice")
    bob_id, bob = add_key(path, "bob")
    keys = APIKeys.from_file(path, clock=clock)
    assert keys.authenticate(bearer(alice)).key_id == alice_id

    assert revoke_key(path, "alice") is True  # by name
    assert alice_id not in path.read_text() and bob_id in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "keys"], "temp file left behind"

    # Checked at most once per second: within the second the old set still answers.
    clock.advance(0.5)
    assert keys.authenticate(bearer(alice)).key_id == alice_id
    clock.advance(0.6)
    with pytest.raises(AuthError) as exc_info:
        keys.authenticate(bearer(alice))
    assert exc_info.value.status == 401 and exc_info.value.code == "invalid_api_key"
    assert keys.authenticate(bearer(bob)).key_id == bob_id

    # By key_id, and a key added while running is picked up as well.
    carol_id, carol = add_key(path, "carol")
    assert revoke_key(path, bob_id) is True
    assert revoke_key(path, "nobody") is False
    clock.advance(1.0)
    with pytest.raises(AuthError):
        keys.authenticate(bearer(bob))
    assert keys.authenticate(bearer(carol)).key_id == carol_id


def test_reload_fails_closed_on_a_broken_file_and_recovers(tmp_path, caplog):
    clock = FakeClock()
    path = tmp_path / "keys"
    key_id, key = add_key(path, "alice")
    good = path.read_text()
    keys = APIKeys.from_file(path, clock=clock)
    path.write_text(good + "oops two-fields\n")
    clock.advance(2)
    with caplog.at_level(logging.ERROR, logger="souverain.server.auth"), pytest.raises(AuthError):
        keys.authenticate(bearer(key))
    assert "line 3" in caplog.text
    path.write_text(good)
    clock.advance(2)
    assert keys.authenticate(bearer(key)).key_id == key_id
    path.unlink()
    clock.advance(2)
    with pytest.raises(AuthError):
        keys.authenticate(bearer(key))


def test_bare_plaintext_and_bare_hash_lines(tmp_path):
    plain = generate_key()
    other = generate_key()
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\n  {plain}  \n{APIKeys.hash_key(other)}\n")
    keys = APIKeys.from_file(path)
    info = keys.authenticate(bearer(plain))
    assert info.key_id == APIKeys.hash_key(plain)[len("sha256:") :][:8]
    assert info.models is None
    assert keys.authenticate(bearer(other)).key_id == APIKeys.hash_key(other)[7:15]
    assert plain not in repr(keys) and plain not in repr(keys.keys)
    assert revoke_key(path, info.key_id) is True
    assert plain not in path.read_text()


def test_from_plaintext():
    key = generate_key()
    keys = APIKeys.from_plaintext([key, key])
    assert len(keys) == 1
    assert keys.authenticate(bearer(key)).key_id == APIKeys.hash_key(key)[7:15]
    with pytest.raises(ConfigError):
        APIKeys.from_plaintext(["has space"])


@pytest.mark.parametrize(
    "content, line",
    [
        ("# header\nid1 alice sha256:xyz\n", 2),
        ("\n\nid1 alice\n", 3),
        ("id1 alice sha256:" + "a" * 64 + " colour=blue\n", 1),
        ("id1 alice sha256:" + "a" * 64 + " models=\n", 1),
        ("id1 a sha256:" + "a" * 64 + "\nid1 b sha256:" + "b" * 64 + "\n", 2),
        ("id1 a sha256:" + "a" * 64 + "\nid2 b sha256:" + "A" * 64 + "\n", 2),
        ("bad/id alice sha256:" + "a" * 64 + "\n", 1),
        ("sha256:1234\n", 1),
        ("a b c d e\n", 1),
    ],
)
def test_bad_file_names_the_line(tmp_path, content, line):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc_info:
        APIKeys.from_file(path)
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, SouverainError)
    assert f"line {line}:" in msg and str(path) in msg
    assert msg.count("\n") == 0


def test_bad_file_error_never_quotes_the_line(tmp_path):
    secret = generate_key()
    path = tmp_path / "keys"
    path.write_text(f"{secret} oops\n")  # two fields: neither format
    with pytest.raises(ConfigError) as exc_info:
        APIKeys.from_file(path)
    assert secret not in str(exc_info.value) and secret not in repr(exc_info.value)


def test_missing_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        APIKeys.from_file(tmp_path / "nope")
    with pytest.raises(ConfigError, match="directory"):
        APIKeys.from_file(tmp_path)
    bad = tmp_path / "latin1"
    bad.write_bytes(b"# ok\n\xe9t\xe9\n")
    with pytest.raises(ConfigError, match="line 2"):
        APIKeys.from_file(bad)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="cannot be read"):
            APIKeys.from_file(locked)


def test_model_scoping_is_403(tmp_path):
    path = tmp_path / "keys"
    scoped_id, scoped = add_key(path, "ci", models=["mistral-7b", "codestral"])
    _, free = add_key(path, "admin")
    assert "models=mistral-7b,codestral" in path.read_text()
    keys = APIKeys.from_file(path)
    info = keys.authenticate(bearer(scoped))
    assert info.models == frozenset({"mistral-7b", "codestral"})
    keys.check_model(info, "codestral")
    with pytest.raises(AuthError) as exc_info:
        keys.check_model(info, "mixtral")
    err = exc_info.value
    assert err.status == 403 and err.code == "model_not_allowed"
    assert scoped_id in err.message and "mixtral" in err.message
    keys.check_model(keys.authenticate(bearer(free)), "mixtral")


def test_add_key_validates_its_arguments(tmp_path):
    path = tmp_path / "keys"
    for name in ("", "two words", "#x", "models=a"):
        with pytest.raises(ConfigError):
            add_key(path, name)
    with pytest.raises(ConfigError):
        add_key(path, "x", models=[])
    with pytest.raises(ConfigError):
        add_key(path, "x", models=["a,b"])
    assert not path.exists()


def test_add_key_appends_after_a_file_without_final_newline(tmp_path):
    path = tmp_path / "keys"
    plain = generate_key()
    path.write_text(plain)  # no trailing newline
    path.chmod(0o600)
    key_id, key = add_key(path, "alice")
    keys = APIKeys.from_file(path)
    assert len(keys) == 2
    assert keys.authenticate(bearer(key)).key_id == key_id
    assert keys.authenticate(bearer(plain)).models is None


def test_plaintext_never_in_repr_str_or_logs(tmp_path, caplog):
    path = tmp_path / "keys"
    caplog.set_level(logging.DEBUG)
    key_id, key = add_key(path, "alice", models=["m"])
    bare = generate_key()
    with open(path, "a") as f:
        f.write(bare + "\n")
    clock = FakeClock()
    keys = APIKeys.from_file(path, clock=clock)
    info = keys.authenticate(bearer(key))
    keys.authenticate(bearer(bare))
    errors: list[BaseException] = []
    for header in (bearer(key + "x"), bearer(key[:-1]), f"Token {key}", f"Bearer {key} {key}"):
        try:
            keys.authenticate(header)
        except AuthError as exc:
            errors.append(exc)
    try:
        keys.check_model(info, "other")
    except AuthError as exc:
        errors.append(exc)
    revoke_key(path, key_id)
    clock.advance(5)
    try:
        keys.authenticate(bearer(key))
    except AuthError as exc:
        errors.append(exc)
    assert len(errors) == 6

    texts = [repr(keys), str(keys), repr(info), str(info), repr(keys.keys)]
    for exc in errors:
        texts += [
            repr(exc),
            str(exc),
            str(exc.to_dict()),
            repr(exc.__cause__),
            repr(exc.__context__),
        ]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("key_id" in t or key_id in t for t in texts)
    for secret in (key, bare, key[7:]):
        for t in texts:
            assert secret not in t


def test_loopback_rule():
    for host in (
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST",
        "::ffff:127.0.0.1",
        "[::ffff:127.0.0.2]",
    ):
        assert is_loopback(host), host
    for host in (
        None,
        "",
        "10.0.0.1",
        "192.168.1.2",
        "::ffff:10.0.0.1",
        "2001:db8::1",
        "testclient",
        "localhost.evil.com",
        "0.0.0.0",
    ):
        assert not is_loopback(host), host
    require_loopback("127.0.0.1")
    with pytest.raises(AuthError) as exc_info:
        require_loopback("203.0.113.5")
    assert exc_info.value.status == 403 and exc_info.value.code == "loopback_only"


def test_authorize(tmp_path):
    assert authorize(None, None, "127.0.0.1") is None
    with pytest.raises(AuthError) as exc_info:
        authorize(None, bearer("anything"), "198.51.100.7")
    assert exc_info.value.status == 403
    key = generate_key()
    keys = APIKeys.from_plaintext([key])
    assert authorize(keys, bearer(key), "198.51.100.7") is not None
    with pytest.raises(AuthError) as exc_info:
        authorize(keys, None, "127.0.0.1")  # keys configured: loopback is no exception
    assert exc_info.value.status == 401


# -- rate limits -------------------------------------------------------------------------------
def test_rate_limiter_burst_refill_and_retry_after():
    clock = FakeClock()
    rl = RateLimiter(requests_per_minute=60, clock=clock)  # 1 per second, burst 60
    assert all(rl.check_request("a") is None for _ in range(60))
    wait = rl.check_request("a")
    assert wait == pytest.approx(1.0)
    assert retry_after(wait) == "1"
    assert rl.check_request("b") is None  # per key
    clock.advance(0.25)
    assert rl.check_request("a") == pytest.approx(0.75)
    assert retry_after(0.75) == "1" and retry_after(0.0001) == "1" and retry_after(2.01) == "3"
    clock.advance(0.75)
    assert rl.check_request("a") is None
    assert rl.check_request("a") == pytest.approx(1.0)
    # A long idle refills to the burst, never beyond.
    clock.advance(3600)
    assert sum(rl.check_request("a") is None for _ in range(100)) == 60


def test_rate_limiter_slow_limit_still_admits_one():
    clock = FakeClock()
    rl = RateLimiter(requests_per_minute=0.5, clock=clock)  # one request per two minutes
    assert rl.check_request("a") is None
    assert rl.check_request("a") == pytest.approx(120.0)
    assert retry_after(rl.check_request("a")) == "120"


def test_rate_limiter_token_charge_blocks_until_repaid():
    clock = FakeClock()
    rl = RateLimiter(requests_per_minute=None, tokens_per_minute=600, clock=clock)  # 10 tok/s
    assert rl.check_request("a") is None
    rl.charge_tokens("a", 500)
    assert rl.check_request("a") is None  # 100 left: still allowed
    rl.charge_tokens("a", 400)  # overdraw to -300
    wait = rl.check_request("a")
    assert wait == pytest.approx(30.0)
    assert rl.check_request("b") is None
    clock.advance(29.0)
    assert rl.check_request("a") == pytest.approx(1.0)
    clock.advance(1.0)
    assert rl.check_request("a") is None


def test_rate_limiter_both_limits_take_the_longer_wait():
    clock = FakeClock()
    rl = RateLimiter(requests_per_minute=6, tokens_per_minute=60, clock=clock)
    assert rl.check_request("k") is None
    rl.charge_tokens("k", 120)  # -60 tokens: 60 s
    assert rl.check_request("k") == pytest.approx(60.0)
    clock.advance(60)
    assert rl.check_request("k") is None


def test_rate_limiter_drops_idle_buckets():
    clock = FakeClock()
    rl = RateLimiter(requests_per_minute=60, tokens_per_minute=1000, clock=clock)
    for i in range(100):
        rl.check_request(f"k{i}")
    rl.charge_tokens("debtor", 5000)  # five minutes of debt
    assert len(rl) == 101
    clock.advance(61)
    rl.check_request("new")
    assert len(rl) == 2  # "new" and the still-indebted key
    assert rl.check_request("debtor") is not None
    clock.advance(300)
    rl.check_request("new")
    assert len(rl) == 1


def test_rate_limiter_disabled_and_validation():
    rl = RateLimiter(None, None)
    assert all(rl.check_request("a") is None for _ in range(1000))
    rl.charge_tokens("a", 10**9)
    assert rl.check_request("a") is None and len(rl) == 0
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            RateLimiter(bad)
        with pytest.raises(ValueError):
            RateLimiter(10, bad)


def test_rate_limiter_is_thread_safe():
    rl = RateLimiter(requests_per_minute=1000, clock=lambda: 0.0)
    allowed = []

    def worker():
        allowed.append(sum(rl.check_request("k") is None for _ in range(500)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 1000


def test_admission_queue_bounds():
    q = AdmissionQueue(3)
    assert [q.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert q.pending == 3
    q.release()
    assert q.pending == 2
    assert q.try_acquire() is True and q.try_acquire() is False
    for _ in range(3):
        q.release()
    assert q.pending == 0
    with pytest.raises(RuntimeError):
        q.release()
    with pytest.raises(ValueError):
        AdmissionQueue(0)

    q = AdmissionQueue(10)
    got = []

    def grab():
        got.append(sum(q.try_acquire() for _ in range(100)))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 10 and q.pending == 10


# -- metrics -----------------------------------------------------------------------------------
def _samples(metrics: ServerMetrics) -> dict[str, float]:
    """``'name{labels}' -> value`` from the rendered exposition (labels as rendered)."""
    body, _ = metrics.render()
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_counters_and_histograms():
    m = ServerMetrics()
    m.observe_request("/v1/chat/completions", "post", 200, 0.3)
    m.observe_request("/v1/chat/completions", "POST", 200, 2.0)
    m.observe_request("/v1/models/{model_id}", "GET", 404, 0.001)
    m.observe_tokens("mistral-7b", 12, 30)
    m.observe_tokens("mistral-7b", 8, 0)
    m.observe_ttft("mistral-7b", 0.2)
    m.observe_ttft("mistral-7b", 3.0)
    for _ in range(4):
        m.observe_itl("mistral-7b", 0.004)
    m.observe_abort("mistral-7b")
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    s = _samples(m)
    assert (
        s['souverain_requests_total{method="POST",route="/v1/chat/completions",status="200"}'] == 2
    )
    assert (
        s['souverain_requests_total{method="GET",route="/v1/models/{model_id}",status="404"}'] == 1
    )
    assert s['souverain_request_duration_seconds_count{route="/v1/chat/completions"}'] == 2
    assert s[
        'souverain_request_duration_seconds_sum{route="/v1/chat/completions"}'
    ] == pytest.approx(2.3)
    assert (
        s['souverain_request_duration_seconds_bucket{le="0.5",route="/v1/chat/completions"}'] == 1
    )
    assert s['souverain_prompt_tokens_total{model="mistral-7b"}'] == 20
    assert s['souverain_completion_tokens_total{model="mistral-7b"}'] == 30
    assert s['souverain_time_to_first_token_seconds_count{model="mistral-7b"}'] == 2
    assert s['souverain_time_to_first_token_seconds_bucket{le="0.25",model="mistral-7b"}'] == 1
    assert s['souverain_time_to_first_token_seconds_bucket{le="60.0",model="mistral-7b"}'] == 2
    assert s['souverain_time_to_first_token_seconds_bucket{le="0.01",model="mistral-7b"}'] == 0
    assert s['souverain_inter_token_latency_seconds_bucket{le="0.005",model="mistral-7b"}'] == 4
    assert s['souverain_inter_token_latency_seconds_bucket{le="0.001",model="mistral-7b"}'] == 0
    assert s['souverain_inter_token_latency_seconds_sum{model="mistral-7b"}'] == pytest.approx(
        0.016
    )
    assert s['souverain_requests_aborted_total{model="mistral-7b"}'] == 1
    assert b"# TYPE souverain_time_to_first_token_seconds histogram" in body


def test_metrics_engine_gauges_read_at_scrape_time():
    m = ServerMetrics()
    stats = {
        "running": 2,
        "waiting": 5,
        "free_blocks": 30,
        "usable_blocks": 100,
        "kv_tokens": 1,
        "preemptions": 3,
        "prefix_cache_queries": 400,
        "prefix_cache_hits": 100,
    }
    m.add_engine_source("mistral-7b", lambda: stats)
    m.add_engine_source("not-loaded", lambda: None)
    s = _samples(m)
    assert s['souverain_queue_depth{model="mistral-7b"}'] == 5
    assert s['souverain_running_sequences{model="mistral-7b"}'] == 2
    assert s['souverain_kv_blocks_used{model="mistral-7b"}'] == 70
    assert s['souverain_kv_blocks_free{model="mistral-7b"}'] == 30
    assert s['souverain_prefix_cache_hit_rate{model="mistral-7b"}'] == pytest.approx(0.25)
    assert s['souverain_preemptions_total{model="mistral-7b"}'] == 3
    assert not any("not-loaded" in k for k in s)

    stats.update(waiting=0, preemptions=4, prefix_cache_queries=0, prefix_cache_hits=0)
    s = _samples(m)
    assert s['souverain_queue_depth{model="mistral-7b"}'] == 0
    assert s['souverain_preemptions_total{model="mistral-7b"}'] == 4
    assert s['souverain_prefix_cache_hit_rate{model="mistral-7b"}'] == 0

    def broken():
        raise RuntimeError("engine being unloaded")

    m.add_engine_source("mistral-7b", broken)  # replaces; a failing source does not break a scrape
    s = _samples(m)
    assert not any("mistral-7b" in k for k in s)
    m.add_engine_source("other", lambda: stats)
    m.remove_engine_source("other")
    assert not any('model="other"' in k for k in _samples(m))


def test_metrics_instances_do_not_collide():
    a, b = ServerMetrics(), ServerMetrics()
    a.observe_request("/v1/models", "GET", 200, 0.01)
    a.add_engine_source("m", lambda: {"waiting": 1})
    sa, sb = _samples(a), _samples(b)
    assert sa['souverain_requests_total{method="GET",route="/v1/models",status="200"}'] == 1
    assert not any(k.startswith("souverain_requests_total") for k in sb)
    assert 'souverain_queue_depth{model="m"}' in sa
    assert not any(k.startswith("souverain_queue_depth") for k in sb)


# -- keys in URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize("query,names", [
    ("api_key=sk-abc", ["api_key"]), ("key=x&page=2", ["key"]), ("token=abc", ["token"]),
    ("access_token=a&x=1", ["access_token"]), ("apiKey=a", ["apiKey"]),
    ("client_secret=s3cr3t", ["client_secret"]), ("password=pw", ["password"]),
    ("q=sk-sov-" + "Ab1" * 14 + "x", ["q"]),  # a key-shaped value, whatever the name
    ("page=2&page_size=10", []), ("search=token+budget", []), ("api_key=", []),
    ("monkey=1&keyboard=2", []), ("", []),
])
def test_secret_query_params(query, names):
    from souverain.server.access import secret_query_params

    assert secret_query_params(query) == names


def test_access_log_filter_redacts_the_query():
    import logging

    from souverain.server.access import AccessLogRedaction

    key = "sk-sov-" + "Zz9" * 14 + "q"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/v1/models?api_key={key}&page=2",
                                "1.1", 401), None)
    assert AccessLogRedaction().filter(record) is True
    assert record.getMessage() == \
        '127.0.0.1:5000 - "GET /v1/models?api_key=[SECRET]&page=2 HTTP/1.1" 401'
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                              '%s - "%s %s HTTP/%s" %d',
                              ("127.0.0.1:5000", "GET", "/v1/models?page=2", "1.1", 200), None)
    AccessLogRedaction().filter(plain)
    assert plain.getMessage() == '127.0.0.1:5000 - "GET /v1/models?page=2 HTTP/1.1" 200'


def test_uvicorn_log_config_installs_the_filter():
    import logging.config

    from souverain.cli.serve import uvicorn_log_config

    config = uvicorn_log_config()
    logging.config.dictConfig(config)
    try:
        filters = logging.getLogger("uvicorn.access").filters
        assert any(type(f).__name__ == "AccessLogRedaction" for f in filters)
    finally:
        logging.getLogger("uvicorn.access").filters.clear()
