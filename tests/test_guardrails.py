"""Guardrails on chat completions (the request's ``guardrails``), through the official
`mistralai` SDK and raw HTTP against a real `souverain serve` with the bundled smollm2 as
both chat and moderation model: a PII prompt is blocked (detector path, deterministic), a
benign one passes, ``action: "none"`` reports without blocking, a judge threshold of 0 blocks
(judge path), a streamed answer is cut mid-stream when a window crosses a threshold,
``block_on_error`` decides what a failed moderation does, and bad configs are 422s."""

from __future__ import annotations

import json

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError

from souverain.moderation.guardrails import DEFAULT_THRESHOLD, GuardrailConfig, rules
from tests.server_utils import ServerProcess

SMOL = "smollm2-135m-instruct"
PII_PROMPT = "My card is 4111 1111 1111 1111 and my e-mail jean.dupont@example.com; remember them."
BENIGN = "What is the capital of France?"
PII_ONLY = {"moderation_llm_v2": {"custom_category_thresholds": {"pii": 0.9},
                                  "ignore_other_categories": True, "action": "block"}}
# an answer forced by the JSON schema: an e-mail early, then enough text to see the cut
FORCED = ("Hello team, the quarterly figures look fine. For questions write to "
          "jean.dupont@example.com and I will answer. " + "This sentence is filler. " * 30)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(SMOL, "--kv-cache-gib", "0.5", "--max-model-len", "512",
                        "--embed-model", "none", "--no-libraries")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Mistral:
    return Mistral(api_key="unused-on-loopback", server_url=server.url)


def _chat(server: ServerProcess, guardrails: list, content: str = BENIGN, **extra) -> httpx.Response:
    body = {"model": SMOL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": content}], "guardrails": guardrails, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)


def test_rules_from_configs() -> None:
    cfg = GuardrailConfig.model_validate({"block_on_error": True, **PII_ONLY})
    (rule,) = rules([cfg])
    assert rule.thresholds == {"pii": 0.9} and rule.block and rule.block_on_error
    (rule,) = rules([GuardrailConfig.model_validate(
        {"moderation_llm_v1": {"custom_category_thresholds": {"law": 0.2}}})])
    assert len(rule.thresholds) == 9 and rule.thresholds["law"] == 0.2
    assert rule.thresholds["sexual"] == DEFAULT_THRESHOLD and rule.block  # default action
    assert rule.needs() >= {"dangerous", "criminal"}
    verdict = rule.judge(dict.fromkeys(rule.needs(), 0.1) | {"pii": 0.1, "jailbreaking": 0.0,
                                                            "law": 0.3})
    assert verdict["blocked"] and verdict["violations"]["law"] and not verdict["violations"]["pii"]


def test_pii_prompt_is_blocked_with_la_plateformes_shape(server: ServerProcess,
                                                         client: Mistral) -> None:
    r = _chat(server, [PII_ONLY], PII_PROMPT)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["error"] == {"message": "Content blocked by guardrail", "status": 403}
    res = body["guardrails"]["results"]["moderation_llm_v2"]
    assert res["scores"] == {"pii": 1.0} and res["violations"] == {"pii": True}
    assert body["guardrails"]["stage"] == "input" and body["code"] == "guardrail_blocked"
    with pytest.raises(SDKError) as info:  # what the SDK user sees
        client.chat.complete(model=SMOL, max_tokens=8,
                             messages=[{"role": "user", "content": PII_PROMPT}],
                             guardrails=[PII_ONLY])
    assert info.value.status_code == 403


def test_benign_prompt_passes(client: Mistral) -> None:
    res = client.chat.complete(model=SMOL, max_tokens=8, temperature=0,
                               messages=[{"role": "user", "content": BENIGN}],
                               guardrails=[{"block_on_error": True, **PII_ONLY}])
    assert res.choices[0].message.content


def test_action_none_reports_without_blocking(server: ServerProcess) -> None:
    none = {"moderation_llm_v2": {**PII_ONLY["moderation_llm_v2"], "action": "none"}}
    r = _chat(server, [none], PII_PROMPT)
    assert r.status_code == 200, r.text
    report = r.json()["guardrails"]["results"]
    assert report["input"]["moderation_llm_v2"]["violations"] == {"pii": True}
    assert report["input"]["moderation_llm_v2"]["blocked"] is False
    assert "output" in report


def test_judge_threshold_zero_blocks(server: ServerProcess) -> None:
    cfg = {"moderation_llm_v1": {"custom_category_thresholds": {"selfharm": 0.0},
                                 "ignore_other_categories": True}}
    r = _chat(server, [cfg])
    assert r.status_code == 403, r.text
    res = r.json()["guardrails"]["results"]["moderation_llm_v1"]
    assert list(res["scores"]) == ["selfharm"] and 0.0 < res["scores"]["selfharm"] < 1.0


def test_streamed_answer_is_cut_mid_stream(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"note": {"const": FORCED}},
              "required": ["note"], "additionalProperties": False}
    body = {"model": SMOL, "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a short note to the team."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "note", "schema": schema,
                                                "strict": True}},
            "guardrails": [PII_ONLY]}
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "content_filter"
    assert last["guardrails"]["blocked"] and last["guardrails"]["stage"] == "output"
    assert last["guardrails"]["results"]["moderation_llm_v2"]["violations"] == {"pii": True}
    assert "usage" in last
    assert 0 < len(text) < len(FORCED) // 2  # cut at the first window, far before the end


def test_block_on_error(server: ServerProcess) -> None:
    # fits the chat (512 tokens) but not the longer moderation prompt: the moderation fails
    long = "hello " * 450
    r = _chat(server, [{"block_on_error": True, **PII_ONLY}], long, max_tokens=4)
    assert r.status_code == 403, r.text
    assert "block_on_error" in r.json()["message"]
    r = _chat(server, [{"block_on_error": False, **PII_ONLY}], long, max_tokens=4)
    assert r.status_code == 200, r.text
    assert "error" in r.json()["guardrails"]["results"]["input"]["moderation_llm_v2"]


@pytest.mark.parametrize("cfg,field", [
    ({"moderation_llm_v2": {"custom_category_thresholds": {"toxicity": 0.5}}},
     "guardrails.0.moderation_llm_v2.custom_category_thresholds.toxicity"),
    ({"moderation_llm_v2": {"custom_category_thresholds": {"pii": 1.5}}},
     "guardrails.0.moderation_llm_v2.custom_category_thresholds.pii"),
    ({"moderation_llm_v2": {"custom_category_thresholds": {"pii": -0.1}}},
     "guardrails.0.moderation_llm_v2.custom_category_thresholds.pii"),
    ({"moderation_llm_v2": {"custom_category_thresholds": {
        "dangerous_and_criminal_content": 0.5}}},  # a v1 name in a v2 config
     "guardrails.0.moderation_llm_v2.custom_category_thresholds.dangerous_and_criminal_content"),
    ({"moderation_llm_v1": {"action": "warn"}}, "guardrails.0.moderation_llm_v1.action"),
])
def test_bad_configs_are_422_naming_the_field(server: ServerProcess, cfg: dict,
                                             field: str) -> None:
    r = _chat(server, [cfg])
    assert r.status_code == 422, r.text
    assert r.json()["param"] == field, r.json()
