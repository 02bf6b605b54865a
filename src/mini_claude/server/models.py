"""What a request's `model` may name: the base model and each LoRA adapter loaded on it.

vLLM's convention: every adapter is a model of its own in `/v1/models`, with `parent` naming the base model
and `root` the dir it came from. `select` maps a request's `model` to (model id, adapter); an unknown name
is a 404 `model_not_found` that lists what is served.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mini_claude.server.errors import APIError
from mini_claude.server.protocol import AdapterDetail, ModelCard, ModelDetail, ModelDetails, ModelList

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._adapter_created: dict[str, int] = {}  # adapters loaded after start: when (for /v1/models)

    @property
    def ids(self) -> list[str]:
        """What `model` may name: the base model, then each loaded adapter."""
        engine = self.service.engine
        return [engine.name, *engine.adapters.names] if engine is not None else []

    def select(self, name: str | None) -> tuple[str, str | None]:
        """(model id, adapter) for a request's `model`: None is the base model; adapters are models of their own."""
        engine, _, _ = self.service.ready()
        if name is None or name == engine.name:
            return engine.name, None
        if name in engine.adapters:
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
        for name in engine.adapters.names:
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
        for name in engine.adapters.names:
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
