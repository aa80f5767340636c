"""The attention explorer: a static page at ``/`` that uses only the public REST API.

Plain HTML, CSS and JavaScript in ``service/static/`` (no build step, nothing fetched from the
network), plus three bundled sample images. Served by every frontend from the shared app.
"""

from pathlib import Path

from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.http_app import app

STATIC = Path(__file__).with_name("static")

app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/", include_in_schema=False)
async def explorer() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
