"""Engines, sessions and schema set-up for the conversation store, on SQLite or PostgreSQL.

Design choices:
- One `make_engine(url)` hides the per-backend settings. SQLite (the default, a file next to the server) gets
  `check_same_thread=False` so a server's thread pool can share connections, WAL journaling so readers never
  block the writer, `foreign_keys=ON` so `ON DELETE CASCADE` holds, and a busy timeout. PostgreSQL
  (`postgresql+psycopg://...`) gets pre-ping, so a pooled connection broken by a database restart is replaced
  instead of failing a request, and a connect timeout, so a health check cannot hang.
- Python's `sqlite3` driver by default issues no BEGIN before SELECTs or DDL, which breaks SAVEPOINTs and
  makes schema changes non-atomic. Following SQLAlchemy's SQLite notes we switch the driver's own transaction
  handling off and emit BEGIN ourselves, so a SQLite transaction means what a PostgreSQL one does.
- Schema versions are Alembic revisions (`migrations/versions/`), each spelling out its own frozen DDL
  instead of using the models (which describe only the newest schema). Every database, fresh or old, is
  built by running the migrations, so production runs the path the tests run; a test checks that the
  migrated schema equals what `create_all` makes from the models. Databases from before Alembic (a one-row
  `schema_version` table) are adopted as the matching revision.
- SQLite transactions start with `BEGIN IMMEDIATE`, taking the single write lock at once. A deferred
  transaction that reads and then writes fails outright (SQLITE_BUSY, no waiting) when another writer
  committed in between; taking the lock up front turns that failure into a short wait. The price is that
  transactions on one SQLite file run one at a time, which a local server does not notice; deployments with
  many concurrent users belong on PostgreSQL.
- `init_db` runs Alembic in one transaction under a lock (a PostgreSQL advisory lock; on SQLite the write lock above):
  server workers starting together cannot both create or migrate the schema, and a migration that fails
  leaves the database as it was.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from .models import Base

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///./mini_claude.db"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for SQLite's single write lock before failing
POSTGRES_CONNECT_TIMEOUT_S = 10
# Any constant works: it only has to be the same for every process that runs `init_db` on this database.
_INIT_LOCK_KEY = 0x6D696E69  # "mini"


# --------------------------------------------------------------------------------------------------- engines


def make_engine(url: str | URL = DEFAULT_URL, *, echo: bool = False) -> Engine:
    """Create an engine for the store, configured for its backend (see the module docstring).

    Args:
        url: SQLAlchemy URL, e.g. `sqlite:///./mini_claude.db`, `postgresql+psycopg://user@host:5432/db`, or
            `sqlite://` (in memory: one connection shared by all threads, for tests). A SQLite file's parent
            directory is created if missing.
        echo: Log every SQL statement (debugging).
    """
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(url, echo=echo)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)


def _make_sqlite_engine(url: URL, *, echo: bool) -> Engine:
    in_memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if not in_memory and not url.query.get("uri"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        # An in-memory database lives only as long as its connection: every thread must share that one.
        **({"poolclass": StaticPool} if in_memory else {}),
    )
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from the driver; `_on_sqlite_begin` emits BEGIN instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # off by default, per connection
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL (a power cut may lose the last commit)
    cursor.close()


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL journaling (stored in the file: readers and one writer then run concurrently).

    Switching needs the file to itself for a moment, and SQLite answers `database is locked` at once, without
    its busy timeout, when another connection holds a lock meanwhile: server workers opening a fresh file
    together, one of them already migrating it, failed this way now and then. So a file in WAL already is left
    as it is (asking the mode takes no lock), and a switch that meets a lock is retried for the busy timeout.
    """
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    deadline, pause = time.monotonic() + SQLITE_BUSY_TIMEOUT_S, 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def _on_sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# -------------------------------------------------------------------------------------------------- sessions


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit.

    `expire_on_commit=False` lets a function return ORM objects from inside `session_scope` and its caller
    read their columns after the session has closed (relationships not loaded by then cannot be read).
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit when the block succeeds, roll back when it raises, always close.

    Args:
        bind: An engine (a session with `make_session_factory`'s settings is made) or a session factory.
    """
    factory = make_session_factory(bind) if isinstance(bind, Engine) else bind
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(engine: Engine) -> bool:
    """Whether the database answers a trivial query; for health checks, so it never raises on a database error."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        logger.warning("database ping failed: %s", error)
        return False
    return True


# ------------------------------------------------------------------------------------------------ migrations

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The store numbered its schema in a one-row `schema_version` table before it used Alembic; those versions are
# these revisions (the same frozen DDL), so an older database is adopted, not rebuilt.
LEGACY_REVISIONS = {1: "0001", 2: "0002", 3: "0003"}
_legacy_version_table = Table("schema_version", MetaData(), Column("version", Integer, nullable=False))


def _alembic(connection: Connection | None = None) -> tuple[Config, ScriptDirectory]:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config, ScriptDirectory.from_config(config)


def head_revision() -> str:
    """The newest schema revision this code knows."""
    head = _alembic()[1].get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database, or None for a database Alembic has never touched."""
    return MigrationContext.configure(connection).get_current_revision()


def _adopt_legacy_version(connection: Connection, script: ScriptDirectory) -> None:
    """Record a pre-Alembic database's `schema_version` as the matching Alembic revision."""
    if not inspect(connection).has_table(_legacy_version_table.name):
        return
    version = connection.execute(select(_legacy_version_table.c.version)).scalar_one()
    if version not in LEGACY_REVISIONS:
        raise RuntimeError(f"database schema version {version} is unknown to this code; upgrade mini-claude")
    MigrationContext.configure(connection).stamp(script, LEGACY_REVISIONS[version])
    _legacy_version_table.drop(connection)
    logger.info("adopted schema_version %d as revision %s", version, LEGACY_REVISIONS[version])


def _migrate(engine: Engine, target: str, downgrade: bool = False) -> list[str]:
    with engine.connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INIT_LOCK_KEY})
        config, script = _alembic(connection)
        _adopt_legacy_version(connection, script)
        before = current_revision(connection)
        if before is None:
            existing = set(inspect(connection).get_table_names()) & set(Base.metadata.tables)
            if existing:
                raise RuntimeError(
                    f"tables {sorted(existing)} exist but the database records no schema revision; "
                    "it was not created by mini-claude and cannot be migrated safely"
                )
        elif before not in {rev.revision for rev in script.walk_revisions()}:
            raise RuntimeError(
                f"database schema revision {before} is newer than this code knows (head {script.get_current_head()}); "
                "upgrade mini-claude"
            )
        if downgrade:
            command.downgrade(config, target)
        else:
            command.upgrade(config, target)
        after = current_revision(connection)
        if after == before:
            return []
        upper, lower = (before, after) if downgrade else (after, before)
        steps = [rev.revision for rev in script.iterate_revisions(upper or "base", lower or "base")]
        return steps if downgrade else steps[::-1]


def init_db(engine: Engine, *, target: str = "head") -> list[str]:
    """Bring the database to `target` (the newest schema by default): create it when fresh, migrate it when older,
    else do nothing. Safe to call at every start-up; runs in one transaction under a lock (module docstring).

    Args:
        engine: Engine from `make_engine`.
        target: An Alembic revision (tests build older schemas this way).

    Returns:
        The revisions applied, oldest first: empty when the database was current already.

    Raises:
        RuntimeError: The database is newer than this code, or holds the store's tables without a revision.
    """
    return _migrate(engine, target)


def downgrade_db(engine: Engine, target: str) -> list[str]:
    """Take the schema back to `target` (a revision, or "base" for an empty database); returns the revisions
    undone, newest first. Data in dropped tables and columns is lost."""
    return _migrate(engine, target, downgrade=True)
