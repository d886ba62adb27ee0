"""The web console's browser tests: Debian's chromium driven by Selenium through Debian's
chromedriver (scripts/chromium.sh installs both; Selenium's own driver download is never used,
the network allows none). Every browser records its network log (Chrome's performance log), so
a test can prove the page contacted no host but the server, and writes screenshots at desktop
and phone widths into ``SOUVERAIN_SCREENSHOTS`` (default: tests/artifacts/console) for people
to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

SHOTS = Path(os.environ.get("SOUVERAIN_SCREENSHOTS",
                            Path(__file__).resolve().parent / "artifacts" / "console"))
DESKTOP = (1280, 900)
PHONE = (390, 844)  # a phone's CSS pixels (iPhone 12-15)


def binaries() -> tuple[str, str]:
    """(chromium, chromedriver): the test fails, naming the fix, when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("chromium and chromedriver are needed: run scripts/chromium.sh "
                    "(scripts/setup.sh runs it; it installs Debian's chromium and "
                    "chromium-driver)")
    return browser, driver


@contextmanager
def browser(lang: str = "en-US", size: tuple[int, int] = DESKTOP) -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver) with its network log on, in language ``lang``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--metrics-recording-only", f"--lang={lang}",
                f"--window-size={size[0]},{size[1]}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"intl.accept_languages": lang})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(60)
    driver.network_log = []  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page has requested so far (accumulated on ``driver.network_log``: Chrome
    hands each performance-log entry out once)."""
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            driver.network_log.append(msg["params"]["request"]["url"])
    return list(driver.network_log)


def foreign_requests(driver: Any, server_url: str) -> list[str]:
    """The requested URLs whose host is not the server's (data: and blob: URLs are local)."""
    own = urlsplit(server_url).netloc
    return [u for u in requested_urls(driver)
            if not u.startswith(("data:", "blob:", "about:", "chrome:"))
            and urlsplit(u).netloc != own]


def console_errors(driver: Any) -> list[str]:
    """Severe entries of the browser console (JavaScript errors, CSP violations)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.2,
             what: str = "the condition") -> Any:
    """Poll until ``predicate()`` is truthy (exceptions count as not yet); its value."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # an element not there yet, a stale one
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last!r})" if last else ""))


def text_of(driver: Any, selector: str) -> str:
    """The visible text of the first element matching the CSS ``selector``."""
    return str(driver.find_element("css selector", selector).text)


def write_files(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """``files`` written into ``folder`` (for a page's file input): name -> path."""
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def screenshots(driver: Any, name: str) -> list[Path]:
    """``<name>-desktop.png`` and ``<name>-phone.png`` of the current page (full height)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    out = []
    for label, (w, h) in (("desktop", DESKTOP), ("phone", PHONE)):
        driver.set_window_size(w, h)
        time.sleep(0.4)  # reflow
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(w, min(max(h, int(height) + 120), 4000))
        time.sleep(0.3)
        path = SHOTS / f"{name}-{label}.png"
        driver.save_screenshot(str(path))
        out.append(path)
    driver.set_window_size(*DESKTOP)
    return out
