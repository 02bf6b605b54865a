"""`POST /predict`, KServe V2 (`/v2/models...`) and `GET /v1/predictions`: scikit-learn models and their log.

V2 routes answer errors in the protocol's `{"error": "..."}` shape; the rest use the server's OpenAI shape.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Header, Query, Response
from fastapi.responses import JSONResponse

from mini_claude.server.conversations import MAX_OFFSET
from mini_claude.server.errors import APIError
from mini_claude.server.protocol.predict import (
    InferResponse,
    ModelIndex,
    ModelMetadata,
    ModelReady,
    PredictionList,
    PredictRequest,
    PredictResponse,
    V2Error,
)
from mini_claude.server.routes.common import PredictDep, api_router

router = api_router()
V2_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": V2Error} for s in (400, 404, 503)}
RequestId = Annotated[str | None, Header(alias="X-Request-Id")]


def _v2_error(exc: APIError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@router.post("/predict", response_model=PredictResponse)
async def predict(
    body: PredictRequest, service: PredictDep, response: Response, x_request_id: RequestId = None
) -> PredictResponse:
    """Labels and class probabilities of a served scikit-learn model (default: the safety classifier)."""
    result = await service.predict(body, x_request_id)
    response.headers["X-Request-Id"] = result.request_id
    return result


@router.get("/v2/models", response_model=ModelIndex)
def v2_models(service: PredictDep) -> ModelIndex:
    return service.index()


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=V2_ERRORS)
def v2_model(name: str, service: PredictDep) -> Any:
    try:
        return service.metadata(name)
    except APIError as exc:
        return _v2_error(exc)


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=V2_ERRORS)
def v2_model_ready(name: str, service: PredictDep) -> Any:
    try:
        ready = service.ready(name)
    except APIError as exc:
        return _v2_error(exc)
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)


@router.post("/v2/models/{name}/infer", response_model=InferResponse, responses=V2_ERRORS)
async def v2_infer(
    name: str, service: PredictDep, payload: Annotated[Any, Body()] = None, x_request_id: RequestId = None
) -> Any:
    try:
        result = await service.infer(name, payload, x_request_id)
    except APIError as exc:
        return _v2_error(exc)
    return JSONResponse(result.model_dump(exclude_none=True), headers={"X-Request-Id": result.id})


@router.get("/v1/predictions", response_model=PredictionList)
async def list_predictions(
    service: PredictDep,
    model: str | None = None,
    request_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,  # as OpenAI's list endpoints (one more row is read for has_more)
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> PredictionList:
    """Logged predictions, newest first (filter by `model` or `request_id`)."""
    return await service.list_logged(model, request_id, limit, offset)
