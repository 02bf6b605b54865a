"""`/v1/fine-tunes`: the HTTP face of `train.jobs.FineTuneRunner`.

Validated requests become runner calls and job rows become `FineTuneJob` responses; errors become `APIError`s
in OpenAI's shape. The runner starts with the server (after the model, since a job trains that model) and the
adapters of jobs that finished earlier are served again at once, so a fine-tuned model survives restarts.
Jobs train the file the base model was loaded from, so a server whose model did not come from a file
(tests that hand it an in-memory engine) refuses them with a 400.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import anyio

from mini_claude.server.errors import APIError, invalid
from mini_claude.server.protocol import (
    FineTuneError,
    FineTuneHyperparameters,
    FineTuneJob,
    FineTuneJobList,
    FineTuneRequest,
)
from mini_claude.server.service import ChatService
from mini_claude.train.jobs import FineTuneRunner, JobError, JobNotFoundError

log = logging.getLogger(__name__)


class FineTuneService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.runner: FineTuneRunner | None = None

    def start(self, poll_s: float = 0.5) -> None:
        """Serve the adapters of earlier successful jobs, re-queue interrupted ones and start the worker."""
        engine, _, db = self.chat.ready()
        self.runner = FineTuneRunner(
            db,
            self.chat.settings.fine_tune_dir,
            engine.source,
            on_adapter=self._serve,
            poll_s=poll_s,
            lease_s=self.chat.settings.job_lease_s,
            idle_poll_s=min(5.0, self.chat.settings.job_lease_s / 2),
        )
        self.chat.models.on_removed.append(self.runner.forget)
        for name, path in self.runner.succeeded_adapters():
            try:
                self._serve(name, path)
            except ValueError as exc:  # e.g. made for another base model than the one served now
                log.warning("not serving fine-tuned model %s: %s", name, exc)
        self.runner.start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.close()

    def _serve(self, name: str, path: str) -> None:
        if name not in self.chat.model_ids:
            self.chat.load_adapter(path, name)

    def _ready(self) -> FineTuneRunner:
        self.chat.ready()
        if self.runner is None:
            raise APIError(503, "The server is starting.", "server_error", code="not_ready")
        return self.runner

    # ---------------------------------------------------------------------------------------- requests
    async def create(self, req: FineTuneRequest) -> FineTuneJob:
        runner = self._ready()
        engine = self.chat.engine
        assert engine is not None
        if req.model is not None and req.model != engine.name:
            raise APIError(
                404, f"Fine-tuning adapts the served base model '{engine.name}', not '{req.model}'.",
                param="model", code="model_not_found",
            )  # fmt: skip
        if not engine.source:
            raise invalid("This server's model was not loaded from a file, so it cannot be fine-tuned.", "model")
        name = f"ft:{engine.name}:{req.suffix}:{{id}}" if req.suffix else f"ft:{engine.name}:{{id}}"
        try:
            job = await anyio.to_thread.run_sync(
                lambda: runner.submit(
                    name, req.files, req.training_data, req.hyperparameters.to_finetune_args(), engine.name
                )
            )
        except JobError as exc:
            param = "training_data" if req.training_data is not None else "training_file"
            raise invalid(str(exc), param) from None
        self.chat.metrics.fine_tunes.inc()
        return _job(job)

    async def get(self, job_id: str) -> FineTuneJob:
        runner = self._ready()
        try:
            return _job(await anyio.to_thread.run_sync(runner.get, job_id))
        except JobNotFoundError:
            raise _not_found(job_id) from None

    async def list(self, limit: int, offset: int) -> FineTuneJobList:
        runner = self._ready()
        jobs = await anyio.to_thread.run_sync(runner.list, limit, offset)
        more = await anyio.to_thread.run_sync(runner.list, 1, offset + limit) if len(jobs) == limit else []
        return FineTuneJobList(data=[_job(j) for j in jobs], has_more=bool(more))

    async def cancel(self, job_id: str) -> FineTuneJob:
        runner = self._ready()
        try:
            return _job(await anyio.to_thread.run_sync(runner.cancel, job_id))
        except JobNotFoundError:
            raise _not_found(job_id) from None
        except JobError as exc:
            raise APIError(409, f"Job '{job_id}' cannot be cancelled: {exc}.", code="job_not_active") from None


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"No fine-tune job with id '{job_id}'.", param="id", code="fine_tune_not_found")


def _timestamp(value: datetime) -> int:
    return int(value.timestamp())


def _job(job: dict[str, Any]) -> FineTuneJob:
    return FineTuneJob(
        id=job["id"], model=job["model"], status=job["status"], progress=job["progress"],
        fine_tuned_model=job["fine_tuned_model"] if job["status"] == "succeeded" else None,
        training_files=job["training_files"], result=job["result"],
        hyperparameters=FineTuneHyperparameters.from_finetune_args(job["hyperparameters"]),
        error=FineTuneError(message=job["error"]) if job["error"] else None,
        created_at=_timestamp(job["created_at"]), updated_at=_timestamp(job["updated_at"]),
    )  # fmt: skip
