"""The web chat UI: a Gradio Blocks page mounted inside the API server's own FastAPI app at `/ui`.

Design choices:
- The page talks only to the service object the HTTP routes use (`stream_reply` and the conversation
  functions, see `ChatService`). It never calls the server over HTTP and never samples on its own, so a reply
  in the browser is the one the API would give, and it is stored the same way.
- The database is the source of truth for conversations. The chat pane shows the UI's copy while a reply
  streams; opening a conversation reloads its messages from the store.
- Streaming: Send runs an async generator that re-yields the chat with the reply so far after every token
  event. Leaving it, for whatever reason, closes the service's iterator (`contextlib.aclosing`), which is how
  generation is cancelled and the partial reply stored: when Stop is pressed, when the browser goes away
  (Gradio closes the generator), or when the reply is done.
- Stop is cooperative rather than Gradio's `cancels=`: it sets an `asyncio.Event` of the browser session that
  the Send generator races against the next token, then the generator ends normally and shows the partial
  reply. Gradio's task cancellation races its own client: in a real browser about one Stop in eight left the
  chat pane covered by an "Error" badge (the same race as gradio-app/gradio#10648 and #11586).
- The conversation list is a radio group whose values are conversation ids and whose labels are titles;
  only user input (`.input`, not `.change`) opens a conversation, so refreshing the list never reloads one.
- Grounded chat: a "Knowledge" box names collections (comma-separated); the reply then streams without
  unknown [n] marks (the service cuts them) and, when it is done, the sources are shown under it: each
  numbered source with its file and heading, which ones the reply cites, and how many were left out for lack
  of room. They are the pane's, not the store's: a reopened conversation shows its replies without them.
- Client-side rendering only (`ssr_mode=False`: no Node server), telemetry off, the theme's bundled fonts:
  the page works on a machine without internet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import gradio as gr

from mini_claude.ui import voice as voice_ui

if TYPE_CHECKING:
    from fastapi import FastAPI

TITLE = "Mini-Claude"
LIST_LIMIT = 100  # conversations shown in the sidebar, newest first
LABEL_CHARS = 48  # longer titles are cut so the sidebar stays one column wide
DEFAULT_TEMPERATURE = 0.2  # the service's own chat default (what `mini-claude chat` uses)
DEFAULT_MAX_TOKENS = 512  # when the service does not expose its settings
MAX_TOKENS_LIMIT = 4096

CSS = """
#sidebar { border-right: 1px solid var(--border-color-primary); padding-right: 12px; }
#conversations .wrap { flex-direction: column; align-items: stretch; gap: 4px; }
#conversations label { width: 100%; }
"""

T = TypeVar("T")


class ReplyEventLike(Protocol):
    """What the UI reads from one event of `ChatService.stream_reply` (the server's `ReplyEvent`)."""

    type: str  # "start" | "token" | "done" | "error"
    conversation_id: str
    content: str
    citations: list[dict[str, Any]] | None  # grounded chat, on "done"
    knowledge: dict[str, Any] | None


class ChatService(Protocol):
    """The slice of the server's service layer the UI uses; the HTTP routes use the same object."""

    def stream_reply(
        self,
        message: str,
        conversation_id: str | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        model: str | None = None,
        knowledge: list[str] | None = None,
    ) -> AsyncIterator[ReplyEventLike]: ...

    @property
    def model_ids(self) -> list[str]: ...

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]: ...

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None: ...

    def delete_conversation(self, conversation_id: str) -> bool: ...


def _label(conversation: dict[str, Any]) -> str:
    title = " ".join(str(conversation.get("title") or "Untitled").split())
    return title if len(title) <= LABEL_CHARS else title[: LABEL_CHARS - 1] + "…"


def _md(text: str) -> str:
    """Text shown literally in Markdown (file names and headings may hold `*`, `_`, `[`...)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text)


def sources_markdown(knowledge: dict[str, Any], citations: list[dict[str, Any]]) -> str:
    """The sources under a grounded reply: each numbered one with file, page and heading, and whether cited."""
    cited = {c["n"] for c in citations}
    lines = ["**Sources**", ""]
    for s in knowledge.get("sources") or []:
        where = _md(s["filename"] or s["file_id"]) + (f", page {s['page']}" if s.get("page") else "")
        where += f" — {_md(s['heading'])}" if s.get("heading") else ""
        lines.append(f"- \\[{s['n']}\\] {where}{' · *cited*' if s['n'] in cited else ''}")
    if knowledge.get("left_out"):
        lines.append(f"- *{len(knowledge['left_out'])} more left out: no room in the context*")
    if not knowledge.get("sources"):
        lines.append(f"- *no source: {_md(knowledge.get('note') or 'nothing was found')}*")
    return "\n".join(lines)


def _friendly(fn: Callable[..., T], *args: Any) -> T:
    """Call a service function; a failure becomes a Gradio error toast with the service's own message."""
    try:
        return fn(*args)
    except Exception as exc:  # the server's APIError carries a user-facing `message`
        raise gr.Error(getattr(exc, "message", None) or "The server could not do that; try again.") from exc


async def until_set(events: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """Yield from `events` until they end or `stop` is set, whichever comes first.

    A stop that arrives while the next event is awaited (a prefill, a wait for a batch slot) cancels that
    wait at once, as a client disconnect would; the caller still closes `events` afterwards.
    """
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)  # let the service's cleanup run
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stopped.cancel()


def build_ui(service: ChatService) -> gr.Blocks:
    """Build the chat page over `service` (not yet mounted; `mount_ui` does that).

    Args:
        service: the server's service object; see `ChatService` for the methods used. If it has
            `settings.max_tokens` (the server's `Settings`), the max-tokens slider starts there.

    Returns:
        The Gradio Blocks app. Its handlers close over `service`, so one page serves every browser session,
        each with its own open conversation.
    """
    stops: dict[str, asyncio.Event] = {}  # browser session -> the Stop signal of its reply in progress
    default_max_tokens = getattr(getattr(service, "settings", None), "max_tokens", DEFAULT_MAX_TOKENS)

    def model_list(current: str | None = None) -> dict[str, Any]:
        """A dropdown update with the served models (the base one first, then adapters, upstream models and
        agents), keeping `current`.

        Read when a page loads, so adapters and agents added since (a finished fine-tune job, a new agent)
        appear on reload."""
        ids = service.model_ids
        return gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

    def conversation_list(selected: str | None = None) -> dict[str, Any]:
        """A radio update listing the stored conversations, with `selected` highlighted (None: none)."""
        rows = _friendly(service.list_conversations, LIST_LIMIT)
        return gr.update(choices=[(_label(c), c["id"]) for c in rows], value=selected)

    async def send(
        message: str,
        history: list[dict[str, Any]],
        conversation_id: str | None,
        system_prompt: str,
        temperature: float,
        max_tokens: float,
        model: str | None,
        knowledge: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
        """Stream one reply into the chat pane; outputs are (chat, message box, open conversation, list)."""
        text = message.strip()
        if not text:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        stop = stops[request.session_hash or ""] = asyncio.Event()
        history = [*history, {"role": "user", "content": text}]
        reply = ""
        yield [*history, {"role": "assistant", "content": reply}], "", conversation_id, gr.skip()
        events = service.stream_reply(
            text,
            conversation_id,
            system_prompt=system_prompt.strip() or None,
            temperature=float(temperature),
            max_tokens=int(max_tokens),
            model=model or None,
            **({"knowledge": names} if (names := [n.strip() for n in knowledge.split(",") if n.strip()]) else {}),
        )
        sources = ""
        try:
            # Leaving this block, however it happens, closes the service's iterator: that cancels the generation.
            async with contextlib.aclosing(events), contextlib.aclosing(until_set(events, stop)) as stream:
                async for event in stream:
                    if event.type == "start":
                        conversation_id = event.conversation_id
                        # The conversation is in the store from its first message: list it at once.
                        listed = await asyncio.to_thread(conversation_list, conversation_id)  # a database read
                        yield gr.skip(), gr.skip(), conversation_id, listed
                        continue
                    if event.type == "done" and getattr(event, "knowledge", None) is not None:
                        sources = sources_markdown(event.knowledge, event.citations or [])  # type: ignore[arg-type]
                        yield [*history, {"role": "assistant", "content": f"{reply}\n\n{sources}"}], gr.skip(), \
                            conversation_id, gr.skip()  # fmt: skip
                        continue
                    if event.type == "token":
                        reply += event.content
                    elif event.type == "error":
                        gr.Warning(event.content or "The generation failed.")
                        reply = reply or f"*{event.content or 'The generation failed.'}*"
                    else:
                        continue
                    yield [*history, {"role": "assistant", "content": reply}], gr.skip(), conversation_id, gr.skip()
        finally:
            if stops.get(request.session_hash or "") is stop:
                del stops[request.session_hash or ""]
        # The final chat, and the list again: the store has just touched (and may have retitled) the conversation.
        shown = f"{reply}\n\n{sources}" if sources else reply
        final = [*history, {"role": "assistant", "content": shown}] if shown else history
        yield final, gr.skip(), conversation_id, await asyncio.to_thread(conversation_list, conversation_id)

    async def stop_reply(request: gr.Request) -> None:
        """Ask this browser session's reply in progress, if any, to stop."""
        if (stop := stops.get(request.session_hash or "")) is not None:
            stop.set()

    def open_conversation(conversation_id: str | None) -> tuple[Any, Any, Any, Any]:
        """Load a stored conversation: outputs are (chat, open conversation, system prompt, list)."""
        conversation = _friendly(service.get_conversation, conversation_id) if conversation_id else None
        if conversation is None:  # deleted meanwhile (another tab or the API)
            gr.Info("That conversation no longer exists.")
            return [], None, gr.skip(), conversation_list()
        messages = conversation.get("messages") or []
        chat = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] in ("user", "assistant")]
        system = next((m["content"] for m in messages if m["role"] == "system"), conversation.get("system_prompt"))
        return chat, conversation["id"], system or "", gr.skip()

    def new_conversation() -> tuple[Any, Any, Any]:
        """Clear the pane; the service creates the conversation with its first message."""
        return [], None, conversation_list()

    def delete_conversation(conversation_id: str | None) -> tuple[Any, Any, Any]:
        """Delete the open conversation from the store: outputs are (chat, open conversation, list)."""
        if conversation_id is None:
            gr.Info("No conversation is open.")
            return gr.skip(), None, conversation_list()
        if not _friendly(service.delete_conversation, conversation_id):
            gr.Info("That conversation was already deleted.")
        return [], None, conversation_list()

    with gr.Blocks(title=TITLE, analytics_enabled=False, fill_height=True) as demo:
        open_id = gr.State(None)  # id of the conversation shown in the pane; None until its first message
        audio = getattr(service, "audio", None)  # the voice (ui/voice.py), where the service has one
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260, elem_id="sidebar"):
                gr.Markdown(f"## {TITLE}")
                new_button = gr.Button("New conversation", elem_id="new-conversation")
                conversations = gr.Radio(choices=[], label="Conversations", elem_id="conversations")
                delete_button = gr.Button("Delete conversation", variant="stop", size="sm", elem_id="delete")
                with gr.Accordion("Settings", open=True):
                    model = gr.Dropdown(
                        choices=[],
                        label="Model",
                        elem_id="model",
                        info="the base model, a LoRA adapter on it, an upstream's model (UPSTREAM/MODEL) or an agent",
                    )
                    system_prompt = gr.Textbox(
                        label="System prompt",
                        placeholder="Optional instructions for the assistant",
                        lines=3,
                        elem_id="system-prompt",
                    )
                    temperature = gr.Slider(
                        0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                        info="0 always picks the likeliest token", elem_id="temperature",
                    )  # fmt: skip
                    max_tokens = gr.Slider(
                        1, MAX_TOKENS_LIMIT, value=default_max_tokens, step=1, label="Max new tokens",
                        elem_id="max-tokens",
                    )  # fmt: skip
                    knowledge = gr.Textbox(
                        label="Knowledge", placeholder="collections to answer from, e.g. notes, vs_…",
                        info="grounded chat: the sources appear under the reply", elem_id="knowledge",
                    )  # fmt: skip
                    voice = voice_ui.voice_picker(audio) if audio is not None else None
            with gr.Column(scale=4):
                chat = gr.Chatbot(
                    show_label=False,
                    elem_id="chat",
                    height="72vh",
                    placeholder="Ask anything. Replies stream from the model running on this machine.",
                    feedback_options=None,
                    buttons=["copy"],
                )
                with gr.Row(equal_height=True):
                    message = gr.Textbox(
                        show_label=False,
                        placeholder="Message Mini-Claude (Enter to send)",
                        scale=8,
                        autofocus=True,
                        container=False,
                        elem_id="message",
                    )
                    send_button = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                    stop_button = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
                if audio is not None and voice is not None:
                    agent_voice = getattr(service, "agent_voice", lambda model_id: None)
                    voice_ui.add_voice(  # an agent's own voice, when the picked model is an agent that has one
                        audio, chat, message, voice, [model], lambda picked, model_id: agent_voice(model_id) or picked
                    )

        private: dict[str, Any] = {"api_visibility": "private"}  # the OpenAI routes are the API; these are not
        gr.on(
            [send_button.click, message.submit],
            send,
            [message, chat, open_id, system_prompt, temperature, max_tokens, model, knowledge],
            [chat, message, open_id, conversations],
            trigger_mode="once",  # one reply at a time per page
            concurrency_limit=None,  # many tabs' replies are batched by the service's scheduler, not serialised
            show_progress="hidden",
            **private,
        )
        stop_button.click(stop_reply, None, None, queue=False, **private)
        conversations.input(
            open_conversation, [conversations], [chat, open_id, system_prompt, conversations], **private
        )
        new_button.click(new_conversation, None, [chat, open_id, conversations], **private)
        # The pane's own trash button empties it; the next message must then start a new conversation too.
        chat.clear(new_conversation, None, [chat, open_id, conversations], **private)
        delete_button.click(delete_conversation, [open_id], [chat, open_id, conversations], **private)
        demo.load(conversation_list, None, [conversations], **private)
        demo.load(model_list, [model], [model], **private)
    return demo


def mount_ui(app: FastAPI, service: ChatService, path: str = "/ui") -> FastAPI:
    """Serve the chat page from `app` at `path`, over `service`.

    Args:
        app: the API server's FastAPI app; the page shares its process, event loop and lifespan.
        service: the server's service object (see `ChatService`).
        path: where to mount the page.

    Returns:
        `app`, with the page mounted.
    """
    return gr.mount_gradio_app(
        app,
        build_ui(service),
        path=path,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        pwa=False,
        theme=gr.themes.Soft(primary_hue="orange", neutral_hue="stone"),
        css=CSS + voice_ui.VOICE_CSS,
        js=voice_ui.JS,
    )
