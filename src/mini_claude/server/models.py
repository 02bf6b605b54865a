"""What a request's `model` may name: the base model and each LoRA adapter loaded on it.

vLLM's convention: every adapter is a model of its own in `/v1/models`, with `parent` naming the base model
and `root` the dir it came from. `select` maps a request's `model` to (model id, adapter); an unknown name
is a 404 `model_not_found` that lists what is served.

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
from typing import TYPE_CHECKING

import anyio

from mini_claude.server.errors import APIError
from mini_claude.server.protocol import AdapterDetail, ModelCard, ModelDeleted, ModelDetail, ModelDetails, ModelList

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often a removal looks whether the adapter's last request has finished


class ModelRegistry:
    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._adapter_created: dict[str, int] = {}  # adapters loaded after start: when (for /v1/models)
        self._removing: set[str] = set()  # adapters being removed: no new requests, running ones finish
        self.on_removed: list[Callable[[str], object]] = []

    @property
    def ids(self) -> list[str]:
        """What `model` may name: the base model, then each loaded adapter (not those being removed)."""
        engine = self.service.engine
        if engine is None:
            return []
        return [engine.name, *(n for n in engine.adapters.names if n not in self._removing)]

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
        """The base model and every loaded adapter, each a model."""
        engine, _, _ = self.service.ready()
        started = int(time.time() - (time.monotonic() - self.service.started_at))
        cards = [ModelCard(id=engine.name, created=started)]
        for name in self.ids[1:]:
            created = self._adapter_created.get(name, started)
            cards.append(ModelCard(id=name, created=created, parent=engine.name, root=engine.adapters.info(name).path))
        return ModelList(data=cards)

    def card(self, name: str) -> ModelCard:
        model_id, _ = self.select(name)
        return next(card for card in self.list().data if card.id == model_id)

    def details(self) -> ModelDetails:
        engine, _, _ = self.service.ready()
        config = engine.model.config
        details = [
            ModelDetail(
                id=engine.name, context_window=engine.context_window, parameters=config.n_params, source=engine.source
            )
        ]
        for name in self.ids[1:]:
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
