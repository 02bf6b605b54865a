"""Fixtures that run every database test on SQLite and on a real PostgreSQL.

Each test gets databases of its own: SQLite files under `tmp_path`, or PostgreSQL schemas with random names
(selected through the connection's `search_path`) that are dropped afterwards, so parallel runs never see
each other's tables. PostgreSQL sessions use a non-UTC time zone on purpose, to prove that timestamps come
back in UTC regardless.

If PostgreSQL cannot be reached its tests are skipped with the reason, except under `CI=true`, where they
fail: CI must never pass by silently testing SQLite alone. Set `MINI_CLAUDE_TEST_POSTGRES_URL` to test
against another server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from helpers import POSTGRES_URL, require_postgres
from mini_claude.db import init_db, make_engine

BACKENDS = ("sqlite", "postgresql")


@contextlib.contextmanager
def _admin_connection() -> Iterator[Connection]:
    """An autocommit connection for creating and dropping schemas."""
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


class Databases:
    """Hands out empty databases of one backend for a test and removes them afterwards."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self._tmp_path = tmp_path
        self._schemas: list[str] = []
        self._engines: list[Engine] = []

    def new_url(self) -> URL:
        """The URL of a new, empty database."""
        name = f"mc_test_{uuid.uuid4().hex[:16]}"
        if self.backend == "sqlite":
            return make_url(f"sqlite:///{self._tmp_path / name}.sqlite")
        with _admin_connection() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        self._schemas.append(name)
        return make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name} -ctimezone=Asia/Kolkata"})

    def engine(self, url: URL | None = None) -> Engine:
        """An engine on `url` (a new empty database by default), disposed of at the end of the test."""
        engine = make_engine(url if url is not None else self.new_url())
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()
        if self._schemas:
            with _admin_connection() as connection:
                for name in self._schemas:
                    connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture(params=BACKENDS)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    """A source of empty databases, once per backend."""
    if request.param == "postgresql":
        require_postgres()
    dbs = Databases(request.param, tmp_path)
    try:
        yield dbs
    finally:
        dbs.close()


@pytest.fixture
def engine(databases: Databases) -> Engine:
    """An engine on a new database with the current schema."""
    engine = databases.engine()
    init_db(engine)
    return engine
