"""The operator page at ``/``: static files shipped inside the package (no build step, no CDN).

Every answer carries headers that make the page safe to open next to anything else a browser has
open. The page is built for them: no inline script or style, nothing fetched from elsewhere, so the
policy allows its own origin only. It holds the admin token (in sessionStorage), so no other site
may frame it (clickjacking its buttons), and no request of it says where it came from.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",  # /static/app.js only: no inline script, no eval
    "style-src 'self'",  # /static/style.css only: no style attributes or <style>
    "img-src 'self'",  # the browser's own /favicon.ico request
    "connect-src 'self'",  # fetch() to this API and the microphone's WebSocket (CSP3 'self' covers ws:/wss:)
    "base-uri 'none'",
    "form-action 'none'",  # forms are sent by script; a form submitted before it ran goes nowhere
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> Response:
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    return _file(name)


def _file(name: str) -> Response:
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR.resolve() or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})
