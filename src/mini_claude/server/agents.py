"""`/v1/agents` serving logic: agent profiles stored in the database, and applying one to a request.

No FastAPI here (STYLE.md, point 8). Design choices:
- The database is the store (`db.crud.*_agent`); `agents/NAME.yaml` files in the settings' `agents_dir` are
  loaded into it when the server starts (a file's agent is replaced by the file's current content, so the
  files can be kept in version control; agents made through the API or CLI are left alone).
- An agent is validated twice: its shape by `agents.AgentSpec` (a 400 naming the field), and its references
  against what this server serves (`check`: the model, the adapter, the upstream), at creation and again when
  a request uses it, since adapters and upstreams can change between restarts.
- Applying an agent to a request (`apply`) is the merge rule of `agents.py`: fields the request sets win,
  then the agent's, then the server's defaults (which the areas apply as they always do).
- Knowledge retrieval is a hook (`KnowledgeHook`): the chat path calls `service.knowledge.ground(...)` with the
  collections (the request's `knowledge`, else the agent's) and retrieval settings and the prompt it built;
  `server/grounding.py` implements it over `rag`. An agent whose collection is gone answers with a 400 that
  names it, at the request that needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from mini_claude.agents import AgentError, AgentSpec, Retrieval, agent_files, load_agent_file, parse_agent
from mini_claude.db import crud, session_scope
from mini_claude.rag.grounding import Grounding
from mini_claude.server.errors import APIError, invalid
from mini_claude.server.protocol.agents import AgentDeleted, AgentList, AgentObject

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mini_claude.server.models import Route
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)


def agent_not_found(name: str) -> APIError:
    return APIError(404, f"No agent named '{name}'.", param="name", code="agent_not_found")


def _object(row: Any) -> AgentObject:
    return AgentObject(
        **row.definition, created_at=int(row.created_at.timestamp()), updated_at=int(row.updated_at.timestamp()),
        source=row.source,
    )  # fmt: skip


class KnowledgeHook(Protocol):
    """Where retrieval plugs in (`server/grounding.py`'s `RagKnowledge`; tests put fakes here).

    `ground` returns the messages with numbered sources fitted to `budget` prompt tokens (counted by
    `count`); `tool_round` lets the model call `search_knowledge` first (`retrieval.mode: tool`).
    """

    async def ground(
        self, collections: list[str], retrieval: Retrieval, messages: list[dict[str, str]],
        count: Callable[[list[dict[str, str]]], int] | None = None, budget: int | None = None,
        adapter: str | None = None,
    ) -> Grounding: ...  # fmt: skip

    async def tool_round(
        self, route: Route, collections: list[str], retrieval: Retrieval, messages: list[dict[str, str]],
        count: Callable[[list[dict[str, str]]], int] | None = None, budget: int | None = None,
    ) -> Grounding: ...  # fmt: skip


class AgentService:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    # ------------------------------------------------------------------------------- start-up (sync)
    def load_directory(self) -> list[str]:
        """Load `agents_dir/*.yaml` into the database; a bad file is logged and skipped. Returns the names."""
        _, _, db = self.service.ready()
        loaded = []
        for path in agent_files(self.service.settings.agents_dir):
            try:
                spec = load_agent_file(path)
            except AgentError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            with session_scope(db) as s:
                row = crud.get_agent(s, spec.name)
                if row is not None and row.source is None:
                    log.warning("skipping %s: the agent %s was made through the API or CLI", path, spec.name)
                    continue
                crud.put_agent(s, spec.name, spec.model_dump(mode="json"), source=str(path))
            loaded.append(spec.name)
        return loaded

    # --------------------------------------------------------------------------------- lookups (sync)
    def get_spec(self, name: str) -> AgentSpec | None:
        """The stored agent `name`, or None (blocking: call in a worker thread from async code)."""
        _, _, db = self.service.ready()
        with session_scope(db) as s:
            row = crud.get_agent(s, name)
            definition = None if row is None else row.definition
        if definition is None:
            return None
        try:
            return AgentSpec.model_validate(definition)
        except ValueError as exc:  # stored by an older version with other rules
            raise APIError(500, f"The stored agent '{name}' is no longer valid: {exc}", "server_error",
                           code="agent_invalid") from None  # fmt: skip

    def names(self) -> list[str]:
        _, _, db = self.service.ready()
        with self.service.db_errors(), session_scope(db) as s:
            return [row.name for row in crud.list_agents(s)]

    def specs(self) -> list[AgentSpec]:
        _, _, db = self.service.ready()
        with self.service.db_errors(), session_scope(db) as s:
            definitions = [row.definition for row in crud.list_agents(s)]
        return [AgentSpec.model_validate(d) for d in definitions]

    def check(self, spec: AgentSpec) -> None:
        """A 400 naming the field if the agent refers to something this server does not serve."""
        engine, _, _ = self.service.ready()
        models = self.service.models
        if spec.name in (engine.name, *engine.adapters.names) or models.upstream_of(spec.name) is not None:
            raise invalid(f"Invalid value for 'name': '{spec.name}' is already a served model's id.", "name",
                          code="agent_name_taken")  # fmt: skip
        if spec.model is not None:
            if spec.upstream:
                upstream, model = models.upstream_of(spec.model) or (None, None)
                if upstream is None:
                    raise invalid(f"Invalid value for 'model': no upstream is named '{spec.model.split('/')[0]}' "
                                  f"(configured: {', '.join(models.upstream_names) or 'none'}).", "model")  # fmt: skip
                if upstream.config.models is not None and model not in upstream.config.models:
                    raise invalid(f"Invalid value for 'model': the upstream '{upstream.name}' serves "
                                  f"{', '.join(upstream.config.models)}.", "model")  # fmt: skip
            elif spec.model not in (engine.name, *engine.adapters.names):
                served = ", ".join([engine.name, *engine.adapters.names])
                raise invalid(f"Invalid value for 'model': this server serves {served} (or UPSTREAM/MODEL); agents "
                              "cannot name other agents.", "model")  # fmt: skip
        if spec.adapter is not None:
            if spec.adapter not in engine.adapters:
                raise invalid(f"Invalid value for 'adapter': this server serves no adapter '{spec.adapter}' "
                              f"(loaded: {', '.join(engine.adapters.names) or 'none'}).", "adapter")  # fmt: skip
            if spec.model not in (None, engine.name, spec.adapter):
                raise invalid("Invalid value for 'adapter': the model already names an adapter.", "adapter")

    # ----------------------------------------------------------------------------------- CRUD (async)
    async def create(self, spec: AgentSpec) -> AgentObject:
        self.check(spec)

        def store() -> Any:
            with session_scope(self.service.db) as s:  # type: ignore[arg-type]
                if crud.get_agent(s, spec.name) is not None:
                    raise APIError(409, f"An agent named '{spec.name}' exists; update it with POST "
                                   f"/v1/agents/{spec.name}.", param="name", code="agent_exists")  # fmt: skip
                return _object(crud.put_agent(s, spec.name, spec.model_dump(mode="json")))

        return await self.service.db_call(store)

    async def update(self, name: str, changes: dict[str, Any]) -> AgentObject:
        """Change the given top-level fields (OpenAI's modify semantics); `null` resets a field."""
        current = await self.service.db_call(self.get_spec, name)
        if current is None:
            raise agent_not_found(name)
        if changes.get("name", name) != name:
            raise invalid("Invalid value for 'name': an agent cannot be renamed; create a new one.", "name")
        merged = current.model_dump(mode="json") | {k: v for k, v in changes.items() if k != "name"}
        merged = {k: v for k, v in merged.items() if v is not None}
        try:
            spec = parse_agent(merged, name)
        except AgentError as exc:
            raise invalid(str(exc), exc.field) from None
        self.check(spec)

        def store() -> Any:
            with session_scope(self.service.db) as s:  # type: ignore[arg-type]
                return _object(crud.put_agent(s, name, spec.model_dump(mode="json")))

        return await self.service.db_call(store)

    async def retrieve(self, name: str) -> AgentObject:
        def read() -> AgentObject | None:
            with session_scope(self.service.db) as s:  # type: ignore[arg-type]
                row = crud.get_agent(s, name)
                return None if row is None else _object(row)

        found = await self.service.db_call(read)
        if found is None:
            raise agent_not_found(name)
        return found

    async def list(self) -> AgentList:
        def read() -> list[AgentObject]:
            with session_scope(self.service.db) as s:  # type: ignore[arg-type]
                return [_object(row) for row in crud.list_agents(s)]

        self.service.ready()
        return AgentList(data=await self.service.db_call(read))

    async def delete(self, name: str) -> AgentDeleted:
        def remove() -> bool:
            with session_scope(self.service.db) as s:  # type: ignore[arg-type]
                return crud.delete_agent(s, name)

        self.service.ready()
        if not await self.service.db_call(remove):
            raise agent_not_found(name)
        return AgentDeleted(id=name)

    # ----------------------------------------------------------------------------- applying one
    @staticmethod
    def apply(req: BaseModel, spec: AgentSpec) -> Any:
        """`req` with the agent's sampling defaults filled in where the request set nothing: the request's own
        fields always win (the merge rule of agents.py); the server's defaults apply after, as always."""
        given = {k for k in req.model_fields_set if getattr(req, k) is not None}  # an explicit null sets nothing
        fill = {k: v for k, v in spec.sampling().items() if k not in given and k in type(req).model_fields}
        if "max_tokens" in fill and "max_completion_tokens" in given:
            del fill["max_tokens"]
        return req.model_copy(update=fill)

    def with_agent(self, req: Any, route: Route) -> Any:
        """`req` merged with the route's agent (and counted in the agent's metrics); as it is without one."""
        if route.agent is None:
            return req
        self.service.metrics.observe_agent(route.agent.name)
        return self.apply(req, route.agent)
