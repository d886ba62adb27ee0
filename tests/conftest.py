"""Shared pytest fixtures.

Tiny random reference checkpoints (see ``tests/checkpoints.py``): built once per session with
transformers, seeded, float32, written in every format souverain reads.

No egress: the whole suite runs with souverain's socket guard (only loopback and Unix sockets),
installed here before any test module is imported, and ``SOUVERAIN_TEST_NO_EGRESS=1`` in the
environment so that every process the tests start (``souverain serve`` ...) installs it too.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # `import checkpoints` also under --import-mode=importlib
    sys.path.insert(0, str(_TESTS_DIR))

from checkpoints import build_tiny_checkpoint

from souverain import offline

os.environ["SOUVERAIN_TEST_NO_EGRESS"] = "1"
# what the tests write (libraries, audit logs) goes to a throw-away home, never the user's
os.environ["SOUVERAIN_HOME"] = tempfile.mkdtemp(prefix="souverain-test-home-")
# ... and every `ServerProcess` started without a data folder of its own gets a fresh one
# (server_utils.py): one server per data folder is the rule `souverain serve` enforces
os.environ["SOUVERAIN_TEST_SHARED_HOME"] = os.environ["SOUVERAIN_HOME"]
offline.force_offline()
offline.install_socket_guard()


@pytest.fixture(scope="session", autouse=True)
def no_egress() -> None:
    """The guard stays on for the whole session (a test that lifts it must put it back)."""
    offline.install_socket_guard()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if offline.attempts:
        terminalreporter.section("no-egress guard")
        for a in offline.attempts:
            terminalreporter.write_line(f"blocked {a}")


def _build(tmp_path_factory: pytest.TempPathFactory, name: str) -> dict:
    return build_tiny_checkpoint(name, tmp_path_factory.mktemp(f"tiny-{name}"))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MistralForCausalLM: 3 layers, head_dim 32 != 64/4, GQA 4/2, sliding_window 6, untied."""
    return _build(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MixtralForCausalLM: 2 layers, 4 experts top-2, GQA 4/2, no window, untied."""
    return _build(tmp_path_factory, "mixtral")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LlamaForCausalLM: 2 layers, GQA 4/1, rope_theta 1e4, eps 1e-6, tied embeddings."""
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_models(tiny_mistral: dict, tiny_mixtral: dict, tiny_llama: dict) -> dict[str, dict]:
    """``{"mistral" | "mixtral" | "llama": {"hf", "consolidated", "pth", "gguf_f32", "gguf_f16",
    "gguf_q8_0": Path, "args": params.json dict, "tokenizer": Path, "spec": TinySpec}}``.

    ``hf``/``consolidated``/``pth`` are folders; ``gguf_*`` are files (all three in one folder).
    Compare against ``checkpoints.hf_reference_logits(entry["hf"], ids)`` / ``hf_greedy``."""
    return {"mistral": tiny_mistral, "mixtral": tiny_mixtral, "llama": tiny_llama}


# -- PostgreSQL: a real cluster, started by the project's own script ---------------------------
def _pg_binaries() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL cluster of the test module's own (scripts/postgres.sh on a free port): its
    SQLAlchemy URL. Skipped, saying how to install it, where the binaries are missing."""
    if not _pg_binaries():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed; "
                    "scripts/postgres.sh installs the postgresql package and starts a cluster")
    d = tmp_path_factory.mktemp("pg")
    script = str(Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh")
    out = subprocess.run([script, "start", str(d)], capture_output=True, text=True,
                         env={**os.environ, "SOUVERAIN_PG_NO_INSTALL": "1"}, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    yield out.stdout.strip().splitlines()[-1]
    subprocess.run([script, "stop", str(d)], capture_output=True, timeout=60, check=False)
