"""The operator page at ``/`` in a real headless Chromium, read and driven as an operator would.

The browser is Debian's ``/usr/bin/chromium`` driven by the ``playwright`` package; nothing is ever
downloaded (no ``playwright install``). Screenshots land in ``artifacts/`` for a human to look at.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import TEXT_A, TOKEN

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SWAP_MS = 20_000  # a swap answers after load, smoke test, drain and free, on 2 shared cores

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]

OpenPage = Callable[[int, int], "sync_api.Page"]


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def server_url(settings: Settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture
def open_page(browser: sync_api.Browser, server_url: str) -> Iterator[OpenPage]:
    """``open_page(width, height)`` -> the operator page in a fresh tab of that size.

    Any uncaught script error on the page fails the test: a broken script leaves stale numbers up.
    So does anything the page's Content-Security-Policy refused: the policy must be true to the page.
    """
    contexts: list[sync_api.BrowserContext] = []
    script_errors: list[str] = []
    refused: list[str] = []

    def open_(width: int, height: int) -> sync_api.Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        page.on("console", lambda message: refused.extend(csp_violations([message])))
        response = page.goto(server_url)
        assert response is not None and "default-src 'none'" in response.headers["content-security-policy"]
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not script_errors, f"the page's script failed: {script_errors}"
    assert not refused, f"the page's Content-Security-Policy refused: {refused}"


def csp_violations(messages: list[sync_api.ConsoleMessage]) -> list[str]:
    """Chromium reports each refusal of the policy as a console error naming it."""
    return [m.text for m in messages if m.type == "error" and "Content Security Policy" in m.text]


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "hello.wav"
    path.write_bytes(synth.wav_bytes(synth.speech_like(1.5)))
    return path


def shown(scope: sync_api.Page | sync_api.Locator, label: str) -> sync_api.Locator:
    """The value the page shows next to ``label`` in one of its term/value lists."""
    term = scope.locator("dt").filter(has_text=re.compile(rf"^{re.escape(label)}$"))
    return term.locator("xpath=following-sibling::dd[1]")


def unlock(page: sync_api.Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Unlock").click()


def transcribe(page: sync_api.Page, clip: Path) -> sync_api.Locator:
    page.get_by_label("Audio file").set_input_files(clip)
    page.get_by_role("button", name="Transcribe", exact=True).click()
    return page.get_by_role("status", name="Transcription result")


def version_row(page: sync_api.Page, name: str) -> sync_api.Locator:
    table = page.get_by_role("table", name="Model versions")
    return table.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name, exact=True))


def test_an_operator_transcribes_updates_unloads_and_loads_again(open_page: OpenPage, clip: Path,
                                                                  server_url: str) -> None:
    page = open_page(1280, 900)
    sent: list[tuple[str, bool]] = []  # (path, carried the admin token)
    page.on("request", lambda request: sent.append((urlparse(request.url).path, "authorization" in request.headers)))
    state = page.get_by_role("status", name="Model state")
    result = page.get_by_role("status", name="Action result")
    button = {name: page.get_by_role("button", name=name, exact=True)
              for name in ("Update", "Roll back", "Reload", "Unload", "Load")}

    expect(shown(page, "Live version")).to_have_text("a")
    expect(state).to_have_text("loaded")
    expect(page.get_by_text("Serving requests with version a.")).to_be_visible()
    for control in button.values():  # nothing an operator can press before giving the token
        expect(control).to_be_disabled()
        expect(control).to_have_accessible_description("Enter the admin token first.")
    expect(page.get_by_text("Enter the admin token first.")).to_be_visible()
    jobs = page.get_by_role("heading", name="Batch jobs")
    if httpx.get(f"{server_url}/api/jobs").status_code == 404:
        expect(jobs).to_be_hidden()  # no batch API on this server: no empty panel either
    else:
        expect(jobs).to_be_visible()

    unlock(page, "not-the-token")
    expect(result).to_contain_text("The admin token was not accepted")
    expect(result).to_contain_text("the admin token is wrong")
    unlock(page, TOKEN)
    expect(result).to_contain_text("Admin controls unlocked")
    with page.expect_request(lambda request: urlparse(request.url).path == "/api/jobs") as jobs_poll:
        pass  # the next poll of the jobs list, made while the page holds the token
    assert "authorization" not in jobs_poll.value.headers
    expect(version_row(page, "a")).to_contain_text("live")
    expect(version_row(page, "b")).to_contain_text("1 golden clip")
    expect(button["Load"]).to_have_accessible_description("already loaded")
    expect(button["Unload"]).to_be_enabled()

    expect(page.get_by_text("no transcriptions yet").first).to_be_visible()
    transcript = transcribe(page, clip)
    expect(transcript.get_by_text(TEXT_A, exact=True)).to_be_visible()
    expect(shown(transcript, "Version")).to_have_text("a")
    expect(shown(transcript, "Language")).to_have_text("en")
    # the next /api/system/traffic poll shows the transcription in the traffic chart
    expect(page.get_by_text("no transcriptions yet").first).to_be_hidden(timeout=SWAP_MS)

    page.get_by_label("Update to version").select_option("b")
    button["Update"].click()
    expect(result).to_contain_text("Updated: now serving b (was a)", timeout=SWAP_MS)
    expect(result).to_contain_text("Smoke test passed")
    expect(shown(page, "Live version")).to_have_text("b")
    expect(shown(page, "Previous")).to_have_text("a")
    expect(version_row(page, "b")).to_contain_text("live")
    expect(version_row(page, "a")).to_contain_text("previous")
    page.get_by_label("Update to version").select_option("b")
    expect(button["Update"]).to_have_accessible_description("b is already live")
    expect(button["Roll back"]).to_be_enabled()
    history = page.get_by_role("list", name="Recent registry events, newest first")
    expect(history.get_by_role("listitem").first).to_contain_text("promoted")
    expect(history.get_by_role("listitem").first).to_contain_text("a → b")

    page.once("dialog", lambda dialog: dialog.accept())
    button["Unload"].click()
    expect(result).to_contain_text("Unloaded b", timeout=SWAP_MS)
    expect(state).to_have_text("not loaded")
    expect(page.get_by_text("No model loaded — press Load.")).to_be_visible()
    expect(shown(page, "Live version")).to_have_text("none")
    expect(button["Unload"]).to_be_disabled()
    expect(page.get_by_text("no model loaded", exact=True)).to_be_visible()
    expect(button["Unload"]).to_have_accessible_description("no model loaded")
    expect(button["Reload"]).to_be_disabled()
    expect(button["Reload"]).to_have_accessible_description("nothing to reload: use Load")
    for name in ("Update", "Roll back", "Load"):  # moving off an unloaded version needs no load of it
        expect(button[name]).to_be_enabled()
    expect(history.get_by_role("listitem").first).to_contain_text("unloaded")

    button["Load"].click()
    expect(result).to_contain_text("Loaded: now serving b", timeout=SWAP_MS)
    expect(state).to_have_text("loaded")
    expect(shown(page, "Live version")).to_have_text("b")
    expect(button["Load"]).to_have_accessible_description("already loaded")
    expect(button["Unload"]).to_be_enabled()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-1280.png", full_page=True)
    # the token went to the admin API, and nowhere else
    assert {path for path, token in sent if token} >= {"/admin/model/versions", "/admin/history"}
    assert {path for path, token in sent if token and not path.startswith("/admin/")} == set()


def test_a_refused_update_shows_the_servers_reason_and_the_old_version_keeps_serving(
    open_page: OpenPage, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    broken = shutil.copytree(model_dir("never serves"), tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph" * 64)
    registry.add(broken, "broken")  # checksums match the garbage: only loading it can tell
    page = open_page(1280, 900)
    unlock(page, TOKEN)

    page.get_by_label("Update to version").select_option("broken")
    page.get_by_role("button", name="Update", exact=True).click()
    result = page.get_by_role("status", name="Action result")
    expect(result).to_contain_text("Update to broken failed (load failed)", timeout=SWAP_MS)
    expect(result).to_contain_text("version 'broken' failed to load")
    expect(result).to_contain_text("a keeps serving")
    expect(page.get_by_role("status", name="Model state")).to_have_text("loaded")
    expect(shown(page, "Live version")).to_have_text("a")
    history = page.get_by_role("list", name="Recent registry events, newest first")
    expect(history.get_by_role("listitem").first).to_contain_text("refused")
    expect(history.get_by_role("listitem").first).to_contain_text("load failed")


def test_the_page_fits_a_phone_screen(open_page: OpenPage, clip: Path) -> None:
    page = open_page(390, 844)
    expect(shown(page, "Live version")).to_have_text("a")
    unlock(page, TOKEN)
    expect(version_row(page, "b")).to_be_visible()
    expect(transcribe(page, clip).get_by_text(TEXT_A, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Update", exact=True)).to_be_enabled()

    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide on a {width[1]} px screen"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-390.png", full_page=True)


def test_a_server_that_stops_answering_shows_as_offline_not_as_its_last_state(open_page: OpenPage) -> None:
    page = open_page(1280, 900)
    connection = page.locator("#conn")
    expect(connection).to_contain_text("live")
    hung: list[sync_api.Route] = []
    page.route("**/api/system/status", lambda route: hung.append(route))  # never answered
    expect(connection).to_have_text("offline · retrying", timeout=20_000)
    assert hung  # the page did ask, and gave up on its own (its timeout ended those requests)
    page.unroute("**/api/system/status")
    expect(connection).to_contain_text("live", timeout=10_000)


def test_the_pages_policy_is_enforced_an_injected_inline_script_does_not_run(
    browser: sync_api.Browser, server_url: str
) -> None:
    """What an attacker's markup would try, were it ever shown: refused, and reported as a violation
    (which is also how the check in ``open_page`` would notice the page's own inline code)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        messages: list[sync_api.ConsoleMessage] = []
        page.on("console", lambda message: messages.append(message))
        page.goto(server_url)
        expect(shown(page, "Live version")).to_have_text("a")  # app.js, from /static, runs
        page.evaluate("""() => {
            const s = document.createElement("script");
            s.textContent = "window.injected = true";
            document.head.append(s);
            document.body.setAttribute("style", "display: none");
        }""")
        expect(page.get_by_role("heading", name="Status")).to_be_visible()  # the style was refused
        assert page.evaluate("window.injected") is None
        wait_until(lambda: len(csp_violations(messages)) >= 2, timeout_s=10, message="both refusals reported")
    finally:
        context.close()


def test_a_server_that_keeps_its_status_private_shows_it_to_the_admin_token_only(
    browser: sync_api.Browser, make_settings: Callable[..., Settings]
) -> None:
    with serve_in_thread(create_app(make_settings(public_status=False))) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            messages: list[sync_api.ConsoleMessage] = []
            page.on("console", lambda message: messages.append(message))
            page.goto(url)
            expect(page.get_by_role("status", name="Model state")).to_have_text("private")
            expect(page.get_by_text("This server keeps its status private: enter the admin token to see it.")
                   ).to_be_visible()
            expect(page.locator("#conn")).to_have_text("status private · admin token needed")

            with page.expect_request(lambda r: urlparse(r.url).path == "/api/system/status"
                                     and "authorization" in r.headers) as status_poll:
                unlock(page, TOKEN)
            assert status_poll.value.headers["authorization"] == f"Bearer {TOKEN}"
            expect(shown(page, "Live version")).to_have_text("a")
            expect(page.get_by_role("status", name="Model state")).to_have_text("loaded")
            expect(page.locator("#conn")).to_contain_text("live")
            assert not csp_violations(messages)
        finally:
            context.close()
