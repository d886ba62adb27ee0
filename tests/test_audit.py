"""Redaction of personal data, and the audit log of a real `souverain serve`."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_utils import ServerProcess

from souverain.audit import AuditLog, erase, expire_content, prune
from souverain.redact import iban_ok, luhn_ok, redact, redact_json, redact_secrets
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


# -- secrets --------------------------------------------------------------------------------

SOV_KEY = "sk-sov-" + "Ab3dEf6hIj9kLm2oPq5sTu8wXy1zAb4dEf7hIj0kLm3"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9\nQ2xhc3NpYyBjYXQ=\n"
       "-----END RSA PRIVATE KEY-----")

SECRET_POSITIVES = [
    (f"my key is {SOV_KEY}, thanks", "my key is [SECRET], thanks"),
    ("OpenAI: sk-proj-Rk2vX9yQw3LmN8pZt5Hc_J7uAb-1Ef4Gh6Ij", "OpenAI: [SECRET]"),
    ("old key sk-T3BlbkFJq8X2vR9mN4pL7wZ1cY5hK0aB6dE3fG", "old key [SECRET]"),
    ("stripe sk_live_51H8xYzAbCdEfGh12345678", "stripe [SECRET]"),
    ("AWS AKIAIOSFODNN7EXAMPLE id", "AWS [SECRET] id"),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a here", "token [SECRET] here"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "[SECRET]"),
    ("slack xoxb-2048-1234567890-abcdefABCDEF", "slack [SECRET]"),
    ("google AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "google [SECRET]"),
    (f"session {JWT}.", "session [SECRET]."),
    (f"key:\n{PEM}\nend", "key:\n[SECRET]\nend"),
    ("Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543", "Authorization: Bearer [SECRET]"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZDEyMw=='",
     "curl -H 'Authorization: Basic [SECRET]'"),
    ("MISTRAL_API_KEY=Qw3rTy7uIoPaSdFgHjKlZxCvBnM12345", "MISTRAL_API_KEY=[SECRET]"),
    ('{"api_key": "Qw3rTy7uIoPaSdFgHjKl"}', '{"api_key": "[SECRET]"}'),
    ("password: hunter", "password: [SECRET]"),
    ("db_password=correct horse", "db_password=[SECRET] horse"),
    ("client_secret = 'x9Y8z7W6v5'", "client_secret = '[SECRET]'"),
]

SECRET_NEGATIVES = [
    "the secret: everything is fine",
    "max_tokens: 12345678",
    "token: none",
    "the token limit is 4096 tokens",
    "sk-learn-compatible-estimators-everywhere",
    "sk-2024-01-15-release-notes-for-everyone",
    "task-management-system-design-document",
    "bearer bonds are a kind of security",
    "Basic Authentication is an HTTP scheme",
    "AKIA is not a key on its own",
    "eyJ is how base64 JSON starts",
    "ghp_short",
    "Python 3.11.4, numpy 1.26.4, commit 8f14e45fceea167a5a36dedd4bea2543",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "-----BEGIN CERTIFICATE-----",
    "call keys.add(name) then token.split()",
]


@pytest.mark.parametrize("text,want", SECRET_POSITIVES)
def test_redacts_secrets(text: str, want: str) -> None:
    assert redact(text) == want
    assert redact_secrets(text) == want  # secrets alone, before the personal data


@pytest.mark.parametrize("text", SECRET_NEGATIVES)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_secret_before_personal_data() -> None:
    # a key's digits never become a [PHONE] half-way through it: the whole key goes first
    key = "sk-sov-0612345678aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
    assert redact(f"{key} 06 12 34 56 78") == "[SECRET] [PHONE]"


def test_redact_json_hides_values_of_credential_keys() -> None:
    body = {"api_key": "Zz9Yy8Xx7Ww6", "password": "hunter2", "max_tokens": 5,
            "token": "none", "metadata": {"access_token": "abcDEF123"},
            "messages": [{"role": "user", "content": f"use {SOV_KEY}"}]}
    assert redact_json(body) == {
        "api_key": "[SECRET]", "password": "[SECRET]", "max_tokens": 5, "token": "none",
        "metadata": {"access_token": "[SECRET]"},
        "messages": [{"role": "user", "content": "use [SECRET]"}]}


# -- the erasure record, retention, `souverain audit erase|prune` ----------------------------

DAY = 86400.0
T0 = dt.datetime(2026, 3, 10, 12, tzinfo=dt.timezone.utc).timestamp()


def _event(start: float, *, note: dict | None = None, body: bytes = b"",
           response: bytes = b"") -> dict:
    return {"start": start, "latency_s": 0.001, "request_id": "req-x", "note": note or {},
            "client_ip": "127.0.0.1", "method": "POST", "route": CHAT, "status": 200,
            "body": body, "response": response, "content_type": "application/json"}


def _chat(text: str, answer: str = "Bonjour.") -> tuple[bytes, bytes]:
    body = json.dumps({"model": SMOL, "messages": [{"role": "user", "content": text}]})
    response = json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": answer}}]})
    return body.encode(), response.encode()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_erasure_is_recorded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    erased = {"document_id": "d1", "library_id": "l1", "chunks": 12, "bytes": 3456}
    log.submit({**_event(T0, note={"erased": erased}), "method": "DELETE",
                "route": "/v1/libraries/{library_id}/documents/{document_id}", "status": 204})
    log.submit(_event(T0))
    log.close()
    deleted, other = _records(tmp_path / "audit" / "audit-2026-03-10.jsonl")
    assert deleted["erased"] == erased and deleted["status"] == 204
    assert "erased" not in other


def test_retention_at_start_and_daily(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    for day in ("2026-01-01", "2026-02-07", "2026-02-08", "2026-03-09"):
        (folder / f"audit-{day}.jsonl").write_text(json.dumps({"ts": f"{day}T00:00:00Z"}) + "\n")
    (folder / "notes.txt").write_text("not an audit file")
    now = [T0]
    log = AuditLog(folder, retention_days=30, clock=lambda: now[0])
    # at start: days before 2026-02-08 (= 2026-03-10 - 30 days) are deleted
    deadline = time.monotonic() + 10
    while (folder / "audit-2026-02-07.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("audit-"))
    assert names == ["audit-2026-02-08.jsonl", "audit-2026-03-09.jsonl",
                     "audit-2026-03-10.jsonl"]
    assert (folder / "notes.txt").exists()
    # a day later, the next record makes the writer apply it again
    now[0] = T0 + DAY
    log.submit(_event(T0 + DAY))
    log.close()
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("audit-"))
    assert names == ["audit-2026-03-09.jsonl", "audit-2026-03-10.jsonl",
                     "audit-2026-03-11.jsonl"]


def test_prune_single_file_keeps_recent_lines_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path=path)
    for days_ago in (40, 31, 30, 2, 0):
        log.submit(_event(T0 - days_ago * DAY))
    log.close()
    result = prune(path, older_than_days=30, now=T0, dry_run=True)
    assert (result.records, result.files) == (2, 1) and len(_records(path)) == 5
    result = prune(path, older_than_days=30, now=T0)
    assert result.describe(dry_run=False) == "Deleted 2 records in 1 file (of 1 searched)."
    assert [r["ts"][:10] for r in _records(path)] == [
        "2026-02-08", "2026-03-08", "2026-03-10"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _filled_log(folder: Path) -> None:
    log = AuditLog(folder, content=True, clock=lambda: T0)
    log.submit(_event(T0 - DAY, note={"key_id": "k-alice"},
                      **dict(zip(("body", "response"), _chat("Je suis Marie Curie.")))))
    log.submit(_event(T0 - DAY, note={"key_id": "k-bob"},
                      **dict(zip(("body", "response"), _chat("Le temps à Paris ?")))))
    log.submit(_event(T0, note={"key_id": "k-bob"}, **dict(zip(
        ("body", "response"), _chat("Bonjour", "Vous parlez de MARIE CURIE.")))))
    log.submit(_event(T0, note={"key_id": "k-alice"},
                      **dict(zip(("body", "response"), _chat("Autre chose.")))))
    log.close()


def test_erase_by_text_and_by_key(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    _filled_log(folder)
    files = sorted(folder.glob("audit-*.jsonl"))
    before = {p: p.read_text() for p in files}
    result = erase(folder, match="marie curie", now=T0, dry_run=True)
    assert (result.records, result.files, result.searched) == (2, 2, 2)
    assert {p: p.read_text() for p in files} == before  # a dry run changes nothing
    result = erase(folder, match="marie curie", now=T0)
    assert result.describe(dry_run=False) == \
        "Erased the content of 2 records in 2 files (of 2 searched)."
    recs = [r for p in files for r in _records(p)]
    assert "Curie" not in "".join(p.read_text() for p in files)
    marker = "[ERASED 2026-03-10]"
    assert [(r["key_id"], r["request"] == marker, r["response"] == marker) for r in recs] == [
        ("k-alice", True, True), ("k-bob", False, False),
        ("k-bob", True, True), ("k-alice", False, False)]
    # the metadata of erased records stays: who called what, when, with what result
    assert all(r["route"] == CHAT and r["status"] == 200 and r["ts"] for r in recs)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    # again: nothing left to erase; by key: only what is not erased yet
    assert erase(folder, match="marie curie", now=T0).records == 0
    assert erase(folder, key_id="k-alice", now=T0).records == 1
    assert erase(folder, key_id="k-alice", match="paris", now=T0).records == 0
    with pytest.raises(ValueError):
        erase(folder)


def test_content_expires_before_the_metadata(tmp_path: Path) -> None:
    """--audit-content-retention-days: the texts of days past the content retention become
    "[EXPIRED <date>]" (at start, by the writer) while every record and its metadata stays;
    recent days are untouched; `souverain audit prune --content-only` does the same by hand."""
    folder = tmp_path / "audit"
    _filled_log(folder)  # two records on T0 - 1 day, two on T0
    old, today = sorted(folder.glob("audit-*.jsonl"))
    assert expire_content(folder, older_than_days=1, now=T0).records == 0  # T0-1 is kept
    result = expire_content(folder, older_than_days=0, now=T0, dry_run=True)
    assert (result.records, result.files, result.searched) == (2, 1, 1)
    assert "Curie" in old.read_text()
    # the writer applies it at start: content older than 0 days = every day before T0
    log = AuditLog(folder, content=True, content_retention_days=0, clock=lambda: T0)
    log.close()
    assert "Curie" in old.read_text()  # 0 keeps the texts
    log = AuditLog(folder, content=True, content_retention_days=1, clock=lambda: T0 + DAY)
    deadline = time.monotonic() + 10
    while "Curie" in old.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    log.close()
    recs = _records(old)
    marker = "[EXPIRED 2026-03-11]"
    assert [(r["key_id"], r["request"], r["response"]) for r in recs] == [
        ("k-alice", marker, marker), ("k-bob", marker, marker)]
    assert all(r["route"] == CHAT and r["status"] == 200 for r in recs)
    assert "CURIE" in today.read_text()  # within the retention: untouched
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    # an erased record is not "expired" again, and nothing is counted twice
    assert expire_content(folder, older_than_days=1, now=T0 + DAY).records == 0
    r = _souverain("audit", "prune", "--data-dir", str(tmp_path), "--older-than-days", "0",
                   "--content-only")
    assert r.returncode == 0, r.stderr
    assert "Expired the content of 2 records in 1 file" in r.stdout, r.stdout
    assert "CURIE" not in today.read_text() and len(_records(today)) == 2


def test_erase_while_the_server_writes_loses_no_line(tmp_path: Path) -> None:
    """A writer appending to today's file all along: every record it wrote is there after
    repeated erasures (the writer reopens the replaced file; the lock orders the two)."""
    folder = tmp_path / "audit"
    log = AuditLog(folder, content=True)
    body, response = _chat("Je suis Marie Curie.")
    n = 400
    done = threading.Event()

    def write() -> None:
        for i in range(n):
            log.submit(_event(time.time(), note={"request_id": f"req-{i}"}, body=body,
                              response=response))
            if i % 50 == 0:
                time.sleep(0.01)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    erased = 0
    while not done.is_set() or erased == 0:
        erased += erase(folder, match="curie").records
    writer.join()
    log.close()
    erased += erase(folder, match="curie").records
    recs = [r for p in sorted(folder.glob("audit-*.jsonl")) for r in _records(p)]
    assert sorted(r["request_id"] for r in recs) == sorted(f"req-{i}" for i in range(n))
    assert erased == n and all(r["request"].startswith("[ERASED ") for r in recs)


def _souverain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "souverain.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_audit_erase_and_prune(tmp_path: Path) -> None:
    _filled_log(tmp_path / "audit")
    r = _souverain("audit", "erase", "--data-dir", str(tmp_path), "--match", "Marie Curie",
                   "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Would erase the content of 2 records in 2 files (of 2 searched)."
    r = _souverain("audit", "erase", "--data-dir", str(tmp_path), "--key-id", "k-bob")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Erased the content of 2 records in 2 files (of 2 searched)."
    r = _souverain("audit", "prune", "--data-dir", str(tmp_path), "--older-than-days", "0")
    assert r.returncode == 0, r.stderr
    assert "Deleted" in r.stdout and "in 2 files" in r.stdout  # both days are before today
    assert not list((tmp_path / "audit").glob("audit-*.jsonl"))
    # user errors: one sentence, exit 2
    for args, needle in [(("erase", "--data-dir", str(tmp_path)), "--match TEXT, --key-id"),
                         (("erase", "--data-dir", str(tmp_path / "nowhere"), "--match", "x"),
                          "No audit log folder"),
                         (("prune", "--audit-log", str(tmp_path / "no.jsonl"),
                           "--older-than-days", "3"), "No audit log file"),
                         (("prune", "--data-dir", str(tmp_path), "--older-than-days", "-1"),
                          "")]:
        r = _souverain("audit", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_server_keeps_secrets_out_of_logs_and_records_erasure(keys: dict,
                                                               tmp_path: Path) -> None:
    """The exact requests of issue 15: a key in the URL (refused, and redacted in uvicorn's
    access log), a key pasted in a message with --audit-content ([SECRET] in the audit log),
    and a deleted file (its erasure on record)."""
    srv = ServerProcess(SMOL, "--lazy", "--no-libraries", "--embed-model", "none",
                        "--api-keys-file", str(keys["path"]), "--data-dir", str(tmp_path),
                        "--audit-content", "--audit-retention-days", "7")
    auth = {"Authorization": f"Bearer {keys['key']}"}
    pasted = f"Here is my key {keys['key']} and my AWS one AKIAIOSFODNN7EXAMPLE, keep them."
    try:
        for query in (f"api_key={keys['key']}", f"key={keys['key']}", "access_token=abc123XYZ"):
            r = httpx.get(f"{srv.url}/v1/models?{query}", timeout=30)
            assert r.status_code == 401, r.text
            err = r.json()
            assert err["code"] == "api_key_in_url" and "Authorization: Bearer" in err["message"]
        # refused even with a valid header: the key in the URL has leaked into logs already
        r = httpx.get(f"{srv.url}/v1/models?api_key={keys['key']}", headers=auth, timeout=30)
        assert r.status_code == 401 and r.json()["param"] == "api_key", r.text
        r = httpx.get(f"{srv.url}/v1/models?limit=3", headers=auth, timeout=30)
        assert r.status_code == 200, r.text  # an ordinary query is fine
        r = httpx.post(srv.url + CHAT, headers=auth, timeout=60, json={
            "model": "nope", "messages": [{"role": "user", "content": pasted}]})
        assert r.status_code == 404, r.text
        line = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello!"}]})
        r = httpx.post(srv.url + "/v1/files", headers=auth, timeout=60,
                       files={"file": ("train.jsonl", (line + "\n").encode())},
                       data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = httpx.delete(f"{srv.url}/v1/files/{file_id}", headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["deleted"], r.text
    finally:
        assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert keys["key"] not in log and "abc123XYZ" not in log
    assert "/v1/models?api_key=[SECRET]" in log and "access_token=[SECRET]" in log
    assert "GET /v1/models?limit=3" in log
    (path,) = (tmp_path / "audit").glob("audit-*.jsonl")
    text = path.read_text()
    assert keys["key"] not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    got = by_route_status([json.loads(line) for line in text.splitlines()])
    (chat,) = got[(CHAT, 404)]
    assert chat["request"]["messages"][0]["content"] == \
        "Here is my key [SECRET] and my AWS one [SECRET], keep them."
    (deleted,) = got[("/v1/files/{file_id}", 200)]
    assert deleted["method"] == "DELETE" and deleted["erased"]["file_id"] == file_id
    assert len(got[("/v1/models", 401)]) == 4


def test_refused_bodies_are_logged_as_strict_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", content=True, clock=lambda: T0)
    for body in (b'{"model": "m", "temperature": NaN, "x": 1e999}', b"[" * 5000 + b"]" * 5000,
                 b'{"model": "\xff", "k": "sk-sov-' + b"a1" * 22 + b'"}'):
        log.submit(_event(T0, body=body))
    log.close()
    lines = (tmp_path / "audit" / "audit-2026-03-10.jsonl").read_text().splitlines()
    assert len(lines) == 3

    def refuse(literal: str) -> None:
        raise AssertionError(literal)

    recs = [json.loads(line, parse_constant=refuse) for line in lines]
    assert recs[0]["request"] == '{"model": "m", "temperature": NaN, "x": 1e999}'
    assert recs[1]["request"].startswith("[[[")
    assert recs[2]["request"] == '{"model": "\ufffd", "k": "[SECRET]"}'
