"""The web console's frame, on a real `souverain serve` (tiny Llama checkpoint) with API keys,
in a real headless Chromium: the shell and its files are served with a strict CSP from an
allow-list; a wrong key is refused with a readable message and a right one is kept for the
tab's session only; a key restricted to other models is told what it cannot use; the
language follows the browser and can be switched; a tour of every page contacts no host but
the server and logs no error; ``--no-console`` turns it off. The pages' own behaviour is
tested in tests/test_console_<page>.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from console_utils import (
    browser,
    console_errors,
    foreign_requests,
    screenshots,
    wait_for,
)
from server_utils import ServerProcess

from souverain.server.auth import add_key
from souverain.server.console import CSP, assets, external_references

PAGES = ["playground", "documents", "finetuning", "batches", "models", "health"]
CSS = "css selector"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-home")


@pytest.fixture(scope="module")
def keys(home: Path) -> dict[str, tuple[str, str]]:
    path = home / "keys.txt"
    return {"user": add_key(path, "alice"), "admin": add_key(path, "ops", admin=True),
            "other": add_key(path, "bob", models=["some-other-model"])}


@pytest.fixture(scope="module")
def server(tiny_llama: dict, home: Path, keys: dict) -> Any:
    srv = ServerProcess(str(tiny_llama["consolidated"]), "--name", "tiny", "--no-libraries",
                        "--embed-model", "none", "--data-dir", str(home),
                        "--api-keys-file", str(home / "keys.txt"),
                        env={"SOUVERAIN_HOME": str(home)})
    yield srv
    assert srv.stop() == 0, srv.log()


def test_shell_and_files_are_served_with_a_strict_csp(server: ServerProcess) -> None:
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert CSP.startswith("default-src 'self'") and "'unsafe-inline'" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/console/app.js">' in page.text
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
    assert httpx.head(server.url + "/", timeout=30).status_code == 200
    for name in assets():
        if name == "index.html":
            continue
        r = httpx.get(f"{server.url}/console/{name}", timeout=30)
        assert r.status_code == 200, name
        assert r.headers["content-security-policy"] == CSP
    # nothing outside the allow-list: not the package's Python, not a path out of the folder
    for bad in ("__init__.py", "../app.py", "..%2Fapp.py", "pages/nope.js", "index.html"):
        r = httpx.get(f"{server.url}/console/{bad}", timeout=30)
        assert r.status_code == 404, (bad, r.status_code)
        assert "application/json" in r.headers["content-type"]
    # the shell needs no key; the API behind it does, and /health (public) says so, with
    # which optional families this server serves (the pages say what is turned off)
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["api_keys"] is True and health["version"]
    assert health["features"] == {"libraries": False, "fine_tuning": True, "batch": True}


def test_console_files_name_no_other_host() -> None:
    assert external_references() == []
    assert {"index.html", "app.js", "api.js", "i18n.js", "ui.js", "chart.js",
            "console.css"} <= set(assets())
    assert {f"pages/{p}.js" for p in PAGES} <= set(assets())


def _dialog_open(d: Any) -> bool:
    return bool(d.execute_script("return document.getElementById('key-dialog').open"))


def _enter_key(d: Any, key: str) -> None:
    box = d.find_element(CSS, "#key-input")
    box.clear()
    box.send_keys(key)
    d.find_element(CSS, "#key-submit").click()


def test_a_wrong_key_is_refused_readably_and_a_right_one_kept_for_the_tab_only(
        server: ServerProcess, keys: dict) -> None:
    with browser() as d:
        d.get(server.url + "/")
        wait_for(lambda: _dialog_open(d), 30, what="the key dialog")
        assert "API key" in d.find_element(CSS, "#key-dialog").text
        _enter_key(d, "sk-sov-not-a-real-key")
        error = wait_for(lambda: d.find_element(CSS, "#key-error").text
                         if "refused" in d.find_element(CSS, "#key-error").text else None,
                         30, what="the refusal")
        # the API's own reason, in a sentence a person can read (not a status code alone)
        assert error.startswith("This key was refused: ") and len(error) > 30, error
        assert "401" not in error and "{" not in error, error
        assert _dialog_open(d)
        screenshots(d, "key-refused")
        _enter_key(d, keys["user"][1])
        wait_for(lambda: not _dialog_open(d), 30, what="the dialog to close")
        wait_for(lambda: d.find_element(CSS, "#page-playground"), 30, what="the playground")
        stored = d.execute_script("return [sessionStorage.getItem('souverain.apiKey'), "
                                  "Object.keys(localStorage).filter(k => "
                                  "localStorage.getItem(k).includes('sk-'))]")
        assert stored == [keys["user"][1], []]
        assert d.find_element(CSS, "#key-button").text == "Change key"
        assert foreign_requests(d, server.url) == []
        # the 401 of the wrong key is logged by Chromium as a failed resource: nothing else
        assert [e for e in console_errors(d) if "401" not in e] == []
    with browser() as d:  # another browser session: the key is not remembered
        d.get(server.url + "/")
        wait_for(lambda: _dialog_open(d), 30, what="the key dialog again")


def test_a_key_for_other_models_is_told_what_it_cannot_use(server: ServerProcess,
                                                          keys: dict) -> None:
    r = httpx.get(server.url + "/v1/models", timeout=30,
                  headers={"Authorization": f"Bearer {keys['other'][1]}"})
    assert r.status_code == 200 and "tiny" not in [m["id"] for m in r.json()["data"]]
    with browser() as d:
        d.get(server.url + "/")
        wait_for(lambda: _dialog_open(d), 30, what="the key dialog")
        _enter_key(d, keys["other"][1])
        wait_for(lambda: not _dialog_open(d), 30, what="the dialog to close")
        d.refresh()  # a reload keeps the tab's key (sessionStorage): no dialog
        d.get(server.url + "/#/playground?model=tiny")
        assert not _dialog_open(d)
        text = wait_for(lambda: d.find_element(CSS, "#page").text
                        if "cannot" in d.find_element(CSS, "#page").text else None, 60,
                        what="the page to say the key cannot use the model")
        assert "tiny" in text, text


def test_language_follows_the_browser_and_can_be_switched(server: ServerProcess,
                                                         keys: dict) -> None:
    with browser(lang="fr-FR") as d:
        d.get(server.url + "/")
        wait_for(lambda: _dialog_open(d), 30, what="the key dialog")
        assert "Clé d'API" in d.find_element(CSS, "#key-dialog").text
        _enter_key(d, keys["user"][1])
        wait_for(lambda: not _dialog_open(d), 30, what="the dialog to close")
        nav = d.find_element(CSS, "nav").text
        assert "Bac à sable" in nav and "Affinage" in nav and "Santé" in nav
        assert d.execute_script("return document.documentElement.lang") == "fr"
        from selenium.webdriver.support.ui import Select

        Select(d.find_element(CSS, "#lang")).select_by_value("en")
        wait_for(lambda: "Fine-tuning" in d.find_element(CSS, "nav").text, 10,
                 what="English navigation")
        assert d.execute_script("return localStorage.getItem('souverain.lang')") == "en"
        d.refresh()  # the choice outlives the page (not the key: that one is per tab)
        wait_for(lambda: "Fine-tuning" in d.find_element(CSS, "nav").text, 30,
                 what="English after a reload")


def test_a_tour_of_every_page_contacts_only_the_server(server: ServerProcess,
                                                       keys: dict) -> None:
    with browser() as d:
        d.get(server.url + "/")
        wait_for(lambda: _dialog_open(d), 30, what="the key dialog")
        _enter_key(d, keys["admin"][1])
        wait_for(lambda: not _dialog_open(d), 30, what="the dialog to close")
        for page in PAGES:
            d.find_element(CSS, f"#nav-{page}").click()
            wait_for(lambda page=page: d.find_element(CSS, f"#page-{page}").text.strip(), 60,
                     what=f"the {page} page")
            assert d.find_element(CSS, f"#nav-{page}").get_attribute("aria-current") == "page"
        # started with --no-libraries: the documents page says so (and calls no missing route)
        d.find_element(CSS, "#nav-documents").click()
        wait_for(lambda: "--no-libraries" in d.find_element(CSS, "#page-documents").text, 30,
                 what="the documents page saying libraries are off")
        for page in PAGES:  # at phone width too: the menu opens and closes
            d.set_window_size(390, 844)
            d.find_element(CSS, "#menu-toggle").click()
            d.find_element(CSS, f"#nav-{page}").click()
            wait_for(lambda page=page: d.find_element(CSS, f"#page-{page}").text.strip(), 60,
                     what=f"the {page} page at phone width")
        d.set_window_size(1280, 900)
        assert foreign_requests(d, server.url) == []
        assert console_errors(d) == []


def test_no_console_turns_it_off(tiny_llama: dict, tmp_path: Path) -> None:
    srv = ServerProcess(str(tiny_llama["consolidated"]), "--name", "tiny", "--lazy",
                        "--no-libraries", "--no-finetune", "--embed-model", "none",
                        "--no-console", "--data-dir", str(tmp_path))
    try:
        for path in ("/", "/console/app.js"):
            r = httpx.get(srv.url + path, timeout=30)
            assert r.status_code == 404 and r.json()["object"] == "error", path
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()


def test_doctor_confirms_the_console_loads_nothing_from_another_host(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from souverain import doctor
    from souverain.server import console

    def finding() -> Any:
        return next(f for f in doctor.egress_findings({})
                    if f.name.startswith("`souverain serve` web console"))

    ok = finding()
    assert not ok.egress and "none naming another host" in ok.state
    assert "default-src 'self'" in ok.state
    # a file that names a CDN is reported, with the place and the fix
    (tmp_path / "app.js").write_text('import "https://cdn.example.com/x.js";\n')
    (tmp_path / "index.html").write_text("<!DOCTYPE html>\n")
    monkeypatch.setattr(console, "CONSOLE_DIR", tmp_path)
    bad = finding()
    assert bad.egress and "app.js:1: https://cdn.example.com" in bad.state and bad.fix
