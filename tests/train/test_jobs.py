"""The fine-tune job runner's bookkeeping, without training: deleted models stay deleted, and at start-up only
jobs of dead runners are taken back (a live replica's running job is left to it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from sqlalchemy import update

from mini_claude.db import FineTuneJob, crud, init_db, make_engine, session_scope
from mini_claude.train.jobs import FineTuneRunner

RECORDS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def runner(tmp_path: Path) -> FineTuneRunner:
    db = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    init_db(db)
    return FineTuneRunner(db, tmp_path / "fine-tunes", "unused-model-path")


def test_a_deleted_fine_tuned_model_is_not_served_again(tmp_path: Path) -> None:
    jobs = runner(tmp_path)
    job = jobs.submit("ft:tiny:{id}", records=RECORDS)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with session_scope(jobs.db) as s:
        crud.update_fine_tune_job(s, job["id"], status="succeeded", result={"adapter": str(adapter)})
    assert jobs.succeeded_adapters() == [(job["fine_tuned_model"], str(adapter))]
    assert jobs.forget(job["fine_tuned_model"]) and not jobs.forget("ft:tiny:other")
    assert jobs.succeeded_adapters() == []
    assert jobs.get(job["id"])["status"] == "succeeded"  # the job's record stays


def test_recover_takes_back_only_jobs_of_dead_runners(tmp_path: Path) -> None:
    jobs = runner(tmp_path)
    ids = [jobs.submit("ft:{id}", records=RECORDS)["id"] for _ in range(3)]
    host = socket.gethostname()
    owners = [f"{host}:999999999:dead", f"{host}:{os.getppid()}:alive", "another-host:1:unknown"]
    with session_scope(jobs.db) as s:
        for job_id, owner in zip(ids, owners, strict=True):
            s.execute(update(FineTuneJob).where(FineTuneJob.id == job_id).values(status="running", owner=owner))
    assert jobs.recover() == [ids[0]]
    assert [jobs.get(i)["status"] for i in ids] == ["queued", "running", "running"]
