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
- Schema versions without Alembic: a one-row `schema_version` table and an ordered tuple of migration
  functions, migration *n* taking the schema from version *n-1* to *n*. A fresh database is built by
  `create_all` from the models and stamped with the newest version; an older one runs the missing
  migrations. Migrations spell out their own frozen DDL instead of using the models (which describe only the
  newest schema), and a test checks that migrating from version 1 ends in the same schema as `create_all`.
- SQLite transactions start with `BEGIN IMMEDIATE`, taking the single write lock at once. A deferred
  transaction that reads and then writes fails outright (SQLITE_BUSY, no waiting) when another writer
  committed in between; taking the lock up front turns that failure into a short wait. The price is that
  transactions on one SQLite file run one at a time, which a local server does not notice; deployments with
  many concurrent users belong on PostgreSQL.
- `init_db` runs in one transaction under a lock (a PostgreSQL advisory lock; on SQLite the write lock above):
  server workers starting together cannot both create or migrate the schema, and a migration that fails
  leaves the database as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from .models import (
    ID_LENGTH,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    JOB_STATUSES,
    ROLES,
    Base,
    UTCDateTime,
    in_list_check,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///./mini_claude.db"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for SQLite's single write lock before failing
POSTGRES_CONNECT_TIMEOUT_S = 10
# Any constant works: it only has to be the same for every process that runs `init_db` on this database.
_INIT_LOCK_KEY = 0x6D696E69  # "mini"

_version_metadata = MetaData()
schema_version_table = Table("schema_version", _version_metadata, Column("version", Integer, nullable=False))


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
    cursor.execute("PRAGMA journal_mode=WAL")  # stored in the file; readers and one writer run concurrently
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL (a power cut may lose the last commit)
    cursor.close()


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


def _v1_conversations_and_messages(connection: Connection) -> None:
    """The first schema: conversations and their ordered messages."""
    metadata = MetaData()
    Table(
        "conversations",
        metadata,
        Column("id", String(ID_LENGTH), primary_key=True),
        Column("title", Text, nullable=False),
        Column("model", Text),
        Column("system_prompt", Text),
        Column("metadata", JSON, nullable=False),
        Column("last_seq", Integer, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Index("ix_conversations_updated_at", "updated_at"),
    )
    Table(
        "messages",
        metadata,
        Column("id", String(ID_LENGTH), primary_key=True),
        Column(
            "conversation_id", String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        Column("seq", Integer, nullable=False),
        Column("role", String(16), nullable=False),
        Column("content", Text, nullable=False),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("model", Text),
        Column("ttft_ms", Float),
        Column("duration_ms", Float),
        Column("finish_reason", Text),
        Column("created_at", UTCDateTime, nullable=False),
        Index("ix_messages_conversation_seq", "conversation_id", "seq", unique=True),
        CheckConstraint(in_list_check("role", ROLES), name="ck_messages_role"),
    )
    metadata.create_all(connection)


def _v2_message_idempotency_key(connection: Connection) -> None:
    """Let callers store a message exactly once under a key of their choosing."""
    # A nullable column can be added in place on both backends; existing rows get NULL, which never collides.
    connection.execute(text(f"ALTER TABLE messages ADD COLUMN idempotency_key VARCHAR({IDEMPOTENCY_KEY_MAX_LENGTH})"))
    connection.execute(
        text(
            "CREATE UNIQUE INDEX uq_messages_conversation_idempotency_key "
            "ON messages (conversation_id, idempotency_key)"
        )
    )


def _v3_fine_tune_jobs(connection: Connection) -> None:
    """The job table behind the fine-tuning API."""
    metadata = MetaData()
    Table(
        "fine_tune_jobs",
        metadata,
        Column("id", String(ID_LENGTH), primary_key=True),
        Column("status", String(32), nullable=False),
        Column("config", JSON, nullable=False),
        Column("progress", Float, nullable=False),
        Column("result", JSON),
        Column("error", Text),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Index("ix_fine_tune_jobs_created_at", "created_at"),
        CheckConstraint(in_list_check("status", JOB_STATUSES), name="ck_fine_tune_jobs_status"),
    )
    metadata.create_all(connection)


# Append only: entry n-1 migrates version n-1 to n. Never edit a migration that has shipped.
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _v1_conversations_and_messages,
    _v2_message_idempotency_key,
    _v3_fine_tune_jobs,
)
SCHEMA_VERSION = len(MIGRATIONS)


def get_schema_version(connection: Connection) -> int | None:
    """The version recorded in the database, or None when it has no `schema_version` table (a fresh one)."""
    if not inspect(connection).has_table(schema_version_table.name):
        return None
    return connection.execute(select(schema_version_table.c.version)).scalar_one()


def _set_schema_version(connection: Connection, version: int, *, insert: bool) -> None:
    if insert:
        schema_version_table.create(connection)
        connection.execute(schema_version_table.insert().values(version=version))
    else:
        connection.execute(update(schema_version_table).values(version=version))


def init_db(engine: Engine, *, target_version: int = SCHEMA_VERSION) -> list[int]:
    """Bring the database to `target_version`: create it when fresh, migrate it when older, else do nothing.

    Safe to call at every start-up. Runs in one transaction under a lock (see the module docstring).

    Args:
        engine: Engine from `make_engine`.
        target_version: The version to reach. Only tests set it (to build an old schema); a fresh database
            below the newest version is built by running the migrations rather than `create_all`.

    Returns:
        The migrations applied, by the version each one produced: empty when the database was current already
        or was created fresh at the newest version.

    Raises:
        RuntimeError: The database is newer than this code, or holds the store's tables without a version.
    """
    if not 0 < target_version <= SCHEMA_VERSION:
        raise ValueError(f"target_version must be in 1..{SCHEMA_VERSION}, got {target_version}")
    with engine.connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INIT_LOCK_KEY})
        version = get_schema_version(connection)
        if version is None:
            existing = set(inspect(connection).get_table_names()) & set(Base.metadata.tables)
            if existing:
                raise RuntimeError(
                    f"tables {sorted(existing)} exist but there is no schema_version table; "
                    "this database was not created by init_db and cannot be migrated safely"
                )
            if target_version == SCHEMA_VERSION:
                Base.metadata.create_all(connection)
                _set_schema_version(connection, SCHEMA_VERSION, insert=True)
                logger.info("created database schema at version %d", SCHEMA_VERSION)
                return []
            _set_schema_version(connection, 0, insert=True)
            version = 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this code's {SCHEMA_VERSION}; upgrade mini-claude"
            )
        applied = list(range(version + 1, target_version + 1))
        for new_version in applied:
            MIGRATIONS[new_version - 1](connection)
            logger.info("migrated database schema to version %d", new_version)
        if applied:
            _set_schema_version(connection, target_version, insert=False)
        return applied
