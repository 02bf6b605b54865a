"""`/v1/agents`: agent profiles (create, list, retrieve, update, delete); use one with `model: NAME`."""

from __future__ import annotations

from typing import Any

from fastapi import Body

from mini_claude.agents import AgentSpec
from mini_claude.server.protocol import ErrorResponse
from mini_claude.server.protocol.agents import AgentDeleted, AgentList, AgentObject
from mini_claude.server.routes.common import ServiceDep, api_router

router = api_router()


@router.post("/v1/agents", response_model=AgentObject, responses={409: {"model": ErrorResponse}})
async def create_agent(body: AgentSpec, service: ServiceDep) -> AgentObject:
    """Create an agent (the same keys as `agents/NAME.yaml`); an invalid one is a 400 naming the field."""
    return await service.agents.create(body)


@router.get("/v1/agents", response_model=AgentList)
async def list_agents(service: ServiceDep) -> AgentList:
    return await service.agents.list()


@router.get("/v1/agents/{name}", response_model=AgentObject)
async def get_agent(name: str, service: ServiceDep) -> AgentObject:
    return await service.agents.retrieve(name)


@router.post("/v1/agents/{name}", response_model=AgentObject)
@router.patch("/v1/agents/{name}", response_model=AgentObject, include_in_schema=False)
async def update_agent(name: str, service: ServiceDep, body: dict[str, Any] = Body(...)) -> AgentObject:  # noqa: B008
    """Change the given fields (OpenAI's modify semantics: POST; PATCH works too); `null` resets one."""
    return await service.agents.update(name, body)


@router.delete("/v1/agents/{name}", response_model=AgentDeleted)
async def delete_agent(name: str, service: ServiceDep) -> AgentDeleted:
    return await service.agents.delete(name)
