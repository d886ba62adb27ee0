"""Redaction of personal data, and the audit log of a real `souverain serve`."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import stat
from pathlib import Path

import httpx
import pytest
from server_utils import ServerProcess

from souverain.audit import AuditLog
from souverain.redact import iban_ok, luhn_ok, redact, redact_json
from souverain.server.auth import add_key

# -- redaction ------------------------------------------------------------------------------

POSITIVES = [
    ("write to jean.dupont+rh@exemple.gouv.fr today", "write to [EMAIL] today"),
    ("a_b@sub.example.co.uk", "[EMAIL]"),
    ("Tél. : +33 6 12 34 56 78.", "Tél. : [PHONE]."),
    ("+33 (0)1 23 45 67 89", "[PHONE]"),
    ("appelez le 06 12 34 56 78 ou le 01.23.45.67.89", "appelez le [PHONE] ou le [PHONE]"),
    ("0612345678", "[PHONE]"),
    ("call (415) 555-2671 or 415.555.2671", "call [PHONE] or [PHONE]"),
    ("+1 415-555-2671", "[PHONE]"),
    ("+44 20 7946 0958", "[PHONE]"),
    ("+49 30 901820", "[PHONE]"),
    ("IBAN FR76 3000 6000 0112 3456 7890 189, merci", "IBAN [IBAN], merci"),
    ("FR7630006000011234567890189", "[IBAN]"),
    ("DE89 3704 0044 0532 0130 00", "[IBAN]"),
    ("GB82 WEST 1234 5698 7654 32", "[IBAN]"),
    ("card 4111 1111 1111 1111 exp 12/29", "card [CARD] exp 12/29"),
    ("4111-1111-1111-1111", "[CARD]"),
    ("amex 378282246310005", "amex [CARD]"),
    ("mc 5555555555554444.", "mc [CARD]."),
    ("from 192.168.1.10:8080 and 8.8.8.8", "from [IP]:8080 and [IP]"),
    ("host 2001:db8::8a2e:370:7334 up", "host [IP] up"),
    ("fe80::1%eth0", "[IP]"),
    ("::ffff:10.0.0.1", "[IP]"),
]

NEGATIVES = [
    "4111 1111 1111 1112",  # Luhn-invalid card number
    "1234 5678 9012 3456",  # Luhn-invalid
    "order 1234567890123456789",  # 19 digits, not Luhn-valid
    "FR76 3000 6000 0112 3456 7890 188",  # IBAN with a wrong check
    "FR7630006000011234567890188",
    "DE00 3704 0044 0532 0130 00",
    "version 1.2.3.4",
    "v1.2.3.4",
    "Python 3.11.4 and numpy 1.26.4",
    "1.2.3.4.5",
    "999.10.10.10",
    "on 2024-01-15 at 10:30:45",
    "le 15/01/2024",
    "12.05.2024",
    "ISBN 978-3-16-148410-0",
    "1 234 567 EUR",
    "pi 3.14159265",
    "MAC 00:1A:2B:3C:4D:5E",
    "std::vector<int>",
    "ratio 1:2:3",
    "user@localhost",  # no domain
]


@pytest.mark.parametrize("text,want", POSITIVES)
def test_redacts(text: str, want: str) -> None:
    assert redact(text) == want


@pytest.mark.parametrize("text", NEGATIVES)
def test_leaves_alone(text: str) -> None:
    assert redact(text) == text


def test_checks() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("FR7630006000011234567890189") and not iban_ok("FR7630006000011234567890188")
    assert not iban_ok("FR76300060000112345678901")  # wrong length for FR


def test_redact_json_keeps_structure() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "mail a@b.fr, tel 0612345678"}],
            "temperature": 0.5, "n": 1, "stop": None}
    assert redact_json(body) == {**body, "messages": [
        {"role": "user", "content": "mail [EMAIL], tel [PHONE]"}]}


def test_audit_log_unit(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    log.submit({"start": 0.0, "latency_s": 0.0123, "request_id": "req-1", "note": {},
                "client_ip": "127.0.0.1", "method": "POST", "route": "/v1/embeddings",
                "status": 401, "body": b'{"input": "x", "model": "mistral-embed"}'})
    log.close()
    path = tmp_path / "audit" / "audit-1970-01-01.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert rec["ts"] == "1970-01-01T00:00:00.000Z" and rec["latency_ms"] == 12.3
    assert rec["model"] == "mistral-embed" and rec["key_id"] is None and "request" not in rec


# -- the log of a real server ---------------------------------------------------------------

SECRET_MAIL = "marie.curie@example.org"
SECRET_PHONE = "+33 6 12 34 56 78"
CHAT = "/v1/chat/completions"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_id, key = add_key(path, "alice")
    return {"path": path, "id": key_id, "key": key,
            "hash": hashlib.sha256(key.encode()).hexdigest()}


def exercise(srv: ServerProcess, key: str, *, stream: bool = False) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    msg = f"My e-mail is {SECRET_MAIL} and my phone {SECRET_PHONE}. Say hi."
    r = httpx.post(srv.url + CHAT, headers=auth, timeout=300, json={
        "model": SMOL, "messages": [{"role": "user", "content": msg}], "max_tokens": 8,
        "temperature": 0})
    assert r.status_code == 200, r.text
    if stream:
        r = httpx.post(srv.url + CHAT, headers=auth, timeout=300, json={
            "model": SMOL, "messages": [{"role": "user", "content": "Count to three."}],
            "max_tokens": 6, "temperature": 0, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    r = httpx.post(srv.url + "/v1/embeddings", headers=auth, timeout=120,
                   json={"model": "mistral-embed", "input": [msg, "second text"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"].startswith("embd-")
    r = httpx.post(srv.url + CHAT, headers={"Authorization": "Bearer not-a-key"}, timeout=60,
                   json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401, r.text
    r = httpx.post(srv.url + CHAT, headers=auth, timeout=60,
                   json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404, r.text


def by_route_status(lines: list[dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for rec in lines:
        out.setdefault((rec["route"], rec["status"]), []).append(rec)
    return out


def check_common(text: str, lines: list[dict], keys: dict) -> dict:
    assert keys["key"] not in text and keys["hash"] not in text
    assert "Bearer" not in text and "not-a-key" not in text
    for rec in lines:
        assert dt.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).tzinfo is not None
        assert rec["client_ip"] == "127.0.0.1" and rec["latency_ms"] >= 0
        assert rec["request_id"]
    got = by_route_status(lines)
    chat = got[(CHAT, 200)][0]
    assert chat["key_id"] == keys["id"] and chat["key_name"] == "alice"
    assert chat["model"] == SMOL and chat["method"] == "POST"
    assert chat["request_id"].startswith("cmpl-")
    assert chat["prompt_tokens"] > 10 and 0 < chat["completion_tokens"] <= 8
    (emb,) = got[("/v1/embeddings", 200)]
    assert emb["model"] == "mistral-embed" and emb["key_id"] == keys["id"]
    assert emb["prompt_tokens"] > 10 and emb["completion_tokens"] == 0
    (unauth,) = got[(CHAT, 401)]
    assert unauth["key_id"] is None and unauth["model"] == SMOL
    (missing,) = got[(CHAT, 404)]
    assert missing["key_id"] == keys["id"] and missing["model"] == "nope"
    return got


def test_server_audit_log_default(keys: dict, tmp_path: Path) -> None:
    srv = ServerProcess(SMOL, "--lazy", "--no-libraries", "--api-keys-file", str(keys["path"]),
                        "--data-dir", str(tmp_path))
    try:
        exercise(srv, keys["key"])
    finally:
        assert srv.stop() == 0, srv.log()
    (path,) = (tmp_path / "audit").glob("audit-*.jsonl")
    assert path.name == f"audit-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 4, text
    check_common(text, lines, keys)
    # no content by default
    assert SECRET_MAIL not in text and "[EMAIL]" not in text and "Say hi" not in text
    assert all("request" not in r and "response" not in r for r in lines)


def test_server_audit_log_with_content(keys: dict, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    srv = ServerProcess(SMOL, "--lazy", "--no-libraries", "--api-keys-file", str(keys["path"]),
                        "--audit-log", str(path), "--audit-content")
    try:
        exercise(srv, keys["key"], stream=True)
    finally:
        assert srv.stop() == 0, srv.log()
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5, text
    got = check_common(text, lines, keys)
    assert SECRET_MAIL not in text and SECRET_PHONE not in text
    plain, streamed = got[(CHAT, 200)]
    user = plain["request"]["messages"][0]["content"]
    assert user == "My e-mail is [EMAIL] and my phone [PHONE]. Say hi."
    assert plain["request"]["model"] == SMOL and plain["request"]["max_tokens"] == 8
    assert isinstance(plain["response"], str) and plain["response"]
    assert streamed["request"]["stream"] is True and streamed["response"]
    assert 0 < streamed["completion_tokens"] <= 6
    (emb,) = got[("/v1/embeddings", 200)]
    assert emb["request"]["input"][0] == user and emb["response"] is None
    (missing,) = got[(CHAT, 404)]
    assert "not served here" in missing["response"]


def test_no_audit(keys: dict, tmp_path: Path) -> None:
    srv = ServerProcess(SMOL, "--lazy", "--no-libraries", "--no-audit", "--embed-model", "none",
                        "--data-dir", str(tmp_path))
    try:
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()
    assert not (tmp_path / "audit").exists()
