"""The whole on-premises flow, run by tests/test_sovereign_namespace.py inside a network
namespace that has only a loopback interface (``unshare --net``): no route to anywhere, so
any attempt to reach the network fails at the kernel, whatever library makes it.

Usage: python tests/offline_flow.py WORKDIR. Exits 0 when every step passed; prints one line
per step.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rag_docs import HANDBOOK_MD, make_pdf  # noqa: E402
from server_utils import ServerProcess  # noqa: E402


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2: SIOCGIFFLAGS / SIOCSIFFLAGS."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, ifr))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


def step(name: str) -> None:
    print(f"ok {name}", flush=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "souverain.cli", *args], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"souverain {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def main(work: Path) -> None:
    loopback_up()
    ifaces = sorted(name for _, name in socket.if_nameindex())
    assert ifaces == ["lo"], ifaces
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=3).close()
        raise SystemExit("reached 1.1.1.1: this is not an isolated namespace")
    except OSError:
        pass
    step(f"namespace has only {ifaces}; the internet is unreachable")

    os.environ["SOUVERAIN_HOME"] = str(work / "home")
    docs = work / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "handbook.md").write_text(HANDBOOK_MD)
    (docs / "travel.pdf").write_bytes(make_pdf([
        "Travel policy. Trips are booked through the travel desk.",
        "The per diem for a business trip to Lyon is 87 euros."]))

    cli("library", "create", "policies")
    cli("library", "add", "policies", str(docs))
    step("library create + add (md, pdf)")
    r = cli("ask", "policies", "What is the notice period for a senior engineer?", "--json",
            "--max-tokens", "32")
    answer = json.loads(r.stdout)
    assert answer["found"] and answer["references"][0]["document_name"].endswith("handbook.md"), \
        answer
    step("ask cites handbook.md")

    srv = ServerProcess("smollm2-135m-instruct", "--name", "smollm2", "--kv-cache-gib", "0.25")
    try:
        import httpx

        httpx = httpx.Client(timeout=120)  # a busy CI machine: nothing here is latency-bound
        lib = httpx.get(srv.url + "/v1/libraries").json()["data"][0]
        assert lib["name"] == "policies" and lib["nb_documents"] == 2, lib
        up = httpx.post(f"{srv.url}/v1/libraries/{lib['id']}/documents",
                        files={"file": ("leave.md", b"# Leave\n\nParental leave is 16 weeks, "
                                                    b"fully paid, for every parent.")}).json()
        deadline = time.monotonic() + 120
        while httpx.get(f"{srv.url}/v1/libraries/{lib['id']}/documents/{up['id']}/status"
                        ).json()["process_status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": "How long is parental leave?"}],
            "tools": [{"type": "document_library", "library_ids": [lib["id"]]}]}).json()
        refs = body["choices"][0]["message"]["references"]
        assert refs and refs[0]["document_name"] == "leave.md", body
        emb = httpx.post(srv.url + "/v1/embeddings", json={"model": "mistral-embed",
                                                           "input": ["on premises"]}).json()
        assert len(emb["data"][0]["embedding"]) == 384
        step("serve: upload, grounded chat, embeddings")
    finally:
        assert srv.stop() == 0, srv.log()
    step("all")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
