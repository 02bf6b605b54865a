"""The web UI's voice: a play button on every assistant reply, a voice picker, and a microphone that
transcribes into the message box.

Design choices:
- Speech and transcription come from the server's service layer (`service.audio.speak_text`,
  `transcribe_file`), the same pipeline, cache and metrics as `/v1/audio/*`; the page never calls the API
  over HTTP (which would also need the API key inside the page).
- Gradio's Chatbot has no per-message custom button, so a small script (`JS`, run once at page load) puts a
  ▶ button after each assistant message and, when one is pressed, records which reply it was and clicks a
  hidden trigger button; that trigger's Gradio event reads the index through its `js` hook and runs `play`
  on the server, which speaks the reply's text into an autoplaying audio player. The button sits beside the
  message element, not inside it, so the message's text stays exactly the reply's.
- Which voice speaks is `choose_voice(picked, *extra)`: by default the voice picked in Settings. A later
  agent picker passes its component as an extra input and a `choose_voice` that prefers the agent's voice:
  wiring it is one call argument.
- The microphone (or an uploaded file) goes through `transcribe`, and the text is appended to what is
  already in the message box, so a person can speak, look, edit, then send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import gradio as gr

VOICE_CSS = """
#speak-trigger, #play-index { display: none !important; }
.mc-play { margin: 2px 0 6px 6px; padding: 1px 10px; border-radius: 999px; cursor: pointer; font-size: 13px;
           border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
.mc-play:hover { background: var(--background-fill-primary); }
"""

# Run once when the page loads: a ▶ button after every assistant message, kept there as the chat re-renders.
JS = """() => {
    const mark = () => {
        document.querySelectorAll('#chat [data-testid="bot"]').forEach((bot) => {
            const next = bot.nextElementSibling;
            if (next && next.classList.contains('mc-play')) return;
            const button = document.createElement('button');
            button.className = 'mc-play';
            button.type = 'button';
            button.textContent = '▶ Play';
            button.setAttribute('aria-label', 'Play this reply');
            button.addEventListener('click', () => {
                window.mcPlayIndex = [...document.querySelectorAll('#chat [data-testid="bot"]')].indexOf(bot);
                document.querySelector('#speak-trigger').click();
            });
            bot.insertAdjacentElement('afterend', button);
        });
    };
    const watch = () => {
        const chat = document.querySelector('#chat');
        if (!chat) return setTimeout(watch, 100);  // the page is still being built
        let queued = false;  // many mutations per streamed token: one pass per frame is enough
        const schedule = () => {
            if (queued) return;
            queued = true;
            requestAnimationFrame(() => { queued = false; mark(); });
        };
        new MutationObserver(schedule).observe(chat, {subtree: true, childList: true});
        mark();
    };
    watch();
}"""


class VoiceService(Protocol):
    """The slice of the server's `AudioService` the UI uses."""

    async def speak_text(self, text: str, voice: str | None = None, fmt: str = "mp3") -> bytes: ...

    async def transcribe_file(self, data: bytes) -> str: ...

    def voices(self) -> Any: ...


def _text(content: Any) -> str:
    """A Chatbot message's text (Gradio gives a string, or a list of parts each with a `text`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, list | tuple):
        return " ".join(_text(part) for part in content)
    return ""


def _friendly_error(exc: Exception) -> gr.Error:
    return gr.Error(getattr(exc, "message", None) or "The voice could not do that; try again.")


def voice_choices(audio: VoiceService) -> list[tuple[str, str]]:
    """(label, id) of every voice, the default engine's first."""
    return [(f"{v.name} ({v.engine}, {v.language})", v.id) for v in audio.voices().voices]


def voice_picker(audio: VoiceService) -> gr.Dropdown:
    """The voice dropdown (call where it should appear, e.g. in the Settings accordion)."""
    choices = voice_choices(audio)
    return gr.Dropdown(
        choices=choices, value=choices[0][1] if choices else None, label="Voice",
        info="speaks a reply when you press ▶ Play under it", elem_id="voice",
    )  # fmt: skip


def add_voice(
    audio: VoiceService,
    chat: gr.Chatbot,
    message: gr.Textbox,
    voice: gr.Dropdown,
    extra_inputs: Sequence[gr.components.Component] = (),
    choose_voice: Callable[..., str | None] = lambda picked, *extra: picked,
) -> dict[str, Any]:
    """Add the microphone, the reply player and the play wiring where called (inside `with gr.Blocks()`).

    Args:
        audio: the server's audio service.
        chat: the chat pane; its assistant messages get play buttons.
        message: the message box the microphone's transcript is added to.
        voice: the voice picker (`voice_picker`).
        extra_inputs: more components `choose_voice` reads (an agent picker, later).
        choose_voice: (picked voice, *extra input values) -> the voice id to speak with (None: the default).

    Returns:
        The new components by name (`mic`, `player`, `trigger`).
    """
    private: dict[str, Any] = {"api_visibility": "private"}
    mic = gr.Audio(
        sources=["microphone", "upload"], type="filepath", label="Speak (transcribed into the message box)",
        elem_id="mic", buttons=[],
    )  # fmt: skip
    player = gr.Audio(label="Reply audio", autoplay=True, interactive=False, elem_id="reply-audio", buttons=[])
    index = gr.Number(value=-1, precision=0, elem_id="play-index", container=False)
    trigger = gr.Button("speak", elem_id="speak-trigger")

    async def play(at: float, history: list[dict[str, Any]], picked: str | None, *extra: Any) -> bytes | None:
        replies = [m for m in history or [] if m.get("role") == "assistant"]
        if not 0 <= int(at) < len(replies):
            return None
        text = _text(replies[int(at)].get("content"))
        try:
            return await audio.speak_text(text, choose_voice(picked, *extra))
        except Exception as exc:
            raise _friendly_error(exc) from exc

    async def transcribe(path: str | None, current: str) -> tuple[Any, Any]:
        if not path:
            return gr.skip(), gr.skip()
        try:
            text = await audio.transcribe_file(Path(path).read_bytes())
        except Exception as exc:
            raise _friendly_error(exc) from exc
        if not text:
            gr.Info("No speech was heard in that recording.")
            return gr.skip(), None
        return " ".join(part for part in (current.strip(), text) if part), None

    trigger.click(
        play, [index, chat, voice, *extra_inputs], [player],
        js="(at, history, ...rest) => [window.mcPlayIndex ?? -1, history, ...rest]", show_progress="minimal",
        **private,
    )  # fmt: skip
    mic.stop_recording(transcribe, [mic, message], [message, mic], **private)
    mic.upload(transcribe, [mic, message], [message, mic], **private)
    return {"mic": mic, "player": player, "trigger": trigger}
