"""The web console at ``/``: playground, documents, fine-tuning, batches, models and health,
for people who do not write code.

It is a client of souverain's public API and nothing else: plain ES modules and CSS in this
folder (no build step, no framework, no CDN), served from an allow-list of these files by the
routes below, every one with a strict Content-Security-Policy (`CSP`: ``default-src 'self'``,
no inline script or style, no other host). The page asks for an API key when the server has
keys and keeps it in the tab's ``sessionStorage`` only; every call it makes is one a client of
the API could make (what the console can do, the API can do). ``souverain serve --no-console``
turns it off. `souverain doctor` checks the files (`external_references`).

The files: ``index.html`` (the shell), ``app.js`` (the hash router ``#/<page>``, the key
dialog, the language switch), ``api.js`` (fetch with the key, errors, SSE streams, uploads
with progress), ``i18n.js`` (English and French, chosen from the browser), ``ui.js`` (a DOM
builder that never parses HTML from data), ``chart.js`` (SVG line charts), ``pages/*.js``
(one module per page: ``render(root, ctx)``, returning a dispose function).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `souverain doctor` reads the files without FastAPI
    from fastapi import FastAPI

CONSOLE_DIR = Path(__file__).resolve().parent
ASSETS_URL = "/console"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}
# an absolute URL to another host: http(s)://, protocol-relative //host, or a CSS @import url
_EXTERNAL = re.compile(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}|@import\s+url""")
# hosts the console names but never loads: the SVG namespace, the La Plateforme base URL that
# "show code" mentions
_NAMED_ONLY = ("www.w3.org", "api.mistral.ai")


def assets() -> dict[str, Path]:
    """Every file the console serves, by its path under `ASSETS_URL`."""
    return {p.relative_to(CONSOLE_DIR).as_posix(): p for p in sorted(CONSOLE_DIR.rglob("*"))
            if p.is_file() and p.suffix in TYPES}


def external_references() -> list[str]:
    """``file:line: url`` for every reference to another host in the console's files (none
    allowed: `souverain doctor` and the tests check it; the CSP would block them anyway)."""
    found = []
    for name, path in assets().items():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{name}:{n}: {m.group(0)}" for m in _EXTERNAL.finditer(line)
                      if not m.group(0).endswith(_NAMED_ONLY)]
    return found


def install_console(app: FastAPI) -> None:
    """``GET /`` (the shell) and ``GET /console/<file>`` (the allow-list of `assets`)."""
    from fastapi.responses import FileResponse, RedirectResponse, Response

    files = assets()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_index() -> Response:
        return FileResponse(files["index.html"], media_type=TYPES[".html"], headers=HEADERS)

    @app.get("/console", include_in_schema=False)
    async def console_redirect() -> Response:
        return RedirectResponse("/", status_code=308)

    @app.api_route(ASSETS_URL + "/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_asset(name: str) -> Response:
        path = files.get(name)
        if path is None or name == "index.html":
            return Response(status_code=404, content=b'{"object":"error","message":"No such '
                            b'console file.","type":"invalid_request_error","param":null,'
                            b'"code":"not_found"}', media_type="application/json")
        return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)
