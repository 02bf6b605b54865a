"""`/health` (public: load balancers and probes call it without a key) and `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from mini_claude.server.protocol import HealthResponse
from mini_claude.server.routes.common import ServiceDep, api_router

public = APIRouter()
router = api_router()


@public.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health(service: ServiceDep) -> JSONResponse:
    report = service.health()
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "healthy" else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
