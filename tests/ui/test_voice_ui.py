"""The web UI's voice in a real browser: ▶ Play speaks a reply, the voice picker changes the voice, and the
microphone transcribes into the message box.

Chromium's fake media devices stand in for a person: `--use-file-for-fake-audio-capture` plays a WAV file
(hibari saying a sentence, made by the test) as the microphone. What the page plays is fetched back and
compared with what the service layer synthesizes for the reply's text in the chosen voice (engines are
deterministic, so the bytes are equal), and the transcript must be the sentence the microphone heard.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mini_claude.audio import formats
from mini_claude.audio.neural import HibariEngine
from mini_claude.server import create_app
from mini_claude.settings import Settings
from ui.test_web_ui import CHROMIUM_ARGS, LiveServer, _missing, find_chromium, word_engine  # type: ignore[import-not-found]

SPOKEN = "Please turn on the kitchen lights."


def plain(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WAV for Chromium's fake microphone: half a second of silence, the sentence, then silence (it loops)."""
    hibari = HibariEngine()
    voice = hibari.find_voice("heart")
    assert voice is not None
    speech = np.concatenate(list(hibari.stream([SPOKEN], voice, 1.0)))
    silence = np.zeros(12_000, np.float32)
    audio = formats.resample(np.concatenate([silence, speech, *[silence] * 12]), 24_000, 48_000)
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    path.write_bytes(formats.encode(audio, "wav", 48_000))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("voice-ui")
    settings = Settings(
        _env_file=None, database_url=f"sqlite:///{root / 'ui.db'}", api_keys=[], system_prompt=None,
        audio_cache_dir=str(root / "audio-cache"),
    )  # type: ignore[call-arg]  # fmt: skip
    live = LiveServer(create_app(settings, word_engine()))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page(server: LiveServer, microphone: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    chromium = find_chromium()
    if chromium is None:
        _missing("no Chromium found (apt-get install chromium)")
    args = [
        *CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required",
    ]  # fmt: skip
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=chromium, headless=True, args=args,
            viewport={"width": 1280, "height": 1000},
        )  # fmt: skip
        context.set_default_timeout(30_000)
        context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("http://127.0.0.1:", "data:",
                                                                                  "blob:")) else r.abort())  # fmt: skip
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/ui/")
        page.locator("#message textarea").wait_for()
        yield page
        assert errors == []
        context.close()


def set_max_tokens(page: Any, value: int) -> None:
    box = page.locator("#max-tokens input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function(f"() => Number(document.querySelector('#max-tokens input[type=range]').value) === {value}")


def play_and_fetch(page: Any, index: int) -> bytes:
    """Press the ▶ Play of reply `index`; wait until it has played to its end; return the audio file it played."""
    with page.expect_response(lambda response: "/file=" in response.url, timeout=60_000) as fetched:
        page.locator(".mc-play").nth(index).click()
    clock = "document.querySelector('#reply-audio #time').textContent"
    duration = "document.querySelector('#reply-audio #duration').textContent"
    page.wait_for_function(f"() => {clock} !== {duration}")  # playing (it starts at 0:00)
    page.wait_for_function(f"() => {duration} !== '0:00' && {clock} === {duration}", timeout=60_000)  # to the end
    with urllib.request.urlopen(fetched.value.url) as response:
        return response.read()


def stored_reply(page: Any, server: LiveServer, n: int) -> str:
    """The n-th stored reply of the only conversation, once it is stored and the pane shows all of it."""
    deadline = time.monotonic() + 180  # a busy shared machine can be very slow
    while True:
        conversations = server.service.list_conversations()
        messages = server.service.get_conversation(conversations[0]["id"])["messages"] if conversations else []
        if len(messages) >= 2 * (n + 1):
            break
        assert time.monotonic() < deadline, f"reply {n} was not stored; the conversation holds {messages}"
        page.wait_for_timeout(100)
    reply = messages[2 * n + 1]["content"]
    shown = f"document.querySelectorAll('#chat [data-testid=\"bot\"]')[{n}]?.innerText.trim()"
    page.wait_for_function(f"() => {shown} === {' '.join(reply.split())!r}", timeout=60_000)
    return reply


@pytest.mark.slow
def test_play_speaks_each_reply_in_the_picked_voice(page: Any, server: LiveServer) -> None:
    set_max_tokens(page, 40)
    page.locator("#message textarea").fill("hello voice")
    page.locator("#send").click()
    reply = stored_reply(page, server, 0)
    assert page.locator(".mc-play").count() == page.locator('#chat [data-testid="bot"]').count() == 1

    # The default voice (hibari) speaks the reply: the file played is the service's synthesis of its text.
    speech = server.service.audio.speech
    assert play_and_fetch(page, 0) == speech.synthesize(reply, "hibari:heart", fmt="mp3")

    # Picking another voice in Settings makes the same button speak with it.
    page.locator("#voice input").click()
    page.get_by_role("option", name="English (America) (espeak-ng, en-us)").click()
    assert play_and_fetch(page, 0) == speech.synthesize(reply, "espeak-ng:en-us", fmt="mp3")

    # A second reply gets its own button, which speaks that reply.
    page.locator("#message textarea").fill("and again")
    page.locator("#send").click()
    second = stored_reply(page, server, 1)
    assert page.locator(".mc-play").count() == 2
    assert play_and_fetch(page, 1) == speech.synthesize(second, "espeak-ng:en-us", fmt="mp3")


@pytest.mark.slow
def test_the_microphone_transcribes_into_the_message_box(page: Any, server: LiveServer) -> None:
    page.locator("#new-conversation").click()
    page.locator("#message textarea").fill("")
    page.locator("#mic button.record-button").click()
    page.wait_for_timeout(5_000)  # the fake microphone plays the sentence within its first 3.5 s
    page.locator("#mic button.stop-button").click()
    page.wait_for_function("() => document.querySelector('#message textarea').value.length > 0", timeout=60_000)
    heard = page.locator("#message textarea").input_value()
    assert plain(heard) == plain(SPOKEN)

    # It is an ordinary message from there: sending it starts a conversation titled by what was said.
    page.locator("#send").click()
    page.wait_for_function(f"() => [...document.querySelectorAll('#conversations label')].some(l => "
                           f"l.innerText.includes({heard.strip()[:20]!r}))")  # fmt: skip
