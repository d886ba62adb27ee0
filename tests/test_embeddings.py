"""``POST /v1/embeddings`` on a real `souverain serve`, through the official SDKs.

Golden reference: sentence-transformers' own ``encode(normalize_embeddings=True)`` of the
bundled all-MiniLM-L6-v2; token counts: the model's tokenizer with special tokens.
"""

from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import pytest
from server_utils import ServerProcess

from souverain.rag.embed import bundled_model_path

mistralai = pytest.importorskip("mistralai")
openai = pytest.importorskip("openai")
from mistralai.client import Mistral

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "La tour Eiffel se trouve à Paris.",
    "Photosynthesis turns light into chemical energy.",
    "émojis 🚀 and ünïcödé",
]
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess("smollm2-135m-instruct", "--lazy", "--no-libraries",
                        "--data-dir", str(tmp_path_factory.mktemp("home")))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    return model


def expected(reference, texts: list[str]) -> tuple[np.ndarray, int]:
    vecs = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    tokens = sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])
    return vecs, tokens


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, cos


def test_mistralai_sdk(server: ServerProcess, reference) -> None:
    client = Mistral(api_key="unused-on-loopback", server_url=server.url)
    r = client.embeddings.create(model="mistral-embed", inputs=TEXTS)
    want, tokens = expected(reference, TEXTS)
    assert r.object == "list" and r.model == "mistral-embed" and r.id
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert all(d.object == "embedding" for d in r.data)
    assert_close(np.array([d.embedding for d in r.data], dtype=np.float32), want)
    assert r.usage.prompt_tokens == tokens == r.usage.total_tokens

    one = client.embeddings.create(model="souverain-embed", inputs=TEXTS[0],
                                   output_dimension=384, output_dtype="float")
    assert len(one.data) == 1
    assert_close(np.array([one.data[0].embedding], dtype=np.float32), want[:1])


def test_openai_sdk_base64(server: ServerProcess, reference) -> None:
    client = openai.OpenAI(api_key="unused-on-loopback", base_url=server.url + "/v1")
    want, tokens = expected(reference, TEXTS)
    # explicit base64: the SDK hands back the string, little-endian float32
    r = client.embeddings.create(model="souverain-embed", input=TEXTS, encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data])
    assert_close(got, want)
    assert r.usage.prompt_tokens == tokens == r.usage.total_tokens
    # the SDK's default: it asks for base64 itself and decodes to floats
    r = client.embeddings.create(model="mistral-embed", input=TEXTS[2], dimensions=384)
    assert_close(np.array([r.data[0].embedding], dtype=np.float32), want[2:3])
    with pytest.raises(openai.BadRequestError, match="384 dimensions"):
        client.embeddings.create(model="mistral-embed", input="x", dimensions=256)


def test_models_list_the_embedding_model(server: ServerProcess) -> None:
    cards = {c["id"]: c for c in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
    card = cards["souverain-embed"]
    assert card["aliases"] == ["mistral-embed"] and card["capabilities"]["embeddings"]
    assert not card["capabilities"]["completion_chat"] and card["max_context_length"] == 256
    assert not cards["smollm2-135m-instruct"]["capabilities"]["embeddings"]
    r = httpx.get(server.url + "/v1/models/mistral-embed", timeout=30)
    assert r.status_code == 200 and r.json()["capabilities"]["embeddings"]


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["object"] == "error" and body["message"].endswith("."), body
    return body["message"]


@pytest.mark.parametrize("body,status,words", [
    ({"input": ""}, 400, "input[0] is empty"),
    ({"input": ["ok", "  "]}, 400, "input[1] is empty"),
    ({"input": []}, 400, "empty list"),
    ({"input": "word " * 300}, 400, "at most 256"),
    ({"input": "x", "output_dimension": 1024}, 400, "384 dimensions"),
    ({"input": "x", "output_dtype": "int8"}, 400, "output_dtype 'int8'"),
    ({"input": ["x"] * 513}, 400, "at most 512"),
    ({"input": [[101, 102]]}, 400, "token ids"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "not served here"),
    ({"input": "x", "encoding_format": "hex"}, 422, "encoding_format"),
    ({"input": "x", "colour": "red"}, 422, "colour"),
])
def test_bad_requests(server: ServerProcess, body: dict, status: int, words: str) -> None:
    r = httpx.post(server.url + EMBED, json={"model": "mistral-embed", **body}, timeout=60)
    assert words in error(r, status)


def test_the_event_loop_stays_free(server: ServerProcess) -> None:
    """A 512-text batch runs on a worker thread: /health answers meanwhile."""
    texts = [f"sentence number {i} about the weather in Lyon and Marseille" for i in range(512)]
    out: dict = {}

    def big() -> None:
        out["r"] = httpx.post(server.url + EMBED, json={"model": "mistral-embed", "input": texts},
                              timeout=300)

    t = threading.Thread(target=big)
    t.start()
    worst = 0.0
    while t.is_alive():
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    t.join()
    assert out["r"].status_code == 200 and len(out["r"].json()["data"]) == 512
    assert worst < 2.0, worst


def test_embed_model_none() -> None:
    srv = ServerProcess("smollm2-135m-instruct", "--lazy", "--no-libraries", "--no-audit",
                        "--embed-model", "none")
    try:
        ids = [c["id"] for c in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]]
        assert ids == ["smollm2-135m-instruct", "mistral-moderation-latest"]
        r = httpx.post(srv.url + EMBED, json={"model": "mistral-embed", "input": "x"}, timeout=30)
        assert "--embed-model none" in error(r, 404)
    finally:
        assert srv.stop() == 0, srv.log()
