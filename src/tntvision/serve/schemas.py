"""Request and response models of `tnt serve`, as its OpenAPI schema (``/openapi.json``, ``/docs``) shows
them.

The handlers build their answers as plain dicts (no validation on the hot path); these models document
them, and the tests check the answers against the schema (schemathesis). The ``/v2`` models follow the
Open Inference Protocol (KServe v2) REST API.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "BatchAnswer",
    "ErrorAnswer",
    "ExplainAnswer",
    "Health",
    "InferenceRequest",
    "InferenceResponse",
    "Liveness",
    "Metadata",
    "ModelMetadata",
    "PredictAnswer",
    "Readiness",
    "ServerMetadata",
]


class ErrorAnswer(BaseModel):
    """Every refusal: one sentence, no traceback."""

    error: str


class TopClass(BaseModel):
    label: str
    index: int
    prob: float


class PredictAnswer(BaseModel):
    model: str
    top: list[TopClass] = Field(description="the most probable classes, most probable first")
    latency_ms: float = Field(description="the server's time from the request's arrival to the answer")


class FilePrediction(BaseModel):
    filename: str
    top: list[TopClass]


class BatchAnswer(BaseModel):
    model: str
    predictions: list[FilePrediction] = Field(description="one per file, in the order sent")
    latency_ms: float


class ExplainAnswer(BaseModel):
    model: str
    top: list[TopClass]
    block: int = Field(description="the block whose attention is shown (1-based: the last)")
    grid: list[int] = Field(description="[rows, cols] of patches")
    attention: list[list[float]] = Field(description="the class token's attention over the patches")
    overlay: str = Field(description="a PNG data URL: the model's input with the map laid over it")
    latency_ms: float


class Health(BaseModel):
    status: str = Field(description="ok, warming up, draining, or failed")
    model: str | None = None
    error: str | None = None


class Liveness(BaseModel):
    live: bool
    error: str | None = None


class Readiness(BaseModel):
    ready: bool
    status: str = Field(description="ok, warming up, draining, or failed")


class Preprocessing(BaseModel):
    interpolation: str
    crop_pct: float
    mean: list[float]
    std: list[float]


class Metadata(BaseModel):
    model: str
    name: str = Field(description="the model's name in the /v2 endpoints")
    runtime: str
    dtype: str
    classes: list[str]
    num_classes: int
    input_size: list[int]
    preprocessing: Preprocessing
    max_batch: int
    max_wait_ms: float
    max_queue: int
    timeout_s: float | None
    max_pixels: int
    explain: bool


# ------------------------------------------------------------------------ Open Inference Protocol


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    """One input tensor: FP32 ``[batch, C, H, W]`` (preprocessed pixels) or BYTES ``[batch]`` (image files:
    base64 strings in JSON, raw with the binary tensor data extension)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]
