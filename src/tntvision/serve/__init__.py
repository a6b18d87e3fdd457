"""`tnt serve`: a model as a batched HTTP service, the Open Inference Protocol, and a web page
(docs/serving.md).

:class:`Engine` (the model, its bounded queue and batching thread, explanations), :func:`create_app`
(the FastAPI app) and :func:`serve` (the command). Importing this package needs the ``serve`` extra
(FastAPI, uvicorn, prometheus_client, python-multipart).
"""

from .app import ServeError, create_app
from .engine import DeadlineExceeded, Engine, EngineConfig, Overloaded, Unavailable
from .server import ServeOptions, serve

__all__ = [
    "DeadlineExceeded",
    "Engine",
    "EngineConfig",
    "Overloaded",
    "ServeError",
    "ServeOptions",
    "Unavailable",
    "create_app",
    "serve",
]
