"""The conversation store on SQLite and PostgreSQL: round trips, ordering, cascades, exactly-once stores,
restarts, migrations and pagination. Every test taking `engine` or `databases` runs on both backends.
"""

from __future__ import annotations

import ast
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import JSON, Engine, bindparam, delete, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

import mini_claude.db as db_package
from mini_claude.db import (
    Base,
    Conversation,
    FineTuneJob,
    Message,
    NotFoundError,
    crud,
    current_revision,
    downgrade_db,
    head_revision,
    init_db,
    make_engine,
    ping,
    session_scope,
)
from mini_claude.db import session as db_session
from mini_claude.db.models import UTCDateTime

if TYPE_CHECKING:
    from conftest import Databases


def schema_of(engine: Engine) -> dict[str, dict[str, Any]]:
    """Everything reflection reports about each table of the store (not Alembic's own bookkeeping table), in a
    form two databases can be compared by."""
    inspector = inspect(engine)
    schema = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        schema[table] = {
            "columns": sorted(
                (c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in inspector.get_columns(table)
            ),
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    str(fk["options"]),
                )
                for fk in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (ix["name"], tuple(ix["column_names"]), bool(ix["unique"])) for ix in inspector.get_indexes(table)
            ),
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
            "checks": sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)),
        }
    return schema


def is_utc(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


def message_count(engine: Engine, conversation_id: str | None = None) -> int:
    query = select(func.count()).select_from(Message)
    if conversation_id is not None:
        query = query.where(Message.conversation_id == conversation_id)
    with session_scope(engine) as session:
        return session.scalar(query) or 0


# ---------------------------------------------------------------------------------------------------- round trip


def test_conversation_and_messages_round_trip_in_order(engine: Engine) -> None:
    turns = [
        dict(role="system", content="You are terse."),
        dict(role="user", content="Hi! ünïcödé ✓"),
        dict(
            role="assistant",
            content="Hello.",
            prompt_tokens=12,
            completion_tokens=3,
            model="smollm2-135m",
            ttft_ms=41.5,
            duration_ms=120.25,
            finish_reason="stop",
        ),
        dict(role="user", content="Again?"),
    ]
    with session_scope(engine) as session:
        created = crud.create_conversation(
            session, title="Greeting", model="smollm2-135m", system_prompt="You are terse.", meta={"temperature": 0.7}
        )
        other = crud.create_conversation(session, title="Interleaved")
    for i, turn in enumerate(turns):
        # Interleave another conversation's writes: each conversation keeps its own sequence.
        with session_scope(engine) as session:
            crud.add_message(session, created.id, **turn)
            crud.add_message(session, other.id, "user", f"noise {i}")

    with session_scope(engine) as session:
        loaded = crud.get_conversation(session, created.id)
        assert loaded is not None
        assert (loaded.title, loaded.model, loaded.system_prompt, loaded.meta) == (
            "Greeting",
            "smollm2-135m",
            "You are terse.",
            {"temperature": 0.7},
        )
        assert loaded.created_at == created.created_at and is_utc(loaded.created_at)
        assert loaded.updated_at > loaded.created_at  # messages count as activity
        messages = crud.list_messages(session, created.id)
        assert loaded.messages == messages  # the relationship uses the same order
        assert [m.content for m in crud.list_messages(session, other.id)] == [f"noise {i}" for i in range(len(turns))]
        page = crud.list_messages(session, created.id, limit=2, offset=1)
        assert [m.content for m in page] == ["Hi! ünïcödé ✓", "Hello."]

    assert [m.seq for m in messages] == list(range(1, len(turns) + 1))
    for message, turn in zip(messages, turns, strict=True):
        stored = {key: getattr(message, key) for key in turn}
        assert stored == turn
        assert is_utc(message.created_at)
    assert messages[1].prompt_tokens is None and messages[1].idempotency_key is None


def test_timestamps_are_stored_as_instants_and_read_back_in_utc(engine: Engine) -> None:
    # A non-UTC input must keep its instant (SQLite keeps no offset; PostgreSQL answers in the session's zone).
    moment = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-7)))
    with session_scope(engine) as session:
        session.add(Conversation(id="c-tz", title="tz", meta={}, last_seq=0, created_at=moment, updated_at=moment))
    with session_scope(engine) as session:
        loaded = crud.get_conversation(session, "c-tz")
        assert loaded is not None
        assert loaded.created_at == moment and is_utc(loaded.created_at)
        assert loaded.created_at.hour == 19
    with pytest.raises(Exception, match="naive datetime"), session_scope(engine) as session:
        naive = datetime(2024, 1, 1)
        session.add(Conversation(title="naive", meta={}, last_seq=0, created_at=naive, updated_at=naive))


def test_add_message_checks_its_arguments(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session)
        with pytest.raises(ValueError, match="role"):
            crud.add_message(session, conversation.id, "tool", "x")
        with pytest.raises(ValueError, match="idempotency_key"):
            crud.add_message(session, conversation.id, "user", "x", idempotency_key="")
        with pytest.raises(NotFoundError):
            crud.add_message(session, "no-such-conversation", "user", "x")
        # The failed calls left nothing behind and the sequence continues from 1.
        assert crud.add_message(session, conversation.id, "user", "ok").seq == 1
    assert message_count(engine, conversation.id) == 1


def test_database_refuses_unknown_roles_and_statuses(engine: Engine) -> None:
    # The CHECK constraints hold even for writes that bypass crud's validation.
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session)
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(Message(conversation_id=conversation.id, seq=1, role="tool", content="x"))
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(FineTuneJob(status="paused", config={}))


def test_update_title(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session, title="Old")
    with session_scope(engine) as session:
        renamed = crud.update_conversation_title(session, conversation.id, "New")
        assert crud.update_conversation_title(session, "missing", "x") is None
    assert renamed is not None and renamed.title == "New" and renamed.updated_at > conversation.updated_at
    with session_scope(engine) as session:
        assert crud.get_conversation(session, conversation.id).title == "New"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------------- cascade


def test_deleting_a_conversation_deletes_its_messages(engine: Engine) -> None:
    with session_scope(engine) as session:
        ids = [crud.create_conversation(session, title=f"c{i}").id for i in range(3)]
        for conversation_id in ids:
            for j in range(3):
                crud.add_message(session, conversation_id, "user", f"m{j}")
    assert message_count(engine) == 9

    with session_scope(engine) as session:
        assert crud.delete_conversation(session, ids[0]) is True
        assert crud.delete_conversation(session, ids[0]) is False
    # Plain SQL, bypassing the ORM: only the database's ON DELETE CASCADE (foreign keys on) can remove them.
    with engine.begin() as connection:
        connection.execute(delete(Conversation.__table__).where(Conversation.__table__.c.id == ids[1]))

    assert message_count(engine, ids[0]) == 0
    assert message_count(engine, ids[1]) == 0
    assert message_count(engine, ids[2]) == 3
    with session_scope(engine) as session:
        assert crud.get_conversation(session, ids[0]) is None
        assert [c.id for c in crud.list_conversations(session)] == [ids[2]]


# ----------------------------------------------------------------------------------------------- exactly once


def test_message_stored_twice_under_one_key_lands_once(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session)
        other = crud.create_conversation(session)
        crud.add_message(session, conversation.id, "user", "question")
    with session_scope(engine) as session:
        first = crud.add_message(
            session, conversation.id, "assistant", "answer", idempotency_key="chatcmpl-1", completion_tokens=1
        )
    with session_scope(engine) as session:
        last_seq_before = crud.get_conversation(session, conversation.id).last_seq  # type: ignore[union-attr]
    # The retry (e.g. a re-sent streamed reply with different text) returns the stored message unchanged.
    with session_scope(engine) as session:
        again = crud.add_message(session, conversation.id, "assistant", "other answer", idempotency_key="chatcmpl-1")
        assert crud.get_conversation(session, conversation.id).last_seq == last_seq_before  # type: ignore[union-attr]
        # Twice in one transaction is still once.
        twice = crud.add_message(session, conversation.id, "user", "q2", idempotency_key="client-7")
        assert crud.add_message(session, conversation.id, "user", "q2", idempotency_key="client-7").id == twice.id
        # Keys are per conversation; unkeyed messages never collide.
        elsewhere = crud.add_message(session, other.id, "assistant", "answer", idempotency_key="chatcmpl-1")
        crud.add_message(session, conversation.id, "user", "same")
        crud.add_message(session, conversation.id, "user", "same")

    assert (again.id, again.content, again.completion_tokens) == (first.id, "answer", 1)
    assert elsewhere.id != first.id
    with session_scope(engine) as session:
        contents = [m.content for m in crud.list_messages(session, conversation.id)]
        assert crud.get_message_by_key(session, conversation.id, "chatcmpl-1").id == first.id  # type: ignore[union-attr]
        assert crud.get_message_by_key(session, conversation.id, "never-used") is None
    assert contents == ["question", "answer", "q2", "same", "same"]


def test_concurrent_stores_under_one_key_land_once(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation_id = crud.create_conversation(session).id
    start = threading.Barrier(4)

    def store(attempt: int) -> str:
        if attempt < 4:  # the first four collide on purpose
            start.wait()
        with session_scope(engine) as session:
            return crud.add_message(session, conversation_id, "assistant", f"try {attempt}", idempotency_key="k").id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(store, range(8)))
    assert len(set(ids)) == 1
    assert message_count(engine, conversation_id) == 1


def test_concurrent_appends_get_distinct_ordered_sequence_numbers(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation_id = crud.create_conversation(session).id
    writers, per_writer = 4, 5

    def append(writer: int) -> None:
        for i in range(per_writer):
            with session_scope(engine) as session:
                crud.add_message(session, conversation_id, "user", f"{writer}:{i}")

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(append, range(writers)))
    with session_scope(engine) as session:
        messages = crud.list_messages(session, conversation_id)
    assert [m.seq for m in messages] == list(range(1, writers * per_writer + 1))
    for writer in range(writers):  # each writer's messages keep the order it wrote them in
        assert [m.content for m in messages if m.content.startswith(f"{writer}:")] == [
            f"{writer}:{i}" for i in range(per_writer)
        ]


# ----------------------------------------------------------------------------------------- restarts, migrations


def test_data_survives_a_restart(databases: Databases) -> None:
    url = databases.new_url()
    first = databases.engine(url)
    init_db(first)
    with session_scope(first) as session:
        conversation = crud.create_conversation(session, title="Persisted", meta={"k": [1, 2]})
        crud.add_message(session, conversation.id, "user", "still here?", idempotency_key="u1")
        job = crud.create_fine_tune_job(session, {"epochs": 2})
    first.dispose()  # the server stops

    second = databases.engine(url)  # and starts again
    assert init_db(second) == []
    with session_scope(second) as session:
        loaded = crud.get_conversation(session, conversation.id)
        assert loaded is not None and (loaded.title, loaded.meta) == ("Persisted", {"k": [1, 2]})
        assert [m.content for m in crud.list_messages(session, conversation.id)] == ["still here?"]
        # The idempotency record survived too: a store retried after the restart still lands once.
        assert crud.add_message(session, conversation.id, "user", "dup", idempotency_key="u1").content == "still here?"
        assert crud.get_fine_tune_job(session, job.id).config == {"epochs": 2}  # type: ignore[union-attr]


def test_init_db_on_a_current_database_changes_nothing(engine: Engine) -> None:
    with session_scope(engine) as session:
        conversation_id = crud.create_conversation(session, title="keep").id
    schema_before = schema_of(engine)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.strip().upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert init_db(engine) == []
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert any(s.startswith("SELECT") for s in statements)  # the listener did see init_db's queries
    writes = [s for s in statements if s.split()[0] in {"INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP"}]
    assert writes == []
    assert schema_of(engine) == schema_before
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    with session_scope(engine) as session:
        assert crud.get_conversation(session, conversation_id).title == "keep"  # type: ignore[union-attr]


def fill_revision_0001(engine: Engine) -> datetime:
    """Rows written the way the first schema (revision 0001, no idempotency keys) stored them."""
    created = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    insert_conversation = text(
        "INSERT INTO conversations (id, title, model, system_prompt, metadata, last_seq, created_at, updated_at) "
        "VALUES ('c1', 'From v1', NULL, NULL, :meta, 2, :at, :at)"
    ).bindparams(bindparam("meta", type_=JSON), bindparam("at", type_=UTCDateTime))
    insert_message = text(
        "INSERT INTO messages (id, conversation_id, seq, role, content, created_at) "
        "VALUES (:id, 'c1', :seq, :role, :content, :at)"
    ).bindparams(bindparam("at", type_=UTCDateTime))
    with engine.begin() as connection:
        assert "idempotency_key" not in {c["name"] for c in inspect(connection).get_columns("messages")}
        connection.execute(insert_conversation, {"meta": {"from": "v1"}, "at": created})
        connection.execute(insert_message, {"id": "m1", "seq": 1, "role": "user", "content": "hi", "at": created})
        connection.execute(insert_message, {"id": "m2", "seq": 2, "role": "assistant", "content": "yo", "at": created})
    return created


def check_migrated_data(engine: Engine, created: datetime) -> None:
    with session_scope(engine) as session:
        conversation = crud.get_conversation(session, "c1")
        assert conversation is not None and conversation.meta == {"from": "v1"} and conversation.created_at == created
        # Features of the later revisions work on the migrated data.
        reply = crud.add_message(session, "c1", "assistant", "new", idempotency_key="r")
        assert crud.add_message(session, "c1", "assistant", "new", idempotency_key="r").id == reply.id
        assert [(m.seq, m.content) for m in crud.list_messages(session, "c1")] == [(1, "hi"), (2, "yo"), (3, "new")]
        assert crud.create_fine_tune_job(session, {"lr": 1e-4}).status == "queued"


def test_migrating_from_the_first_revision_keeps_data_and_matches_the_models(databases: Databases) -> None:
    old = databases.engine()
    assert init_db(old, target="0001") == ["0001"]
    with old.connect() as connection:
        assert current_revision(connection) == "0001"
    created = fill_revision_0001(old)

    applied = init_db(old)
    assert applied[0] == "0002" and applied[-1] == head_revision()

    from_models = databases.engine()  # the schema the models describe, made directly
    with from_models.begin() as connection:
        Base.metadata.create_all(connection)
    assert schema_of(old) == schema_of(from_models)
    check_migrated_data(old, created)


def test_a_database_from_before_alembic_is_adopted_and_migrated(databases: Databases) -> None:
    """Databases of earlier releases record their version in a one-row `schema_version` table."""
    old = databases.engine()
    init_db(old, target="0001")
    created = fill_revision_0001(old)
    with old.begin() as connection:  # what the pre-Alembic code left behind: the same DDL, its own version table
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
        connection.execute(text("INSERT INTO schema_version (version) VALUES (1)"))

    assert init_db(old)[0] == "0002"
    assert not inspect(old).has_table("schema_version")
    with old.connect() as connection:
        assert current_revision(connection) == head_revision()
    check_migrated_data(old, created)


def test_downgrade_undoes_every_revision(databases: Databases) -> None:
    engine = databases.engine()
    applied = init_db(engine)
    assert downgrade_db(engine, "base") == applied[::-1]
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert init_db(engine) == applied


def test_a_failing_migration_leaves_the_database_unchanged(
    databases: Databases, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A revision that runs DDL and then fails: the whole upgrade, DDL included, rolls back."""
    import shutil

    engine = databases.engine()
    init_db(engine, target="0001")
    schema_before = schema_of(engine)
    scripts = tmp_path / "migrations"
    shutil.copytree(db_session.MIGRATIONS_DIR, scripts)
    (scripts / "versions" / "9999_broken.py").write_text(
        "from alembic import op\nimport sqlalchemy as sa\n"
        f"revision = '9999'\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n"
        "def upgrade():\n    op.create_table('leftover', sa.Column('id', sa.Integer, primary_key=True))\n"
        "    raise RuntimeError('migration bug')\n"
        "def downgrade():\n    pass\n"
    )
    monkeypatch.setattr(db_session, "MIGRATIONS_DIR", scripts)
    with pytest.raises(RuntimeError, match="migration bug"):
        init_db(engine)
    assert schema_of(engine) == schema_before
    with engine.connect() as connection:
        assert current_revision(connection) == "0001"


def test_init_db_refuses_a_newer_or_unversioned_database(databases: Databases) -> None:
    newer = databases.engine()
    init_db(newer)
    with newer.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(RuntimeError, match="newer"):
        init_db(newer)

    unversioned = databases.engine()
    with unversioned.begin() as connection:
        Conversation.__table__.create(connection)
    with pytest.raises(RuntimeError, match="no schema revision"):
        init_db(unversioned)


def test_workers_starting_together_create_the_schema_once(databases: Databases) -> None:
    url = databases.new_url()
    engines = [databases.engine(url) for _ in range(3)]  # one engine per server worker
    start = threading.Barrier(len(engines))

    def start_worker(engine: Engine) -> list[str]:
        start.wait()
        return init_db(engine)

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(start_worker, engines))
    migrated = [r for r in results if r]
    assert len(migrated) == 1 and migrated[0][-1] == head_revision()  # one worker migrated; the others found it done
    with engines[0].connect() as connection:
        assert current_revision(connection) == head_revision()
        assert connection.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar_one() == 1


# ---------------------------------------------------------------------------------------------------- pagination


def test_conversations_are_paginated_most_recent_first(engine: Engine) -> None:
    created = []
    for i in range(7):
        with session_scope(engine) as session:
            created.append(crud.create_conversation(session, title=f"c{i}").id)
    with session_scope(engine) as session:
        assert crud.count_conversations(session) == 7
        pages = [crud.list_conversations(session, limit=3, offset=offset) for offset in (0, 3, 6, 9)]
        everything = crud.list_conversations(session, limit=100)
    assert [len(page) for page in pages] == [3, 3, 1, 0]
    assert [c.id for page in pages for c in page] == [c.id for c in everything] == created[::-1]

    # Activity moves a conversation to the front.
    with session_scope(engine) as session:
        crud.add_message(session, created[0], "user", "bump")
    with session_scope(engine) as session:
        assert [c.id for c in crud.list_conversations(session, limit=2)] == [created[0], created[6]]
        with pytest.raises(ValueError):
            crud.list_conversations(session, limit=0)
        with pytest.raises(ValueError):
            crud.list_conversations(session, offset=-1)


# ------------------------------------------------------------------------------------------------ fine-tune jobs


def test_fine_tune_job_lifecycle(engine: Engine) -> None:
    config = {"base_model": "smollm2-135m", "lora": {"r": 8, "alpha": 16}, "epochs": 1}
    with session_scope(engine) as session:
        first = crud.create_fine_tune_job(session, config)
        second = crud.create_fine_tune_job(session, {"epochs": 3})
    assert (first.status, first.progress, first.result, first.error) == ("queued", 0.0, None, None)

    with session_scope(engine) as session:
        crud.update_fine_tune_job(session, first.id, status="running", progress=0.5)
    with session_scope(engine) as session:
        done = crud.update_fine_tune_job(session, first.id, status="succeeded", progress=1.0, result={"loss": 1.25})
        failed = crud.update_fine_tune_job(session, second.id, status="failed", error="out of memory")
        assert crud.update_fine_tune_job(session, "missing", status="running") is None
        with pytest.raises(ValueError, match="status"):
            crud.update_fine_tune_job(session, first.id, status="paused")
        with pytest.raises(ValueError, match="progress"):
            crud.update_fine_tune_job(session, first.id, progress=1.5)
    assert done is not None and failed is not None

    with session_scope(engine) as session:
        loaded = crud.get_fine_tune_job(session, first.id)
        assert loaded is not None
        assert (loaded.status, loaded.progress, loaded.result, loaded.config) == (
            "succeeded",
            1.0,
            {"loss": 1.25},
            config,
        )
        assert loaded.updated_at > loaded.created_at and is_utc(loaded.updated_at)
        assert crud.get_fine_tune_job(session, second.id).error == "out of memory"  # type: ignore[union-attr]
        assert [job.id for job in crud.list_fine_tune_jobs(session)] == [second.id, first.id]
        assert crud.get_fine_tune_job(session, "missing") is None
        # `result` left unset is SQL NULL, not the JSON literal null.
        assert session.scalar(select(func.count()).where(FineTuneJob.result.is_(None))) == 1


def test_runners_racing_for_jobs_claim_each_exactly_once(databases: Databases) -> None:
    """Runners of several server processes (here: engines with their own connections) claim concurrently."""
    url = databases.new_url()
    engines = [databases.engine(url) for _ in range(4)]
    init_db(engines[0])
    with session_scope(engines[0]) as session:
        jobs = {crud.create_fine_tune_job(session, {"n": i}).id for i in range(12)}
    start = threading.Barrier(len(engines))

    def runner(i: int) -> list[str]:
        start.wait()
        claimed = []
        while True:
            with session_scope(engines[i]) as session:
                job = crud.claim_next_fine_tune_job(session, f"runner-{i}", lease_s=60)
                if job is None:
                    return claimed
                assert (job.status, job.owner) == ("running", f"runner-{i}")
                claimed.append(job.id)

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(runner, range(len(engines))))
    everything = [job for claimed in results for job in claimed]
    assert sorted(everything) == sorted(jobs)  # every job once: none twice, none missed


def test_a_job_whose_lease_ran_out_is_claimed_again_and_its_old_runner_is_told(engine: Engine) -> None:
    with session_scope(engine) as session:
        job_id = crud.create_fine_tune_job(session, {}).id
    with session_scope(engine) as session:
        assert crud.claim_next_fine_tune_job(session, "a", lease_s=60).id == job_id  # type: ignore[union-attr]
    with session_scope(engine) as session:
        assert crud.claim_next_fine_tune_job(session, "b", lease_s=60) is None  # a's lease holds
        assert crud.renew_fine_tune_lease(session, job_id, "a", 60)
        session.execute(text("UPDATE fine_tune_jobs SET lease_expires_at = :t"), {"t": "2000-01-01 00:00:00"})
    with session_scope(engine) as session:  # a died: its lease ran out
        taken = crud.claim_next_fine_tune_job(session, "b", lease_s=60)
        assert taken is not None and (taken.id, taken.owner, taken.status) == (job_id, "b", "running")
    with session_scope(engine) as session:
        assert not crud.renew_fine_tune_lease(session, job_id, "a", 60)  # a (if it was only stalled) must stop
        assert crud.update_fine_tune_job(session, job_id, status="succeeded", owner="a") is None
        done = crud.update_fine_tune_job(session, job_id, status="succeeded", owner="b")
        assert done is not None and done.lease_expires_at is None
    with session_scope(engine) as session:
        assert crud.claim_next_fine_tune_job(session, "c") is None


def test_text_columns_store_nul_as_replacement_on_every_backend(engine: Engine) -> None:
    """PostgreSQL's text cannot hold NUL; the column type replaces it, whoever writes (a job's error text did)."""
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session, title="t\x00", model="m\x00", system_prompt="s\x00")
        crud.add_message(session, conversation.id, "assistant", "c\x00", finish_reason="f\x00", model="m\x00")
        job = crud.create_fine_tune_job(session, {})
        crud.update_fine_tune_job(session, job.id, status="failed", error="log tail \x00\x00")
    with session_scope(engine) as session:
        stored = crud.get_conversation(session, conversation.id)
        assert stored is not None and (stored.title, stored.model, stored.system_prompt) == (
            "t\ufffd",
            "m\ufffd",
            "s\ufffd",
        )
        message = crud.list_messages(session, conversation.id)[0]
        assert (message.content, message.finish_reason, message.model) == ("c\ufffd", "f\ufffd", "m\ufffd")
        assert crud.get_fine_tune_job(session, job.id).error == "log tail \ufffd\ufffd"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ engines, ping


def test_ping(engine: Engine) -> None:
    assert ping(engine) is True
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    try:
        assert ping(unreachable) is False
    finally:
        unreachable.dispose()


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'store.db'}")  # missing dirs are created
    try:
        init_db(engine)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    assert (tmp_path / "nested" / "dir" / "store.db").exists()


def test_in_memory_sqlite_is_shared_across_threads() -> None:
    engine = make_engine("sqlite://")
    try:
        init_db(engine)
        with session_scope(engine) as session:
            conversation_id = crud.create_conversation(session, title="memory").id

        def read() -> str | None:
            with session_scope(engine) as session:
                conversation = crud.get_conversation(session, conversation_id)
                return conversation.title if conversation else None

        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(read).result() == "memory"
    finally:
        engine.dispose()


def test_db_package_imports_nothing_else_of_mini_claude() -> None:
    package_dir = Path(db_package.__file__).parent
    for source in sorted(package_dir.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not [name for name in names if name.split(".")[0] == "mini_claude"], source.name


def test_a_worker_opening_a_fresh_sqlite_file_while_another_writes_it_waits(tmp_path: Path) -> None:
    """The intermittent 'database is locked' while workers created the schema: switching a fresh file to WAL
    meets another worker's lock, and SQLite refuses that switch at once instead of waiting its busy timeout."""
    import sqlite3
    import time

    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # still a rollback journal
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_worker (x)")
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    start = time.monotonic()
    engine = make_engine(f"sqlite:///{path}")
    try:
        assert init_db(engine)[-1] == head_revision()  # waited for the lock instead of failing
        assert time.monotonic() - start >= 0.4
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        engine.dispose()
        other.close()
