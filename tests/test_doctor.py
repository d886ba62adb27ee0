"""`souverain doctor`: no egress by default (exit 0); a proxy, a hub endpoint or the hub turned
back online is reported with the sentence that turns it off (exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from souverain import doctor, offline

QUIET = {k: v for k, v in os.environ.items()
         if k.upper() not in (*doctor.PROXIES, "HF_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")}


def run_doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "souverain.cli", "doctor", *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def test_importing_souverain_turns_everything_off() -> None:
    for k, v in {**offline.TELEMETRY_OFF, **offline.OFFLINE}.items():
        assert os.environ.get(k) == v or offline.USER_ENV.get(k) is not None, k
    import huggingface_hub.constants as hf

    assert hf.HF_HUB_OFFLINE and hf.HF_HUB_DISABLE_TELEMETRY


def test_findings_default_env() -> None:
    env = {**QUIET, **offline.TELEMETRY_OFF, **offline.OFFLINE}
    findings = doctor.egress_findings(env)
    assert not [f for f in findings if f.egress], findings
    names = " ".join(f.name for f in findings)
    for what in ("Hugging Face hub", "proxies", "telemetry", "bind address", "API keys"):
        assert what in names


@pytest.mark.parametrize("extra,name,fix", [
    ({"HTTPS_PROXY": "http://user:secret@proxy:3128"}, "proxy HTTPS_PROXY", "Unset HTTPS_PROXY"),
    ({"http_proxy": "http://proxy:3128"}, "proxy http_proxy", "Unset http_proxy"),
    ({"HF_ENDPOINT": "https://mirror.example"}, "HF_ENDPOINT", "Unset HF_ENDPOINT"),
    ({"HF_HUB_OFFLINE": "0"}, "Hugging Face hub", "HF_HUB_OFFLINE=1"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"}, "OpenTelemetry", "Unset OTEL"),
    ({"LANGSMITH_TRACING": "true"}, "LangChain", "Unset LANGSMITH_TRACING"),
])
def test_findings_egress(extra: dict, name: str, fix: str) -> None:
    env = {**QUIET, **offline.TELEMETRY_OFF, **offline.OFFLINE, **extra}
    bad = [f for f in doctor.egress_findings(env) if f.egress]
    assert len(bad) == 1 and name in bad[0].name and fix in bad[0].fix, bad
    assert "secret" not in bad[0].state


def test_cli_json_no_egress(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "audit-2026-01-01.jsonl").write_text("x" * 2048)
    r = run_doctor("--json", env={**QUIET, "SOUVERAIN_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["egress"] is False
    data = {d["name"]: d for d in report["data"]}
    assert data["audit logs"]["path"] == str(tmp_path / "audit")
    assert data["audit logs"]["bytes"] == 2048
    assert data["bundled embedding model"]["bytes"] > 80e6
    assert report["versions"]["souverain"] and report["versions"]["torch"]


def test_cli_proxy_is_egress() -> None:
    r = run_doctor(env={**QUIET, "HTTPS_PROXY": "http://proxy.example:3128"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "egress: proxy HTTPS_PROXY" in r.stderr and "Unset HTTPS_PROXY" in r.stderr
    assert "network egress" in r.stdout and "data on this machine" in r.stdout
