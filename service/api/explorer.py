"""The attention explorer: a static page at ``/`` that uses only the public REST API.

Plain HTML, CSS and JavaScript in ``service/api/static/`` (no build step, nothing fetched from the
network), plus three bundled sample images; ``create_app`` includes the router and the mount.
"""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
router = APIRouter()


@router.get("/", include_in_schema=False)
async def explorer() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
