"""``/docs``: Swagger UI served from this machine, never from a CDN.

FastAPI's own ``/docs`` and ``/redoc`` load their JavaScript, CSS and favicon from
cdn.jsdelivr.net and fastapi.tiangolo.com, so a browser opening them sends a request off the
premises. Here the page loads Swagger UI from the files of the ``swagger-ui-bundle`` wheel
(Apache-2.0), served by the routes below from an allow-list (not a folder mount: the wheel's
own ``index.html`` points at the petstore demo). The validator badge (validator.swagger.io) is
off. ReDoc is not served: no well-kept package ships its bundle without a web framework of its
own (drf-spectacular-sidecar needs Django).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by `install_docs`: `souverain doctor` reads ASSETS without FastAPI
    from fastapi import FastAPI

DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8",
          "swagger-ui.css": "text/css; charset=utf-8",
          "favicon-32x32.png": "image/png",
          "favicon-16x16.png": "image/png"}


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's files in the ``swagger-ui-bundle`` wheel."""
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def swagger_ui_html(title: str, openapi_url: str) -> str:
    """The /docs page: every URL in it is a path on this server."""
    params = {"url": openapi_url, "dom_id": "#swagger-ui", "layout": "BaseLayout",
              "deepLinking": True, "showExtensions": True, "showCommonExtensions": True,
              "validatorUrl": None}  # no badge fetched from validator.swagger.io
    config = json.dumps(params).replace("<", "\\u003c")  # no '</script>' from a title
    safe_title = (title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{safe_title}</title>
<link rel="stylesheet" type="text/css" href="{ASSETS_URL}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_URL}/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="{ASSETS_URL}/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_URL}/swagger-ui-bundle.js" charset="utf-8"></script>
<script>
const config = {config};
config.oauth2RedirectUrl = window.location.origin + "{OAUTH2_REDIRECT_URL}";
config.presets = [SwaggerUIBundle.presets.apis];
window.ui = SwaggerUIBundle(config);
</script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Serve /docs, its OAuth2 redirect page and its assets (``app`` is built with
    ``docs_url=None, redoc_url=None``)."""
    from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import FileResponse, HTMLResponse

    from souverain.server.errors import APIError

    folder = swagger_ui_dir()
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(swagger_ui_html(f"{app.title} - Swagger UI", openapi_url))

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def swagger_ui_asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise APIError(404, f"No documentation asset {name!r}: /docs uses "
                                f"{', '.join(sorted(ASSETS))}.")
        return FileResponse(folder / name, media_type=ASSETS[name],
                            headers={"cache-control": "public, max-age=86400"})
