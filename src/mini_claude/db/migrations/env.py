"""Alembic's environment for the conversation store: always run on a connection `init_db` hands over.

`init_db` opens the connection, begins the one transaction and takes the lock (see `session.py`), then runs
Alembic inside it, so every migration of an upgrade commits or rolls back together, on SQLite as on
PostgreSQL. `render_as_batch` lets future migrations alter columns on SQLite (which rebuilds the table).
"""

from __future__ import annotations

from alembic import context

from mini_claude.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through mini_claude.db.init_db (or `mini-claude db upgrade`), not alembic")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    transactional_ddl=True,  # our SQLite connections issue a real BEGIN, so DDL rolls back there too
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():  # a no-op inside init_db's transaction
    context.run_migrations()
