"""The console's Fine-tuning and Batches pages, in a real headless Chromium against a real
`souverain serve` (the tiny random Llama checkpoint, fine-tuning and batches on, its own data
folder).

Through the pages only: a training file the API refuses at upload shows its error at its line
(and what the line holds); one that passes upload but fails the job's validation shows the
job's errors line by line; a job started from the page (files uploaded through its file input)
draws a loss curve that grows while it trains, then says Done with a link that opens its
fine-tuned model in the playground; a running job stops from its page; a batch job created from the page finishes with its
counters shown, and its results and errors download through blob: links. The pages contact
no host but the server and log no browser error; they also speak French.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from console_utils import (
    browser,
    console_errors,
    foreign_requests,
    screenshots,
    text_of,
    wait_for,
    write_files,
)
from server_utils import ServerProcess

CSS = "css selector"


def conversation(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def jsonl(objs: list[Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def chat_line(cid: str, question: str) -> dict[str, Any]:
    return {"custom_id": cid, "body": {"messages": [{"role": "user", "content": question}],
                                       "max_tokens": 4, "temperature": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: dict) -> Any:
    home = tmp_path_factory.mktemp("console-finetuning")
    # one torch thread: on a busy 2-core machine, threads spinning for a core stall the tiny
    # model's steps for seconds (tests/test_batch.py)
    srv = ServerProcess(str(tiny_llama["consolidated"]), "--name", "tiny", "--no-libraries",
                        "--embed-model", "none", "--no-audit", "--dtype", "float32",
                        "--threads", "1", "--data-dir", str(home),
                        env={"SOUVERAIN_HOME": str(home)})
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ft-uploads")
    good = [json.dumps(conversation(i)).encode() for i in range(24)]
    out = {
        # line 3 is cut short: refused at upload, naming the line
        "bad.jsonl": b"\n".join(good[:2] + [b'{"messages": [{"role": "user"'] + good[2:4]) + b"\n",
        # valid JSON, but line 2's role is unknown: refused by the job's validation
        "roles.jsonl": jsonl([conversation(0), {"messages": [
            {"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            conversation(1)]),
        "train.jsonl": b"\n".join(good) + b"\n",
        "valid.jsonl": jsonl([conversation(i) for i in range(100, 106)]),
        "requests.jsonl": jsonl([chat_line("first", "Hello?"), chat_line("second", "Why?"),
                                 {"custom_id": "empty", "body": {"messages": []}},  # refused
                                 chat_line("third", "Where?")]),
    }
    return write_files(folder, out)


@pytest.fixture(scope="module")
def driver(server: ServerProcess) -> Any:
    with browser() as d:
        yield d


def _status(d: Any) -> str | None:
    found = d.find_elements(CSS, "#ft-job-status .badge")
    return str(found[0].get_attribute("data-status")) if found else None


def _points(d: Any) -> int:
    return int(d.find_element(CSS, "#ft-loss-chart svg").get_attribute("data-points"))


def _checkbox(d: Any, filename: str) -> Any:
    return next(label.find_element(CSS, "input") for label in
                d.find_elements(CSS, "#ft-training label") if filename in label.text)


def _upload(d: Any, path: Path) -> None:
    """A file through the page's file input; waits for the page to say it is uploaded."""
    d.find_element(CSS, "#ft-upload").send_keys(str(path))
    wait_for(lambda: f"{path.name} is uploaded" in text_of(d, "#ft-files-panel .upload-status"),
             30, what=f"{path.name} uploaded")
    wait_for(lambda: _checkbox(d, path.name).is_selected(), 10,
             what=f"{path.name} ticked as a training file")


def test_refused_training_files_name_their_lines(driver: Any, server: ServerProcess,
                                                 files: dict[str, Path]) -> None:
    d = driver
    d.get(server.url + "/#/finetuning")
    wait_for(lambda: d.find_elements(CSS, "#ft-upload"), 60, what="the fine-tuning page")
    assert "No training file yet" in text_of(d, "#ft-files")

    # 1. refused at upload: the API's message, under the line it names, with that line
    d.find_element(CSS, "#ft-upload").send_keys(str(files["bad.jsonl"]))
    item = wait_for(lambda: d.find_element(CSS, "#ft-files-panel .upload-error li[data-line]"),
                    30, what="the upload's refusal")
    assert item.get_attribute("data-line") == "3"
    assert "Line 3" in item.text and "bad.jsonl line 3 is not valid JSON" in item.text
    item.find_element(CSS, "summary").click()
    assert item.find_element(CSS, "pre").text == '{"messages": [{"role": "user"'
    assert "The server refused bad.jsonl" in text_of(d, "#ft-files-panel .upload-error")
    listed = httpx.get(server.url + "/v1/files", timeout=30).json()
    assert listed["data"] == []  # nothing stored
    # the only browser errors so far: the refused upload's 400
    errors = console_errors(d)
    assert errors and all("400" in e for e in errors), errors

    # 2. refused by the job's validation (the base model's rules): the job lists each line
    _upload(d, files["roles.jsonl"])
    assert "roles.jsonl" in text_of(d, "#ft-files")
    d.find_element(CSS, "#ft-create").click()
    wait_for(lambda: "job=" in d.current_url, 30, what="the new job's page")
    wait_for(lambda: _status(d) == "FAILED_VALIDATION", 120, what="the job to fail validation")
    problem = wait_for(lambda: d.find_element(CSS, "#ft-job-problems li[data-line]"), 10,
                       what="the validation errors")
    assert problem.get_attribute("data-line") == "2"
    assert "Line 2" in problem.text and "roles.jsonl line 2" in problem.text
    assert "Data refused" in text_of(d, "#ft-job-status")
    assert not d.find_elements(CSS, "#ft-open-playground")
    assert console_errors(d) == []


def test_a_job_started_from_the_page_shows_its_loss_curve_grow(
        driver: Any, server: ServerProcess, files: dict[str, Path]) -> None:
    d = driver
    d.find_element(CSS, "#ft-back").click()
    wait_for(lambda: d.find_elements(CSS, "#ft-upload"), 30, what="the overview")
    # the failed job is listed with its status
    wait_for(lambda: d.find_element(CSS, "#ft-jobs .badge").get_attribute("data-status")
             == "FAILED_VALIDATION", 10, what="the jobs list")

    _upload(d, files["train.jsonl"])
    _upload(d, files["valid.jsonl"])
    _checkbox(d, "valid.jsonl").click()  # not to train on: it is the validation file
    assert [label.text.split(" ")[0] for label in d.find_elements(CSS, "#ft-training label")
            if label.find_element(CSS, "input").is_selected()] == ["train.jsonl"]
    from selenium.webdriver.support.ui import Select

    valid = next(o.get_attribute("value") for o in
                 d.find_elements(CSS, "#ft-validation option") if "valid.jsonl" in o.text)
    Select(d.find_element(CSS, "#ft-validation")).select_by_value(valid)
    assert Select(d.find_element(CSS, "#ft-model")).first_selected_option.text == "tiny"
    # enough steps for the curve to grow over several seconds (~0.1 s a step here)
    d.find_element(CSS, "#ft-steps").send_keys("120")
    d.find_element(CSS, "#ft-lr").clear()
    d.find_element(CSS, "#ft-lr").send_keys("0.01")
    d.find_element(CSS, "#ft-suffix").send_keys("sums")
    d.find_element(CSS, "#ft-form .ft-more summary").click()
    d.find_element(CSS, "#ft-seq-len").send_keys("128")
    d.find_element(CSS, "#ft-warmup").send_keys("0")
    d.find_element(CSS, "#ft-create").click()
    wait_for(lambda: "job=" in d.current_url, 30, what="the new job's page")
    job_id = parse_qs(urlsplit(d.current_url).fragment.split("?", 1)[1])["job"][0]
    created = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()
    assert created["hyperparameters"]["training_steps"] == 120
    assert created["hyperparameters"]["learning_rate"] == 0.01
    assert created["hyperparameters"]["seq_len"] == 128
    assert created["validation_files"] == [valid] and created["suffix"] == "sums"

    # the curve grows while the job trains: the page polls the job and redraws the chart
    seen: list[int] = []
    deadline = time.monotonic() + 240
    while True:
        status, points = d.execute_script(  # both from one moment of the page
            "const b = document.querySelector('#ft-job-status .badge');"
            "const s = document.querySelector('#ft-loss-chart svg');"
            "return [b && b.dataset.status, s ? Number(s.dataset.points) : 0];")
        if status == "SUCCESS":
            break
        assert status not in ("FAILED", "FAILED_VALIDATION", "CANCELLED"), \
            text_of(d, "#page-finetuning")
        assert time.monotonic() < deadline, (status, seen)
        if points and (not seen or points != seen[-1]):
            seen.append(points)
        time.sleep(0.1)
    assert len(seen) >= 2 and seen == sorted(seen), seen  # at least two growing counts
    final = _points(d)
    assert final >= seen[-1]
    done = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()
    assert done["status"] == "SUCCESS"
    n_train = len({e["data"]["step"] for e in done["events"] if e["name"] == "training-step"}
                  | {c["step_number"] for c in done["checkpoints"]})
    n_eval = len({e["data"]["step"] for e in done["events"] if e["name"] == "evaluation"})
    assert final == n_train + n_eval  # every loss the API gives, once per step
    assert {p.get_attribute("data-series") for p in
            d.find_elements(CSS, "#ft-loss-chart path.chart-line")} == {"training loss",
                                                                        "validation loss"}

    # Done: the fine-tuned model, one click from the playground
    assert "Done" in text_of(d, "#ft-job-status")
    link = wait_for(lambda: d.find_element(CSS, "#ft-open-playground"), 10, what="the link")
    fragment = urlsplit(link.get_attribute("href")).fragment
    assert fragment.startswith("/playground?")
    assert parse_qs(fragment.split("?", 1)[1])["model"] == [done["fine_tuned_model"]]
    assert done["fine_tuned_model"].startswith("ft:tiny:sums:")
    assert text_of(d, "#ft-model-name") == done["fine_tuned_model"]
    assert len(d.find_elements(CSS, "#ft-checkpoints tbody tr")) == len(done["checkpoints"]) > 0
    assert "Training finished" in text_of(d, "#ft-events")
    assert not d.find_elements(CSS, "#ft-cancel")
    screenshots(d, "finetuning")
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []


def test_stop_a_running_job_from_its_page(driver: Any, server: ServerProcess) -> None:
    d = driver
    train = next(f["id"] for f in httpx.get(server.url + "/v1/files", timeout=30).json()["data"]
                 if f["filename"] == "train.jsonl")
    r = httpx.post(server.url + "/v1/fine_tuning/jobs", timeout=30, json={
        "model": "tiny", "training_files": [train],
        "hyperparameters": {"training_steps": 100000, "seq_len": 128}})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    d.get(f"{server.url}/#/finetuning?job={job_id}")
    wait_for(lambda: _status(d) == "RUNNING" and d.find_elements(CSS, "#ft-job-head progress"),
             120, what="the job to train")
    d.find_element(CSS, "#ft-cancel").click()
    alert = wait_for(lambda: d.switch_to.alert, 10, what="the confirmation")
    assert "Stop this training job?" in alert.text
    alert.accept()
    wait_for(lambda: _status(d) == "CANCELLED", 60, what="the job to stop")
    assert "Stopped" in text_of(d, "#ft-job-status")
    assert not d.find_elements(CSS, "#ft-cancel") and not d.find_elements(CSS, "#ft-open-playground")
    job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "CANCELLED" and job["fine_tuned_model"] is None
    assert console_errors(d) == []


def test_a_batch_job_from_the_page(driver: Any, server: ServerProcess,
                                   files: dict[str, Path], tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    d = driver
    # downloads land here (the page saves a blob: link with <a download>)
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow",
                                                   "downloadPath": str(tmp_path)})
    d.get(server.url + "/#/batches")
    wait_for(lambda: d.find_elements(CSS, "#batch-upload"), 60, what="the batches page")
    assert "No batch job yet" in text_of(d, "#batch-jobs")
    d.find_element(CSS, "#batch-upload").send_keys(str(files["requests.jsonl"]))
    wait_for(lambda: "requests.jsonl is uploaded: 4 lines" in text_of(d, "#batch-form"), 30,
             what="the requests file uploaded")
    chosen = Select(d.find_element(CSS, "#batch-file")).first_selected_option
    assert chosen.text.startswith("requests.jsonl")
    assert Select(d.find_element(CSS, "#batch-endpoint")).first_selected_option \
        .get_attribute("value") == "/v1/chat/completions"
    Select(d.find_element(CSS, "#batch-model")).select_by_value("tiny")
    d.find_element(CSS, "#batch-create").click()

    def finished() -> Any:
        badge = d.find_element(CSS, "#batch-jobs .badge[data-status]")
        return badge.get_attribute("data-status") in ("SUCCESS", "FAILED") and badge

    badge = wait_for(finished, 120, what="the batch job to finish")
    assert badge.get_attribute("data-status") == "SUCCESS" and badge.text == "Done"
    counters = d.find_element(CSS, "#batch-jobs .batch-counters")
    assert (counters.get_attribute("data-total"), counters.get_attribute("data-succeeded"),
            counters.get_attribute("data-failed")) == ("4", "3", "1")
    assert "4 of 4 done · 3 succeeded · 1 failed" in counters.text
    job = httpx.get(server.url + "/v1/batch/jobs", timeout=30).json()["data"][0]
    assert job["input_files"] == [chosen.get_attribute("value")] and job["model"] == "tiny"

    # the results: fetched with the key, offered as a blob: link, saved
    d.find_element(CSS, "#batch-jobs button.batch-output").click()
    link = wait_for(lambda: d.find_element(CSS, "#batch-jobs a.download-link"), 30,
                    what="the results link")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == f"batch-{job['id']}-output.jsonl"
    # (the test cannot fetch the blob: URL itself: the CSP's connect-src is 'self')
    saved = wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.endswith("output.jsonl")],
                     30, what="the saved results")
    assert [p.name for p in saved] == [link.get_attribute("download")]
    text = saved[0].read_text()
    assert [json.loads(x)["custom_id"] for x in text.splitlines()] == ["first", "second", "third"]
    assert text == httpx.get(f"{server.url}/v1/files/{job['output_file']}/content",
                             timeout=30).text
    d.find_element(CSS, "#batch-jobs button.batch-errors").click()
    wait_for(lambda: len(d.find_elements(CSS, "#batch-jobs a.download-link")) == 2, 30,
             what="the errors link")
    errors = wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.endswith("error.jsonl")],
                      30, what="the saved errors")
    assert [json.loads(x)["custom_id"] for x in errors[0].read_text().splitlines()] == ["empty"]
    assert not d.find_elements(CSS, "#batch-jobs button.batch-cancel")  # finished
    screenshots(d, "batches")
    assert foreign_requests(d, server.url) == []
    assert console_errors(d) == []


def test_in_french(server: ServerProcess) -> None:
    with browser("fr-FR") as d:
        d.get(server.url + "/#/finetuning")
        wait_for(lambda: "Fichiers d'entraînement" in text_of(d, "#page-finetuning"), 60,
                 what="the French fine-tuning page")
        page = text_of(d, "#page-finetuning")
        assert "Affinage" in page and "Lancer l'entraînement" in page
        assert "Terminé" in text_of(d, "#ft-jobs")  # the job trained above
        d.get(server.url + "/#/batches")
        wait_for(lambda: "Nouveau lot" in text_of(d, "#page-batches"), 60,
                 what="the French batches page")
        assert "Terminé" in text_of(d, "#batch-jobs")
        assert foreign_requests(d, server.url) == []
        assert console_errors(d) == []
