"""The console's Playground page (issue 20, item 1) in a real headless Chromium against a real
`souverain serve` of the bundled smollm2-135m-instruct: the answer streams in token by token
and ends as the API's own non-streamed answer, TTFT and tokens/s are shown, Stop aborts a long
answer (the server counts the abort) and the page stays usable, errors are shown readably,
"Show code" writes the same request (and its Python runs), JSON mode gives JSON, tools give
readable tool calls; no request leaves the server, no console error, screenshots at the end.

The tests share one browser and one server and run in file order (each starts a new chat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from console_utils import browser, console_errors, foreign_requests, screenshots, wait_for
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from server_utils import ServerProcess

MODEL = "smollm2-135m-instruct"
SEEN: dict[str, Any] = {}  # what a test leaves for the next one (they run in file order)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("playground-data")
    srv = ServerProcess(MODEL, "--no-libraries", "--embed-model", "none", "--no-finetune",
                        "--kv-cache-gib", "0.5", "--data-dir", str(data))
    yield srv
    assert srv.stop() == 0, srv.tail()


@pytest.fixture(scope="module")
def driver(server: ServerProcess):
    with browser() as d:
        d.get(f"{server.url}/#/playground?model={MODEL}")
        wait_for(lambda: d.find_element(By.ID, "pg-input"), 60, what="the playground")
        yield d


# -- helpers ----------------------------------------------------------------------------------

def by_id(d: Any, id_: str) -> Any:
    return d.find_element(By.ID, id_)


def click(d: Any, id_or_el: Any) -> None:
    """Click an element once scrolled to the middle (the sticky header covers the top)."""
    el = by_id(d, id_or_el) if isinstance(id_or_el, str) else id_or_el
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()


def choose(d: Any, id_: str, value: str) -> None:
    el = by_id(d, id_)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    Select(el).select_by_value(value)


def set_value(d: Any, id_: str, value: str) -> None:
    el = by_id(d, id_)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.clear()
    el.send_keys(value)


def last_answer(d: Any) -> list | None:
    """[state, text] of the last answer bubble (textContent: the exact text, no layout)."""
    return d.execute_script(
        "const a = document.querySelectorAll('#pg-log .msg.assistant');"
        "if (!a.length) return null; const b = a[a.length - 1];"
        "return [b.dataset.state, b.querySelector('.pg-text').textContent];")


def last_stats(d: Any) -> dict:
    return d.execute_script(
        "const a = document.querySelectorAll('#pg-log .pg-stats'); const s = a[a.length - 1];"
        "return {text: s.textContent, ttft: s.dataset.ttftMs, tps: s.dataset.tps};")


def new_chat(d: Any, *, max_tokens: str, temperature: str = "0", seed: str = "7") -> None:
    click(d, "pg-new")
    wait_for(lambda: not d.find_elements(By.CSS_SELECTOR, "#pg-log .msg"), 10, what="an empty chat")
    set_value(d, "pg-temperature", temperature)
    set_value(d, "pg-max-tokens", max_tokens)
    set_value(d, "pg-seed", seed)


def send(d: Any, text: str) -> None:
    set_value(d, "pg-input", text)
    click(d, "pg-send")


def wait_answer(d: Any, timeout: float = 120) -> list:
    return wait_for(lambda: (r := last_answer(d)) and r[0] != "streaming" and r, timeout,
                    every=0.1, what="the answer to end")


def api_chat(server: ServerProcess, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


# -- the tests --------------------------------------------------------------------------------

def test_answer_streams_token_by_token_and_equals_the_api_answer(driver, server):
    d = driver
    # ?model= picked the model (other pages link "open in playground" this way)
    assert Select(by_id(d, "pg-model")).first_selected_option.get_attribute("value") == MODEL
    new_chat(d, max_tokens="96")
    question = "Tell me about the sea, in a few sentences."
    send(d, question)

    seen: list[str] = []  # the answer's text each time it changed while streaming
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = last_answer(d)
        if r and r[1] and (not seen or seen[-1] != r[1]):
            seen.append(r[1])
        if r and r[0] != "streaming":
            break
        time.sleep(0.02)
    state, final = last_answer(d)
    assert state == "done", (state, final, by_id(d, "pg-error").text)
    # it grew: at least 3 distinct lengths before the end, each a prefix of the next
    lengths = sorted({len(s) for s in seen if s != final})
    assert len(lengths) >= 3, f"the answer did not stream: {seen!r}"
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a), (a, b)

    # the same request without streaming: the same text
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "temperature": 0, "top_p": 1, "max_tokens": 96, "random_seed": 7}
    expected = api_chat(server, body)
    assert final == expected["choices"][0]["message"]["content"]
    assert final.strip()
    # shown as plain text: nothing in the bubble but the text node
    assert d.execute_script("const a = document.querySelectorAll('#pg-log .pg-text');"
                            "return a[a.length - 1].children.length") == 0
    SEEN["usage"] = expected["usage"]


def test_ttft_and_tokens_per_second_are_shown(driver):
    s = last_stats(driver)
    assert "First token after" in s["text"] and "tokens/s" in s["text"], s
    assert float(s["ttft"]) > 0 and float(s["tps"]) > 0, s
    usage = SEEN.get("usage")
    if usage:  # the count is the server's usage once the stream ended
        assert f"{usage['completion_tokens']} tokens" in s["text"], s


def test_stop_aborts_a_long_answer_and_the_page_stays_usable(driver, server):
    d = driver
    aborted = server.metrics().get(f'souverain_requests_aborted_total{{model="{MODEL}"}}', 0)
    new_chat(d, max_tokens="4000", temperature="0.7")
    send(d, "Write a very long story about a lighthouse keeper and his cat.")
    wait_for(lambda: len(last_answer(d)[1]) > 20, 120, every=0.05, what="some tokens")
    assert by_id(d, "pg-send").get_attribute("disabled") is not None
    click(d, "pg-stop")
    state, text = wait_for(lambda: (r := last_answer(d)) and r[0] == "stopped" and r, 30,
                           what="the answer to stop")
    assert "stopped by you" in last_stats(d)["text"]
    assert by_id(d, "pg-stop").get_attribute("disabled") is not None
    assert by_id(d, "pg-send").get_attribute("disabled") is None
    time.sleep(1)
    assert last_answer(d)[1] == text  # nothing more arrives
    # the server saw the client go and stopped generating
    wait_for(lambda: server.metrics().get(
        f'souverain_requests_aborted_total{{model="{MODEL}"}}', 0) > aborted, 30,
        what="the server to count the abort")

    # still usable: the conversation goes on (the stopped text is part of it)
    set_value(d, "pg-max-tokens", "12")
    send(d, "Thanks. Say hello.")
    state, text = wait_answer(d)
    assert state == "done" and text.strip()
    assert len(d.find_elements(By.CSS_SELECTOR, "#pg-log .msg.user")) == 2


def test_errors_and_invalid_settings_are_shown_readably(driver):
    d = driver
    console_errors(d)  # drain
    new_chat(d, max_tokens="100000")
    send(d, "Hello")
    err = wait_for(lambda: (e := by_id(d, "pg-error")).is_displayed() and e.text, 60,
                   what="the error")
    assert "max_tokens" in err and "8192" in err, err  # the API's own message
    # nothing was answered; the question is back in the box to send again
    assert not d.find_elements(By.CSS_SELECTOR, "#pg-log .msg")
    assert by_id(d, "pg-input").get_attribute("value") == "Hello"
    # Chrome reports the 400 itself: that is the only console entry
    assert all("chat/completions" in e and "400" in e for e in console_errors(d))

    # a JSON schema that is not JSON: said at once, and nothing is sent
    set_value(d, "pg-max-tokens", "32")
    choose(d, "pg-format", "json_schema")
    set_value(d, "pg-schema", '{"type": "object", ')
    problem = wait_for(lambda: (e := by_id(d, "pg-schema-error")).is_displayed() and e.text, 10,
                       what="the schema's parse error")
    assert "Not valid JSON" in problem
    click(d, "pg-send")
    assert "Fix the settings first" in by_id(d, "pg-error").text
    assert not d.find_elements(By.CSS_SELECTOR, "#pg-log .msg")
    assert by_id(d, "pg-input").get_attribute("value") == "Hello"
    set_value(d, "pg-schema", '{"type": "object", "properties": {"city": {"type": "string"}}}')
    wait_for(lambda: not by_id(d, "pg-schema-error").is_displayed(), 10, what="the error to go")
    choose(d, "pg-format", "text")


def test_show_code_writes_the_same_request(driver, server, tmp_path):
    d = driver
    new_chat(d, max_tokens="16")
    message = "Bonjour, qui es-tu ? Réponds en une phrase."
    set_value(d, "pg-input", message)
    if by_id(d, "pg-code-toggle").get_attribute("aria-expanded") != "true":
        click(d, "pg-code-toggle")
    code = {}
    for tab in ("curl", "python", "javascript"):
        click(d, f"pg-code-{tab}")
        code[tab] = d.execute_script("return document.getElementById('pg-code').textContent")
        assert MODEL in code[tab] and message in code[tab], code[tab]
        assert server.url in code[tab]
    assert "$MISTRAL_API_KEY" in code["curl"] and "/v1/chat/completions" in code["curl"]
    assert "from mistralai.client import Mistral" in code["python"]
    assert "client.chat.complete(" in code["python"]
    assert "process.env.MISTRAL_API_KEY" in code["javascript"] and "fetch(" in code["javascript"]
    # curl's body is the request, as JSON
    body = json.loads(code["curl"].split("<<'JSON_BODY'\n", 1)[1].rsplit("\nJSON_BODY", 1)[0])
    assert body == {"model": MODEL, "messages": [{"role": "user", "content": message}],
                    "temperature": 0, "top_p": 1, "max_tokens": 16, "random_seed": 7}
    # the Python runs as shown (the official SDK) and answers what the API answers
    script = tmp_path / "snippet.py"
    script.write_text(code["python"])
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "MISTRAL_API_KEY": "unused-on-loopback"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == api_chat(server, body)["choices"][0]["message"]["content"].strip()
    # the streaming variant
    click(d, "pg-code-stream")
    click(d, "pg-code-python")
    assert "client.chat.stream(" in by_id(d, "pg-code").text
    click(d, "pg-code-stream")
    click(d, "pg-code-toggle")
    assert not by_id(d, "pg-code-panel").is_displayed()


def test_json_mode_answers_json(driver):
    d = driver
    new_chat(d, max_tokens="64")
    choose(d, "pg-format", "json_object")
    send(d, "Give me a JSON object with a name and an age.")
    state, text = wait_answer(d)
    if state == "done":
        assert isinstance(json.loads(text), dict), text
        assert "valid JSON" in d.find_element(By.CSS_SELECTOR, "#pg-log .pg-note").text
    else:  # a readable error instead
        assert by_id(d, "pg-error").text.strip(), state

    # JSON following the schema written in the page
    new_chat(d, max_tokens="64")
    choose(d, "pg-format", "json_schema")
    set_value(d, "pg-schema", json.dumps({
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}))
    send(d, "In which city is the Eiffel Tower?")
    state, text = wait_answer(d)
    assert state == "done", by_id(d, "pg-error").text
    assert set(json.loads(text)) == {"city"}, text
    choose(d, "pg-format", "text")


def test_tool_calls_are_shown_and_answered(driver):
    d = driver
    new_chat(d, max_tokens="64")
    click(d, "pg-tools-on")
    choose(d, "pg-tool-choice", "any")
    send(d, "What is the weather in Paris?")
    state, _ = wait_answer(d)
    assert state == "done", by_id(d, "pg-error").text
    call = d.find_element(By.CSS_SELECTOR, "#pg-log .pg-call")
    assert "Calls get_weather" in call.text
    json.loads(call.find_element(By.TAG_NAME, "pre").text)  # the arguments, pretty JSON
    assert "asks for a tool" in last_stats(d)["text"]
    # the results go back as tool messages and the model answers
    for area in d.find_elements(By.CSS_SELECTOR, "#pg-tool-results textarea"):
        area.send_keys('{"temperature": 18, "sky": "clear"}')
    click(d, d.find_element(By.CSS_SELECTOR, "#pg-tool-results button"))
    state, _ = wait_answer(d)
    assert state == "done", by_id(d, "pg-error").text
    assert d.find_elements(By.CSS_SELECTOR, "#pg-log .pg-tool-msg")
    click(d, "pg-tools-on")


def test_french_no_foreign_requests_no_console_errors_and_screenshots(driver, server):
    d = driver
    # the page in French keeps the conversation
    choose(d, "lang", "fr")
    wait_for(lambda: by_id(d, "pg-send").text == "Envoyer", 20, what="the French page")
    assert d.find_element(By.CSS_SELECTOR, "#page-playground h1").text == "Bac à sable"
    assert d.find_elements(By.CSS_SELECTOR, "#pg-log .msg.assistant")
    choose(d, "lang", "en")
    wait_for(lambda: by_id(d, "pg-send").text == "Send", 20, what="the English page")

    # a plain chat with its stats and the code, for people to look at
    new_chat(d, max_tokens="48")
    set_value(d, "pg-system", "Answer in one short sentence.")
    send(d, "What is the capital of France?")
    state, _ = wait_answer(d)
    assert state == "done", by_id(d, "pg-error").text
    set_value(d, "pg-input", "And of Italy?")
    click(d, "pg-code-toggle")
    click(d, "pg-code-python")
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []
    d.execute_script("window.scrollTo(0, 0)")
    shots = screenshots(d, "playground")
    assert all(p.stat().st_size > 10_000 for p in shots)
