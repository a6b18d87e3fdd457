"""The Open Inference Protocol (KServe v2) REST endpoints of `tnt serve`, so that KServe, Triton's clients
(``tritonclient.http``) and other standard clients work unchanged.

- ``GET /v2``: server metadata (extensions ``binary_tensor_data`` and ``classification``);
- ``GET /v2/health/live``: 200 while the process and its inference thread run (warm-up included), else 503;
- ``GET /v2/health/ready``: 200 once warmed up, 503 while warming up, after a failure, or once told to stop;
- ``GET /v2/models/{name}[/versions/1]`` (metadata) and ``.../ready``;
- ``POST /v2/models/{name}[/versions/1]/infer``: one input, either ``FP32 [batch, C, H, W]`` (preprocessed
  pixels, as ``/metadata`` describes the preprocessing) or ``BYTES [batch]`` (image files, decoded and
  preprocessed by the server as for ``/predict``). In JSON a BYTES element is the file in base64; with the
  binary tensor data extension (``Inference-Header-Content-Length``) it is raw (4-byte little-endian length,
  then the bytes). Outputs ``logits`` and ``probabilities`` (``FP32 [batch, classes]``), each in JSON or
  binary (``binary_data``, or ``binary_data_output`` for all), and ``probabilities`` as the classification
  extension (``classification: K``: ``BYTES [batch, K]``, ``"prob:index:label"``, most probable first).

Each image of a request is one place in the engine's queue and joins the batches of every other request.
Errors are ``{"error": "..."}``: 400 for a bad request, 404 for an unknown model or version, and the
same 413 / 503 / 504 as the rest of the server.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from . import schemas
from .body import ServeError, unless_gone
from .engine import Engine

__all__ = ["VERSION", "add_routes"]

VERSION = "1"  # the one version a server has
MAX_IMAGES = 64  # images (rows) in one request, at most
OUTPUTS = ("logits", "probabilities")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorAnswer, "description": what}
    for code, what in {
        400: "not an inference request this model takes",
        404: "no such model or version",
        413: "the body, an image, or the batch is too large",
        415: "a compressed body (Content-Encoding)",
        503: "the queue is full (Retry-After), the model is not ready, or the server is stopping",
        504: "the deadline passed before the answer was computed",
    }.items()
}


def _inline(schema: dict) -> dict:
    """``schema`` with its ``$defs`` substituted for their references (OpenAPI has no local ``$defs``)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# a 1x1 grey PNG: an example request that reaches the model (clients, /docs and fuzzers start from it)
_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJRU5ErkJggg=="
_EXAMPLE = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_PIXEL_PNG]}]}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _inline(schemas.InferenceRequest.model_json_schema()),
                "example": _EXAMPLE,
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: the JSON request, then the raw tensors",
            },
        },
    }
}


def add_routes(
    app: FastAPI,
    engine: Engine,
    name: str,
    preprocess: Callable[[bytes], Awaitable[torch.Tensor]],
    readiness: Callable[[FastAPI, Engine], tuple[bool, str]],
) -> None:
    """Add the /v2 routes for ``engine`` under the model name ``name``.

    ``preprocess`` turns image bytes into the model's input (raising ``ServeError`` for bad images);
    ``readiness`` is the app's readiness, (ready, status).
    """

    def model_ready(model_name: str, model_version: str | None) -> JSONResponse:
        _check(name, model_name, model_version)
        ready, status = readiness(app, engine)
        return JSONResponse({"ready": ready, "status": status}, status_code=200 if ready else 503)

    def model_metadata(model_name: str, model_version: str | None) -> JSONResponse:
        _check(name, model_name, model_version)
        return JSONResponse(_model_metadata(engine, name))

    async def infer(request: Request, model_name: str, model_version: str | None) -> Response:
        started = time.monotonic()
        _check(name, model_name, model_version)
        return await _infer(request, engine, name, preprocess, started)

    # the schema lists the one name and version (so that clients and fuzzers find them); any other
    # value is answered 404, as the protocol asks
    name_param = Path(description="the model's name", json_schema_extra={"enum": [name]})
    version_param = Path(description="the model's version", json_schema_extra={"enum": [VERSION]})
    ready_doc = {503: {"model": schemas.Readiness, "description": "not ready"}}
    meta_doc = {404: _ERRORS[404]}
    infer_doc = {200: {"content": {"application/octet-stream": {}}}, **_ERRORS}

    @app.get("/v2", response_model=schemas.ServerMetadata, summary="server metadata")
    async def server_metadata() -> JSONResponse:
        from .. import __version__

        extensions = ["binary_tensor_data", "classification"]
        return JSONResponse({"name": "tntvision", "version": __version__, "extensions": extensions})

    @app.get(
        "/v2/health/live",
        response_model=schemas.Liveness,
        responses={503: {"model": schemas.Liveness, "description": "the inference thread has failed"}},
        summary="liveness: 200 while the process and its inference thread run, warm-up included",
    )
    async def live() -> JSONResponse:
        if engine.alive:
            return JSONResponse({"live": True})
        return JSONResponse({"live": False, "error": str(engine.failure)}, status_code=503)

    @app.get(
        "/v2/health/ready",
        response_model=schemas.Readiness,
        responses=ready_doc,
        summary="readiness: 200 once warmed up; 503 while warming up, failed, or draining",
    )
    async def ready() -> JSONResponse:
        ok, status = readiness(app, engine)
        return JSONResponse({"ready": ok, "status": status}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model_name}", response_model=schemas.ModelMetadata, responses=meta_doc)
    async def metadata(model_name: str = name_param) -> JSONResponse:
        return model_metadata(model_name, None)

    @app.get(
        "/v2/models/{model_name}/versions/{model_version}",
        response_model=schemas.ModelMetadata,
        responses=meta_doc,
    )
    async def metadata_versioned(
        model_name: str = name_param, model_version: str = version_param
    ) -> JSONResponse:
        return model_metadata(model_name, model_version)

    @app.get(
        "/v2/models/{model_name}/ready", response_model=schemas.Readiness, responses={**ready_doc, **meta_doc}
    )
    async def ready_model(model_name: str = name_param) -> JSONResponse:
        return model_ready(model_name, None)

    @app.get(
        "/v2/models/{model_name}/versions/{model_version}/ready",
        response_model=schemas.Readiness,
        responses={**ready_doc, **meta_doc},
    )
    async def ready_versioned(
        model_name: str = name_param, model_version: str = version_param
    ) -> JSONResponse:
        return model_ready(model_name, model_version)

    @app.post(
        "/v2/models/{model_name}/infer",
        response_model=schemas.InferenceResponse,
        responses=infer_doc,
        openapi_extra=_INFER_BODY,
        summary="inference: an FP32 tensor or BYTES image files in; logits and probabilities out",
    )
    async def infer_model(request: Request, model_name: str = name_param) -> Response:
        return await infer(request, model_name, None)

    @app.post(
        "/v2/models/{model_name}/versions/{model_version}/infer",
        response_model=schemas.InferenceResponse,
        responses=infer_doc,
        openapi_extra=_INFER_BODY,
    )
    async def infer_versioned(
        request: Request, model_name: str = name_param, model_version: str = version_param
    ) -> Response:
        return await infer(request, model_name, model_version)


def _check(name: str, model_name: str, model_version: str | None) -> None:
    if model_name != name:
        raise ServeError(404, f"unknown model {model_name!r}: this server serves {name!r}")
    if model_version is not None and model_version != VERSION:
        raise ServeError(404, f"unknown version {model_version!r} of {name!r}: its version is {VERSION!r}")


def _model_metadata(engine: Engine, name: str) -> dict:
    classes = len(engine.labels)
    return {
        "name": name,
        "versions": [VERSION],
        "platform": f"tntvision_{engine.runtime}",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, *engine.meta.input_size]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, classes]} for out in OUTPUTS],
    }


# ------------------------------------------------------------------------------------------ decoding


def _split(request: Request, body: bytes) -> tuple[schemas.InferenceRequest, bytes]:
    """The JSON request and the binary data after it (binary tensor data extension)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ServeError(415, f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed")
    declared = request.headers.get("inference-header-content-length")
    size = len(body)
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) > len(body):
            raise ServeError(400, f"Inference-Header-Content-Length {declared!r} does not fit the body")
        size = int(declared)
    try:
        return schemas.InferenceRequest.model_validate_json(body[:size]), body[size:]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise ServeError(400, f"not an inference request: {where}: {first.get('msg')}") from None


def _parameter(parameters: dict[str, Any] | None, key: str, kind: type, default: Any) -> Any:
    """``parameters[key]`` if it is of ``kind`` (bool is not an int here), else 400; ``default`` if absent."""
    value = (parameters or {}).get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ServeError(400, f"parameter {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _raw(tensor: schemas.RequestInput, binary: bytes) -> bytes | None:
    size = _parameter(tensor.parameters, "binary_data_size", int, None)
    if size is None:
        if binary:
            raise ServeError(400, "binary data follows the JSON but the input has no binary_data_size")
        return None
    if size != len(binary):
        raise ServeError(400, f"binary_data_size is {size}, but {len(binary)} bytes follow the JSON")
    return binary


def _rows(tensor: schemas.RequestInput, shape: list[int], raw: bytes | None, limit: int) -> int:
    """The batch size of ``tensor`` (its first dimension), checked against ``shape`` (the rest)."""
    if len(tensor.shape) != 1 + len(shape) or list(tensor.shape[1:]) != shape or tensor.shape[0] < 1:
        want = "x".join(map(str, ["batch", *shape]))
        raise ServeError(400, f"input {tensor.name!r} must have shape {want}, got {tensor.shape}")
    if tensor.shape[0] > limit:
        raise ServeError(413, f"{tensor.shape[0]} images in one request: at most {limit}")
    if raw is None and tensor.data is None:
        raise ServeError(400, f"input {tensor.name!r} has neither data nor binary_data_size")
    return tensor.shape[0]


def _pixels(
    tensor: schemas.RequestInput, raw: bytes | None, input_size: list[int], limit: int
) -> list[torch.Tensor]:
    """An FP32 input -> one (C, H, W) tensor per row."""
    rows = _rows(tensor, input_size, raw, limit)
    count = rows * int(np.prod(input_size))
    try:
        if raw is not None:
            if len(raw) != 4 * count:
                raise ValueError(f"{len(raw)} bytes for {count} FP32 values")
            array = np.frombuffer(raw, dtype="<f4")
        else:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
            if array.size != count:
                raise ValueError(f"{array.size} values for shape {tensor.shape}")
    except (ValueError, TypeError, OverflowError) as e:
        raise ServeError(400, f"input {tensor.name!r}: not {count} FP32 values ({e})") from None
    if not np.isfinite(array).all():
        raise ServeError(400, f"input {tensor.name!r} holds NaN or infinite values")
    batch = torch.from_numpy(array.astype(np.float32, copy=True)).reshape(rows, *input_size)
    return list(batch)


def _files(tensor: schemas.RequestInput, raw: bytes | None, limit: int) -> list[bytes]:
    """A BYTES input -> the bytes of each element (base64 in JSON, length-prefixed in binary)."""
    rows = _rows(tensor, [], raw, limit) if len(tensor.shape) == 1 else _rows(tensor, [1], raw, limit)
    if raw is not None:
        files, at = [], 0
        while at < len(raw) and len(files) <= rows:  # past ``rows`` elements the count is wrong anyway
            if at + 4 > len(raw):
                raise ServeError(400, f"input {tensor.name!r}: truncated BYTES element")
            (size,) = struct.unpack_from("<I", raw, at)
            files.append(raw[at + 4 : at + 4 + size])
            at += 4 + size
        if at > len(raw):
            raise ServeError(400, f"input {tensor.name!r}: truncated BYTES element")
    else:
        data = tensor.data or []
        flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
        if not all(isinstance(x, str) for x in flat):
            raise ServeError(400, f"input {tensor.name!r}: BYTES elements in JSON must be base64 strings")
        try:
            files = [base64.b64decode(x, validate=True) for x in flat]
        except (binascii.Error, ValueError):
            raise ServeError(400, f"input {tensor.name!r}: a BYTES element is not base64") from None
    if len(files) != rows:
        raise ServeError(400, f"input {tensor.name!r}: {len(files)} elements for shape {tensor.shape}")
    return files


# ------------------------------------------------------------------------------------------ inference


def _deadline(engine: Engine, request: schemas.InferenceRequest, started: float) -> float | None:
    """The server's deadline, or the request's own ``timeout`` parameter (microseconds) if sooner."""
    timeout = engine.config.timeout_s
    asked = _parameter(request.parameters, "timeout", int, None)
    if asked is not None and asked > 0:
        timeout = asked / 1e6 if timeout is None else min(timeout, asked / 1e6)
    return None if timeout is None else started + timeout


async def _infer(
    request: Request,
    engine: Engine,
    name: str,
    preprocess: Callable[[bytes], Awaitable[torch.Tensor]],
    started: float,
) -> Response:
    infer_request, binary = _split(request, await request.body())
    if len(infer_request.inputs) != 1:
        got = len(infer_request.inputs)
        raise ServeError(400, f"send one input (FP32 pixels or BYTES image files), got {got}")
    (tensor,) = infer_request.inputs
    raw = _raw(tensor, binary)
    outputs = _requested(infer_request, len(engine.labels))
    limit = min(MAX_IMAGES, engine.config.max_queue)
    if tensor.datatype == "FP32":
        images = _pixels(tensor, raw, list(engine.meta.input_size), limit)
    elif tensor.datatype == "BYTES":
        images = []
        for i, data in enumerate(_files(tensor, raw, limit)):
            try:
                images.append(await preprocess(data))
            except ServeError as e:
                raise ServeError(e.status, f"input {tensor.name!r}[{i}]: {e.message}") from None
    else:
        got = tensor.datatype
        raise ServeError(400, f"input {tensor.name!r}: datatype must be FP32 or BYTES, got {got!r}")
    deadline = _deadline(engine, infer_request, started)
    logits = torch.stack(await unless_gone(request, engine.infer_many(images, deadline=deadline)))
    if not torch.isfinite(logits).all():
        raise ServeError(400, "the input gives non-finite logits (values far outside the preprocessed range)")
    answer: dict[str, Any] = {"model_name": name, "model_version": VERSION}
    if infer_request.id is not None:
        answer["id"] = infer_request.id
    return _encode(answer, [_output(out, logits, engine.labels) for out in outputs])


def _requested(request: schemas.InferenceRequest, classes: int) -> list[tuple[str, bool, int]]:
    """(name, binary, classification count) of each output asked for (default: all, in JSON unless
    ``binary_data_output``)."""
    all_binary = _parameter(request.parameters, "binary_data_output", bool, False)
    if request.outputs is None:
        return [(out, all_binary, 0) for out in OUTPUTS]
    asked = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise ServeError(400, f"unknown output {out.name!r}: the outputs are {', '.join(OUTPUTS)}")
        binary = _parameter(out.parameters, "binary_data", bool, all_binary)
        k = _parameter(out.parameters, "classification", int, 0)
        if k < 0:
            raise ServeError(400, f"classification must not be negative, got {k}")
        asked.append((out.name, binary, min(k, classes)))
    return asked


def _output(
    asked: tuple[str, bool, int], logits: torch.Tensor, labels: list[str]
) -> tuple[dict, bytes | None]:
    """One output tensor: its JSON description and, if binary, its bytes."""
    name, binary, k = asked
    values = logits.float() if name == "logits" else logits.float().softmax(dim=-1)  # (b, classes)
    if k:
        top_v, top_i = values.topk(k, dim=-1)
        text = [
            [f"{v:f}:{i}:{labels[i]}" for v, i in zip(vs, idx, strict=True)]
            for vs, idx in zip(top_v.tolist(), top_i.tolist(), strict=True)
        ]
        tensor = {"name": name, "datatype": "BYTES", "shape": [len(text), k]}
        flat = [s for row in text for s in row]
        if binary:
            raw = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in flat))
            return {**tensor, "parameters": {"binary_data_size": len(raw)}}, raw
        return {**tensor, "data": flat}, None
    tensor = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
    array = values.numpy().astype("<f4")
    if binary:
        raw = array.tobytes()
        return {**tensor, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**tensor, "data": array.reshape(-1).tolist()}, None


def _encode(answer: dict[str, Any], outputs: list[tuple[dict, bytes | None]]) -> Response:
    answer["outputs"] = [description for description, _ in outputs]
    binary = [raw for _, raw in outputs if raw is not None]
    if not binary:
        return JSONResponse(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        header + b"".join(binary),
        media_type="application/octet-stream",
        headers={"inference-header-content-length": str(len(header))},
    )
