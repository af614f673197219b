"""The operator page is served with a Content-Security-Policy that its own files satisfy, and the
headers that keep other sites from framing it or sniffing its files (issue 18: there were none).
tests/e2e/test_web_page.py drives the page under this policy in Chromium and fails on any violation.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from server.http.page import STATIC_DIR

PATHS = ["/", "/static/app.js", "/static/mic-worklet.js", "/static/style.css", "/static/no-such-file.js"]


@pytest.mark.parametrize("path", PATHS)
def test_the_page_and_its_files_carry_the_security_headers(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == (404 if "no-such" in path else 200)
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy[directive] == "'self'", directive  # its own origin only, nothing inline
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


class _Inline(HTMLParser):
    """What in an HTML file a policy without 'unsafe-inline' would block, or that loads elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag in ("script", "style"):
            self._in = tag
        if tag == "style":
            self.found.append("<style> element")
        self.found += [f"{tag} {name}=" for name, _ in attrs if name == "style" or name.startswith("on")]
        for name in ("src", "href"):
            url = named.get(name)
            if url is not None and not (url.startswith("/") and not url.startswith("//")):
                self.found.append(f"{tag} {name}={url} (not this server)")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script" and data.strip():
            self.found.append("inline <script>")


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() -> None:
    parser = _Inline()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert parser.found == []
    script = (STATIC_DIR / "app.js").read_text()
    for blocked in ("eval(", "new Function(", "innerHTML", "cssText"):
        assert blocked not in script, blocked  # script-src/style-src 'self' would refuse these
    assert not re.search(r"""\bstyle\s*:|["']style["']""", script)  # a style attribute, set through h()
