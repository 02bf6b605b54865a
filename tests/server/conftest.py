"""Fixtures for the server tests: a tiny random model, apps over temporary databases, and a real uvicorn.

The model is a 2-layer random Llama with a byte-level tokenizer (every byte a token, ChatML specials), so a
generation takes milliseconds and its text is gibberish - which is fine: tests compare what the server
returns with what the engine produces on its own for the same prompt and parameters, never with fixed text.

`LiveServer` runs an app in uvicorn on a thread, on a free port of 127.0.0.1: the `openai` client, the
concurrency test and schemathesis talk to it over real sockets, so streaming and disconnects behave as in
production. PostgreSQL fixtures give each test its own schema (through the URL's `search_path`), skipped
with the reason when the server is unreachable, failed under `CI=true`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from helpers import POSTGRES_URL, TINY_VOCAB, require_postgres, tiny_tokenizer
from mini_claude.config import PRESETS
from mini_claude.engine import Engine
from mini_claude.model import Transformer
from mini_claude.server import create_app
from mini_claude.settings import Settings
from mini_claude.tokenizer import Tokenizer

CONTEXT = 256


def tiny_engine(context: int = CONTEXT, eos: bool = True) -> Engine:
    """The tiny model; `eos=False` gives it no end-of-sequence token, so a reply always runs to its budget."""
    config = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=context)
    model = Transformer(config)
    model.init_weights(std=0.8, generator=torch.Generator().manual_seed(0))
    return Engine(model.eval(), Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>" if eos else None), "tiny")


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The reference: tests compute expected text with it. Every app gets its own copy of the same weights,
    so a server's scheduler thread never shares a model with the test thread or another app."""
    return tiny_engine()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MINI_CLAUDE_* settings from the developer's shell leak into the apps under test."""
    for key in list(os.environ):
        if key.startswith("MINI_CLAUDE_") and key != "MINI_CLAUDE_TEST_POSTGRES_URL":
            monkeypatch.delenv(key)


def app_settings(database_url: str, **kwargs: Any) -> Settings:
    """Settings of a test app: the given values, defaults for the rest (no environment, no .env file)."""
    values: dict[str, Any] = {"api_keys": [], "system_prompt": None, "max_tokens": 512, "ui": False,
                              "audio_cache_max_mb": 0, **kwargs}  # fmt: skip
    return Settings(_env_file=None, database_url=database_url, **values)  # type: ignore[call-arg]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'server.db'}"


@pytest.fixture
def make_client(sqlite_url: str) -> Iterator[Callable[..., TestClient]]:
    """Start apps (lifespan included) on the test's SQLite file; all are shut down at the end."""
    with contextlib.ExitStack() as stack:

        def make(database_url: str = sqlite_url, engine: Engine | None = None, **settings: Any) -> TestClient:
            app = create_app(app_settings(database_url, **settings), engine or tiny_engine())
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


class LiveServer:
    """An app served by uvicorn on a thread, on a free port of 127.0.0.1."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server per test module (over its own SQLite file)."""
    db = tmp_path_factory.mktemp("live") / "live.db"
    server = LiveServer(create_app(app_settings(f"sqlite:///{db}"), tiny_engine()))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_long(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Like `live`, with a model that has no end-of-sequence token: every reply runs to its `max_tokens`."""
    db = tmp_path_factory.mktemp("live") / "live.db"
    server = LiveServer(create_app(app_settings(f"sqlite:///{db}"), tiny_engine(eos=False)))
    yield server
    server.stop()


@pytest.fixture
def make_live(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start real servers with a given engine and settings; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def make(engine: Engine | None = None, **settings: Any) -> LiveServer:
        url = settings.pop("database_url", f"sqlite:///{tmp_path / f'live{len(servers)}.db'}")
        servers.append(LiveServer(create_app(app_settings(url, **settings), engine or tiny_engine())))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def settings_for() -> Callable[..., Settings]:
    """`app_settings(database_url, **values)` for tests that build apps themselves."""
    return app_settings


@pytest.fixture(scope="session")
def new_engine() -> Callable[..., Engine]:
    """`tiny_engine` for tests that need their own (e.g. `new_engine(eos=False)`)."""
    return tiny_engine


# ---------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own, dropped after the test."""
    require_postgres()
    name = f"mc_server_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """The `LiveServer` class, for module-scoped servers with settings of their own."""
    return LiveServer


@pytest.fixture(scope="session")
def serve_app() -> Callable[[FastAPI], LiveServer]:
    """`LiveServer(app)` for module-scoped fixtures that build their own apps (they stop them themselves)."""
    return LiveServer
