"""The service layer: a loaded model + tokenizer that turns prompts or conversations into streams of text.

Every front end (CLI, HTTP routes, WebSocket, web UI) consumes `Engine.stream()`; none re-implements
sampling, stop handling or detokenization. A stream yields `TextChunk`s: text that is safe to show (whole
characters, never the beginning of a stop string that may still complete), and a final chunk per sequence
that carries a `Completion` with token ids, finish reason and timings (and, when asked for, each token's
log-probability). `Engine.score` is the other direction: the log-probability of every token of a given text
(OpenAI's `echo` with `logprobs`, which is how evaluation harnesses score choices), from one dense forward.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mini_claude.adapters import AdapterInfo, AdapterSet, parse_adapter_spec
from mini_claude.checkpoint import load_model
from mini_claude.generate import (
    BatchGenerator,
    ContextOverflowError,
    GenerationError,
    SamplingParams,
    SequenceState,
    TokenEvent,
    TokenLogprob,
    token_logprobs,
)
from mini_claude.grammar import GrammarCompiler
from mini_claude.model import Transformer
from mini_claude.tokenizer import IncrementalDetokenizer, Tokenizer


def release_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's `malloc_trim`; a no-op elsewhere).

    Generation reuses the heap for its short-lived buffers (see `_eager_memory_release`), so a long prefill's
    temporaries stay resident after it ends; the scheduler calls this when it goes idle.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _eager_memory_release() -> Iterator[None]:
    """Keep a model load's temporaries from inflating the process for good (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold every time a large block is freed, so after the first few tensors
    every temporary lands on the heap, which fragments and is never returned: loading then peaks near
    twice the model's size. Pinning the threshold low during the load returns large temporaries to the OS
    at once, and a final `malloc_trim` gives back what the heap still holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
            # Back to heap reuse for generation's many short-lived buffers (mmap per buffer costs page faults).
            libc.mallopt(-3, 32 * 1024 * 1024)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 where the CPU multiplies bf16 natively (AVX512-BF16/AMX), else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass
class Completion:
    """Everything about one finished generation, as the CLI's `--json` and the API's `usage` report it."""

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    finish_reason: str
    ttft_ms: float
    decode_tokens_per_s: float
    truncated_prompt_tokens: int = 0
    # when asked for: one per sampled token, including an end-of-sequence token (not in completion_ids)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class TextChunk:
    index: int  # which prompt of the call this belongs to
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the last chunk of a sequence
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of this chunk's tokens, when asked for


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if s.startswith(self.pending[-n:]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """A model, its tokenizer and the LoRA adapters loaded on it; `adapter=NAME` picks one per generation."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.adapters = AdapterSet(model)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)

    @classmethod
    def load(
        cls,
        source: str | Path,
        dtype: str = "auto",
        threads: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        quantize: str = "auto",
        name: str | None = None,
        adapters: Sequence[str] = (),
    ) -> Engine:
        """Load a checkpoint (see `checkpoint.load_checkpoint`) and LoRA adapters on it, each `DIR` (named after
        the dir) or `NAME=DIR`; `name` is how front ends will refer to the base model."""
        if threads:
            torch.set_num_threads(threads)
        with _eager_memory_release():
            model, tokenizer, saved_name = load_model(source, resolve_dtype(dtype), progress, quantize)
        path = Path(source)
        engine = cls(
            model, tokenizer, name or (saved_name if path.is_dir() else path.name.removesuffix(".gguf")), str(source)
        )
        for spec in adapters:
            adapter_name, adapter_dir = parse_adapter_spec(spec)
            engine.load_adapter(adapter_dir, adapter_name)
        return engine

    def load_adapter(self, path: str | Path, name: str | None = None) -> AdapterInfo:
        """Add a PEFT-format LoRA adapter; generations then choose it with `adapter=info.name`. Safe while a
        scheduler runs: it takes effect between two forwards."""
        return self.adapters.load(path, name, reserved=[self.name])

    @property
    def context_window(self) -> int:
        return self.model.config.max_seq_len

    # ------------------------------------------------------------------------------------- prompts
    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level token may be part of a character); a special token's
        are its name's."""
        raw = self.grammars.ll_tokenizer.decode_bytes([token_id])
        if raw.startswith(b"\xff"):  # llguidance marks special tokens with a 0xFF byte
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return raw

    def encode_text(self, text: str) -> list[int]:
        """Tokenize raw text as is, with the model's own BOS rule."""
        return self.tokenizer.encode(text)

    def fit_prompt(self, ids: list[int], truncate: bool = False) -> tuple[list[int], int]:
        """Check a prompt fits the context; with `truncate`, drop the oldest tokens and say how many."""
        limit = self.context_window - 1  # room for at least one new token
        if len(ids) <= limit:
            return ids, 0
        if not truncate:
            raise ContextOverflowError(len(ids), self.context_window)
        keep_bos = self.tokenizer.add_bos and ids[:1] == [self.tokenizer.bos_id]
        head = ids[:1] if keep_bos else []
        tail = ids[len(ids) - (limit - len(head)) :]
        return head + tail, len(ids) - len(head) - len(tail)

    # ------------------------------------------------------------------------------------ generation
    def stream(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
        adapter: str | None = None,
    ) -> Iterator[TextChunk]:
        """Generate continuations of several token prompts together, yielding text as it becomes final.

        `adapter` names a loaded LoRA adapter to generate with (None: the base model). Closing the iterator
        early (a client went away, Ctrl-C) stops the work for all its sequences.
        """
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        fitted = [self.fit_prompt(list(p), truncate) for p in prompts]
        gen = BatchGenerator(self.model, len(prompts), self.tokenizer.stop_ids, self.adapters, masks=self.grammars.mask)
        seqs = [gen.new_sequence(ids, sp, adapter) for (ids, _), sp in zip(fitted, per_prompt, strict=True)]
        start = time.perf_counter()
        texts = {id(s): TextAssembler(self.tokenizer, i, stop, fitted[i][1], start) for i, s in enumerate(seqs)}
        gen.admit(seqs)
        while gen.running:
            for ev in gen.step():
                if ev.finish_reason == "error":
                    raise GenerationError(ev.seq.error)
                yield texts[id(ev.seq)].on_event(ev, gen)

    def complete(
        self,
        prompt: list[int],
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
        adapter: str | None = None,
    ) -> Completion:
        """Run one prompt to the end and return the whole result."""
        for chunk in self.stream([prompt], params, stop, truncate, adapter):
            if chunk.completion is not None:
                return chunk.completion
        raise RuntimeError("generation ended without a final chunk")  # unreachable: every sequence finishes

    @torch.inference_mode()
    def score(
        self, prompt_ids: Sequence[int], top: int = 0, adapter: str | None = None, start: int = 1
    ) -> list[TokenLogprob | None]:
        """The log-probability of each token of `prompt_ids` from `start` on, given the ones before it (None
        for those before `start`, and always for the first, which has no context), with the `top` most likely
        tokens at each position: one forward over the whole text, without a cache, on the dense path (the
        int4/int8 layers' prefill weights); the vocabulary projection only where a score is wanted. Not
        thread-safe against other forwards: a server runs it on its scheduler's thread (`Scheduler.call`)."""
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.context_window:
            raise ContextOverflowError(len(ids), self.context_window)
        start = min(max(start, 1), len(ids))
        device = self.model.embed_tokens.weight.device
        x = torch.tensor(ids, device=device)
        with self.adapters.route([adapter]):  # one row: the whole text uses `adapter` (None: the base model)
            logits = self.model(x[None], logits_from=start - 1)[0, :-1]  # position t predicts token t+1
        return [None] * start + token_logprobs(logits, x[start:], top)

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        adapter: str | None = None,
    ) -> Iterator[TextChunk]:
        """Stream the assistant's reply to a conversation rendered with the model's own chat template."""
        return self.stream([self.encode_chat(messages)], params, stop, adapter=adapter)


def _printable(text: str) -> str:
    """NUL (a byte token random or small models do emit) as U+FFFD: PostgreSQL's text cannot hold it, many JSON
    clients choke on it, and every front end (and the stored copy of a reply) must show the same text."""
    return text.replace("\x00", "\ufffd")


class TextAssembler:
    """Turns one sequence's token events into `TextChunk`s: detokenization, stop strings, timings, the result.

    Shared by `Engine.stream` and the server's scheduler, so every front end sees the same text.
    """

    def __init__(self, tokenizer: Tokenizer, index: int, stop: Sequence[str], truncated: int, start: float) -> None:
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop)
        self.truncated = truncated
        self.start = start
        self.text: list[str] = []
        self.times: list[float] = []
        self.stopped_by_string = False
        self.logprobs: list[TokenLogprob] = []

    def on_event(self, ev: TokenEvent, gen: BatchGenerator) -> TextChunk:
        self.times.append(time.perf_counter())
        text = ""
        if ev.token_id is not None and ev.token_id not in ev.seq.stop_ids:
            text, hit = self.matcher.feed(self.detok.push(ev.token_id))
            if hit:
                gen.finish(ev.seq, "stop")
                self.stopped_by_string = True
        ids = [ev.token_id] if ev.token_id is not None else []
        lps = [ev.logprob] if ev.logprob is not None else []  # an end token's too (the legacy API reports it)
        self.logprobs += lps
        if not ev.seq.finished:
            text = _printable(text)
            self.text.append(text)
            return TextChunk(self.index, text, ids, logprobs=lps)
        if not self.stopped_by_string:
            text += self.matcher.feed(self.detok.flush())[0] + self.matcher.flush()
        text = _printable(text)
        self.text.append(text)
        return TextChunk(self.index, text, ids, ev.seq.finish_reason, self.completion(ev.seq), lps)

    def completion(self, seq: SequenceState) -> Completion:
        ids = [t for t in seq.output_ids if t not in seq.stop_ids]
        first, last = (self.times[0], self.times[-1]) if self.times else (self.start, self.start)
        rate = (len(self.times) - 1) / (last - first) if len(self.times) > 1 and last > first else 0.0
        return Completion(
            text="".join(self.text),
            prompt_ids=seq.prompt_ids,
            completion_ids=ids,
            finish_reason=seq.finish_reason or "stop",
            ttft_ms=(first - self.start) * 1000,
            decode_tokens_per_s=rate,
            truncated_prompt_tokens=self.truncated,
            logprobs=list(self.logprobs),
        )
