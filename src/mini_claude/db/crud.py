"""Repository functions over the store: plain functions that take a `Session` and return model objects.

Design choices:
- The caller owns the transaction. Every function works inside the session it is given and at most flushes
  (so ids, defaults and constraint errors appear at once); committing is `session_scope`'s job, so a route
  can store a user message and the reply in one unit of work.
- Absence is `None` (or `False` for a delete) for lookups, and `NotFoundError` only where a missing parent
  makes the call meaningless (adding a message to an unknown conversation).
- Exactly-once messages: `add_message(..., idempotency_key=k)` stores at most one message per
  `(conversation, k)`; a repeat returns the stored message and changes nothing (the first write wins, so a
  retried or re-streamed reply never appears twice). The conversation row is updated *first* (taking its row
  lock on PostgreSQL; on SQLite every transaction already holds the write lock), so a concurrent writer with
  the same key waits and then sees the stored message instead of racing it to the unique index.
- Lists are paginated with limit/offset: newest first for conversations (by last activity), jobs and
  predictions, oldest first for messages (conversation order, by `seq`).
- Predictions are written in batches (`add_predictions`): the server's log writer drains its queue into one
  INSERT per batch, so a burst of requests costs a few transactions, not one each.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, func, inspect, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from .models import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    JOB_STATUSES,
    ROLES,
    Agent,
    Conversation,
    FineTuneJob,
    Message,
    Prediction,
    utcnow,
)

DEFAULT_TITLE = "New conversation"
MAX_PAGE_SIZE = 1000


class NotFoundError(LookupError):
    """The row an operation needs does not exist."""


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be in 1..{MAX_PAGE_SIZE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _sync_cached(session: Session, conversation_id: str, **values: Any) -> None:
    """Copy columns changed by a bulk UPDATE onto the session's `Conversation` object, if it holds one.

    Setting them as committed state (rather than expiring them) keeps the object readable after the session
    closes, which is what `expire_on_commit=False` promises callers.
    """
    cached = session.identity_map.get(inspect(Conversation).identity_key_from_primary_key((conversation_id,)))
    if cached is not None:
        for name, value in values.items():
            set_committed_value(cached, name, value)


# ----------------------------------------------------------------------------------------------- conversations


def create_conversation(
    session: Session,
    *,
    title: str = DEFAULT_TITLE,
    model: str | None = None,
    system_prompt: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Conversation:
    """Create an empty conversation; `meta` is free-form JSON (e.g. sampling settings or an agent profile)."""
    now = utcnow()
    conversation = Conversation(
        title=title,
        model=model,
        system_prompt=system_prompt,
        meta=dict(meta or {}),
        last_seq=0,
        created_at=now,
        updated_at=now,
    )
    session.add(conversation)
    session.flush()
    return conversation


def get_conversation(session: Session, conversation_id: str) -> Conversation | None:
    """The conversation with this id, or None."""
    return session.get(Conversation, conversation_id)


def list_conversations(session: Session, *, limit: int = 20, offset: int = 0) -> list[Conversation]:
    """One page of conversations, most recently active (created, titled or messaged) first.

    The id breaks ties between equal timestamps, so pages never overlap or skip rows while nothing changes.
    """
    _check_page(limit, offset)
    query = (
        select(Conversation)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


def count_conversations(session: Session) -> int:
    """How many conversations exist (for a paginated listing's total)."""
    return session.scalar(select(func.count()).select_from(Conversation)) or 0


def update_conversation_title(session: Session, conversation_id: str, title: str) -> Conversation | None:
    """Rename a conversation (which counts as activity for the listing order); None if it does not exist."""
    now = utcnow()
    changed = session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(title=title, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount == 0:
        return None
    _sync_cached(session, conversation_id, title=title, updated_at=now)
    return session.get(Conversation, conversation_id)


def delete_conversation(session: Session, conversation_id: str) -> bool:
    """Delete a conversation and, through the database's ON DELETE CASCADE, its messages; False if absent."""
    deleted = session.execute(
        delete(Conversation)
        .where(Conversation.id == conversation_id)
        .execution_options(synchronize_session="evaluate")  # drop it from the session as well
    )
    return deleted.rowcount > 0


# ---------------------------------------------------------------------------------------------------- messages


def add_message(
    session: Session,
    conversation_id: str,
    role: str,
    content: str,
    *,
    idempotency_key: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    model: str | None = None,
    ttft_ms: float | None = None,
    duration_ms: float | None = None,
    finish_reason: str | None = None,
    seq: int | None = None,
) -> Message:
    """Append a message to a conversation, exactly once per `idempotency_key`.

    Args:
        session: The unit of work to store it in.
        conversation_id: The conversation to append to.
        role: "system", "user" or "assistant".
        content: The message text.
        idempotency_key: Optional caller-chosen key, unique within the conversation (e.g. the completion id of
            a reply, or a client's message id). When a message with this key exists it is returned unchanged
            and nothing is written, so retrying a store is safe.
        prompt_tokens: Tokens of the prompt that produced this reply.
        completion_tokens: Tokens generated for this reply.
        model: The model that produced the reply.
        ttft_ms: Time to first token.
        duration_ms: Total generation time.
        finish_reason: Why generation stopped ("stop", "length", ...).
        seq: A position taken earlier with `reserve_seq`, for a message whose place in the conversation is
            decided before its content exists (a reply is ordered after its question even when the client's
            next question is stored first). By default the message goes at the end.

    Returns:
        The new message, or the one stored earlier under the same key.

    Raises:
        ValueError: Unknown role, or an empty or over-long key.
        NotFoundError: The conversation does not exist.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX_LENGTH:
        raise ValueError(f"idempotency_key must have 1..{IDEMPOTENCY_KEY_MAX_LENGTH} characters")
    now = utcnow()
    # A savepoint, so that finding the key already stored can undo the counter bump below.
    savepoint = session.begin_nested()
    try:
        # Either way the update locks the conversation row, so concurrent stores to it run one at a time.
        last_seq = _advance_last_seq(session, conversation_id, 1 if seq is None else 0, updated_at=now)
        if seq is None:
            seq = last_seq
        elif not 0 < seq <= last_seq:
            raise ValueError(f"seq {seq} was not reserved in conversation {conversation_id!r}")
        stored = None if idempotency_key is None else get_message_by_key(session, conversation_id, idempotency_key)
        replay_id = None if stored is None else stored.id
        if replay_id is None:
            message = Message(
                conversation_id=conversation_id,
                seq=seq,
                role=role,
                content=content,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                model=model,
                ttft_ms=ttft_ms,
                duration_ms=duration_ms,
                finish_reason=finish_reason,
                created_at=now,
                idempotency_key=idempotency_key,
            )
            session.add(message)
            session.flush()
    except BaseException:
        if savepoint.is_active:
            savepoint.rollback()
        raise
    if replay_id is not None:
        savepoint.rollback()
        # Load it again outside the undone savepoint, where the row is still there (committed, or added
        # earlier in this same transaction); the object read inside the savepoint may have been expired.
        replayed = session.get(Message, replay_id)
        if replayed is None:  # cannot happen: the row predates the savepoint
            raise RuntimeError(f"message {replay_id!r} vanished while replaying key {idempotency_key!r}")
        return replayed
    savepoint.commit()
    _sync_cached(session, conversation_id, last_seq=last_seq, updated_at=now)
    return message


def reserve_seq(session: Session, conversation_id: str) -> int:
    """Take the conversation's next position for a message stored later with `add_message(seq=...)`.

    A position that is never used leaves a gap, which orders nothing wrongly: `seq` only sorts.
    """
    seq = _advance_last_seq(session, conversation_id, 1)
    _sync_cached(session, conversation_id, last_seq=seq)
    return seq


def _advance_last_seq(session: Session, conversation_id: str, step: int, **values: Any) -> int:
    """Add `step` to the conversation's `last_seq` (setting `values` too) and return it; the UPDATE locks the
    row until the transaction ends."""
    last_seq = session.scalar(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(last_seq=Conversation.last_seq + step, **values)
        .returning(Conversation.last_seq)
        .execution_options(synchronize_session=False)
    )
    if last_seq is None:
        raise NotFoundError(f"conversation {conversation_id!r} does not exist")
    return last_seq


def get_message_by_key(session: Session, conversation_id: str, idempotency_key: str) -> Message | None:
    """The message stored under this key in this conversation, or None (e.g. to answer a retried request)."""
    query = select(Message).where(
        Message.conversation_id == conversation_id, Message.idempotency_key == idempotency_key
    )
    return session.scalars(query).one_or_none()


def delete_message_by_key(session: Session, conversation_id: str, idempotency_key: str) -> bool:
    """Delete the message stored under this key (e.g. a partial reply superseded by a full one); False if absent."""
    deleted = session.execute(
        delete(Message)
        .where(Message.conversation_id == conversation_id, Message.idempotency_key == idempotency_key)
        .execution_options(synchronize_session="evaluate")
    )
    return deleted.rowcount > 0  # type: ignore[attr-defined]


def list_messages(
    session: Session, conversation_id: str, *, limit: int | None = None, offset: int = 0
) -> list[Message]:
    """A conversation's messages in the order they were added (all of them unless `limit` is given)."""
    if limit is not None:
        _check_page(limit, offset)
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.seq)
    if limit is not None or offset:
        query = query.limit(limit).offset(offset)
    return list(session.scalars(query))


# ---------------------------------------------------------------------------------------------- fine-tune jobs


def _check_status(status: str) -> None:
    if status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {JOB_STATUSES}, got {status!r}")


def create_fine_tune_job(session: Session, config: dict[str, Any], *, status: str = "queued") -> FineTuneJob:
    """Record a requested fine-tuning run with its configuration (free-form JSON)."""
    _check_status(status)
    now = utcnow()
    job = FineTuneJob(status=status, config=dict(config), progress=0.0, created_at=now, updated_at=now)
    session.add(job)
    session.flush()
    return job


def get_fine_tune_job(session: Session, job_id: str) -> FineTuneJob | None:
    """The job with this id, or None."""
    return session.get(FineTuneJob, job_id)


def list_fine_tune_jobs(session: Session, *, limit: int = 20, offset: int = 0) -> list[FineTuneJob]:
    """One page of jobs, newest first."""
    _check_page(limit, offset)
    query = (
        select(FineTuneJob).order_by(FineTuneJob.created_at.desc(), FineTuneJob.id.desc()).limit(limit).offset(offset)
    )
    return list(session.scalars(query))


def _claimable(now: Any) -> Any:
    """Queued jobs, and running jobs whose runner's lease has run out (or that never had one: older rows)."""
    expired = or_(FineTuneJob.lease_expires_at.is_(None), FineTuneJob.lease_expires_at < now)
    return or_(FineTuneJob.status == "queued", and_(FineTuneJob.status == "running", expired))


def claim_next_fine_tune_job(session: Session, owner: str = "", lease_s: float = 30.0) -> FineTuneJob | None:
    """Give the oldest claimable job (queued, or running under an expired lease) to `owner` for `lease_s` seconds.

    Exactly one of several runners sharing a database gets a job: PostgreSQL's `FOR UPDATE SKIP LOCKED` makes
    concurrent claimers pick different rows, and the UPDATE re-checks the condition, so a job claimed meanwhile
    (on SQLite, whose `BEGIN IMMEDIATE` runs claims one at a time) is never taken twice. None when nothing waits.
    """
    now = utcnow()
    query = (
        select(FineTuneJob.id)
        .where(_claimable(now))
        .order_by(FineTuneJob.created_at, FineTuneJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job_id = session.scalars(query).first()
    if job_id is None:
        return None
    claimed = session.execute(
        update(FineTuneJob)
        .where(FineTuneJob.id == job_id, _claimable(now))
        .values(status="running", owner=owner, lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.expire_all()
    return session.get(FineTuneJob, job_id)


def renew_fine_tune_lease(session: Session, job_id: str, owner: str, lease_s: float) -> bool:
    """Extend `owner`'s lease on a running job; False when the job is no longer its to run (taken over after
    the lease ran out, cancelled, or deleted): the runner must then stop its run."""
    now = utcnow()
    renewed = session.execute(
        update(FineTuneJob)
        .where(FineTuneJob.id == job_id, FineTuneJob.owner == owner, FineTuneJob.status == "running")
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return renewed.rowcount == 1  # type: ignore[attr-defined]


def update_fine_tune_job(
    session: Session,
    job_id: str,
    *,
    status: str | None = None,
    progress: float | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    owner: str | None = None,
) -> FineTuneJob | None:
    """Record a job's progress or outcome; arguments left as None are not changed. None if the job is absent,
    or if `owner` is given and no longer holds the job (a runner whose lease was taken over changes nothing).
    A job that leaves the running state gives its lease up.

    Raises:
        ValueError: Unknown status, or progress outside [0, 1].
    """
    if status is not None:
        _check_status(status)
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    job = session.get(FineTuneJob, job_id, with_for_update=True)  # row lock on PostgreSQL; ignored by SQLite
    if job is None or (owner is not None and (job.owner != owner or job.status != "running")):
        return None
    if status is not None:
        job.status = status
        if status != "running":
            job.lease_expires_at = None
    if progress is not None:
        job.progress = progress
    if result is not None:
        job.result = dict(result)  # a new object: JSON columns do not track in-place changes
    if error is not None:
        job.error = error
    job.updated_at = utcnow()
    session.flush()
    return job


# ------------------------------------------------------------------------------------------------- predictions


def add_predictions(session: Session, rows: list[dict[str, Any]]) -> list[Prediction]:
    """Store logged predictions; each row has the `Prediction` columns (`id` and `created_at` optional)."""
    now = utcnow()
    predictions = [Prediction(**{"created_at": now, **row}) for row in rows]
    session.add_all(predictions)
    session.flush()
    return predictions


def list_predictions(
    session: Session,
    *,
    model: str | None = None,
    request_id: str | None = None,
    limit: int = 20,
    offset: int = 0,
) -> list[Prediction]:
    """One page of logged predictions, newest first, optionally of one model or one request id."""
    _check_page(limit, offset)
    query = select(Prediction)
    if model is not None:
        query = query.where(Prediction.model == model)
    if request_id is not None:
        query = query.where(Prediction.request_id == request_id)
    query = query.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query))


# ------------------------------------------------------------------------------------------------------ agents


def put_agent(session: Session, name: str, definition: dict[str, Any], *, source: str | None = None) -> Agent:
    """Create the agent `name`, or replace its definition (and source) if it exists."""
    now = utcnow()
    agent = get_agent(session, name)
    if agent is None:
        agent = Agent(name=name, definition=dict(definition), source=source, created_at=now, updated_at=now)
        session.add(agent)
    else:
        agent.definition = dict(definition)  # a new object: JSON columns do not track in-place changes
        agent.source = source
        agent.updated_at = now
    session.flush()
    return agent


def get_agent(session: Session, name: str) -> Agent | None:
    """The agent with this name, or None."""
    return session.scalars(select(Agent).where(Agent.name == name)).one_or_none()


def list_agents(session: Session, *, limit: int = MAX_PAGE_SIZE, offset: int = 0) -> list[Agent]:
    """One page of agents, by name."""
    _check_page(limit, offset)
    return list(session.scalars(select(Agent).order_by(Agent.name).limit(limit).offset(offset)))


def delete_agent(session: Session, name: str) -> bool:
    """Delete an agent; False if there was none."""
    deleted = session.execute(delete(Agent).where(Agent.name == name).execution_options(synchronize_session="evaluate"))
    return deleted.rowcount > 0
