"""`tnt serve` under what production brings (issue 33): cancelled and disconnected clients, overload,
deadlines, extreme images, oversized uploads, probes, draining, a failed warm-up, explanations next to
batches, the page behind a path prefix.

Most tests hold the model with a :class:`Gate` (a pre-hook on its pixel embedding, which batches and
explanations both run first) so that "a request is running" and "a request is queued" are states the
test sets up, not timings it hopes for; the server runs in-process on a real socket (uvicorn in a thread)
or as a `tnt serve` process. Every wait is bounded; no test measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import tntvision
from tntvision.serve import Engine, EngineConfig, create_app
from tntvision.serve.server import bind

from .test_serve import CLASSES, EXAMPLE, Served

ROOT = Path(__file__).resolve().parents[1]
SECOND = ROOT / "docs" / "examples" / "ankle_boot_0.png"
WAIT = 60  # seconds: the bound on any wait for an event (a loaded machine), never a measurement


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tnt_mini_patch4_28 with test_serve's class names."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve_production") / "model"
    tntvision.save_model(tntvision.create_model("tnt_mini_patch4_28"), folder, class_names=CLASSES)
    return folder


class Gate:
    """Holds the model's forward passes while closed and records each one as (images, mean pixel)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Semaphore(0)
        self.passes: list[tuple[int, float]] = []
        model.pixel_embed.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        self.passes.append((x.shape[0], float(x.float().mean())))
        self.entered.release()
        if not self.opened.wait(WAIT):
            raise RuntimeError("the test never opened the gate")

    def close(self) -> None:
        """Hold the passes that start from now on (:meth:`wait_entered` waits for one of those)."""
        self.entered = threading.Semaphore(0)
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    def wait_entered(self) -> None:
        """Until a forward pass has reached the gate (the one it holds, when closed)."""
        if not self.entered.acquire(timeout=WAIT):
            raise AssertionError("no forward pass reached the gate")


def _gated(model_dir: Path, **config) -> tuple[Engine, Gate]:
    model = tntvision.load_model(model_dir)
    gate = Gate(model)
    return Engine(model, EngineConfig(**{"max_wait_ms": 0, **config})), gate


@contextlib.contextmanager
def live(app, **config) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 in a thread of this process; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(WAIT * 20):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def _until(predicate, what: str) -> None:
    for _ in range(WAIT * 20):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def _ready(client: httpx.Client | TestClient) -> None:
    _until(lambda: client.get("/v2/health/ready").status_code == 200, "ready")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


BLACK = _png(np.zeros((28, 28), np.uint8))
WHITE = _png(np.full((28, 28), 255, np.uint8))


def _queue_depth(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("tnt_serve_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no queue depth in /metrics")


# --------------------------------------------------------------------------- the inference thread


def test_a_cancelled_request_cannot_stop_the_inference_thread(model_dir):
    """A caller that gives up (a task cancelled: a client gone, asyncio.wait_for, a shutdown) while its
    image runs or waits: the thread goes on, the waiting image is never computed, later requests are
    answered. Before the fix the thread died on InvalidStateError and every later request hung."""
    engine, gate = _gated(model_dir, max_batch=1)
    engine.start()
    images = [torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def scenario() -> torch.Tensor:
        running = asyncio.ensure_future(engine.infer(images[0]))
        await asyncio.to_thread(gate.wait_entered)  # images[0], held in its batch
        waiting = asyncio.ensure_future(engine.infer(images[1]))
        await asyncio.sleep(0)  # queued
        running.cancel()
        waiting.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        assert engine.queue_depth() == 1  # the running one keeps its place until its batch ends
        gate.open()
        return await asyncio.wait_for(engine.infer(images[2]), WAIT)

    try:
        assert engine.ready.wait(WAIT)
        gate.close()
        last = asyncio.run(scenario())
    finally:
        gate.open()
        engine.stop()
    assert [n for n, _ in gate.passes] == [1, 1, 1]  # warm-up, images[0], images[2]: not images[1]
    with torch.inference_mode():
        assert torch.allclose(last, engine._source(images[2][None])[0], atol=1e-5)
    assert engine.alive and engine.queue_depth() == 0


def test_when_the_inference_thread_ends_nobody_waits_and_liveness_says_so(model_dir):
    class Ended(BaseException):
        pass

    def end(_n: int, _s: float) -> None:
        raise Ended()

    engine, _gate = _gated(model_dir)
    with TestClient(create_app(engine)) as client:
        _ready(client)
        assert client.get("/v2/health/live").json() == {"live": True}
        engine.on_batch = end  # the thread ends after this batch
        assert (
            client.post("/predict", content=BLACK, headers={"content-type": "image/png"}).status_code == 200
        )
        _until(lambda: not engine.alive, "the thread has ended")
        r = client.post("/predict", content=BLACK, headers={"content-type": "image/png"})
        assert r.status_code == 503 and "cannot run" in r.json()["error"]
        live = client.get("/v2/health/live")
        assert live.status_code == 503 and live.json()["live"] is False
        assert client.get("/v2/health/ready").status_code == 503


# ------------------------------------------------------------------------------- load is answered


def _post(url: str, data: bytes = BLACK, path: str = "/predict", **kw) -> httpx.Response:
    return httpx.post(url + path, content=data, headers={"content-type": "image/png"}, timeout=WAIT, **kw)


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(model_dir):
    engine, gate = _gated(model_dir, max_batch=1, max_queue=2)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        _ready(client)
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, url)
            gate.wait_entered()  # running
            second = pool.submit(_post, url)
            _until(lambda: _queue_depth(client) == 2, "two images admitted")
            refused = [_post(url), _post(url, path="/explain")]
            gate.open()
            answers = [first.result(WAIT), second.result(WAIT)]
    for r in refused:
        assert r.status_code == 503 and "busy" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200, 200]
    assert [n for n, _ in gate.passes] == [1, 1, 1]  # warm-up and the two admitted


def test_a_request_past_its_deadline_answers_504_and_unstarted_work_is_dropped(model_dir):
    engine, gate = _gated(model_dir, max_batch=1, timeout_s=1.0)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        _ready(client)
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_post, url)
            gate.wait_entered()
            waiting = pool.submit(_post, url, WHITE)  # queued behind the held batch
            late = [running.result(WAIT), waiting.result(WAIT)]  # both pass their deadline
        _until(lambda: _queue_depth(client) == 1, "the queued image has left the queue")
        gate.open()
        _until(lambda: _queue_depth(client) == 0, "the held batch has ended")
        assert _post(url).status_code == 200
    for r in late:
        assert r.status_code == 504 and "deadline" in r.json()["error"]
    assert len(gate.passes) == 3 and all(mean < 0 for _, mean in gate.passes[1:])  # never the white one


def test_a_client_that_disconnects_frees_its_place(model_dir):
    engine, gate = _gated(model_dir, max_batch=1, max_queue=2)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        _ready(client)
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_post, url)
            gate.wait_entered()
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as gone:
                head = f"POST /predict HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: {len(WHITE)}"
                gone.sendall(head.encode() + b"\r\nHost: x\r\n\r\n" + WHITE)
                _until(lambda: _queue_depth(client) == 2, "the second image admitted")
            _until(lambda: _queue_depth(client) == 1, "the place of the client that left is free")
            third = pool.submit(_post, url)  # takes that place (--max-queue 2)
            _until(lambda: _queue_depth(client) == 2, "the freed place taken")
            gate.open()
            assert running.result(WAIT).status_code == 200 and third.result(WAIT).status_code == 200
    assert len(gate.passes) == 3 and all(mean < 0 for _, mean in gate.passes[1:])  # never the white one


def test_explanations_run_between_batches_not_before_them(model_dir):
    """Explanations queue on the inference thread like images; one runs only when no image waits or the
    last turn was a batch, so a stream of them cannot starve the batches (they used to run under the
    batch lock on any thread, unbatched, as often as they came)."""
    engine, gate = _gated(model_dir, max_batch=8)
    white = engine.preprocess(WHITE)
    black = engine.preprocess(BLACK)

    async def scenario() -> None:
        explains = [asyncio.ensure_future(engine.explain(white, 3)) for _ in range(3)]
        images = [asyncio.ensure_future(engine.infer(black)) for _ in range(2)]
        await asyncio.sleep(0)
        assert engine.queue_depth() == 5
        gate.open()
        await asyncio.wait_for(asyncio.gather(*explains, *images), WAIT)

    gate.close()
    engine.start()  # its warm-up waits at the gate while the work queues
    try:
        gate.wait_entered()
        asyncio.run(scenario())
    finally:
        gate.open()
        engine.stop()
    kinds = ["E" if mean > 0 else f"B{n}" for n, mean in gate.passes[1:]]
    assert kinds == ["E", "B2", "E", "E"]


# --------------------------------------------------------------------------------------- bad input


def test_an_extreme_aspect_ratio_is_refused_before_it_is_resized(model_dir):
    """1 x 100,000 pixels (a PNG under 1 KB) passes the pixel limit but, with its short side resized to
    32 for this model, would become 3.2 M x 32; a 224-pixel model would make it tens of GB."""
    engine = Engine(tntvision.load_model(model_dir), EngineConfig(max_wait_ms=0, max_pixels=10_000_000))
    tall = _png(np.zeros((100_000, 1), np.uint8))
    assert len(tall) < 1024
    with TestClient(create_app(engine)) as client:
        _ready(client)
        r = client.post("/predict", content=tall, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "aspect ratio" in r.json()["error"], r.text
        wide = _png(np.zeros((28, 2000), np.uint8))  # 32 x 2285 once resized: fine
        assert client.post("/predict", content=wide, headers={"content-type": "image/png"}).status_code == 200


def _slow_upload(port: int, total: int, *, chunked: bool, pause_after: int) -> bytes:
    """POST ``total`` bytes as a slow client would: once ``pause_after`` bytes of the body are sent, if the
    server has answered already, go on only after its keep-alive timer has run out. The answer's head."""
    body = b"\0" * total
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    parts = [body[i : i + 2**18] for i in range(0, total, 2**18)]
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(head.encode())
        sent = 0
        for part in parts:
            if sent >= pause_after and sent - len(part) < pause_after and select.select([s], [], [], 0.5)[0]:
                time.sleep(2)  # answered early: the keep-alive timer (1 s) closes the socket meanwhile
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent += len(part)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer and (data := s.recv(65536)):
            answer += data
        return answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_upload_is_answered_413_after_its_body_not_reset(model_dir, chunked):
    """The server reads the rest of a too-large body before it answers, so a client that sends slowly
    reads the 413. Answered at once (at the declared length, or as the streamed body passed the limit),
    the keep-alive timer closed the socket under the upload: the client got a reset (broken pipe)."""
    limit = 2**20
    engine = Engine(tntvision.load_model(model_dir))
    with live(create_app(engine, max_upload_mb=1), timeout_keep_alive=1) as url:
        port = int(url.rsplit(":", 1)[1])
        answer = _slow_upload(port, 3 * limit, chunked=chunked, pause_after=limit + 1 if chunked else 0)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]


# ---------------------------------------------------------------------------- probes and shutdown


def test_liveness_and_readiness_apart_during_warm_up(model_dir):
    """A warm-up that builds the kernel is alive but not ready: a liveness probe must not kill it."""
    engine, gate = _gated(model_dir)
    gate.close()
    with TestClient(create_app(engine)) as client:
        try:
            gate.wait_entered()
            assert client.get("/v2/health/live").json() == {"live": True}
            ready = client.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json() == {"ready": False, "status": "warming up"}
            assert client.get("/v2/models/tnt_mini_patch4_28/ready").status_code == 503
            assert client.get("/health").status_code == 503
        finally:
            gate.open()
        _ready(client)
        assert client.get("/health").json() == {"status": "ok", "model": "tnt_mini_patch4_28"}
        assert client.get("/v2/models/tnt_mini_patch4_28/ready").json() == {"ready": True, "status": "ok"}


def test_sigterm_turns_readiness_503_serves_on_and_exits_0_with_the_flags_applied(model_dir):
    flags = [
        "--max-queue",
        "7",
        "--timeout",
        "9",
        "--max-pixels",
        "1234567",
        "--topk",
        "3",
        "--name",
        "fashion",
    ]
    served = Served(model_dir, *flags, "--stop-delay-s", "60", "--drain-s", "20")
    url = served.url.rstrip("/")
    try:
        with httpx.Client(base_url=url, timeout=WAIT) as client:
            _ready(client)
            meta = client.get("/metadata").json()
            assert (meta["name"], meta["max_queue"], meta["timeout_s"], meta["max_pixels"]) == (
                "fashion",
                7,
                9,
                1234567,
            )
            assert client.get("/v2/models/fashion/ready").status_code == 200
            assert client.get("/v2/models/tnt_mini_patch4_28").status_code == 404
            assert len(_post(url, EXAMPLE.read_bytes()).json()["top"]) == 3  # --topk
            served.proc.send_signal(signal.SIGTERM)
            _until(lambda: client.get("/v2/health/ready").status_code == 503, "readiness 503")
            assert client.get("/v2/health/ready").json() == {"ready": False, "status": "draining"}
            assert client.get("/health").json()["status"] == "draining"
            assert client.get("/v2/health/live").status_code == 200
            assert _post(url, EXAMPLE.read_bytes()).status_code == 200  # still served
        served.proc.send_signal(signal.SIGTERM)  # a second signal skips the rest of --stop-delay-s
        assert served.proc.wait(timeout=WAIT) == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


def test_a_model_that_fails_to_warm_up_exits_1(model_dir):
    """Not a process that answers 503 for ever: it says why on stderr and exits 1, printing no URL."""
    script = textwrap.dedent(
        f"""
        import sys
        import tntvision.tools.checkpoints as checkpoints
        from tntvision.cli import main

        load = checkpoints.load_checkpoint

        def broken(*args, **kwargs):
            model = load(*args, **kwargs)

            def fail(*_):
                raise RuntimeError("the kernel would not build")

            model.pixel_embed.register_forward_pre_hook(fail)
            return model

        checkpoints.load_checkpoint = broken
        sys.exit(main(["serve", "--checkpoint", {str(model_dir)!r}, "--port", "0"]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert "failed to warm up (the kernel would not build)" in proc.stderr and "http://" not in proc.stdout
