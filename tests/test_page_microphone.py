"""The operator page's live microphone in a real headless Chromium, against a real server.

Chromium's fake capture device plays a WAV file as the microphone (speech, then a pause, looped), so
the whole path runs as it does for an operator: getUserMedia, the AudioWorklet, the page's
downsampling to 24 kHz PCM16, the WebSocket to ``/v1/realtime?intent=transcription`` under the
page's Content-Security-Policy, the server's turn detection and decoding, and the page showing
partial text and then each turn's final text with the version that made it.

The browser is Debian's ``/usr/bin/chromium`` driven by the ``playwright`` package; nothing is
downloaded. Screenshots of the live section land in ``artifacts/`` for a human to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI

from server.settings import Settings
from server.testing import synth
from tests.conftest import TEXT_A

if TYPE_CHECKING:
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # a microphone without a person: permission granted, a file played as the device
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
LISTENING = re.compile(r"^(listening|hearing speech)$")
TURN_MS = 30_000  # speech, a pause, then the turn's last piece decoded: on 2 shared cores with Chromium
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake microphone hears, looped: 5 s of speech (longer than realtime_segment_s, so the
    turn has partial text before it ends), then 3 s of silence (longer than silence_duration_ms)."""
    path = tmp_path_factory.mktemp("microphone") / "speech-then-pause.wav"
    path.write_bytes(synth.wav_bytes(synth.islands([("speech", 5.0), ("silence", 3.0)], seed=3)))
    return path


@pytest.fixture(scope="module")
def browser(microphone: Path) -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={microphone}"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: sync_api.Browser, live_server: tuple[str, FastAPI]) -> Iterator[sync_api.Page]:
    """The operator page; an uncaught script error or anything its Content-Security-Policy refused
    (the WebSocket and the AudioWorklet module included) fails the test."""
    url, _ = live_server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    script_errors: list[str] = []
    refused: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    yield page
    context.close()
    assert not script_errors, f"the page's script failed: {script_errors}"
    assert not refused, f"the page's Content-Security-Policy refused: {refused}"


def test_an_operator_speaks_and_sees_partial_text_then_the_final_transcript_with_its_version(
        page: sync_api.Page, settings: Settings) -> None:
    model = settings.default_model
    # the live session uses the model chosen for uploads: wait until the page has listed the models
    expect(page.get_by_label("Model", exact=True)).to_have_value(model)
    live = page.get_by_role("region", name="Live microphone")
    state = live.get_by_role("status", name="Live transcription state")
    expect(state).to_have_text("off")

    live.get_by_role("button", name="Start live transcription").click()
    expect(state).to_have_text(LISTENING)
    turns = live.get_by_role("list", name="Live transcript")

    # while the speaker is still talking: the deltas so far, styled as partial
    partial = turns.locator('li[data-state="partial"]').filter(has_text=TEXT_A).first
    expect(partial).to_be_visible(timeout=TURN_MS)
    expect(partial.locator(".turn-text")).to_have_css("font-style", "italic")
    expect(partial).to_have_attribute("aria-busy", "true")  # screen readers wait for the final text
    ARTIFACTS.mkdir(exist_ok=True)
    live.screenshot(path=ARTIFACTS / "web-page-live-partial.png")

    # after the pause: the turn's final text, labelled with the version that transcribed it
    final = turns.locator('li[data-state="final"]').first
    expect(final.locator(".turn-text")).to_contain_text(TEXT_A, timeout=TURN_MS)
    expect(final.locator(".turn-text")).to_have_css("font-style", "normal")
    version = final.locator("dt", has_text="Version").locator("xpath=following-sibling::dd[1]")
    expect(version).to_have_text(f"{model}@a")
    live.screenshot(path=ARTIFACTS / "web-page-live-final.png")

    # the file loops: stop in the middle of the next turn, once it has partial text
    expect(turns.locator('li[data-state="partial"]').filter(has_text=TEXT_A)).to_have_count(1, timeout=TURN_MS)
    live.get_by_role("button", name="Stop").click()
    expect(state).to_have_text("off", timeout=TURN_MS)
    # the turn being spoken was committed and finished, not cut off
    expect(turns.locator("li")).to_have_count(2)
    expect(turns.locator('li[data-state="final"]')).to_have_count(2)
    expect(live.get_by_role("button", name="Start live transcription")).to_be_enabled()
    expect(live.get_by_role("status", name="Live transcription problem")).to_be_hidden()  # nothing went wrong


def test_a_refused_session_update_is_shown_and_the_session_goes_on(page: sync_api.Page) -> None:
    """An error event (here: a language the server does not know) is shown to the operator; the
    session itself stays open, as the protocol says."""
    expect(page.get_by_label("Language", exact=True)).not_to_have_value("")  # the vocabulary has loaded
    page.evaluate("""() => {
        const select = document.getElementById("language");
        select.append(new Option("Klingon", "tlh"));
        select.value = "tlh";
    }""")
    live = page.get_by_role("region", name="Live microphone")
    live.get_by_role("button", name="Start live transcription").click()
    problem = live.get_by_role("status", name="Live transcription problem")
    expect(problem).to_contain_text("language must be one of", timeout=TURN_MS)
    state = live.get_by_role("status", name="Live transcription state")
    expect(state).to_have_text(LISTENING)
    live.get_by_role("button", name="Stop").click()
    expect(state).to_have_text("off", timeout=TURN_MS)
