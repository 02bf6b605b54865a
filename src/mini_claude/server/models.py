"""What a request's `model` may name: the base model, each LoRA adapter on it, `UPSTREAM/MODEL`, and agents.

vLLM's convention: every adapter is a model of its own in `/v1/models`, with `parent` naming the base model
and `root` the dir it came from. Upstream models are listed as `UPSTREAM/MODEL` (`owned_by` the upstream)
and agents by name (`owned_by` "agent", `parent` the model they run on). `route` maps a request's `model` to
a `Route` (where the request goes, and the agent it names, if any); `select` is its local-only part. An
unknown name is a 404 `model_not_found` that lists what is served. Names are looked up in that order: the
served models, then `UPSTREAM/` prefixes, then agents (whose names can contain no "/" and may not shadow a
served model).

`remove` (`DELETE /v1/models/{id}`) takes an adapter out of service without cutting anyone off: from the
moment it is called, new requests for it are 404s; the requests already queued or running with it finish;
then its weights leave the model. The base model cannot be removed (a 400). Removal callbacks (the fine-tune
service's) make it last: a fine-tuned model removed here is not served again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from mini_claude.agents import AgentSpec
from mini_claude.server.errors import APIError
from mini_claude.server.protocol import AdapterDetail, ModelCard, ModelDeleted, ModelDetail, ModelDetails, ModelList
from mini_claude.upstream import Upstream

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often a removal looks whether the adapter's last request has finished


@dataclass
class Route:
    """Where a request goes: the local engine (with an adapter or not) or an upstream, and its agent."""

    model: str  # the id the client named: reported back as `model`, stored with the conversation
    adapter: str | None = None
    upstream: Upstream | None = None
    upstream_model: str | None = None  # the model's name on the upstream (without the prefix)
    agent: AgentSpec | None = None


class ModelRegistry:
    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._adapter_created: dict[str, int] = {}  # adapters loaded after start: when (for /v1/models)
        self._removing: set[str] = set()  # adapters being removed: no new requests, running ones finish
        self.on_removed: list[Callable[[str], object]] = []
        self.upstreams = {c.name: Upstream(c) for c in service.settings.upstreams}

    @property
    def upstream_names(self) -> list[str]:
        return list(self.upstreams)

    def upstream_of(self, name: str) -> tuple[Upstream, str] | None:
        """(upstream, its model name) for `UPSTREAM/MODEL`, or None if `name` has no upstream's prefix."""
        prefix, slash, model = name.partition("/")
        upstream = self.upstreams.get(prefix) if slash and model else None
        return (upstream, model) if upstream is not None else None

    def upstream_ids(self) -> list[tuple[Upstream, str]]:
        return [(u, f"{u.name}/{m}") for u in self.upstreams.values() for m in u.models()]

    @property
    def adapter_ids(self) -> list[str]:
        """The loaded adapters that take requests (not those being removed)."""
        engine = self.service.engine
        return [] if engine is None else [n for n in engine.adapters.names if n not in self._removing]

    @property
    def ids(self) -> list[str]:
        """What `model` may name (the web UI's picker): the base model, adapters, upstream models, agents."""
        engine = self.service.engine
        if engine is None:
            return []
        try:
            agents = self.service.agents.names() if self.service.db is not None else []
        except APIError:  # the database is down: the picker still lists what the engine serves
            agents = []
        return [engine.name, *self.adapter_ids, *(i for _, i in self.upstream_ids()), *agents]

    def _unknown(self, name: str) -> APIError:
        return APIError(
            404, f"The model '{name}' does not exist; this server serves {', '.join(map(repr, self.ids))}.",
            param="model", code="model_not_found",
        )  # fmt: skip

    async def route(self, name: str | None) -> Route:
        """Resolve a request's `model` (see the module docstring); agents are read from the database."""
        engine, _, _ = self.service.ready()
        if name is None or name == engine.name or name in engine.adapters:
            model_id, adapter = self.select(name)
            return Route(model_id, adapter)
        if (found := self.upstream_of(name)) is not None:
            upstream, model = found
            if upstream.config.models is not None and model not in upstream.config.models:
                raise self._unknown(name)
            return Route(name, upstream=upstream, upstream_model=model)
        spec = await self.service.db_call(self.service.agents.get_spec, name) if "/" not in name else None
        if spec is None:
            raise self._unknown(name)
        try:
            self.service.agents.check(spec)
        except APIError as exc:  # e.g. its adapter is no longer served
            raise APIError(400, f"The agent '{name}' cannot run here: {exc.message}", param="model",
                           code="agent_unavailable") from None  # fmt: skip
        target = spec.model
        if spec.adapter is not None:
            target = spec.adapter
        inner = await self.route(target) if target is not None else Route(engine.name)
        return Route(name, inner.adapter, inner.upstream, inner.upstream_model, spec)

    def select(self, name: str | None) -> tuple[str, str | None]:
        """(model id, adapter) for a request's `model`: None is the base model; adapters are models of their own."""
        engine, _, _ = self.service.ready()
        if name is None or name == engine.name:
            return engine.name, None
        if name in engine.adapters and name not in self._removing:
            return name, name
        raise APIError(
            404, f"The model '{name}' does not exist; this server serves {', '.join(map(repr, self.ids))}.",
            param="model", code="model_not_found",
        )  # fmt: skip

    def list(self) -> ModelList:
        """The base model, every loaded adapter, the upstreams' models and the agents, each a model."""
        engine, _, _ = self.service.ready()
        started = int(time.time() - (time.monotonic() - self.service.started_at))
        cards = [ModelCard(id=engine.name, created=started)]
        for name in self.adapter_ids:
            created = self._adapter_created.get(name, started)
            cards.append(ModelCard(id=name, created=created, parent=engine.name, root=engine.adapters.info(name).path))
        for upstream, model_id in self.upstream_ids():
            cards.append(ModelCard(id=model_id, created=started, owned_by=upstream.name, root=upstream.base_url))
        for spec in self.service.agents.specs():
            cards.append(ModelCard(id=spec.name, created=started, owned_by="agent",
                                   parent=spec.adapter or spec.model or engine.name))  # fmt: skip
        return ModelList(data=cards)

    def card(self, name: str) -> ModelCard:
        found = next((card for card in self.list().data if card.id == name), None)
        if found is None:
            raise self._unknown(name)
        return found

    def details(self) -> ModelDetails:
        engine, _, _ = self.service.ready()
        config = engine.model.config
        details = [
            ModelDetail(
                id=engine.name, context_window=engine.context_window, parameters=config.n_params, source=engine.source
            )
        ]
        for name in self.adapter_ids:
            info = engine.adapters.info(name)
            details.append(
                ModelDetail(
                    id=name, context_window=engine.context_window, parameters=config.n_params + info.parameters,
                    source=info.path, parent=engine.name,
                    adapter=AdapterDetail(rank=info.rank, alpha=info.alpha, targets=info.targets,
                                          parameters=info.parameters, base_model=info.base_model),
                )
            )  # fmt: skip
        return ModelDetails(models=details)

    def load_adapter(self, path: str, name: str | None = None) -> ModelCard:
        """Serve the adapter in `path` as a new model, without a restart (fine-tune jobs call this when done)."""
        engine, _, _ = self.service.ready()
        info = engine.load_adapter(path, name)
        self._adapter_created[info.name] = int(time.time())
        log.info("serving adapter %s from %s", info.name, info.path)
        return self.card(info.name)

    async def remove(self, name: str, timeout_s: float = 600.0) -> ModelDeleted:
        """Stop serving adapter `name` once the requests using it have finished (module docstring)."""
        engine, scheduler, _ = self.service.ready()
        if name == engine.name:
            raise APIError(400, f"'{name}' is the base model this server runs; only adapters and fine-tuned "
                           "models can be deleted.", param="model", code="model_not_deletable")  # fmt: skip
        self.select(name)  # a 404 for unknown names and for adapters already being removed
        self._removing.add(name)
        try:
            deadline = time.monotonic() + timeout_s
            while scheduler.users(name) and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            engine.adapters.unload(name)
        finally:
            self._removing.discard(name)
        self._adapter_created.pop(name, None)
        log.info("removed adapter %s", name)
        for callback in self.on_removed:
            await anyio.to_thread.run_sync(callback, name)  # e.g. a database write
        return ModelDeleted(id=name)
