"""`tnt serve`: load a checkpoint, bind the socket, run uvicorn until SIGTERM / SIGINT.

The checkpoint is read and the socket bound before the server starts, so a bad checkpoint, an unknown
runtime or a port in use is a user error (one line, exit 2), not a server log. A model that fails its
warm-up stops the server: :func:`serve` returns 1. On SIGTERM or SIGINT readiness turns 503 at once; the
server goes on serving for ``stop_delay_s`` (so that load balancers take it out of rotation), then uvicorn
stops accepting connections, lets the requests in flight finish (``drain_s`` at most), and the app's
lifespan stops the engine after the batches still queued; :func:`serve` returns 0. A second signal skips
the delay.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..errors import ConfigError
from .engine import DEFAULT_MAX_PIXELS

__all__ = ["ServeOptions", "bind", "serve"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # a model name that needs no escaping in a URL path


@dataclass(frozen=True)
class ServeOptions:
    """`tnt serve`'s options (see its --help); checked by :func:`serve`."""

    checkpoint: str | Path
    runtime: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    threads: int | None = None
    max_upload_mb: float = 10.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    topk: int = 5
    max_queue: int = 256
    timeout_s: float | None = 30.0
    name: str | None = None
    drain_s: float = 30.0
    stop_delay_s: float = 0.0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's, a privileged port); the
            OSError stays its cause.
    """
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # so, and uvicorn writes a response's head and body separately: with Nagle on, every answer on a
    # keep-alive connection after the first waited for the client's delayed ACK (~40 ms here)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it on Linux
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host"
        ) from e
    sock.set_inheritable(True)
    return sock


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """Let uvicorn's re-raise of the SIGTERM / SIGINT it handled be a no-op, so the command exits 0.

    uvicorn handles the signal (graceful shutdown), restores the handler it found, and raises the signal
    again; with Python's default handlers that would be a KeyboardInterrupt or a kill by SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server_class(on_stop: Callable[[], None], delay_s: float) -> type:
    """uvicorn's Server, told to call ``on_stop`` at the first SIGTERM / SIGINT and to begin its graceful
    shutdown ``delay_s`` later (at once on a second signal)."""
    import uvicorn

    class DelayedStop(uvicorn.Server):
        stopping = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.stopping:
                self.stopping = True
                on_stop()
                if delay_s > 0:
                    timer = threading.Timer(delay_s, uvicorn.Server.handle_exit, (self, sig, frame))
                    timer.daemon = True
                    timer.start()
                    return
            super().handle_exit(sig, frame)

    return DelayedStop


def serve(options: ServeOptions, *, log: Callable[[str], None], announce: Callable[[str], None]) -> int:
    """Serve ``options.checkpoint`` until SIGTERM / SIGINT; 0 then, 1 if the model failed to warm up.

    ``announce`` gets one line with the URL once the socket listens and the model has warmed up (the
    CLI prints it on stdout); ``log`` gets notes for the user.

    Raises:
        ConfigError, CheckpointError, InputError: bad options or checkpoint, or an address that cannot be
            bound, before anything listens.
    """
    import torch
    import uvicorn

    from ..tools.checkpoints import open_model
    from ..utils.amp import weight_dtype
    from ..utils.devices import device_name, resolve_device
    from .app import create_app, set_draining
    from .engine import Engine, EngineConfig

    device = resolve_device(options.device)  # before the checkpoint is read
    if options.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {options.max_upload_mb}")
    if options.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {options.topk}")
    if options.drain_s < 0 or options.stop_delay_s < 0:
        raise ConfigError("--drain-s and --stop-delay-s must not be negative")
    if options.name is not None and not _NAME.fullmatch(options.name):
        raise ConfigError(f"--name must be letters, digits, '_', '-' or '.', got {options.name!r}")
    if options.threads is not None:
        if options.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {options.threads}")
        torch.set_num_threads(options.threads)  # before loading: the ONNX runtimes take torch's count
    config = EngineConfig(
        max_batch=options.max_batch,
        max_wait_ms=options.max_wait_ms,
        max_queue=options.max_queue,
        timeout_s=options.timeout_s,
        max_pixels=options.max_pixels,
        dtype=weight_dtype(options.dtype),
        device=device,
    )
    engine = Engine(open_model(options.checkpoint, runtime=options.runtime), config)
    sock = bind(options.host, options.port)
    app = create_app(engine, max_upload_mb=options.max_upload_mb, topk=options.topk, name=options.name)
    server_class = _server_class(lambda: set_draining(app), options.stop_delay_s)
    server = server_class(
        uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=options.drain_s,
            lifespan="on",
            access_log=False,
        )
    )

    where = (
        f"{device} {device_name(device)}" if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    timeout = "no timeout" if config.timeout_s is None else f"timeout {config.timeout_s:g} s"

    def wait_and_announce() -> None:
        while not (engine.ready.wait(0.05) and server.started):
            if engine.failure is not None:
                log(f"tnt serve: error: the model failed to warm up ({engine.failure}); stopping")
                server.should_exit = True
                return
            if server.should_exit:
                return
        announce(
            f"serving {engine.model_name} ({engine.runtime}, {options.dtype}, {where}, batches of up to "
            f"{config.max_batch} within {config.max_wait_ms:g} ms, queue {config.max_queue}, {timeout}) "
            f"at {_url(sock)}"
        )

    threading.Thread(target=wait_and_announce, name="tnt-serve-announce", daemon=True).start()
    with _signals_end_quietly():
        server.run(sockets=[sock])
    return 1 if engine.failure is not None else 0
