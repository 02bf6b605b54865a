"""The conversation store: SQLAlchemy models, engine and schema set-up, and repository functions.

Knows nothing of the rest of `mini_claude` (no model, tokenizer or server import), so the server, the web UI
and the RAG index can share it and it can be tested on its own against SQLite and PostgreSQL.

Typical use::

    engine = make_engine("sqlite:///./mini_claude.db")
    init_db(engine)
    with session_scope(engine) as session:
        conversation = crud.create_conversation(session, title="Hello")
        crud.add_message(session, conversation.id, "user", "Hi!")
"""

from . import crud
from .crud import NotFoundError
from .models import JOB_STATUSES, ROLES, Agent, Base, Conversation, FineTuneJob, Message, Prediction
from .session import (
    DEFAULT_URL,
    current_revision,
    downgrade_db,
    head_revision,
    init_db,
    make_engine,
    make_session_factory,
    ping,
    session_scope,
)

__all__ = [
    "DEFAULT_URL",
    "JOB_STATUSES",
    "ROLES",
    "Agent",
    "Base",
    "Conversation",
    "FineTuneJob",
    "Message",
    "NotFoundError",
    "Prediction",
    "crud",
    "current_revision",
    "downgrade_db",
    "head_revision",
    "init_db",
    "make_engine",
    "make_session_factory",
    "ping",
    "session_scope",
]
