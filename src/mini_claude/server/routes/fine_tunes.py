"""`/v1/fine-tunes`: LoRA fine-tuning jobs that run in the background and are served when they succeed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from mini_claude.server.conversations import MAX_OFFSET
from mini_claude.server.protocol import ErrorResponse, FineTuneJob, FineTuneJobList, FineTuneRequest
from mini_claude.server.routes.common import FineTunesDep, api_router

router = api_router()


@router.post("/v1/fine-tunes", response_model=FineTuneJob)
async def create_fine_tune(body: FineTuneRequest, fine_tunes: FineTunesDep) -> FineTuneJob:
    """Start a LoRA fine-tune of the served model in the background; poll the job for progress. When it has
    succeeded, its `fine_tuned_model` is served (chat with it by that `model` id) without a restart."""
    return await fine_tunes.create(body)


@router.get("/v1/fine-tunes", response_model=FineTuneJobList)
async def list_fine_tunes(
    fine_tunes: FineTunesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> FineTuneJobList:
    return await fine_tunes.list(limit, offset)


@router.get("/v1/fine-tunes/{job_id}", response_model=FineTuneJob)
async def get_fine_tune(job_id: str, fine_tunes: FineTunesDep) -> FineTuneJob:
    return await fine_tunes.get(job_id)


@router.post("/v1/fine-tunes/{job_id}/cancel", response_model=FineTuneJob, responses={409: {"model": ErrorResponse}})
async def cancel_fine_tune(job_id: str, fine_tunes: FineTunesDep) -> FineTuneJob:
    return await fine_tunes.cancel(job_id)
