"""`/v1/agents`: an agent's definition is `agents.AgentSpec` itself (the same schema as `agents/NAME.yaml`);
responses add OpenAI's `object` and the timestamps."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from mini_claude.agents import AgentSpec


class AgentObject(AgentSpec):
    object: Literal["agent"] = "agent"
    created_at: int
    updated_at: int
    source: str | None = None  # the YAML file it was loaded from; None when made through the API or CLI


class AgentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AgentObject]


class AgentDeleted(BaseModel):
    id: str
    object: Literal["agent.deleted"] = "agent.deleted"
    deleted: bool = True
