"""The file of a multipart upload (a library document, a fine-tuning file): its name and its
bytes within the route's limit. `BodyLimit` refuses a body over the limit before it is read;
this check names the file."""

from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile

from souverain.server.errors import APIError


def upload_name(file: UploadFile, example: str) -> str:
    """The uploaded file's name without folders, or a 400 (``example``: a name to suggest)."""
    name = Path(file.filename or "").name
    if not name:
        raise APIError(400, "The uploaded file has no name; send it as "
                            f"file=@path;filename={example}.", param="file")
    return name


async def read_upload(file: UploadFile, name: str, limit: int, *, what: str,
                      flag: str) -> bytes:
    """The file's bytes, or a 413 naming ``what`` limit it is over and the ``flag`` to raise."""
    data = await file.read()
    if len(data) > limit:
        raise APIError(413, f"{name} is {len(data)} bytes, over the {what} limit of "
                            f"{limit} bytes; split it or raise {flag}.", code="too_large")
    return data
