"""/docs is served from this machine: no page the server serves makes a browser reach another
host (FastAPI's default /docs and /redoc load cdn.jsdelivr.net, fastapi.tiangolo.com and
Google Fonts), and every asset the pages reference is served."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from server_utils import ServerProcess

SMOL = "smollm2-135m-instruct"
# a URL with a scheme, or protocol-relative ("//host/..."), anywhere in a page's text
_ABSOLUTE = re.compile(r"""(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//[^\s"'<>)]+""")
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)""")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


class _Refs(HTMLParser):
    """The resources an HTML page makes a browser load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action", "data", "poster") and value:
                self.refs.append(value)


def html_refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


def foreign_urls(text: str) -> list[str]:
    """Every absolute or protocol-relative URL in ``text`` whose host is not this machine."""
    found = []
    for m in _ABSOLUTE.finditer(text):
        host = urlsplit(m.group(0) if "://" in m.group(0) else "http:" + m.group(0)).hostname
        if f"[{host}]" not in _LOCAL_HOSTS and host not in _LOCAL_HOSTS:
            found.append(m.group(0))
    return found


def test_the_check_sees_fastapis_cdn_pages() -> None:
    """The detector flags what FastAPI serves by default (so the test below can fail)."""
    swagger = get_swagger_ui_html(openapi_url="/openapi.json", title="t").body.decode()
    redoc = get_redoc_html(openapi_url="/openapi.json", title="t").body.decode()
    assert any("cdn.jsdelivr.net" in u for u in foreign_urls(swagger))
    assert any("fonts.googleapis.com" in u for u in foreign_urls(redoc))
    assert foreign_urls('<a href="/docs/assets/x.js">') == []
    assert foreign_urls("see //evil.example/x") == ["//evil.example/x"]
    assert foreign_urls("http://127.0.0.1:8000/docs") == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("docs-home")
    srv = ServerProcess(SMOL, "--lazy", "--no-libraries", "--no-audit", "--embed-model", "none",
                        "--data-dir", str(data))
    yield srv
    assert srv.stop() == 0, srv.log()


def test_docs_pages_reference_only_this_server(server: ServerProcess) -> None:
    pages = ["/docs", "/docs/oauth2-redirect"]
    seen_assets: dict[str, httpx.Response] = {}
    for page in pages:
        r = httpx.get(server.url + page, timeout=30)
        assert r.status_code == 200, (page, r.text)
        assert r.headers["content-type"].startswith("text/html")
        assert foreign_urls(r.text) == [], page
        for ref in html_refs(r.text):
            url = urljoin(server.url + page, ref)
            assert urlsplit(url).netloc == urlsplit(server.url).netloc, (page, ref)
            if url not in seen_assets:
                seen_assets[url] = httpx.get(url, timeout=30)
    docs = httpx.get(server.url + "/docs", timeout=30).text
    # Swagger UI's script, its CSS and the icon, all served here
    assert {urlsplit(u).path for u in seen_assets} >= {
        "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
        "/docs/assets/favicon-32x32.png"}
    for url, r in seen_assets.items():
        assert r.status_code == 200, url
        assert r.content, url
        if urlsplit(url).path.endswith(".css"):  # what the stylesheet loads in turn
            for ref in _CSS_URL.findall(r.text):
                assert ref.startswith("data:") or foreign_urls(ref) == [], ref
    assert '"validatorUrl": null' in docs  # no badge image from validator.swagger.io
    assert '"url": "/openapi.json"' in docs
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 200


def test_no_cdn_page_is_left(server: ServerProcess) -> None:
    """ReDoc (which needs a CDN or Google Fonts) is off; assets outside the allow-list are
    not served (the wheel's own index.html points at the petstore demo)."""
    assert httpx.get(server.url + "/redoc", timeout=30).status_code == 404
    r = httpx.get(server.url + "/docs/assets/index.html", timeout=30)
    assert r.status_code == 404
    assert "swagger-ui-bundle.js" in r.json()["message"]
    assert httpx.get(server.url + "/docs/assets/..%2Fswagger-initializer.js",
                     timeout=30).status_code == 404
    paths = httpx.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    assert not [p for p in paths if p.startswith("/docs")]


def test_doctor_reports_docs_assets_local() -> None:
    from souverain.doctor import egress_findings
    from souverain.server.docs import ASSETS, swagger_ui_dir

    finding = next(f for f in egress_findings({}) if f.name.startswith("`souverain serve` /docs"))
    assert not finding.egress
    assert str(swagger_ui_dir()) in finding.state
    assert all((Path(swagger_ui_dir()) / name).is_file() for name in ASSETS)
