"""The HTTP side of `tnt serve`: a FastAPI app around an :class:`~tntvision.serve.engine.Engine`.

Endpoints (docs/serving.md): ``POST /predict`` (one image: multipart field ``file`` or raw ``image/*``
bytes; ``?topk=K``), ``POST /predict/batch`` (several ``file`` fields), ``POST /explain`` (class-token
attention), ``GET /health`` (503 until the model has warmed up), ``GET /metadata``, ``GET /metrics``
(Prometheus) and ``GET /`` (the page). Every refusal is a 4xx with ``{"error": "<one sentence>"}``;
nothing a client sends names a file on the server's disk or a checkpoint.

Decoding and preprocessing run in the app's thread pool; inference runs on the engine's thread; the
event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import DataError, ImageTooLargeError
from ..utils.messages import log_stderr
from .engine import Engine, Unavailable
from .metrics import MetricsMiddleware, ServeMetrics

__all__ = ["ServeError", "create_app"]

ENDPOINTS = ("/", "/health", "/metadata", "/metrics", "/predict", "/predict/batch", "/explain")
MAX_BATCH_FILES = 64  # files in one /predict/batch request


class ServeError(Exception):
    """A request refused with ``status`` and a one-sentence ``message`` (the JSON ``error``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, before or while they arrive.

    A declared ``Content-Length`` over the limit is answered at once, unread; a body without one
    (chunked) is counted as it streams and cut off at the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the upload is larger than the server's limit of {self.max_bytes / 2**20:g} MB"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, self._message())(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ServeError(413, self._message())
            return message

        await self.app(scope, counted, send)


def _topk(request: Request, default: int) -> int:
    raw = request.query_params.get("topk")
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ServeError(422, f"topk must be a positive integer, got {raw!r}")
    return int(raw)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _form_files(request: Request, max_files: int) -> list[UploadFile]:
    """The ``file`` fields of a multipart form (415 for another content type, 422 for none)."""
    if _media_type(request) != "multipart/form-data":
        raise ServeError(415, "send the images as multipart/form-data fields named 'file'")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
    except HTTPException as e:  # Starlette's refusal of a malformed or oversized form
        raise ServeError(400, f"unreadable form ({e.detail})") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise ServeError(422, "the form has no file field named 'file'")
    return files


async def _one_image(request: Request) -> bytes:
    """The bytes of the one image of a /predict or /explain request."""
    media = _media_type(request)
    if media.startswith("image/"):
        return await request.body()
    if media == "multipart/form-data":
        (upload, *rest) = await _form_files(request, max_files=1)
        return await upload.read()
    shown = media or "none"
    raise ServeError(
        415, f"content type {shown!r} is not accepted: send image/* bytes or a multipart field 'file'"
    )


async def _preprocess(engine: Engine, data: bytes) -> torch.Tensor:
    try:
        return await run_in_threadpool(engine.preprocess, data)
    except ImageTooLargeError as e:
        raise ServeError(413, str(e)) from None
    except DataError as e:
        raise ServeError(400, str(e)) from None


def _metadata(engine: Engine) -> dict:
    meta = engine.meta
    return {
        "model": engine.model_name,
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
        "max_pixels": engine.config.max_pixels,
        "explain": engine.can_explain,
    }


def create_app(engine: Engine, *, max_upload_mb: float = 10.0, topk: int = 5) -> FastAPI:
    """The app serving ``engine``. Its lifespan starts the engine (warm-up runs on the engine's thread,
    so /health answers 503 meanwhile) and stops it after the last request. ``topk`` is the default
    ``?topk``."""
    metrics = ServeMetrics(engine.config.max_batch, engine.queue_depth, ENDPOINTS)
    engine.on_batch = metrics.observe_batch
    app = FastAPI(
        title="tntvision", lifespan=_lifespan(engine), docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 2**20))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it also sees BodyLimit's 413s
    for kind, handler in _ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    _add_info_routes(app, engine, metrics)
    _add_inference_routes(app, engine, topk)
    return app


def _lifespan(engine: Engine) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start ``engine`` when the app starts, stop it (in a worker thread) after the last request."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    return lifespan


# ---------------------------------------------------------------------------------- error responses


async def _refused(_request: Request, e: ServeError) -> JSONResponse:
    return _error(e.status, e.message)


async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


async def _unavailable(_request: Request, e: Unavailable) -> JSONResponse:
    return _error(503, str(e))


async def _bug(_request: Request, e: Exception) -> JSONResponse:
    log_stderr(f"tnt serve: internal error: {type(e).__name__}: {e}")
    return _error(500, f"internal error ({type(e).__name__})")


_ERROR_HANDLERS: tuple[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]], ...] = (
    (ServeError, _refused),
    (HTTPException, _http_error),
    (Unavailable, _unavailable),
    (Exception, _bug),
)


# ------------------------------------------------------------------------------------------- routes


def _add_info_routes(app: FastAPI, engine: Engine, metrics: ServeMetrics) -> None:
    """GET / (the page), /health, /metadata and /metrics."""
    page = resources.files("tntvision.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        return _health(engine)

    @app.get("/metadata")
    async def metadata() -> dict:
        return _metadata(engine)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _health(engine: Engine) -> JSONResponse:
    """200 once the model has warmed up; 503 while it warms up or after its warm-up failed."""
    if engine.ready.is_set():
        return JSONResponse({"status": "ok", "model": engine.model_name})
    if engine.failure is not None:
        return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
    return JSONResponse({"status": "warming up"}, status_code=503)


def _add_inference_routes(app: FastAPI, engine: Engine, topk: int) -> None:
    """POST /predict, /predict/batch and /explain; ``topk`` is the default ``?topk``."""

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        return await _predict(engine, request, topk)

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> dict:
        return await _predict_batch(engine, request, topk)

    @app.post("/explain")
    async def explain(request: Request) -> dict:
        return await _explain(engine, request, topk)


def _since_ms(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


async def _predict(engine: Engine, request: Request, default_topk: int) -> dict:
    """The top-k classes of the request's one image."""
    started = time.perf_counter()
    k = _topk(request, default_topk)
    image = await _preprocess(engine, await _one_image(request))
    logits = await engine.infer(image)
    (prediction,) = engine.predictions(logits[None], k, ["upload"])
    return {"model": engine.model_name, "top": prediction.to_dict()["top"], "latency_ms": _since_ms(started)}


async def _predict_batch(engine: Engine, request: Request, default_topk: int) -> dict:
    """The top-k classes of every ``file`` field of the request's form, named by their file names."""
    started = time.perf_counter()
    k = _topk(request, default_topk)
    uploads = await _form_files(request, max_files=MAX_BATCH_FILES)
    names = [u.filename or f"file {i}" for i, u in enumerate(uploads)]
    images = [
        await _preprocess_upload(engine, name, upload) for name, upload in zip(names, uploads, strict=True)
    ]
    rows = await asyncio.gather(*(engine.infer(x) for x in images))  # all in the coming batches
    predictions = engine.predictions(torch.stack(rows), k, names)
    return {
        "model": engine.model_name,
        "predictions": [{"filename": p.path, "top": p.to_dict()["top"]} for p in predictions],
        "latency_ms": _since_ms(started),
    }


async def _preprocess_upload(engine: Engine, name: str, upload: UploadFile) -> torch.Tensor:
    """One file of a batch, preprocessed; a refusal names the file."""
    try:
        return await _preprocess(engine, await upload.read())
    except ServeError as e:
        raise ServeError(e.status, f"{name}: {e.message}") from None


async def _explain(engine: Engine, request: Request, default_topk: int) -> dict:
    """The top-k classes of the request's one image and the class token's attention over it."""
    started = time.perf_counter()
    k = _topk(request, default_topk)
    if not engine.can_explain:
        raise ServeError(501, f"{engine.model_name} ({engine.runtime}) has no class-token attention to draw")
    if not engine.ready.is_set():
        raise Unavailable("the model is warming up")
    image = await _preprocess(engine, await _one_image(request))
    result = await run_in_threadpool(engine.explain, image, k)
    return {"model": engine.model_name, **result, "latency_ms": _since_ms(started)}
