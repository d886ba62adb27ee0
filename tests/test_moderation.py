"""Moderation: the PII detectors (valid and invalid check digits per identifier), the category
sets against the official SDK's models, Llama Guard's code map, and ``/v1/moderations`` +
``/v1/chat/moderations`` through the official `mistralai` SDK against a real `souverain serve`
(the bundled smollm2 as judge), with its /v1/models card, /metrics and audit records."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch
from mistralai.client import Mistral
from mistralai.client.models import (
    ModerationLlmv1CategoryThresholds,
    ModerationLlmv2CategoryThresholds,
    ModerationResponse,
)

from souverain import pii
from souverain.engine.async_engine import AsyncLLMEngine
from souverain.llm import LLM
from souverain.moderation.categories import DESCRIPTIONS, SCORED, V1, V2, for_version
from souverain.moderation.judge import (
    LLAMA_GUARD_CODES,
    JudgeBackend,
    LlamaGuardBackend,
    is_llama_guard,
)
from souverain.redact import redact
from tests.server_utils import ServerProcess

SMOL = "smollm2-135m-instruct"


# -- PII detectors ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,valid,invalid", [
    (pii.EMAIL, "jean.dupont@example.com", "jean.dupont@example"),
    (pii.PHONE, "+33 6 12 34 56 78", "+33 6"),
    (pii.PHONE, "06 12 34 56 78", "06 12 34 56"),
    (pii.IBAN, "FR76 3000 6000 0112 3456 7890 189", "FR76 3000 6000 0112 3456 7890 188"),
    (pii.IBAN, "DE89370400440532013000", "DE89370400440532013001"),
    (pii.CARD, "4111 1111 1111 1111", "4111 1111 1111 1112"),
    (pii.FR_NIR, "1 85 05 78 006 084 91", "1 85 05 78 006 084 92"),
    (pii.FR_NIR, "185052A00608435", "185052A00608436"),  # Corsica: 2A counts as 19
    (pii.US_SSN, "123-45-6789", "666-45-6789"),
    (pii.US_SSN, "123 45 6789", "123-00-6789"),
    (pii.UK_NINO, "AB 12 34 56 C", "GB 12 34 56 C"),
    (pii.UK_NINO, "JG123456A", "DA123456A"),  # D is never a first letter
    (pii.DE_STEUER_ID, "86095742719", "86095742718"),
    (pii.DE_STEUER_ID, "65 929 970 489", "65 929 970 488"),
    (pii.IP, "192.168.10.24", "192.168.10.256"),
    (pii.IP, "2001:db8::8a2e:370:7334", "2001:db8::8a2e::7334"),
])
def test_detector_accepts_valid_and_refuses_invalid(kind: str, valid: str, invalid: str) -> None:
    found = pii.find_pii(f"see {valid} here")
    assert [(m.kind, m.text) for m in found] == [(kind, valid)]
    assert kind not in pii.pii_kinds(f"see {invalid} here")


def test_check_digit_functions() -> None:
    assert pii.nir_ok("185057800608491") and not pii.nir_ok("185057800608490")
    assert not pii.nir_ok("185137800608400")  # month 13 does not exist
    assert pii.steuer_id_ok("12345678995")
    assert not pii.steuer_id_ok("12345678905")  # no repeated digit among the first ten
    assert not pii.steuer_id_ok("02345678995")  # a leading 0
    assert pii.ssn_ok("123", "45", "6789") and not pii.ssn_ok("900", "45", "6789")


def test_ordinary_numbers_are_not_pii() -> None:
    text = "Order 2024-11-05 #123456789, version 1.2.3.4, total 1 234,56 EUR, call ext. 4412."
    assert pii.find_pii(text) == []


def test_redaction_shares_the_detectors() -> None:
    text = ("Patient NIR 1 85 05 78 006 084 91, SSN 123-45-6789, NINO AB 12 34 56 C, "
            "Steuer-ID 86095742719, mail jean.dupont@example.com, IP 10.0.0.7.")
    assert redact(text) == ("Patient NIR [NATIONAL_ID], SSN [NATIONAL_ID], NINO [NATIONAL_ID], "
                            "Steuer-ID [NATIONAL_ID], mail [EMAIL], IP [IP].")
    assert redact("NIR 1 85 05 78 006 084 92") == "NIR 1 85 05 78 006 084 92"  # bad key


# -- categories ----------------------------------------------------------------------------
def test_categories_are_the_sdks() -> None:
    assert list(V1) == list(ModerationLlmv1CategoryThresholds.model_fields)
    assert list(V2) == list(ModerationLlmv2CategoryThresholds.model_fields)
    assert set(DESCRIPTIONS) == set(SCORED) == set(V2)
    scores = dict.fromkeys(SCORED, 0.1) | {"dangerous": 0.2, "criminal": 0.7}
    v1 = for_version(scores, "v1")
    assert list(v1) == list(V1) and v1["dangerous_and_criminal_content"] == 0.7


def test_llama_guard_codes_map_onto_mistral_categories() -> None:
    assert sorted(LLAMA_GUARD_CODES) == list(range(1, 15))
    assert all(set(cats) <= set(SCORED) for cats in LLAMA_GUARD_CODES.values())
    assert LLAMA_GUARD_CODES[7] == ("pii",) and LLAMA_GUARD_CODES[11] == ("selfharm",)
    assert is_llama_guard("Llama-Guard-3-1B-Q8_0.gguf") and is_llama_guard("llamaguard3")
    assert not is_llama_guard("smollm2-135m-instruct", "Mistral-7B-Instruct-v0.3")


# -- backends on a real (tiny, random) engine -------------------------------------------------
def test_backends_read_the_engines_logits(tiny_llama: dict) -> None:
    """The judge's log-odds are the full forward's (golden: `LLM.logits`), its scores are
    calibrated probabilities; Llama Guard's format runs end to end (jailbreaking has no code)."""
    llm = LLM(tiny_llama["hf"], dtype="float32")  # no sliding window: the text is seen
    engine = AsyncLLMEngine(engine=llm.engine)
    try:
        async def main() -> tuple:
            judge = JudgeBackend(engine, "tiny")
            odds = await judge.log_odds(["hello there", "call me"], ["pii", "law"])
            scores = await judge.score(["hello there"], ["pii", "law"])
            guard = LlamaGuardBackend(engine, "tiny-llama-guard")
            return judge, odds, scores, await guard.score(["hello there", "my card"])

        judge, odds, scores, guarded = asyncio.run(main())
        row = llm.logits(judge.prompt("call me", "law"))[-1].double()
        want = (torch.logsumexp(row[judge.yes], 0) - torch.logsumexp(row[judge.no], 0)).item()
    finally:
        engine.shutdown()
    assert odds[1]["law"] == pytest.approx(want, abs=1e-3)
    assert set(scores[0]) == {"pii", "law"} and all(0 < v < 1 for v in scores[0].values())
    assert odds[0]["pii"] != odds[1]["pii"]  # the text changes the answer
    for g in guarded:
        assert set(g) == set(SCORED) and g["jailbreaking"] == 0.0
        assert all(0.0 <= v <= 1.0 for v in g.values()) and max(g.values()) > 0.0


# -- the routes, through the SDK --------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    srv = ServerProcess(SMOL, "--kv-cache-gib", "0.5", "--max-model-len", "512",
                        "--embed-model", "none", "--no-libraries", "--audit-log", str(audit))
    srv.audit_path = audit  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


BENIGN = "The meeting is moved to Thursday; bring the slides."
WITH_PII = "Send the invoice to jean.dupont@example.com or call +33 6 12 34 56 78."


def test_moderate_through_the_sdk(client: Mistral) -> None:
    res = client.classifiers.moderate(model="mistral-moderation-latest",
                                      inputs=[BENIGN, WITH_PII])
    assert isinstance(res, ModerationResponse) and res.model == "mistral-moderation-latest"
    assert len(res.results) == 2
    for r in res.results:
        assert list(r.category_scores) == list(V2) and list(r.categories) == list(V2)
        assert all(0.0 <= s <= 1.0 for s in r.category_scores.values())
        assert all(r.categories[c] == (r.category_scores[c] >= 0.5) for c in V2)
    assert res.results[1].category_scores["pii"] == 1.0 and res.results[1].categories["pii"]
    # the judge really read the texts: not every score is the same
    assert len({round(s, 4) for s in res.results[0].category_scores.values()}) > 1


def test_v1_model_id_answers_v1_categories(client: Mistral) -> None:
    res = client.classifiers.moderate(model="mistral-moderation-2411", inputs=WITH_PII)
    assert list(res.results[0].category_scores) == list(V1)
    assert res.results[0].categories["pii"]


def test_moderate_chat_through_the_sdk(client: Mistral) -> None:
    conv = [{"role": "user", "content": "Where can I reach you?"},
            {"role": "assistant", "content": "Write to jean.dupont@example.com."}]
    res = client.classifiers.moderate_chat(model="mistral-moderation-latest", inputs=conv)
    assert len(res.results) == 1 and res.results[0].categories["pii"]
    res = client.classifiers.moderate_chat(
        model="mistral-moderation-2411",
        inputs=[conv, [{"role": "user", "content": BENIGN}]])
    assert len(res.results) == 2 and list(res.results[1].category_scores) == list(V1)


def test_moderation_model_is_listed(client: Mistral) -> None:
    cards = {m.id: m for m in client.models.list().data}
    card = cards["mistral-moderation-latest"]
    assert card.capabilities.moderation and not card.capabilities.completion_chat
    assert "mistral-moderation-2411" in card.aliases
    one = client.models.retrieve(model_id="mistral-moderation-2411")
    assert one.capabilities.moderation


def test_bad_input_is_a_4xx_naming_it(server: ServerProcess) -> None:
    url = server.url + "/v1/moderations"
    r = httpx.post(url, json={"model": "mistral-moderation-latest", "input": []}, timeout=60)
    assert r.status_code == 400 and r.json()["param"] == "input", r.text
    r = httpx.post(url, json={"model": "mistral-moderation-latest", "input": ["ok", " "]},
                   timeout=60)
    assert r.status_code == 400 and r.json()["param"] == "input.1", r.text
    r = httpx.post(url, json={"model": "gpt-moderation", "input": "hi"}, timeout=60)
    assert r.status_code == 404 and "mistral-moderation-latest" in r.json()["message"]
    r = httpx.post(url, json={"model": "mistral-moderation-latest",
                              "input": ["fine", "word " * 600]}, timeout=60)
    assert r.status_code == 400 and r.json()["param"] == "input.1", r.text
    assert "512" in r.json()["message"] or "511" in r.json()["message"]
    r = httpx.post(server.url + "/v1/chat/moderations",
                   json={"model": "mistral-moderation-latest", "input": []}, timeout=60)
    assert r.status_code == 400, r.text


def test_metrics_and_audit(server: ServerProcess, client: Mistral) -> None:
    client.classifiers.moderate(model="mistral-moderation-latest", inputs=[WITH_PII])
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'souverain_moderation_flagged_total{category="pii",source="moderations"}' in text
    assert 'souverain_moderation_calls_total{outcome="ok",source="moderations"}' in text
    assert "souverain_moderation_duration_seconds_bucket" in text
    assert 'souverain_moderation_calls_total{outcome="refused",source="moderations"}' in text
    audit_path: Path = server.audit_path  # type: ignore[attr-defined]
    records = []
    for _ in range(50):  # the writer thread appends shortly after the response
        records = [json.loads(line) for line in audit_path.read_text().splitlines()
                   if '"/v1/moderations"' in line and '"moderation"' in line]
        if records:
            break
        time.sleep(0.1)
    assert records, audit_path.read_text()
    assert records[-1]["moderation"] == {"source": "moderations", "flagged": [["pii"]]}
    assert "jean.dupont" not in audit_path.read_text()  # flags only, never the text


def test_moderation_model_flag_serves_a_path(tiny_llama: dict) -> None:
    """`--moderation-model PATH`: that model is served too and moderates; the chat model
    stays the first one."""
    srv = ServerProcess(SMOL, "--lazy", "--embed-model", "none", "--no-libraries",
                        "--no-audit", "--moderation-model", str(tiny_llama["hf"]))
    try:
        name = Path(tiny_llama["hf"]).name
        cards = {c["id"]: c for c in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]}
        assert set(cards) == {SMOL, name, "mistral-moderation-latest"}
        assert cards["mistral-moderation-latest"]["root"] == name
        r = httpx.post(srv.url + "/v1/moderations",
                       json={"model": "mistral-moderation-latest", "input": "hello"}, timeout=120)
        assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
    finally:
        assert srv.stop() == 0, srv.log()
