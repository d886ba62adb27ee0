"""`souverain serve --speculative ngram` through the official SDKs: the same answers as the
engine without speculation (in this process), streamed in multi-token deltas, with logprobs for
every token, and the acceptance figures in /metrics."""

from __future__ import annotations

import openai
import pytest
from mistralai.client import Mistral
from server_utils import ServerProcess

from souverain import LLM, SamplingParams
from souverain.bench.workload import COPY_DOCUMENT, COPY_INSTRUCTION

SMOL = "smollm2"
MESSAGES = [{"role": "user", "content": COPY_DOCUMENT + "\n\n" + COPY_INSTRUCTION}]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("smollm2-135m-instruct", "--name", SMOL, "--speculative", "ngram",
                        "--kv-cache-gib", "0.25", "--no-console")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def reference() -> str:
    """The greedy answer without speculation, from the engine in this process."""
    llm = LLM("smollm2-135m-instruct", kv_cache_gib=0.25)
    return llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=48))[0].text


def test_sdk_answers_equal_without_speculation(server, reference) -> None:
    client = Mistral(api_key="unused-on-loopback", server_url=server.url)
    full = client.chat.complete(model=SMOL, messages=MESSAGES, temperature=0, max_tokens=48)
    assert full.choices[0].message.content == reference
    chunks = [e.data for e in client.chat.stream(model=SMOL, messages=MESSAGES,
                                                 temperature=0, max_tokens=48)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 48
    # several tokens per step: fewer content chunks than tokens
    assert sum(1 for c in chunks if c.choices[0].delta.content) < 40
    m = server.metrics()
    assert m[f'souverain_spec_acceptance_rate{{model="{SMOL}"}}'] > 0.5
    assert m[f'souverain_spec_tokens_per_step{{model="{SMOL}"}}'] > 2
    assert m[f'souverain_spec_accepted_tokens_total{{model="{SMOL}"}}'] > 40


def test_openai_logprobs_for_every_token(server) -> None:
    oai = openai.OpenAI(api_key="unused-on-loopback", base_url=server.url + "/v1")
    r = oai.chat.completions.create(model=SMOL, messages=MESSAGES, temperature=0,
                                    max_tokens=32, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 32
    spelled = b"".join(bytes(t.bytes) for t in content).decode("utf-8")
    assert spelled.replace("<|im_end|>", "") == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the top one
        assert len(t.top_logprobs) == 2 and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5
