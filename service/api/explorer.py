"""The attention explorer: a static page at ``/`` that uses only the public REST API.

Plain HTML, CSS and JavaScript in ``service/api/static/`` (no build step, nothing fetched from the
network), plus three bundled sample images; ``create_app`` includes the router and the mount.
"""

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC = Path(__file__).with_name("static")
router = APIRouter()


#: the page and its files are checked with the server on every load (ETag / Last-Modified):
#: without it a browser may keep an old explorer.js for days after an upgrade, beside new HTML
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
async def explorer() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)


class _StaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def mount_static(app: FastAPI) -> None:
    app.mount("/static", _StaticFiles(directory=STATIC), name="static")
