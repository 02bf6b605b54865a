"""Wire format of the prediction API: `/predict` (KServe V1 / TF-Serving shape), the Open Inference Protocol
(KServe V2) and the prediction log.

- `/predict` takes `{"model"?, "instances": [...]}` and answers `{"predictions": [...], "probabilities": [...]}`:
  the shape MLflow's scoring server and KServe V1 accept, so their clients work unchanged.
- V2 tensors are `{"name", "shape", "datatype", "data"}`; `data` may be nested or flat (row-major), as the
  protocol allows. Texts travel as `BYTES` tensors of strings.
  Spec: https://github.com/kserve/open-inference-protocol (REST).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mini_claude.server.protocol.common import _Request

MAX_INSTANCES = 1000  # per request: a bound on the work (and the log row) one call can ask for
DEFAULT_MODEL = "safety_classifier"  # the bundled model, answering when a request names none


class PredictRequest(_Request):
    model: str = DEFAULT_MODEL
    instances: list[Any] = Field(min_length=1, max_length=MAX_INSTANCES)


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[dict[str, float]]  # per instance: every class's probability
    model: str
    model_version: str
    request_id: str


# ------------------------------------------------------------------------------------ Open Inference Protocol
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                   "FP32", "FP64", "BYTES"]  # fmt: skip


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(_Request):
    name: str


class InferRequest(_Request):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[Tensor] = Field(min_length=1, max_length=1)  # one input tensor: the instances
    outputs: list[RequestedOutput] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] | None = None
    outputs: list[Tensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]  # -1: any size


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}  # the classes, and what the file's metadata says about the model


class ModelReady(BaseModel):
    name: str
    ready: bool


class ModelIndex(BaseModel):
    models: list[str]


class V2Error(BaseModel):
    error: str


# ----------------------------------------------------------------------------------------- the prediction log
class PredictionRecord(BaseModel):
    id: str
    object: Literal["prediction"] = "prediction"
    request_id: str
    protocol: str
    model: str
    model_version: str
    inputs: list[Any]
    outputs: dict[str, Any]
    latency_ms: float
    created_at: float  # Unix time with sub-second precision: requests a few ms apart keep their order


class PredictionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PredictionRecord]
    has_more: bool
