"""The commands behind `mini-claude agent create|list|show|delete`, and how `mini-claude chat --agent` finds one.

They work on the database the server uses (`MINI_CLAUDE_DATABASE_URL`), directly, so no server needs to run;
a running server sees the change at its next request. A definition is checked against the schema here
(`agents.AgentSpec`; a bad one is one line naming the field, exit status 1); whether its model and adapter
exist is for the server that runs it to say, since that depends on what it serves.
"""

from __future__ import annotations

import json as json_lib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from mini_claude.agents import AgentError, AgentSpec, load_agent_file, parse_agent
from mini_claude.settings import Settings

T = TypeVar("T")


@contextmanager
def _database(database_url: str | None) -> Iterator[Any]:
    from sqlalchemy.exc import SQLAlchemyError

    from mini_claude.cli import UserError
    from mini_claude.db import init_db, make_engine

    engine = make_engine(database_url or Settings().database_url)
    try:
        init_db(engine)
        yield engine
    except SQLAlchemyError as exc:
        raise UserError(f"database error: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()


def _in_session(database_url: str | None, fn: Callable[..., T]) -> T:
    from mini_claude.db import session_scope

    with _database(database_url) as engine, session_scope(engine) as session:
        return fn(session)


def stored_agent(name: str, database_url: str | None = None) -> AgentSpec | None:
    """The agent `name` from the database, or None."""
    from mini_claude.db import crud

    def read(session: Any) -> dict[str, Any] | None:
        row = crud.get_agent(session, name)
        return None if row is None else dict(row.definition)

    definition = _in_session(database_url, read)
    return None if definition is None else parse_agent(definition, name)


def find_agent(name: str, settings: Settings) -> AgentSpec:
    """`chat --agent NAME`: `agents_dir/NAME.yaml` if there is one, else the database's agent."""
    from mini_claude.cli import UserError

    for suffix in (".yaml", ".yml", ".json"):
        path = Path(settings.agents_dir) / f"{name}{suffix}"
        if path.is_file():
            return load_agent_file(path)
    found = stored_agent(name, settings.database_url)
    if found is None:
        raise UserError(f"no agent named {name!r} in {settings.agents_dir} or the database (`mini-claude agent list`)")
    return found


def agent_model(
    spec: AgentSpec, settings: Settings, model: str | None, adapter: str | None
) -> tuple[str | None, str | None]:
    """(model, adapter dir) for `chat --agent`: flags win; an adapter named by the agent is found among the
    settings' adapters (NAME=DIR) or taken as a dir."""
    from mini_claude.adapters import parse_adapter_spec

    named = dict(parse_adapter_spec(s) for s in settings.adapters)
    wanted = spec.adapter or (spec.model if spec.model in named else None)
    if adapter is None and wanted is not None:
        adapter = named.get(wanted) or (wanted if Path(wanted).expanduser().is_dir() else None)
        if adapter is None:
            from mini_claude.cli import UserError

            raise UserError(f"the agent's adapter {wanted!r} is neither in MINI_CLAUDE_ADAPTERS (NAME=DIR) nor a dir")
    if model is None and spec.model is not None and spec.model not in named:
        model = spec.model
    return model, adapter


def create(
    source: str,
    model: str | None = None,
    adapter: str | None = None,
    system: str | None = None,
    description: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    knowledge: list[str] | None = None,
    voice: str | None = None,
    replace: bool = False,
    database_url: str | None = None,
) -> None:
    """Create an agent from a YAML file (`agents/NAME.yaml`) or, given a NAME, from these flags.

    Flags override what the file says. Select the agent with `model: NAME` in any API request, or
    `mini-claude chat --agent NAME`.

    Args:
        source: a definition file (.yaml, .yml or .json; its name is the file's stem unless it has `name`), or
            the new agent's name.
        model: the model it runs on: the base model (default), an adapter's id, or UPSTREAM/MODEL.
        adapter: a LoRA adapter the server serves, by name.
        system: its system prompt.
        description: what it is for.
        temperature: its default temperature.
        max_tokens: its default cap on tokens per reply.
        knowledge: document collections it answers from.
        voice: its voice id for speech (see `mini-claude voices`).
        replace: replace an existing agent of that name instead of failing.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.cli import UserError
    from mini_claude.db import crud

    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        base = load_agent_file(path).model_dump(mode="json", exclude_defaults=True)
    else:
        base = {"name": source}
    flags = {"model": model, "adapter": adapter, "system": system, "description": description,
             "knowledge": knowledge, "voice": voice}  # fmt: skip
    data = base | {k: v for k, v in flags.items() if v is not None}
    params = {"temperature": temperature, "max_tokens": max_tokens}
    if any(v is not None for v in params.values()):
        data["params"] = dict(data.get("params") or {}) | {k: v for k, v in params.items() if v is not None}
    spec = parse_agent(data)

    def store(session: Any) -> bool:
        existed = crud.get_agent(session, spec.name) is not None
        if existed and not replace:
            raise UserError(f"an agent named {spec.name!r} exists; pass --replace to replace it")
        crud.put_agent(session, spec.name, spec.model_dump(mode="json"))
        return existed

    existed = _in_session(database_url, store)
    print(f"{'replaced' if existed else 'created'} agent {spec.name} (model: {spec.model or 'the base model'})")


def list_agents(json: bool = False, database_url: str | None = None) -> None:
    """List the stored agents.

    Args:
        json: print a JSON list of their definitions instead of a table.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.db import crud

    def read(session: Any) -> list[dict[str, Any]]:
        return [dict(row.definition) for row in crud.list_agents(session)]

    definitions = _in_session(database_url, read)
    if json:
        print(json_lib.dumps(definitions, indent=2, ensure_ascii=False))
        return
    if not definitions:
        print("No agents yet: `mini-claude agent create agents/NAME.yaml` (or NAME --model ... --system ...).")
        return
    for d in definitions:
        print(f"{d['name']:24} {d.get('model') or '(base model)':28} {d.get('description') or ''}".rstrip())


def show(name: str, format: Literal["yaml", "json"] = "yaml", database_url: str | None = None) -> None:
    """Print an agent's definition (YAML, the form `agent create` reads back, or JSON).

    Args:
        name: the agent.
        format: yaml or json.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.cli import UserError

    spec = stored_agent(name, database_url)
    if spec is None:
        raise UserError(f"no agent named {name!r}")
    if format == "json":
        print(json_lib.dumps(spec.model_dump(mode="json"), indent=2, ensure_ascii=False))
    else:
        print(spec.to_yaml(), end="")


def delete(name: str, database_url: str | None = None) -> None:
    """Delete an agent (conversations that used it stay).

    Args:
        name: the agent.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.cli import UserError
    from mini_claude.db import crud

    if not _in_session(database_url, lambda session: crud.delete_agent(session, name)):
        raise UserError(f"no agent named {name!r}")
    print(f"deleted agent {name}")


COMMANDS = {"create": create, "list": list_agents, "show": show, "delete": delete}
__all__ = ["COMMANDS", "AgentError", "agent_model", "find_agent", "stored_agent"]
