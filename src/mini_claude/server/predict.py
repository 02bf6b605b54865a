"""Prediction serving: `/predict`, the Open Inference Protocol (KServe V2) and the prediction log. No FastAPI.

Design choices:
- Models come from a `predict.ModelCache` (bundled models plus `Settings.models_dir`, by file name, reloaded
  when a file changes) that is loaded when the server starts, so the first request does not pay for it and a
  broken file shows up in the log at once.
- scikit-learn is synchronous and may take milliseconds, so every prediction runs in a worker thread; the
  event loop keeps streaming chat tokens meanwhile.
- **Logging never slows or fails a prediction.** Each answered request puts one row on a bounded queue; a
  writer thread drains it into the database in batches. A full queue or a database error drops rows and
  counts them (`mini_claude_prediction_log_rows_total{outcome="dropped"}`) instead of blocking the caller,
  as KServe's request logger sends to a sink outside the request path.
- The request id is the caller's (`X-Request-Id`, or a V2 request's `id`) when given, else a new UUID: it
  is returned to the caller and stored with the row, so a client can find its own prediction again.
- V2 errors use the protocol's `{"error": "..."}` shape; `/predict` errors use the server's OpenAI shape.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from pydantic import ValidationError

from mini_claude.db import crud, session_scope
from mini_claude.predict import ModelCache, ModelLoadError, ModelNotFoundError, SklearnModel
from mini_claude.server.errors import APIError, invalid
from mini_claude.server.protocol.predict import (
    MAX_INSTANCES,
    InferRequest,
    InferResponse,
    ModelIndex,
    ModelMetadata,
    ModelReady,
    PredictionList,
    PredictionRecord,
    PredictRequest,
    PredictResponse,
    Tensor,
    TensorMetadata,
)

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

BATCH_ROWS = 256  # rows per INSERT transaction of the log writer
_STOP = object()


def request_id(given: str | None) -> str:
    return given.strip()[:255] if given and given.strip() else str(uuid.uuid4())


def _is_text_model(model: SklearnModel) -> bool:
    """A pipeline that starts with a text vectorizer has no `n_features_in_`: it takes strings."""
    return getattr(model.estimator, "n_features_in_", None) is None


def _label_datatype(labels: Sequence[Any]) -> str:
    if all(isinstance(v, bool) for v in labels):
        return "BOOL"
    if all(isinstance(v, int) for v in labels):
        return "INT64"
    if all(isinstance(v, float) for v in labels):
        return "FP64"
    return "BYTES"


class PredictService:
    """The `predict` area: model cache, predictions, and the log writer."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.metrics = chat.metrics
        self.cache = ModelCache(chat.settings.models_dir)
        self._queue: queue.Queue[Any] = queue.Queue(chat.settings.prediction_log_queue)
        self._writer: threading.Thread | None = None

    # --------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Load every model (a file that fails is logged and reported as not ready) and start the log writer."""
        for name, error in self.cache.load_all().items():
            if error:
                log.warning("model %s is not ready: %s", name, error)
        self.metrics.watch_model_cache(self.cache)
        self._writer = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._writer.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout_s)
            self._writer = None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued row is written (or dropped); for tests and shutdown. False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------------------------ the models
    def _model(self, name: str) -> SklearnModel:
        try:
            return self.cache.get(name)
        except ModelNotFoundError:
            raise APIError(404, f"No model named '{name}'.", param="model", code="model_not_found") from None
        except ModelLoadError as exc:
            raise APIError(503, str(exc), "server_error", code="model_not_ready") from None

    def index(self) -> ModelIndex:
        return ModelIndex(models=self.cache.names())

    def ready(self, name: str) -> ModelReady:
        try:
            ok, _ = self.cache.status(name)
        except ModelNotFoundError:
            raise APIError(404, f"No model named '{name}'.", code="model_not_found") from None
        return ModelReady(name=name, ready=ok)

    def metadata(self, name: str) -> ModelMetadata:
        model = self._model(name)
        if _is_text_model(model):
            inputs = [TensorMetadata(name="input-0", datatype="BYTES", shape=[-1])]
        else:
            inputs = [TensorMetadata(name="input-0", datatype="FP64", shape=[-1, int(model.estimator.n_features_in_)])]
        k = len(model.classes)
        outputs = [
            TensorMetadata(name="label", datatype=_label_datatype(model.classes), shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP64", shape=[-1, k]),
        ]
        about = {k: v for k, v in model.metadata.items() if isinstance(v, str | int | float | bool)}
        return ModelMetadata(name=name, versions=[model.version], platform="sklearn", inputs=inputs,
                             outputs=outputs, parameters={"classes": model.classes, **about})  # fmt: skip

    # ------------------------------------------------------------------------------------- predicting
    async def _run(self, name: str, instances: list[Any], rid: str, protocol: str) -> tuple[SklearnModel, Any]:
        start = time.perf_counter()
        try:
            model = await anyio.to_thread.run_sync(self._model, name)
            try:
                out = await anyio.to_thread.run_sync(model.predict, instances)
            # Instances of the wrong shape or type for this model: scikit-learn says so with one of these (a text
            # pipeline given numbers fails on `.lower()`, a tabular one given text on the float conversion).
            except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
                raise invalid(f"The model '{name}' cannot take these instances: {exc}", "instances") from None
        except APIError:
            self.metrics.observe_prediction(name, protocol, "error", 0, time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        self.metrics.observe_prediction(name, protocol, "ok", len(instances), seconds)
        self._log({
            "request_id": rid, "protocol": protocol, "model": name, "model_version": model.version,
            "inputs": instances, "outputs": {"predictions": out.labels, "probabilities": out.probabilities},
            "latency_ms": seconds * 1000, "created_at": datetime.now(UTC),
        })  # fmt: skip
        return model, out

    async def predict(self, req: PredictRequest, given_id: str | None = None) -> PredictResponse:
        rid = request_id(given_id)
        model, out = await self._run(req.model, req.instances, rid, "v1")
        return PredictResponse(predictions=out.labels, probabilities=out.probabilities, model=req.model,
                               model_version=model.version, request_id=rid)  # fmt: skip

    async def infer(self, name: str, payload: Any, given_id: str | None = None) -> InferResponse:
        """A V2 inference request (validated here, so its errors take the V2 shape)."""
        try:
            req = InferRequest.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise invalid(f"{where}: {first['msg']}" if where else first["msg"]) from None
        rid = request_id(req.id or given_id)
        instances = _instances(req.inputs[0])
        model, out = await self._run(name, instances, rid, "v2")
        n, classes = len(instances), model.classes
        probs = [row[str(c)] for row in out.probabilities for c in classes]
        label = Tensor(name="label", shape=[n], datatype=_label_datatype(out.labels), data=out.labels)  # type: ignore[arg-type]
        proba = Tensor(name="probabilities", shape=[n, len(classes)], datatype="FP64", data=probs,
                       parameters={"classes": classes})  # fmt: skip
        outputs = [label, proba]
        if req.outputs is not None:
            wanted = [o.name for o in req.outputs]
            unknown = sorted(set(wanted) - {t.name for t in outputs})
            if unknown:
                raise invalid(f"Unknown outputs {unknown}; this model has 'label' and 'probabilities'.")
            outputs = [t for t in outputs if t.name in wanted]
        return InferResponse(model_name=name, model_version=model.version, id=rid, outputs=outputs)

    # ---------------------------------------------------------------------------------------- the log
    def _log(self, row: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.metrics.observe_prediction_log("dropped")

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = [item]
            while len(batch) < BATCH_ROWS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(row is _STOP for row in batch)
            rows = [row for row in batch if row is not _STOP]
            try:
                if rows:
                    self._write(rows)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        db = self.chat.db
        try:
            if db is None:
                raise RuntimeError("no database")
            with session_scope(db) as session:
                crud.add_predictions(session, rows)
        except Exception as exc:  # the log must never take the writer down
            log.warning("dropped %d logged predictions: %s", len(rows), str(exc).splitlines()[0])
            self.metrics.observe_prediction_log("dropped", len(rows))
        else:
            self.metrics.observe_prediction_log("written", len(rows))

    async def list_logged(self, model: str | None, rid: str | None, limit: int, offset: int) -> PredictionList:
        _, _, db = self.chat.ready()

        def page() -> tuple[list[PredictionRecord], bool]:
            with session_scope(db) as session:
                rows = crud.list_predictions(session, model=model, request_id=rid, limit=limit + 1, offset=offset)
                return [_record(r) for r in rows[:limit]], len(rows) > limit

        data, more = await self.chat.db_call(page)
        return PredictionList(data=data, has_more=more)


def _record(row: Any) -> PredictionRecord:
    return PredictionRecord(
        id=row.id, request_id=row.request_id, protocol=row.protocol, model=row.model,
        model_version=row.model_version, inputs=row.inputs, outputs=row.outputs, latency_ms=row.latency_ms,
        created_at=row.created_at.timestamp(),
    )  # fmt: skip


def _instances(tensor: Tensor) -> list[Any]:
    """A V2 input tensor as the list of instances a model takes: strings for BYTES, rows of numbers otherwise."""
    flat = np.asarray(tensor.data, dtype=object).reshape(-1).tolist()
    size = math.prod(tensor.shape) if tensor.shape else 0
    if not tensor.shape or size != len(flat):
        raise invalid(f"inputs[0]: shape {tensor.shape} holds {size} values, but data has {len(flat)}.")
    if size == 0 or not 1 <= tensor.shape[0] <= MAX_INSTANCES:
        raise invalid(f"inputs[0]: the first dimension (the instances) must be 1 to {MAX_INSTANCES}.")
    if tensor.datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise invalid("inputs[0]: BYTES data must be strings.")
        return flat
    try:
        values = np.asarray(flat, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(f"inputs[0]: {tensor.datatype} data must be numbers.") from None
    rows = values.reshape(tensor.shape[0], -1) if len(tensor.shape) > 1 else values.reshape(-1, 1)
    return rows.tolist()
