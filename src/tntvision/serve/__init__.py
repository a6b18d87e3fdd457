"""`tnt serve`: a model as a batched HTTP service and a web page (docs/serving.md).

:class:`Engine` (the model, its batching thread, explanations), :func:`create_app` (the FastAPI app) and
:func:`serve` (the command). Importing this package needs the ``serve`` extra (FastAPI, uvicorn,
prometheus_client, python-multipart).
"""

from .app import ServeError, create_app
from .engine import Engine, EngineConfig
from .server import ServeOptions, serve

__all__ = ["Engine", "EngineConfig", "ServeError", "ServeOptions", "create_app", "serve"]
