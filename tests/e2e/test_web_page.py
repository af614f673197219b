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
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TOKEN

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SWAP_MS = 20_000  # a swap answers after load, smoke test, drain and free, on 2 shared cores
DEFAULT = "sensevoice"  # the default model's name
MEETING_1 = "the meeting model listens"
MEETING_2 = "the meeting model listens again"

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
def open_page(browser: sync_api.Browser, request: pytest.FixtureRequest) -> Iterator[OpenPage]:
    """``open_page(width, height)`` -> the operator page in a fresh tab of that size.

    The server starts at the first call (``server_url``), so a test can add models to the registry
    before it does.

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
        response = page.goto(request.getfixturevalue("server_url"))
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


def model_card(page: sync_api.Page, name: str) -> sync_api.Locator:
    """The card of one named model."""
    return page.get_by_role("region", name=f"Model {name}", exact=True)


def unlock(page: sync_api.Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Unlock").click()


def transcribe(page: sync_api.Page, clip: Path) -> sync_api.Locator:
    page.get_by_label("Audio file").set_input_files(clip)
    page.get_by_role("button", name="Transcribe", exact=True).click()
    return page.get_by_role("status", name="Transcription result")


def version_row(card: sync_api.Locator, name: str) -> sync_api.Locator:
    table = card.get_by_role("table", name=re.compile(r"^Versions of "))
    return table.get_by_role("row").filter(has=card.page.get_by_role("rowheader", name=name, exact=True))


def history_of(card: sync_api.Locator) -> sync_api.Locator:
    return card.get_by_role("list", name=re.compile(r"^Recent events of .*, newest first$"))


def add_meeting_model(registry: Registry, model_dir: Callable[..., Path]) -> None:
    """A second named model, ``meeting``: m1 current, m2 added (as ``registry add --model`` makes one)."""
    meeting = ModelCatalog(registry.root).create("meeting", "sensevoice")
    meeting.add(model_dir(MEETING_1), "m1")
    meeting.promote("m1")
    meeting.add(model_dir(MEETING_2), "m2")


def test_an_operator_transcribes_updates_unloads_and_loads_again(open_page: OpenPage, clip: Path,
                                                                  server_url: str) -> None:
    page = open_page(1280, 900)
    sent: list[tuple[str, bool]] = []  # (path, carried the admin token)
    page.on("request", lambda request: sent.append((urlparse(request.url).path, "authorization" in request.headers)))
    card = model_card(page, DEFAULT)
    state = card.get_by_role("status", name=f"State of {DEFAULT}")
    result = card.get_by_role("status", name="Action result")
    token_result = page.get_by_role("status", name="Unlock result")
    button = {name: card.get_by_role("button", name=name, exact=True)
              for name in ("Update", "Roll back", "Reload", "Unload", "Load")}

    expect(page.get_by_role("region", name=re.compile(r"^Model "))).to_have_count(1)
    expect(shown(card, "Live version")).to_have_text("a")
    expect(state).to_have_text("loaded")
    expect(page.get_by_role("status", name="Server state")).to_have_text("ready")
    expect(card.get_by_text(f"Serving requests with {DEFAULT}@a.")).to_be_visible()
    expect(card.get_by_text("default", exact=True)).to_be_visible()
    expect(card.get_by_text("not real speech recognition")).to_be_visible()  # the fixtures' models are generated
    for control in button.values():  # nothing an operator can press before giving the token
        expect(control).to_be_disabled()
        expect(control).to_have_accessible_description("Enter the admin token first.")
    expect(card.get_by_text("Enter the admin token first.")).to_be_visible()
    jobs = page.get_by_role("heading", name="Batch jobs")
    if httpx.get(f"{server_url}/api/jobs").status_code == 404:
        expect(jobs).to_be_hidden()  # no batch API on this server: no empty panel either
    else:
        expect(jobs).to_be_visible()

    unlock(page, "not-the-token")
    expect(token_result).to_contain_text("The admin token was not accepted")
    expect(token_result).to_contain_text("the admin token is wrong")
    unlock(page, TOKEN)
    expect(token_result).to_contain_text("Admin controls unlocked")
    with page.expect_request(lambda request: urlparse(request.url).path == "/api/jobs") as jobs_poll:
        pass  # the next poll of the jobs list, made while the page holds the token
    assert "authorization" not in jobs_poll.value.headers
    expect(version_row(card, "a")).to_contain_text("live")
    expect(version_row(card, "b")).to_contain_text("1 golden clip")
    expect(button["Load"]).to_have_accessible_description("already loaded")
    expect(button["Unload"]).to_be_enabled()

    expect(page.get_by_text("no transcriptions yet").first).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_have_value(DEFAULT)
    transcript = transcribe(page, clip)
    expect(transcript.get_by_text(TEXT_A, exact=True)).to_be_visible()
    expect(shown(transcript, "Version")).to_have_text(f"{DEFAULT}@a")
    expect(shown(transcript, "Language")).to_have_text("en")
    expect(transcript.get_by_text("not real speech recognition")).to_be_visible()
    # the next /api/system/traffic poll shows the transcription in the traffic chart, by model@version
    expect(page.get_by_text("no transcriptions yet").first).to_be_hidden(timeout=SWAP_MS)
    expect(page.get_by_role("list", name="Requests by version, last minutes")).to_contain_text(f"{DEFAULT}@a")

    card.get_by_label("Update to version").select_option("b")
    button["Update"].click()
    expect(result).to_contain_text(f"Updated: now serving {DEFAULT}@b (was {DEFAULT}@a)", timeout=SWAP_MS)
    expect(result).to_contain_text("Smoke test passed")
    expect(shown(card, "Live version")).to_have_text("b")
    expect(shown(card, "Previous")).to_have_text("a")
    expect(version_row(card, "b")).to_contain_text("live")
    expect(version_row(card, "a")).to_contain_text("previous")
    card.get_by_label("Update to version").select_option("b")
    expect(button["Update"]).to_have_accessible_description("b is already live")
    expect(button["Roll back"]).to_be_enabled()
    history = history_of(card)
    expect(history.get_by_role("listitem").first).to_contain_text("promoted")
    expect(history.get_by_role("listitem").first).to_contain_text("a → b")

    page.once("dialog", lambda dialog: dialog.accept())
    button["Unload"].click()
    expect(result).to_contain_text(f"Unloaded {DEFAULT}@b", timeout=SWAP_MS)
    expect(state).to_have_text("not loaded")
    expect(card.get_by_text("No model loaded — press Load.")).to_be_visible()
    expect(shown(card, "Live version")).to_have_text("none")
    expect(button["Unload"]).to_be_disabled()
    expect(card.get_by_text("no model loaded", exact=True)).to_be_visible()
    expect(button["Unload"]).to_have_accessible_description("no model loaded")
    expect(button["Reload"]).to_be_disabled()
    expect(button["Reload"]).to_have_accessible_description("nothing to reload: use Load")
    for name in ("Update", "Roll back", "Load"):  # moving off an unloaded version needs no load of it
        expect(button[name]).to_be_enabled()
    expect(history.get_by_role("listitem").first).to_contain_text("unloaded")

    button["Load"].click()
    expect(result).to_contain_text(f"Loaded: now serving {DEFAULT}@b", timeout=SWAP_MS)
    expect(state).to_have_text("loaded")
    expect(shown(card, "Live version")).to_have_text("b")
    expect(button["Load"]).to_have_accessible_description("already loaded")
    expect(button["Unload"]).to_be_enabled()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-1280.png", full_page=True)
    # the token went to the admin API, and nowhere else
    assert {path for path, token in sent if token} >= {f"/admin/models/{DEFAULT}/versions", "/admin/history",
                                                       f"/admin/models/{DEFAULT}/update"}
    assert {path for path, token in sent if token and not path.startswith("/admin/")} == set()


def test_each_model_has_its_own_card_and_an_update_swaps_only_that_model(
    open_page: OpenPage, registry: Registry, model_dir: Callable[..., Path], clip: Path, server_url: str
) -> None:
    add_meeting_model(registry, model_dir)  # before the server starts (open_page starts it)
    page = open_page(1280, 1000)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(urlparse(request.url).path))
    cards = page.get_by_role("region", name=re.compile(r"^Model "))
    default, meeting = model_card(page, DEFAULT), model_card(page, "meeting")

    expect(cards).to_have_count(2)
    expect(cards.first).to_have_accessible_name(f"Model {DEFAULT}")  # the default model first
    expect(shown(default, "Live version")).to_have_text("a")
    expect(shown(meeting, "Live version")).to_have_text("m1")
    expect(meeting.get_by_role("status", name="State of meeting")).to_have_text("loaded")
    expect(meeting.get_by_text("sensevoice", exact=True)).to_be_visible()  # its kind
    expect(meeting.get_by_text("default", exact=True)).to_be_hidden()
    expect(default.get_by_text("default", exact=True)).to_be_visible()
    for card in (default, meeting):  # both serve make-test-model output: labelled, not passed off as ASR
        expect(card.get_by_role("note")).to_contain_text("Generated stand-in — not real speech recognition")
    expect(page.get_by_text("Serving 2 models: sensevoice@a, meeting@m1.")).to_be_visible()

    unlock(page, TOKEN)
    expect(version_row(meeting, "m1")).to_contain_text("live")
    expect(version_row(meeting, "m2")).to_be_visible()
    expect(version_row(meeting, "a")).to_have_count(0)  # each card lists its own model's versions
    expect(version_row(default, "m1")).to_have_count(0)
    expect(history_of(meeting).get_by_role("listitem").filter(has_text="promoted")).to_contain_text("m1")
    expect(history_of(default).get_by_role("listitem").filter(has_text="promoted")).to_contain_text("a")

    meeting.get_by_label("Update to version").select_option("m2")
    meeting.get_by_role("button", name="Update", exact=True).click()
    expect(meeting.get_by_role("status", name="Action result")).to_contain_text(
        "Updated: now serving meeting@m2 (was meeting@m1)", timeout=SWAP_MS)
    expect(shown(meeting, "Live version")).to_have_text("m2")
    expect(shown(meeting, "Previous")).to_have_text("m1")
    expect(version_row(meeting, "m2")).to_contain_text("live")
    expect(history_of(meeting).get_by_role("listitem").first).to_contain_text("m1 → m2")
    # the other model did not move, on the page and on the server
    expect(shown(default, "Live version")).to_have_text("a")
    expect(shown(default, "Previous")).to_have_text("none")
    expect(default.get_by_text("now serving")).to_have_count(0)
    expect(history_of(default)).not_to_contain_text("m2")
    answer = httpx.get(f"{server_url}/admin/models", headers=AUTH).json()
    live = {m["name"]: (m["live_version"], m["previous_version"]) for m in answer["models"]}
    assert answer["default"] == DEFAULT
    assert live == {DEFAULT: ("a", None), "meeting": ("m2", "m1")}

    # the transcription form lists the models and sends the chosen one
    model_choice = page.get_by_label("Model", exact=True)
    expect(model_choice.get_by_role("option")).to_have_text([f"{DEFAULT} (default)", "meeting"])
    model_choice.select_option("meeting")
    expect(page.get_by_text("meeting: generated stand-in — not real speech recognition")).to_be_visible()
    transcript = transcribe(page, clip)
    expect(transcript.get_by_text(MEETING_2, exact=True)).to_be_visible()  # the meeting model answered, not the default
    expect(shown(transcript, "Version")).to_have_text("meeting@m2")
    expect(page.get_by_role("list", name="Requests by version, last minutes")).to_contain_text(
        "meeting@m2", timeout=SWAP_MS)
    model_choice.select_option(DEFAULT)
    expect(transcribe(page, clip).get_by_text(TEXT_A, exact=True)).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-models-1280.png", full_page=True)
    assert "/admin/models/meeting/update" in sent and "/admin/model/update" not in sent


def test_a_refused_update_shows_the_servers_reason_and_the_old_version_keeps_serving(
    open_page: OpenPage, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    broken = shutil.copytree(model_dir("never serves"), tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph" * 64)
    registry.add(broken, "broken")  # checksums match the garbage: only loading it can tell
    page = open_page(1280, 900)
    unlock(page, TOKEN)
    card = model_card(page, DEFAULT)

    card.get_by_label("Update to version").select_option("broken")
    card.get_by_role("button", name="Update", exact=True).click()
    result = card.get_by_role("status", name="Action result")
    expect(result).to_contain_text(f"Update to {DEFAULT}@broken failed (load failed)", timeout=SWAP_MS)
    expect(result).to_contain_text("version 'broken' failed to load")
    expect(result).to_contain_text(f"{DEFAULT}@a keeps serving")
    expect(card.get_by_role("status", name=f"State of {DEFAULT}")).to_have_text("loaded")
    expect(shown(card, "Live version")).to_have_text("a")
    history = history_of(card)
    expect(history.get_by_role("listitem").first).to_contain_text("refused")
    expect(history.get_by_role("listitem").first).to_contain_text("load failed")


def test_the_page_fits_a_phone_screen(open_page: OpenPage, registry: Registry, model_dir: Callable[..., Path],
                                      clip: Path) -> None:
    add_meeting_model(registry, model_dir)
    page = open_page(390, 844)
    card = model_card(page, DEFAULT)
    expect(shown(card, "Live version")).to_have_text("a")
    expect(shown(model_card(page, "meeting"), "Live version")).to_have_text("m1")
    unlock(page, TOKEN)
    expect(version_row(card, "b")).to_be_visible()
    expect(transcribe(page, clip).get_by_text(TEXT_A, exact=True)).to_be_visible()
    expect(card.get_by_role("button", name="Update", exact=True)).to_be_enabled()

    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide on a {width[1]} px screen"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-390.png", full_page=True)


def test_a_server_that_stops_answering_shows_as_offline_not_as_its_last_state(open_page: OpenPage) -> None:
    page = open_page(1280, 900)
    connection = page.locator("#conn")
    card = model_card(page, DEFAULT)
    expect(connection).to_contain_text("live")
    expect(card.get_by_role("status", name=f"State of {DEFAULT}")).to_have_text("loaded")
    hung: list[sync_api.Route] = []
    page.route("**/api/system/status", lambda route: hung.append(route))  # never answered
    expect(connection).to_have_text("offline · retrying", timeout=20_000)
    expect(card.get_by_role("status", name=f"State of {DEFAULT}")).to_have_text("unreachable")
    expect(page.get_by_role("status", name="Server state")).to_have_text("unreachable")
    assert hung  # the page did ask, and gave up on its own (its timeout ended those requests)
    page.unroute("**/api/system/status")
    expect(connection).to_contain_text("live", timeout=10_000)
    expect(card.get_by_role("status", name=f"State of {DEFAULT}")).to_have_text("loaded")


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
        expect(shown(model_card(page, DEFAULT), "Live version")).to_have_text("a")  # app.js, from /static, runs
        page.evaluate("""() => {
            const s = document.createElement("script");
            s.textContent = "window.injected = true";
            document.head.append(s);
            document.body.setAttribute("style", "display: none");
        }""")
        expect(page.get_by_role("heading", name="Server")).to_be_visible()  # the style was refused
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
            expect(page.get_by_role("status", name="Server state")).to_have_text("private")
            expect(page.get_by_text("This server keeps its status private: enter the admin token to see it.")
                   ).to_be_visible()
            expect(page.get_by_role("region", name=re.compile(r"^Model "))).to_have_count(0)
            expect(page.locator("#conn")).to_have_text("status private · admin token needed")

            with page.expect_request(lambda r: urlparse(r.url).path == "/api/system/status"
                                     and "authorization" in r.headers) as status_poll:
                unlock(page, TOKEN)
            assert status_poll.value.headers["authorization"] == f"Bearer {TOKEN}"
            card = model_card(page, DEFAULT)
            expect(shown(card, "Live version")).to_have_text("a")
            expect(card.get_by_role("status", name=f"State of {DEFAULT}")).to_have_text("loaded")
            expect(page.locator("#conn")).to_contain_text("live")
            assert not csp_violations(messages)
        finally:
            context.close()
