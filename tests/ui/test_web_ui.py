"""The web chat UI, driven in a real browser against the real server, service, scheduler and database.

Headless Chromium opens the page served by uvicorn (`create_app` mounts the UI at /ui) and uses it as a person
would. What it shows is checked against references, never against fixed text: each reply must equal what the
engine generates on its own for the same chat (greedy, the service's chat sampling defaults), and what the
pane shows must equal what the database stored. The model writes plain lowercase words and never ends a
reply by itself (see `word_engine`), so these comparisons are exact.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from fastapi import FastAPI

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.config import PRESETS
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.model import Transformer
from mini_claude.server import create_app
from mini_claude.server.chat import CHAT_DEFAULTS
from mini_claude.settings import Settings
from mini_claude.tokenizer import Tokenizer
from mini_claude.ui.web import until_set

CONTEXT = 2048
INIT_STD = 0.02  # GPT-2's init: the blocks add little to the residual stream, so dimension 0 stays dominant
WORD_BIAS = 1.0  # the constant on dimension 0 of every embedding (50 times the other entries' spread)
HEAD_WEIGHT = 10.0  # +/- weight of dimension 0 in the LM head: allowed tokens lead the rest by ~150 logits
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WATCH_REPLIES = """() => {
    // Every text the newest bot message has shown, in order: proof that the reply grew token by token.
    window.shown = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('#chat [data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText : "";
        if (text && text !== window.shown[window.shown.length - 1]) window.shown.push(text);
    }).observe(document.querySelector("#chat"), {subtree: true, childList: true, characterData: true});
}"""


# -------------------------------------------------------------------------------------------------- fixtures


def word_engine() -> Engine:
    """The tiny random Llama of the other tests (GPT-2's init), made to write only lowercase letters and spaces.

    Every token embedding carries a large constant on dimension 0, so the final hidden state always points
    along it, and the LM head's column 0 rewards the 26 letters and the space and punishes every other token.
    Replies are then random lowercase words (the context still steers which) that the chat pane renders as
    they are (no Markdown, HTML or broken UTF-8 to reinterpret), and the model never emits its end-of-turn
    token, so a reply always runs to exactly `max_tokens`, one character per token.
    """
    config = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=CONTEXT)
    model = Transformer(config)
    model.init_weights(std=INIT_STD, generator=torch.Generator().manual_seed(0))
    backend = tiny_tokenizer()
    allowed = [backend.token_to_id(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] + [backend.token_to_id("Ġ")]
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = WORD_BIAS  # (vocab, dim): dimension 0 of every token
        model.lm_head.weight[:, 0] = -HEAD_WEIGHT  # (vocab, dim): every token punished along it...
        model.lm_head.weight[allowed, 0] = HEAD_WEIGHT  # ...but letters and the space
    return Engine(model.eval(), Tokenizer(backend, eos_token="<|im_end|>"), "tiny-words")


class LiveServer:
    """An app served by uvicorn on a thread, on a free port of 127.0.0.1 (the socket is bound first: no race)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def service(self) -> Any:
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Browser:
    """A browser context, and what its pages tried to fetch from anywhere but this machine (blocked)."""

    context: Any
    outside_requests: list[str] = field(default_factory=list)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run; .ci/run installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless Debian Chromium with a fresh profile that may reach 127.0.0.1 only: the page must work offline.

    Playwright drives it; its own browser downloads are not used. Without a Chromium the tests skip, saying
    why, except under `CI=true`, where that is a failure.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    chromium = find_chromium()
    if chromium is None:
        _missing("no Chromium found (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )  # fmt: skip
        context.set_default_timeout(20_000)
        browser = Browser(context)

        def only_local(route: Any) -> None:
            if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
                route.continue_()
            else:
                browser.outside_requests.append(route.request.url)
                route.abort()

        context.route("**/*", only_local)
        try:
            yield browser
        finally:
            context.close()


def words(text: str) -> str:
    """Text as the browser lays it out: runs of whitespace become one space, none at the ends."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("ui") / "ui.db"
    settings = Settings(_env_file=None, database_url=f"sqlite:///{db}", api_keys=[], system_prompt=None)  # type: ignore[call-arg]
    live = LiveServer(create_app(settings, word_engine()))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference() -> Engine:
    """Its own copy of the weights: the server's scheduler thread never shares a model with the test."""
    return word_engine()


def expected_reply(engine: Engine, messages: list[dict[str, str]], max_tokens: int) -> str:
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=0.0, top_p=CHAT_DEFAULTS["top_p"],
        repetition_penalty=CHAT_DEFAULTS["repetition_penalty"],
    )  # fmt: skip
    return engine.complete(engine.encode_chat(messages), params).text


@dataclass
class Tab:
    """One browser tab (its own Gradio session) on the server, and the uncaught errors of its page."""

    page: Any
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def tab(server: LiveServer, browser: Browser) -> Iterator[Tab]:
    """A new tab opened at the server's root; closed after the test, before the server stops."""
    tab = Tab(browser.context.new_page())
    tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
    tab.page.goto(server.url + "/")
    tab.page.locator("#message textarea").wait_for()
    tab.page.locator("#chat").wait_for(state="attached")  # rendered apart from the textarea: observed below
    tab.page.evaluate(WATCH_REPLIES)
    yield tab
    tab.page.close()


def set_slider(page: Any, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function(
        f"() => Number(document.querySelector('#{elem_id} input[type=range]').value) === {value}", timeout=5000
    )


def send(page: Any, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def chat_messages(page: Any) -> list[tuple[str, str]]:
    """(role, text) of every message in the pane, in order."""
    items = page.locator('#chat [data-testid="user"], #chat [data-testid="bot"]')
    return [
        ("user" if item.get_attribute("data-testid") == "user" else "assistant", words(item.inner_text()))
        for item in items.all()
    ]


def wait_for_reply(page: Any, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator('#chat [data-testid="bot"]').last).to_have_text(words(text), timeout=30_000)


def conversation_labels(page: Any) -> list[str]:
    return [words(t) for t in page.locator("#conversations label").all_inner_texts()]


def stored(server: LiveServer, conversation_id: str) -> list[tuple[str, str]]:
    found = server.service.get_conversation(conversation_id)
    assert found is not None
    return [(m["role"], words(m["content"])) for m in found["messages"]]


@pytest.mark.slow
def test_root_redirects_to_the_ui_which_works_offline(server: LiveServer, browser: Browser, tab: Tab) -> None:
    with urllib.request.urlopen(server.url + "/") as response:  # follows the redirect
        assert response.url == server.url + "/ui/"
        assert "Mini-Claude" in response.read().decode()
    page = tab.page
    assert page.url == server.url + "/ui/"
    assert page.title() == "Mini-Claude"
    for elem_id in ("chat", "message", "send", "stop", "new-conversation", "conversations", "system-prompt"):
        assert page.locator(f"#{elem_id}").is_visible(), elem_id
    page.evaluate("document.fonts.ready.then(() => true)")
    page.wait_for_timeout(500)  # Gradio holds a stream open, so "network idle" never comes: let loading settle
    assert browser.outside_requests == [], "the page fetched something from outside this server"
    assert tab.errors == []


@pytest.mark.slow
def test_chat_stream_list_reopen_continue_delete(
    server: LiveServer, tab: Tab, reference: Engine, tmp_path: Path
) -> None:
    page = tab.page
    system = "You answer in lowercase words."
    page.locator("#system-prompt textarea").fill(system)
    set_slider(page, "temperature", 0)
    set_slider(page, "max-tokens", 48)

    # Send: the reply streams into the pane and is what the engine writes for this chat on its own.
    send(page, "hello mini claude")
    opening = [{"role": "system", "content": system}, {"role": "user", "content": "hello mini claude"}]
    first = expected_reply(reference, opening, 48)
    wait_for_reply(page, first)
    shown = [words(t) for t in page.evaluate("window.shown")]
    partial = [t for t in shown if t != words(first)]
    assert len(partial) >= 3, f"the reply did not stream: the pane showed {shown}"
    assert all(words(first).startswith(t) for t in partial), "a partial reply was not a prefix of the final one"
    assert page.locator("#message textarea").input_value() == ""

    # The conversation is listed, selected, and stored as shown.
    page.wait_for_function("() => document.querySelector('#conversations input:checked') !== null")
    assert conversation_labels(page) == ["hello mini claude"]
    [conversation] = server.service.list_conversations()
    assert conversation["system_prompt"] == system
    assert stored(server, conversation["id"]) == [("user", "hello mini claude"), ("assistant", words(first))]
    assert chat_messages(page) == stored(server, conversation["id"])

    # New clears the pane; opening the conversation from the list brings its messages back from the store.
    page.locator("#new-conversation").click()
    page.locator('#chat [data-testid="user"]').wait_for(state="detached")
    assert page.locator("#conversations input:checked").count() == 0
    page.locator("#system-prompt textarea").fill("")
    page.locator("#conversations label", has_text="hello mini claude").click()
    page.locator('#chat [data-testid="bot"]').wait_for()
    assert chat_messages(page) == stored(server, conversation["id"])
    assert page.locator("#system-prompt textarea").input_value() == system

    # Continuing it sends the whole history: the reply is the engine's for all four turns.
    send(page, "and then")
    history = [*opening, {"role": "assistant", "content": first}, {"role": "user", "content": "and then"}]
    second = expected_reply(reference, history, 48)
    wait_for_reply(page, second)
    assert [c["id"] for c in server.service.list_conversations()] == [conversation["id"]]
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 2")
    assert chat_messages(page) == stored(server, conversation["id"])
    assert [role for role, _ in chat_messages(page)] == ["user", "assistant", "user", "assistant"]
    page.screenshot(path=str(tmp_path / "web-ui.png"))  # for a person to look at: pytest's tmp dir

    # Delete removes it from the store, the list and the pane.
    page.locator("#delete").click()
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length === 0")
    assert page.locator('#chat [data-testid="user"]').count() == 0
    assert server.service.get_conversation(conversation["id"]) is None
    assert tab.errors == []


@pytest.mark.slow
def test_stop_cancels_the_generation_and_keeps_the_partial_reply(
    server: LiveServer, tab: Tab, reference: Engine
) -> None:
    page = tab.page
    set_slider(page, "temperature", 0)
    set_slider(page, "max-tokens", 2000)
    send(page, "tell me a long story")
    page.wait_for_function("() => window.shown.length > 0 && window.shown[window.shown.length - 1].length >= 30")
    page.locator("#stop").click()

    # The scheduler is idle again long before 2000 tokens: the generation was cancelled, not hidden.
    scheduler = server.service.scheduler
    for _ in range(100):
        if scheduler.stats.running == 0 and scheduler.stats.waiting == 0:
            break
        page.wait_for_timeout(50)
    assert scheduler.stats.running == 0 and scheduler.stats.waiting == 0

    # The partial reply is stored and shown alike, and is the start of what the engine would have written.
    [conversation] = [c for c in server.service.list_conversations() if c["title"] == "tell me a long story"]
    for _ in range(100):
        messages = stored(server, conversation["id"])
        if len(messages) == 2:
            break
        page.wait_for_timeout(50)
    assert [role for role, _ in messages] == ["user", "assistant"]
    partial = server.service.get_conversation(conversation["id"])["messages"][1]["content"]
    assert 30 <= len(partial) < 2000  # one token per character: letters and spaces are single bytes
    wait_for_reply(page, partial)
    assert partial == expected_reply(reference, [{"role": "user", "content": "tell me a long story"}], len(partial))

    # The page is not stuck after a stop: the next message gets its reply.
    set_slider(page, "max-tokens", 8)
    send(page, "short one")
    history = [
        {"role": "user", "content": "tell me a long story"}, {"role": "assistant", "content": partial},
        {"role": "user", "content": "short one"},
    ]  # fmt: skip
    wait_for_reply(page, expected_reply(reference, history, 8))

    # The pane's own clear button starts afresh too: the next message opens a new conversation.
    page.locator('#chat button[aria-label="Clear"]').click()
    page.locator('#chat [data-testid="user"]').first.wait_for(state="detached")
    send(page, "fresh start")
    wait_for_reply(page, expected_reply(reference, [{"role": "user", "content": "fresh start"}], 8))
    titles = [c["title"] for c in server.service.list_conversations()]
    assert titles[:2] == ["fresh start", "tell me a long story"]
    assert tab.errors == []


@pytest.mark.slow
def test_the_model_picker_chooses_an_adapter_loaded_while_serving(
    server: LiveServer, browser: Browser, reference: Engine, tmp_path: Path
) -> None:
    """An adapter added to the running server (as a finished fine-tune job does) is offered on the next page load,
    and choosing it makes the replies the adapter's."""
    import copy

    from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

    lora = apply_lora(copy.deepcopy(reference.model), LoRAConfig(r=4, alpha=8, init_lora_weights=False))
    path = save_adapter(lora, tmp_path / "tuned")
    server.service.load_adapter(str(path), "tuned")
    tuned = Engine(copy.deepcopy(reference.model), reference.tokenizer, "tiny-words")
    tuned.load_adapter(path, "tuned")
    messages = [{"role": "user", "content": "hello adapter"}]
    params = SamplingParams(
        max_new_tokens=24, temperature=0.0, top_p=CHAT_DEFAULTS["top_p"],
        repetition_penalty=CHAT_DEFAULTS["repetition_penalty"],
    )  # fmt: skip
    want = tuned.complete(tuned.encode_chat(messages), params, adapter="tuned").text
    assert words(want) != words(expected_reply(reference, messages, 24))  # the adapter changes the reply

    page = browser.context.new_page()
    try:
        page.goto(server.url + "/ui/")
        page.locator("#message textarea").wait_for()
        page.locator("#model input").click()
        page.get_by_role("option", name="tuned").click()
        set_slider(page, "temperature", 0)
        set_slider(page, "max-tokens", 24)
        send(page, "hello adapter")
        wait_for_reply(page, want)
    finally:
        page.close()
    [conversation] = [c for c in server.service.list_conversations() if c["title"] == "hello adapter"]
    assert conversation["model"] == "tuned"


@pytest.mark.slow
def test_a_grounded_reply_shows_its_sources_under_it(
    server: LiveServer, tab: Tab, reference: Engine, tmp_path: Path
) -> None:
    """With a collection in the Knowledge box, the reply is the engine's answer to the prompt with the numbered
    sources, and the sources found appear under it (this model writes no [n] marks, so none is cited)."""
    from playwright.sync_api import expect

    from mini_claude.rag.grounding import Grounder

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bread.md").write_text("# Bread\n\nLet the dough rise for an hour in a warm place.\n")
    (tmp_path / "docs" / "planets.md").write_text("# Planets\n\nJupiter is the largest planet of all.\n")
    knowledge = server.service.rag.knowledge
    knowledge.ingest([tmp_path / "docs"], "ui-notes")
    question = [{"role": "user", "content": "how long does the dough rise"}]
    grounded = Grounder(knowledge, ["ui-notes"])(question)
    assert [s.hit.filename for s in grounded.sources][:1] == ["bread.md"]

    page = tab.page
    set_slider(page, "temperature", 0)
    set_slider(page, "max-tokens", 16)
    page.locator("#knowledge textarea").fill("ui-notes")
    send(page, question[0]["content"])
    reply = expected_reply(reference, grounded.messages, 16)
    bot = page.locator('#chat [data-testid="bot"]').last
    expect(bot).to_contain_text("Sources", timeout=60_000)
    shown = words(bot.inner_text())
    assert shown.startswith(words(reply) + " Sources")
    assert "[1] bread.md — Bread" in shown and "[2] planets.md — Planets" in shown and "cited" not in shown
    [conversation] = [c for c in server.service.list_conversations() if c["title"] == question[0]["content"]]
    assert stored(server, conversation["id"])[-1] == ("assistant", words(reply))  # the sources are the pane's
    assert tab.errors == []


# ------------------------------------------------------------------------------- the stop signal, no browser


async def _tokens(closed: list[str], gate: asyncio.Event) -> AsyncIterator[str]:
    try:
        yield "a"
        yield "b"
        await gate.wait()  # a token that takes forever (a long prefill, a full batch)
        yield "c"
    finally:
        closed.append("closed")


def test_until_set_stops_between_tokens_and_while_waiting_for_one() -> None:
    async def run(stop_after: int, set_gate: bool) -> tuple[list[str], list[str]]:
        closed: list[str] = []
        gate, stop = asyncio.Event(), asyncio.Event()
        if set_gate:
            gate.set()
        seen: list[str] = []
        tokens = _tokens(closed, gate)
        async for token in until_set(tokens, stop):
            seen.append(token)
            if len(seen) == stop_after:
                asyncio.get_running_loop().call_later(0.05, stop.set)
        await tokens.aclose()
        return seen, closed

    def in_fresh_loop(coroutine: Any) -> Any:
        # On a thread of its own: Playwright's sync API keeps an event loop running on this one.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, asyncio.wait_for(coroutine, 5)).result()

    # Stop while the next token is awaited: the wait is cancelled at once, and the source's cleanup runs.
    assert in_fresh_loop(run(2, set_gate=False)) == (["a", "b"], ["closed"])
    # No stop: everything arrives.
    assert in_fresh_loop(run(99, set_gate=True)) == (["a", "b", "c"], ["closed"])
