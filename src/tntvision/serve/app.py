"""The HTTP side of `tnt serve`: a FastAPI app around an :class:`~tntvision.serve.engine.Engine`.

Endpoints (docs/serving.md): ``POST /predict`` (one image: multipart field ``file`` or raw ``image/*``
bytes; ``?topk=K``), ``POST /predict/batch`` (several ``file`` fields), ``POST /explain`` (class-token
attention), ``GET /health`` (readiness, as before), ``GET /metadata``, ``GET /metrics`` (Prometheus),
``GET /`` (the page), the Open Inference Protocol under ``/v2`` (:mod:`tntvision.serve.v2`: liveness,
readiness, model metadata, inference), and the OpenAPI schema (``/openapi.json``, ``/docs``). Every
refusal is ``{"error": "<one sentence>"}``: 4xx for what the client sent, 503 (with ``Retry-After`` when
the queue is full) and 504 (deadline) for load; nothing a client sends names a file on the server's disk
or a checkpoint.

Decoding and preprocessing run in a bounded thread pool; inference runs on the engine's thread; the
event loop only moves bytes. A request whose client disconnects gives its place in the queue back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Annotated, Any

import anyio
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import DataError, ImageTooLargeError
from ..utils.messages import log_stderr
from . import schemas, v2
from .body import BodyLimit, ClientGone, ServeError, error_response, form_files, one_image, unless_gone
from .engine import DeadlineExceeded, Engine, Overloaded, Unavailable
from .metrics import MetricsMiddleware, ServeMetrics

__all__ = ["ServeError", "create_app", "set_draining"]

MAX_BATCH_FILES = 64  # files in one /predict/batch request
CLIENT_GONE = 499  # nginx's code for "client closed request": counted in the metrics, never sent

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorAnswer, "description": what}
    for code, what in {
        400: "not an image, truncated, empty, or an unreadable form",
        413: "the upload or the image is too large",
        415: "the content type is not accepted",
        422: "a bad query parameter, or a form without a 'file' field",
        503: "the queue is full (Retry-After says when to retry), the model is warming up, or shutting down",
        504: "the request's deadline (--timeout) passed before its answer was computed",
    }.items()
}

_BINARY = {"type": "string", "format": "binary"}


def _multipart_body(file_schema: dict, *, raw_image: bool) -> dict:
    """An OpenAPI request body: a multipart field ``file`` of ``file_schema``, and with ``raw_image`` the
    image's bytes as an ``image/*`` body too."""
    multipart = {"type": "object", "properties": {"file": file_schema}, "required": ["file"]}
    content = {"multipart/form-data": {"schema": multipart}}
    if raw_image:
        content["image/*"] = {"schema": _BINARY}
    return {"requestBody": {"required": True, "content": content}}


_IMAGE_BODY = _multipart_body(_BINARY, raw_image=True)
_BATCH_BODY = _multipart_body({"type": "array", "items": _BINARY}, raw_image=False)

TopK = Annotated[
    int | None,
    Query(ge=1, description="how many classes to list (default: the server's --topk; capped at the classes)"),
]


def create_app(
    engine: Engine,
    *,
    max_upload_mb: float = 10.0,
    topk: int = 5,
    name: str | None = None,
    preprocess_threads: int | None = None,
) -> FastAPI:
    """The app serving ``engine``. Its lifespan starts the engine (warm-up runs on the engine's thread:
    readiness answers 503 meanwhile, liveness 200) and stops it after the last request.

    Args:
        max_upload_mb: the largest request body.
        topk: the default ``?topk``.
        name: the model's name in the ``/v2`` endpoints (default: its registry name).
        preprocess_threads: images decoded at once, at most (default: the CPU count, at least 2): each
            holds up to ``max_pixels`` pixels while it is decoded and resized.
    """
    name = name or engine.model_name
    metrics = ServeMetrics(engine.config.max_batch, engine.queue_depth, endpoints(name))
    engine.on_batch = metrics.observe_batch
    app = FastAPI(
        title="tntvision",
        summary=f"tnt serve: {engine.model_name}, batched",
        version=_version(),
        lifespan=_lifespan(engine),
    )
    app.state.draining = False
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 2**20))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it also sees BodyLimit's 413s
    for kind, handler in _ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    limiter = anyio.CapacityLimiter(preprocess_threads or max(2, os.cpu_count() or 2))
    _add_info_routes(app, engine, metrics, name)
    _add_inference_routes(app, engine, topk, limiter)
    v2.add_routes(app, engine, name, lambda data: _preprocess(engine, data, limiter), readiness)
    return app


def endpoints(name: str) -> tuple[str, ...]:
    """The paths counted under their own name in the metrics (``name``: the model's /v2 name)."""
    model = f"/v2/models/{name}"
    versioned = f"{model}/versions/{v2.VERSION}"
    return (
        *("/", "/health", "/metadata", "/metrics", "/openapi.json", "/docs"),
        *("/predict", "/predict/batch", "/explain", "/v2", "/v2/health/live", "/v2/health/ready"),
        *(model, f"{model}/ready", f"{model}/infer", versioned, f"{versioned}/ready", f"{versioned}/infer"),
    )


def set_draining(app: FastAPI) -> None:
    """From now on readiness answers 503 (the server has been told to stop); requests are still served."""
    app.state.draining = True


def _version() -> str:
    from .. import __version__

    return __version__


def _lifespan(engine: Engine) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start ``engine`` when the app starts, stop it (in a worker thread) after the last request."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    return lifespan


# ---------------------------------------------------------------------------------- error responses


async def _refused(_request: Request, e: ServeError) -> JSONResponse:
    return error_response(e.status, e.message, e.headers)


async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
    parts = []
    for err in e.errors():
        where = " ".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')} (got {err.get('input')!r})")
    return error_response(422, "; ".join(parts) or "invalid request")


async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), e.headers)


async def _unavailable(_request: Request, e: Unavailable) -> JSONResponse:
    return error_response(503, str(e))


async def _overloaded(_request: Request, e: Overloaded) -> JSONResponse:
    return error_response(503, str(e), {"retry-after": str(e.retry_after_s)})


async def _late(_request: Request, e: DeadlineExceeded) -> JSONResponse:
    return error_response(504, str(e))


async def _gone(_request: Request, _e: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)


async def _bug(_request: Request, e: Exception) -> JSONResponse:
    log_stderr(f"tnt serve: internal error: {type(e).__name__}: {e}")
    return error_response(500, f"internal error ({type(e).__name__})")


_ERROR_HANDLERS: tuple[tuple[type[Exception], Callable[..., Awaitable[Response]]], ...] = (
    (ServeError, _refused),
    (RequestValidationError, _invalid),
    (HTTPException, _http_error),
    (Unavailable, _unavailable),
    (Overloaded, _overloaded),
    (DeadlineExceeded, _late),
    (ClientGone, _gone),
    (ClientDisconnect, _gone),
    (Exception, _bug),
)


# ------------------------------------------------------------------------------------------- health


def readiness(app: FastAPI, engine: Engine) -> tuple[bool, str]:
    """(ready, status): ready once warmed up, until the server is told to stop; status says why not."""
    if engine.failure is not None:
        return False, "failed"
    if app.state.draining:
        return False, "draining"
    if not engine.ready.is_set():
        return False, "warming up"
    return True, "ok"


def _add_info_routes(app: FastAPI, engine: Engine, metrics: ServeMetrics, name: str) -> None:
    """GET / (the page), /health, /metadata and /metrics."""
    page = resources.files("tntvision.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, summary="the page: drop an image, see its classes")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get(
        "/health",
        response_model=schemas.Health,
        responses={503: {"model": schemas.Health, "description": "warming up, draining, or failed"}},
        summary="readiness (as /v2/health/ready): 200 once warmed up, 503 before, while draining, or failed",
    )
    async def health() -> JSONResponse:
        ready, status = readiness(app, engine)
        if ready:
            return JSONResponse({"status": status, "model": engine.model_name})
        body = {"status": status} | ({"error": str(engine.failure)} if engine.failure is not None else {})
        return JSONResponse(body, status_code=503)

    @app.get("/metadata", response_model=schemas.Metadata, summary="the model, its preprocessing, the limits")
    async def metadata() -> JSONResponse:
        return JSONResponse(_metadata(engine, name))

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}},
        summary="Prometheus metrics",
    )
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _metadata(engine: Engine, name: str) -> dict:
    meta = engine.meta
    return {
        "model": engine.model_name,
        "name": name,
        "runtime": engine.runtime,
        "dtype": str(engine.config.dtype).removeprefix("torch."),
        "classes": engine.labels,
        "num_classes": len(engine.labels),
        "input_size": list(meta.input_size),
        "preprocessing": {
            "interpolation": meta.interpolation,
            "crop_pct": meta.crop_pct,
            "mean": list(meta.mean),
            "std": list(meta.std),
        },
        "max_batch": engine.config.max_batch,
        "max_wait_ms": engine.config.max_wait_ms,
        "max_queue": engine.config.max_queue,
        "timeout_s": engine.config.timeout_s,
        "max_pixels": engine.config.max_pixels,
        "explain": engine.can_explain,
    }


# --------------------------------------------------------------------------------------- inference


def _deadline(engine: Engine) -> float | None:
    """The deadline of a request arriving now (``time.monotonic()``), or None without --timeout."""
    timeout = engine.config.timeout_s
    return None if timeout is None else time.monotonic() + timeout


async def _preprocess(engine: Engine, data: bytes, limiter: anyio.CapacityLimiter) -> torch.Tensor:
    try:
        return await anyio.to_thread.run_sync(engine.preprocess, data, limiter=limiter)
    except ImageTooLargeError as e:
        raise ServeError(413, str(e)) from None
    except DataError as e:
        raise ServeError(400, str(e)) from None


def _add_inference_routes(
    app: FastAPI, engine: Engine, default_topk: int, limiter: anyio.CapacityLimiter
) -> None:
    """POST /predict, /predict/batch and /explain."""

    @app.post(
        "/predict",
        response_model=schemas.PredictAnswer,
        responses=ERROR_RESPONSES,
        openapi_extra=_IMAGE_BODY,
        summary="the top classes of one image (multipart field 'file', or raw image/* bytes)",
    )
    async def predict(request: Request, topk: TopK = None) -> JSONResponse:
        started, deadline = time.perf_counter(), _deadline(engine)
        image = await _preprocess(engine, await one_image(request), limiter)
        logits = await unless_gone(request, engine.infer(image, deadline=deadline))
        (prediction,) = engine.predictions(logits[None], topk or default_topk, ["upload"])
        top = prediction.to_dict()["top"]
        return JSONResponse({"model": engine.model_name, "top": top, "latency_ms": _since_ms(started)})

    @app.post(
        "/predict/batch",
        response_model=schemas.BatchAnswer,
        responses=ERROR_RESPONSES,
        openapi_extra=_BATCH_BODY,
        summary=f"the top classes of each multipart field 'file' (at most {MAX_BATCH_FILES})",
    )
    async def predict_batch(request: Request, topk: TopK = None) -> JSONResponse:
        started, deadline = time.perf_counter(), _deadline(engine)
        uploads = await form_files(request, max_files=MAX_BATCH_FILES)
        if len(uploads) > engine.config.max_queue:
            raise ServeError(413, f"{len(uploads)} files are more than the server's queue holds")
        names = [u.filename or f"file {i}" for i, u in enumerate(uploads)]
        images = [await _upload(engine, n, u, limiter) for n, u in zip(names, uploads, strict=True)]
        rows = await unless_gone(request, engine.infer_many(images, deadline=deadline))
        predictions = engine.predictions(torch.stack(rows), topk or default_topk, names)
        return JSONResponse(
            {
                "model": engine.model_name,
                "predictions": [{"filename": p.path, "top": p.to_dict()["top"]} for p in predictions],
                "latency_ms": _since_ms(started),
            }
        )

    @app.post(
        "/explain",
        response_model=schemas.ExplainAnswer,
        responses={**ERROR_RESPONSES, 501: {"model": schemas.ErrorAnswer, "description": "no class token"}},
        openapi_extra=_IMAGE_BODY,
        summary="the top classes and the class token's attention over the patches (PyTorch TNT models)",
    )
    async def explain(request: Request, topk: TopK = None) -> JSONResponse:
        started, deadline = time.perf_counter(), _deadline(engine)
        if not engine.can_explain:
            what = f"{engine.model_name} ({engine.runtime})"
            raise ServeError(501, f"{what} has no class-token attention to draw")
        image = await _preprocess(engine, await one_image(request), limiter)
        result = await unless_gone(request, engine.explain(image, topk or default_topk, deadline=deadline))
        return JSONResponse({"model": engine.model_name, **result, "latency_ms": _since_ms(started)})


def _since_ms(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


async def _upload(
    engine: Engine, name: str, upload: UploadFile, limiter: anyio.CapacityLimiter
) -> torch.Tensor:
    """One file of a batch, preprocessed; a refusal names the file."""
    try:
        return await _preprocess(engine, await upload.read(), limiter)
    except ServeError as e:
        raise ServeError(e.status, f"{name}: {e.message}") from None
