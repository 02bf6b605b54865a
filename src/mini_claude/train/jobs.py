"""Fine-tuning as background jobs: a queue in the database, one child process per run.

A request to fine-tune must return at once, and a training run must not be able to take the server down
with it (minutes of CPU, gigabytes of memory, a crash). So a job is `mini-claude finetune` run as a child
process on a YAML recipe the job writes, exactly as a user would run it by hand:

- Each job is a row of `fine_tune_jobs` (status, progress, result, error): its state survives restarts.
- One job runs at a time, oldest queued first: two trainings would only split the same cores.
- Progress is read from the run's `metrics.jsonl` (step, total steps, latest loss) while it trains.
- On success the adapter dir goes to `on_adapter(name, path)`: the server loads it as a new model, with
  no restart.
- `cancel()` ends the child's whole process group and marks the job cancelled.
- Several runners (server replicas) may share a database. A runner claims a job atomically, with a lease
  (`owner`, `lease_expires_at`) that it renews while the job trains. When a runner dies, its lease runs out and
  another runner claims the job, once; `finetune --resume` continues it from its latest checkpoint. A runner
  that finds its lease taken over (it stalled past the lease) stops its child instead of finishing the job.
  Jobs held by a dead process of this same host (a restart after a crash) are taken back at once (`recover`).
- The child dies with its runner (`PR_SET_PDEATHSIG`), so a `kill -9` of the server never leaves a training
  that a second runner would then run beside.
- Idle, the worker sleeps on a condition variable: a job submitted here wakes it at once; jobs queued by
  other processes and expired leases are looked for every `idle_poll_s` (one small query, seconds apart).

Nothing here knows about HTTP.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine as Database

from mini_claude.db import crud, session_scope
from mini_claude.train.data import DataError, load_records, parse_record
from mini_claude.train.finetune import BUILTIN_DATA
from mini_claude.train.trainer import latest_checkpoint

log = logging.getLogger(__name__)

# `finetune` arguments a job may set; the rest (model, data, out, resume, quiet) belong to the runner.
HYPERPARAMETERS = (
    "rank", "alpha", "dropout", "targets", "steps", "epochs", "lr", "min_lr_ratio", "batch_size", "grad_accum",
    "warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "save_every", "max_length", "val_fraction",
    "seed", "skip_safety_filter", "dtype", "threads", "augment", "augment_copies",
)  # fmt: skip
ACTIVE = ("validating_files", "queued", "running")
RESULT_KEYS = (
    "steps", "train_examples", "val_examples", "train_loss_first", "train_loss_last", "val_ppl_before",
    "val_ppl_after", "val_ppl_change", "train_time_s", "wall_time_s", "tokens_trained",
)  # fmt: skip


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the child between fork and exec: nothing but the system call
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class JobError(ValueError):
    """A job request or action that cannot be honoured (bad data, unknown job, finished job)."""


class JobNotFoundError(JobError):
    pass


@dataclass
class _Running:
    job_id: str
    process: subprocess.Popen[bytes]
    cancelled: threading.Event


def check_data(files: Sequence[str], records: Sequence[Any] | None) -> None:
    """Refuse unreadable data now, with the file and line (or `training_data[i]`) of the first problem, so a
    job never queues for minutes to fail on its input."""
    if records is not None:
        for i, record in enumerate(records):
            parse_record(record, f"training_data[{i}]")
        return
    for spec in files:
        path = Path(spec).expanduser()
        if path.is_file():
            load_records(path)  # raises DataError naming file and line
        elif spec.partition(":")[0] not in BUILTIN_DATA:
            raise JobError(f"training file not found on the server: {spec} (bundled sets: {', '.join(BUILTIN_DATA)})")


class FineTuneRunner:
    """Queues, runs and reports fine-tuning jobs; see the module docstring."""

    def __init__(
        self,
        db: Database,
        work_dir: str | Path,
        model_source: str,
        on_adapter: Callable[[str, str], object] | None = None,
        poll_s: float = 0.5,
        lease_s: float = 30.0,
        idle_poll_s: float = 5.0,
    ) -> None:
        self.db = db
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.model_source = model_source
        self.on_adapter = on_adapter
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.idle_poll_s = idle_poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Condition()
        self._closed = False
        self._running: _Running | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ requests
    def submit(
        self,
        name: str,
        files: Sequence[str] = (),
        records: Sequence[dict[str, Any]] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        model_name: str = "",
    ) -> dict[str, Any]:
        """Check the data and queue a job that trains an adapter to be served as `name` (a format string
        that may use `{id}`, the job's id). Returns the job as `view()` shows it."""
        hyper = dict(hyperparameters or {})
        unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
        if unknown:
            raise JobError(f"unknown hyperparameters: {', '.join(unknown)}")
        if records is None and not files:
            raise JobError("no training data: give training files or records")
        try:
            check_data(files, records)
        except DataError as exc:
            raise JobError(str(exc)) from None
        config = {"model": model_name, "training_files": list(files) if records is None else None,
                  "hyperparameters": hyper}  # fmt: skip
        with session_scope(self.db) as s:  # one transaction: the worker never sees a job without its files
            job = crud.create_fine_tune_job(s, config)
            job_id, job_dir = job.id, self.work_dir / job.id
            job_dir.mkdir(parents=True, exist_ok=True)
            data = [str(Path(f).expanduser().resolve()) if Path(f).expanduser().is_file() else f for f in files]
            if records is not None:
                path = job_dir / "training_data.jsonl"
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
                data = [str(path)]
            recipe = {**hyper, "model": self.model_source, "data": data, "out": str(job_dir / "run"), "quiet": True}
            (job_dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            job.config = {**config, "fine_tuned_model": name.format(id=job_id[:8]), "dir": str(job_dir)}
        with self._wake:
            self._wake.notify()
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        with session_scope(self.db) as s:
            job = crud.get_fine_tune_job(s, job_id)
            if job is None:
                raise JobNotFoundError(f"no fine-tune job with id '{job_id}'")
            return view(job)

    def list(self, limit: int = 20, offset: int = 0) -> list[dict[str, Any]]:
        with session_scope(self.db) as s:
            return [view(job) for job in crud.list_fine_tune_jobs(s, limit=limit, offset=offset)]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a queued or running job; its partial run stays on disk."""
        with session_scope(self.db) as s:
            job = crud.get_fine_tune_job(s, job_id)
            if job is None:
                raise JobNotFoundError(f"no fine-tune job with id '{job_id}'")
            if job.status not in ACTIVE:
                raise JobError(f"the job has already finished ({job.status}); only queued or running jobs cancel")
            crud.update_fine_tune_job(s, job_id, status="cancelled")
        running = self._running
        if running is not None and running.job_id == job_id:
            running.cancelled.set()
            _kill(running.process)
        return self.get(job_id)

    def forget(self, name: str) -> bool:
        """Record that fine-tuned model `name` was deleted, so it is not served again after a restart (its
        adapter dir stays on disk, as the job's result names it). False when no job made that model."""
        with session_scope(self.db) as s:
            for job in _all_jobs(s):
                if job.status == "succeeded" and (job.config or {}).get("fine_tuned_model") == name:
                    job.config = {**job.config, "deleted": True}  # a new dict: JSON columns miss in-place edits
                    return True
        return False

    def succeeded_adapters(self) -> list[tuple[str, str]]:
        """(model name, adapter dir) of every finished, undeleted job whose adapter is on disk, oldest first."""
        with session_scope(self.db) as s:
            found = [view(job) for job in _all_jobs(s) if job.status == "succeeded" and not job.config.get("deleted")]
        adapters = [(j["fine_tuned_model"], (j.get("result") or {}).get("adapter", "")) for j in reversed(found)]
        return [(name, path) for name, path in adapters if name and path and Path(path).is_dir()]

    # ------------------------------------------------------------------------------------------ running
    def start(self) -> None:
        """Re-queue interrupted jobs and start the worker thread."""
        self.recover()
        self._thread = threading.Thread(target=self._run, name="mini-claude-fine-tunes", daemon=True)
        self._thread.start()

    def recover(self) -> list[str]:
        """Re-queue the running jobs of dead runners of this host (their leases need not run out first: the
        process is known to be gone); fail jobs left half-created. Jobs of live runners are left alone."""
        with session_scope(self.db) as s:
            stale = [job for job in _all_jobs(s) if job.status == "validating_files"
                     or (job.status == "running" and _dead_here(job.owner))]  # fmt: skip
            for job in stale:
                status = "queued" if job.status == "running" else "failed"
                error = None if status == "queued" else "the server stopped while the job was being created"
                crud.update_fine_tune_job(s, job.id, status=status, error=error)
            return [job.id for job in stale]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker. A running child is ended too; its job goes back to the queue (and resumes from its
        last checkpoint when a runner starts again)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        running = self._running
        if running is not None:
            _kill(running.process)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
            job_id = self._claim()
            if job_id is None:
                with self._wake:
                    if not self._closed:  # other processes may queue jobs, or die holding one
                        self._wake.wait(timeout=self.idle_poll_s)
                continue
            try:
                self._run_job(job_id)
            except Exception as exc:  # a bug or a vanished disk: fail this job, keep the queue going
                log.exception("fine-tune job %s failed", job_id)
                with session_scope(self.db) as s:
                    crud.update_fine_tune_job(s, job_id, status="failed", error=f"the job runner failed: {exc}")

    def _claim(self) -> str | None:
        with session_scope(self.db) as s:
            job = crud.claim_next_fine_tune_job(s, self.owner, self.lease_s)
            return job.id if job is not None else None

    def _run_job(self, job_id: str) -> None:
        job = self.get(job_id)
        job_dir = Path(job["config"]["dir"])
        run_dir = job_dir / "run"
        command = [sys.executable, "-m", "mini_claude", "finetune", "--config", str(job_dir / "config.yaml")]
        if latest_checkpoint(run_dir) is not None:
            command.append("--resume")  # interrupted earlier: continue from the last checkpoint
        env = {k: v for k, v in os.environ.items() if k != "MINI_CLAUDE_DEBUG"}
        with (job_dir / "log.txt").open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=_die_with_parent)  # fmt: skip
        running = _Running(job_id, process, threading.Event())
        self._running = running
        lost = False
        try:
            step, renewed = -1, time.monotonic()
            while process.poll() is None:
                time.sleep(self.poll_s)
                if time.monotonic() - renewed >= self.lease_s / 3:
                    with session_scope(self.db) as s:
                        lost = not crud.renew_fine_tune_lease(s, job_id, self.owner, self.lease_s)
                    renewed = time.monotonic()
                progress = read_progress(run_dir)
                if progress and progress["step"] != step and not lost:
                    step = progress["step"]
                    with session_scope(self.db) as s:
                        crud.update_fine_tune_job(s, job_id, progress=min(step / progress["total_steps"], 0.99),
                                                  result=progress, owner=self.owner)  # fmt: skip
                if lost or self._cancelled_elsewhere(job_id):
                    running.cancelled.set()
                    _kill(process)
        finally:
            self._running = None
        if lost:
            log.warning("fine-tune job %s was taken over by another runner; stopped its run here", job_id)
            return
        self._finish(job_id, job["fine_tuned_model"], process.returncode, running.cancelled.is_set(), job_dir)

    def _cancelled_elsewhere(self, job_id: str) -> bool:
        with session_scope(self.db) as s:
            job = crud.get_fine_tune_job(s, job_id)
            return job is None or job.status == "cancelled"

    def _finish(self, job_id: str, name: str, returncode: int, cancelled: bool, job_dir: Path) -> None:
        with self._wake:
            closing = self._closed
        if cancelled:
            return  # the status says cancelled already
        if closing and returncode != 0:  # we ended it ourselves: run it again (resuming) next time
            with session_scope(self.db) as s:
                crud.update_fine_tune_job(s, job_id, status="queued", owner=self.owner)
            return
        if returncode != 0:
            with session_scope(self.db) as s:
                crud.update_fine_tune_job(s, job_id, status="failed", error=_failure(job_dir / "log.txt", returncode),
                                          owner=self.owner)  # fmt: skip
            return
        summary = json.loads((job_dir / "run" / "summary.json").read_text())
        result = {key: summary.get(key) for key in RESULT_KEYS} | {"adapter": summary["adapter"]}
        error = None
        if self.on_adapter is not None:
            try:
                self.on_adapter(name, summary["adapter"])
            except ValueError as exc:  # e.g. the name was taken meanwhile: the adapter is still on disk
                error = f"trained, but the adapter could not be served: {exc}"
        with session_scope(self.db) as s:
            crud.update_fine_tune_job(
                s,
                job_id,
                status="failed" if error else "succeeded",
                progress=1.0,
                result=result,
                error=error,
                owner=self.owner,
            )


def view(job: Any) -> dict[str, Any]:
    """A job row as plain data: what the API returns."""
    config = dict(job.config or {})
    return {
        "id": job.id,
        "status": job.status,
        "progress": job.progress,
        "model": config.get("model", ""),
        "fine_tuned_model": config.get("fine_tuned_model"),
        "training_files": config.get("training_files"),
        "hyperparameters": config.get("hyperparameters", {}),
        "result": job.result,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "config": config,
    }


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """The latest training step of a run in progress: step, total_steps, loss (None before the first step)."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the trainer is writing this line right now
            continue
        if "loss" in row and "total_steps" in row:
            return {"step": row["step"], "total_steps": row["total_steps"], "loss": row["loss"]}
    return None


def _failure(log_path: Path, returncode: int) -> str:
    """The child's own one-line error (`mini-claude: error: ...`) if it printed one, else the end of its log."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.exists() else []
    for line in reversed(lines):
        if line.startswith("mini-claude: error:"):
            return line.removeprefix("mini-claude: error:").strip()
    tail = " | ".join(line.strip() for line in lines[-3:] if line.strip())
    return f"the training process exited with status {returncode}" + (f": {tail}" if tail else "")


def _kill(process: subprocess.Popen[bytes]) -> None:
    """End the child and anything it started (torchrun workers, data loaders)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _dead_here(owner: str | None) -> bool:
    """Whether `owner` (a runner id, `host:pid:suffix`) names a process of this host that no longer exists."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return owner is None  # a job from before leases: nobody can be renewing it
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _all_jobs(session: Any) -> list[Any]:
    jobs, offset = [], 0
    while page := crud.list_fine_tune_jobs(session, limit=100, offset=offset):
        jobs += page
        offset += len(page)
    return jobs
