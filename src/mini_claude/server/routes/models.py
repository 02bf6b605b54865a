"""`/v1/models` (OpenAI's list and retrieve) and `/models` (details: context window, parameters, adapters)."""

from __future__ import annotations

from mini_claude.server.protocol import ModelCard, ModelDeleted, ModelDetails, ModelList
from mini_claude.server.routes.common import ServiceDep, api_router

router = api_router()


@router.get("/v1/models", response_model=ModelList)
def list_models(service: ServiceDep) -> ModelList:
    return service.models.list()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)  # ids may be UPSTREAM/MODEL
def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    return service.models.card(model_id)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
async def delete_model(model_id: str, service: ServiceDep) -> ModelDeleted:
    """Stop serving an adapter or fine-tuned model; requests already using it finish first (the base model: 400)."""
    return await service.models.remove(model_id)


@router.get("/models", response_model=ModelDetails)
def model_details(service: ServiceDep) -> ModelDetails:
    return service.models.details()
