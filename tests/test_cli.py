"""The `souverain` command line: `keys add|list|revoke` through the real CLI (the printed key
authenticates against the file's hash, list shows no secret, revoke removes, bad input -> exit
2 and one sentence), and the cheap paths (`import souverain.cli`, `--help`, `keys`, `doctor`)
never importing torch, the engine, FastAPI or the RAG stack."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from souverain.cli import app
from souverain.server.auth import APIKeys

HEAVY = ("torch", "souverain.engine", "souverain.llm", "souverain.kernels",
         "souverain.server.app", "fastapi", "uvicorn", "sentence_transformers", "lancedb")

# runs `souverain ARGS...` in this process, then names the heavy modules it imported
CHECK_IMPORTS = f"""
import sys
from souverain.cli import main
sys.argv = ["souverain", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""

KEY = re.compile(r"sk-sov-\S+")


def souverain(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *args], capture_output=True,
                          text=True, timeout=300, check=False, cwd=cwd)


def invoke(*args: str):  # the real CLI in this process (CliRunner)
    return CliRunner().invoke(app, list(args))


def one_sentence_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def add(file: Path, name: str, *extra: str) -> str:
    r = invoke("keys", "add", str(file), name, *extra)
    assert r.exit_code == 0, r.output
    assert f"for {name} added to {file}" in r.stderr
    keys = KEY.findall(r.stdout)
    assert len(keys) == 1, r.stdout
    return keys[0]


# -- cheap imports ------------------------------------------------------------------------------
def test_import_is_torch_free() -> None:
    r = subprocess.run([sys.executable, "-c", "import souverain, souverain.cli, sys; "
                        "assert 'torch' not in sys.modules, 'torch imported'"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr


def test_help_keys_and_doctor_import_nothing_heavy(tmp_path: Path) -> None:
    runs = [("--help",), ("keys", "add", "k.txt", "alice"), ("keys", "list", "k.txt"),
            ("keys", "revoke", "k.txt", "alice"), ("doctor",), ("doctor", "--json")]
    for args in runs:
        r = souverain(*args, cwd=tmp_path)
        assert r.returncode in (0, 1), (args, r.returncode, r.stderr)  # doctor: 1 = egress
        assert r.stderr.splitlines()[-1] == "HEAVY=", (args, r.stderr)
    assert "alice" not in (tmp_path / "k.txt").read_text()  # the keys runs did their work


# -- keys add -----------------------------------------------------------------------------------
def test_keys_add_prints_a_key_that_matches_the_stored_hash(tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    key = add(file, "alice")
    text = file.read_text()
    assert key not in text  # only its hash
    assert f"sha256:{hashlib.sha256(key.encode()).hexdigest()}" in text
    assert file.stat().st_mode & 0o777 == 0o600
    who = APIKeys.from_file(file).authenticate(f"Bearer {key}")
    assert who.name == "alice" and who.models is None


def test_keys_add_with_models_restricts_the_key(tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    key = add(file, "bob", "--models", "small,large")
    who = APIKeys.from_file(file).authenticate(f"Bearer {key}")
    assert who.models == frozenset({"small", "large"})
    assert who.allows("small") and not who.allows("other")


def test_keys_add_same_name_twice_adds_a_second_key(tmp_path: Path) -> None:
    # a name may hold several keys (rotation); revoking the name removes them all
    file = tmp_path / "keys.txt"
    first, second = add(file, "alice"), add(file, "alice")
    keys = APIKeys.from_file(file)
    assert first != second and len(keys) == 2
    assert {keys.authenticate(f"Bearer {k}").name for k in (first, second)} == {"alice"}
    assert invoke("keys", "revoke", str(file), "alice").exit_code == 0
    assert len(APIKeys.from_file(file)) == 0


@pytest.mark.parametrize("name,extra,says", [
    ("bad name", (), "key name 'bad name'"),
    ("#alice", (), "key name '#alice'"),
    ("carol", ("--models", "a,,b"), "Model id ''"),
])
def test_keys_add_refuses_bad_input(tmp_path: Path, name: str, extra: tuple[str, ...],
                                    says: str) -> None:
    file = tmp_path / "keys.txt"
    assert says in one_sentence_error(invoke("keys", "add", str(file), name, *extra))
    assert not file.exists() or not KEY.search(file.read_text())


# -- keys list ----------------------------------------------------------------------------------
def test_keys_list_shows_ids_names_and_models_never_secrets(tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    alice, bob = add(file, "alice"), add(file, "bob", "--models", "small,large")
    r = invoke("keys", "list", str(file))
    assert r.exit_code == 0, r.output
    rows = r.stdout.strip().splitlines()
    ids = {k.key_id: k.name for k in APIKeys.from_file(file).keys}
    assert [row.split()[1] for row in rows] == ["alice", "bob"]
    assert {row.split()[0] for row in rows} == set(ids)
    assert rows[0].endswith("all models") and rows[1].endswith("large,small")
    for key in (alice, bob):
        assert key not in r.output
        assert hashlib.sha256(key.encode()).hexdigest() not in r.output


def test_keys_list_missing_file(tmp_path: Path) -> None:
    line = one_sentence_error(invoke("keys", "list", str(tmp_path / "nope.txt")))
    assert "does not exist" in line and "souverain keys add" in line


# -- keys revoke --------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["id", "name"])
def test_keys_revoke_removes_the_key(tmp_path: Path, by: str) -> None:
    file = tmp_path / "keys.txt"
    alice, bob = add(file, "alice"), add(file, "bob")
    keys = APIKeys.from_file(file)
    alice_id = keys.authenticate(f"Bearer {alice}").key_id
    r = invoke("keys", "revoke", str(file), alice_id if by == "id" else "alice")
    assert r.exit_code == 0 and "revoked" in r.stderr, r.output
    keys = APIKeys.from_file(file)
    assert [k.name for k in keys.keys] == ["bob"]
    assert keys.authenticate(f"Bearer {bob}").name == "bob"
    with pytest.raises(Exception, match="Invalid or revoked"):
        keys.authenticate(f"Bearer {alice}")
    assert "alice" not in invoke("keys", "list", str(file)).stdout


def test_keys_revoke_unknown_name(tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    add(file, "alice")
    before = file.read_text()
    line = one_sentence_error(invoke("keys", "revoke", str(file), "mallory"))
    assert "no key with id or name 'mallory'" in line
    assert file.read_text() == before


def test_keys_revoke_missing_file(tmp_path: Path) -> None:
    line = one_sentence_error(invoke("keys", "revoke", str(tmp_path / "nope.txt"), "alice"))
    assert "does not exist" in line


# -- output to a pipe -----------------------------------------------------------------------------
def _long_dir(tmp_path: Path) -> Path:
    path = tmp_path / ("a-folder-name-long-enough-to-overflow-eighty-columns-" * 3) / "data"
    path.mkdir(parents=True)
    return path


def _piped(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`souverain ARGS...` with stdout and stderr to pipes, no terminal, no COLUMNS."""
    clean = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "souverain.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
                          env={**clean, **(env or {})})


def test_piped_tables_keep_whole_paths(tmp_path: Path) -> None:
    home = _long_dir(tmp_path)
    assert len(str(home)) > 200
    r = _piped("doctor", env={"SOUVERAIN_HOME": str(home)})
    assert r.returncode in (0, 1), r.stderr
    rows = [line for line in r.stdout.splitlines() if "document libraries" in line
            and "writes" in line]  # the data table's row
    assert len(rows) == 1 and str(home / "libraries") in rows[0], r.stdout
    # COLUMNS still sets a width (rich then wraps the cell over lines)
    narrow = _piped("doctor", env={"SOUVERAIN_HOME": str(home), "COLUMNS": "80"})
    assert str(home / "libraries") not in narrow.stdout
    assert max(map(len, narrow.stdout.splitlines())) <= 80


def test_piped_finetune_validate_table_keeps_the_path(tmp_path: Path) -> None:
    data = _long_dir(tmp_path) / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]})
                    + "\n")
    r = _piped("finetune", "validate", str(data), "--no-estimate")
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if "train.jsonl" in line]
    assert len(row) == 1 and str(data) in row[0], r.stdout


def test_library_commands_show_no_third_party_progress_bar(tmp_path: Path) -> None:
    """transformers' tqdm ``Loading weights`` bar (drawn whenever the embedder loads) never
    reaches souverain's output."""
    doc = tmp_path / "paris.txt"
    doc.write_text("The capital of France is Paris. It lies on the Seine.\n")
    home = {"SOUVERAIN_HOME": str(tmp_path / "home")}
    runs = [("library", "create", "geo"), ("library", "add", "geo", str(doc)),
            ("library", "search", "geo", "capital of France")]
    for args in runs:
        r = _piped(*args, env=home)
        assert r.returncode == 0, (args, r.stderr)
        both = r.stdout + r.stderr
        assert "Loading weights" not in both and "it/s]" not in both, (args, both)
        assert not re.search(r"\d+%\|", both), (args, both)
    assert "paris.txt" in r.stdout and "capital of France is Paris" in r.stdout
