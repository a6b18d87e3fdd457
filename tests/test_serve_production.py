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
import base64
import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import tntvision
from tntvision.data import eval_transform, open_image
from tntvision.serve import Engine, EngineConfig, create_app
from tntvision.serve.server import bind

from .test_serve import CLASSES, EXAMPLE, Served, chrome, needs_chromium

ROOT = Path(__file__).resolve().parents[1]
SECOND = ROOT / "docs" / "examples" / "ankle_boot_0.png"
WAIT = 180  # seconds: the bound on any wait (a kernel build on a loaded machine); never a measurement


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
    _until(lambda: server.started or not thread.is_alive(), "uvicorn started")
    try:
        assert server.started, "uvicorn did not start"
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


@dataclass
class Held:
    """A live server (batches of one) whose first request, a black image, is held in its batch."""

    url: str
    client: httpx.Client
    gate: Gate
    pool: ThreadPoolExecutor
    running: Future


@contextlib.contextmanager
def first_request_held(model_dir: Path, **config) -> Iterator[Held]:
    engine, gate = _gated(model_dir, max_batch=1, **config)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        _ready(client)
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_post, url)
            gate.wait_entered()
            try:
                yield Held(url, client, gate, pool, running)
            finally:
                gate.open()


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(model_dir):
    with first_request_held(model_dir, max_queue=2) as held:
        second = held.pool.submit(_post, held.url)
        _until(lambda: _queue_depth(held.client) == 2, "two images admitted")
        refused = [_post(held.url), _post(held.url, path="/explain")]
        held.gate.open()
        answers = [held.running.result(WAIT), second.result(WAIT)]
    for r in refused:
        assert r.status_code == 503 and "busy" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200, 200]
    assert [n for n, _ in held.gate.passes] == [1, 1, 1]  # warm-up and the two admitted


def test_a_request_past_its_deadline_answers_504_and_unstarted_work_is_dropped(model_dir):
    with first_request_held(model_dir, timeout_s=1.0) as held:
        waiting = held.pool.submit(_post, held.url, WHITE)  # queued behind the held batch
        late = [held.running.result(WAIT), waiting.result(WAIT)]  # both pass their deadline
        _until(lambda: _queue_depth(held.client) == 1, "the queued image has left the queue")
        held.gate.open()
        _until(lambda: _queue_depth(held.client) == 0, "the held batch has ended")
        assert _post(held.url).status_code == 200
    for r in late:
        assert r.status_code == 504 and "deadline" in r.json()["error"]
    passes = held.gate.passes
    assert len(passes) == 3 and all(mean < 0 for _, mean in passes[1:])  # never the white one


def test_a_client_that_disconnects_frees_its_place(model_dir):
    with first_request_held(model_dir, max_queue=2) as held:
        port = int(held.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as gone:
            head = f"POST /predict HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: {len(WHITE)}"
            gone.sendall(head.encode() + b"\r\nHost: x\r\n\r\n" + WHITE)
            _until(lambda: _queue_depth(held.client) == 2, "the second image admitted")
        _until(lambda: _queue_depth(held.client) == 1, "the place of the client that left is free")
        third = held.pool.submit(_post, held.url)  # takes that place (--max-queue 2)
        _until(lambda: _queue_depth(held.client) == 2, "the freed place taken")
        held.gate.open()
        assert held.running.result(WAIT).status_code == 200 and third.result(WAIT).status_code == 200
    passes = held.gate.passes
    assert len(passes) == 3 and all(mean < 0 for _, mean in passes[1:])  # never the white one


def test_explanations_run_between_batches_not_before_them(model_dir):
    """Explanations queue on the inference thread like images; one runs only when no image waits or the
    last turn was a batch, so a stream of them cannot starve the batches (they used to run under the
    batch lock on any thread, unbatched, as often as they came)."""
    engine, gate = _gated(model_dir, max_batch=8)
    white = engine.preprocess(WHITE)
    black = engine.preprocess(BLACK)

    async def scenario() -> None:
        held = asyncio.ensure_future(engine.infer(black))
        await asyncio.to_thread(gate.wait_entered)  # its batch holds the thread while the rest queues
        explains = [asyncio.ensure_future(engine.explain(white, 3)) for _ in range(3)]
        images = [asyncio.ensure_future(engine.infer(black)) for _ in range(2)]
        await asyncio.sleep(0)
        assert engine.queue_depth() == 6
        gate.open()
        await asyncio.wait_for(asyncio.gather(held, *explains, *images), WAIT)

    engine.start()
    try:
        assert engine.ready.wait(WAIT)
        gate.close()
        asyncio.run(scenario())
    finally:
        gate.open()
        engine.stop()
    kinds = ["E" if mean > 0 else f"B{n}" for n, mean in gate.passes[1:]]
    assert kinds == ["B1", "E", "B2", "E", "E"]


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

        load = checkpoints.open_model

        def broken(*args, **kwargs):
            model = load(*args, **kwargs)

            def fail(*_):
                raise RuntimeError("the kernel would not build")

            model.pixel_embed.register_forward_pre_hook(fail)
            return model

        checkpoints.open_model = broken
        sys.exit(main(["serve", "--checkpoint", {str(model_dir)!r}, "--port", "0"]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert "failed to warm up (the kernel would not build)" in proc.stderr and "http://" not in proc.stdout


# --------------------------------------------------------------------------------- schema and page


def test_the_openapi_schema_declares_every_endpoint_and_docs_are_served(model_dir):
    engine = Engine(tntvision.load_model(model_dir))
    with TestClient(create_app(engine)) as client:
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
    paths = schema["paths"]
    for path in ("/predict", "/predict/batch", "/explain", "/health", "/metadata", "/metrics", "/v2"):
        assert path in paths
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/infer"):
        assert path in paths
    predict = paths["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    (topk,) = predict["parameters"]
    assert topk["name"] == "topk" and topk["schema"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    answer = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert answer.endswith("/PredictAnswer") and "InferenceResponse" in schema["components"]["schemas"]
    assert docs.status_code == 200 and "/openapi.json" in docs.text


HOLD_FIRST_EXPLAIN = """
const realFetch = window.fetch;
let explains = 0;
window.fetch = async (url, options) => {
  const response = await realFetch(url, options);
  if (String(url).includes("explain") && explains++ === 0) {
    await new Promise((resolve) => { window.releaseFirst = resolve; });
    setTimeout(() => { window.firstDone = true; }, 0);
  }
  return response;
};
"""


@needs_chromium
def test_the_page_behind_a_path_prefix_by_keyboard_without_stale_answers(model_dir, tmp_path):
    """The app mounted under /models/tnt/ (as behind a proxy that strips the prefix): the page finds its
    endpoints, Tab reaches the file picker, and the answer for a first image, arriving after a second
    image was picked, does not replace what the page shows for the second."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from starlette.applications import Starlette
    from starlette.routing import Mount

    engine = Engine(tntvision.load_model(model_dir), EngineConfig(max_wait_ms=0))
    proxy = Starlette(routes=[Mount("/models/tnt", app=create_app(engine))])
    engine.start()  # the mounted app's lifespan does not run
    try:
        with live(proxy) as url, chrome(tmp_path / "profile") as driver:
            page = url + "/models/tnt/"
            png = {"content-type": "image/png"}
            second = httpx.post(
                page + "explain?topk=5", content=SECOND.read_bytes(), headers=png, timeout=WAIT
            )
            driver.get(page)
            wait = WebDriverWait(driver, WAIT)
            wait.until(
                lambda d: "10 classes" in d.find_element(By.ID, "meta").text
            )  # metadata, via the prefix
            ActionChains(driver).send_keys(Keys.TAB).perform()
            assert driver.switch_to.active_element.get_attribute("id") == "file"
            driver.execute_script(HOLD_FIRST_EXPLAIN)
            picker = driver.find_element(By.ID, "file")
            picker.send_keys(str(EXAMPLE))
            wait.until(lambda d: d.execute_script("return window.releaseFirst !== undefined"))
            picker.send_keys(str(SECOND))
            overlay = second.json()["overlay"]
            wait.until(lambda d: d.find_element(By.ID, "overlay").get_attribute("src") == overlay)
            driver.execute_script("window.releaseFirst()")
            wait.until(lambda d: d.execute_script("return window.firstDone === true"))
            driver.execute_async_script("setTimeout(arguments[0], 500)")  # the first image's handlers run
            assert driver.find_element(By.ID, "overlay").get_attribute("src") == overlay
            labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#top .label")]
            assert labels == [t["label"] for t in second.json()["top"]]
    finally:
        engine.stop()


# ------------------------------------------------------------------ the Open Inference Protocol (v2)

NAME = "tnt_mini_patch4_28"


@pytest.fixture(scope="module")
def v2_url(model_dir) -> Iterator[str]:
    """A server (in-process, real socket) for the /v2 clients and the fuzzer."""
    engine = Engine(tntvision.load_model(model_dir), EngineConfig(max_wait_ms=2))
    with live(create_app(engine, max_upload_mb=1)) as url:
        with httpx.Client(base_url=url, timeout=WAIT) as client:
            _ready(client)
        yield url


def _triton(url: str):
    import tritonclient.http as triton

    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=WAIT)


def _inputs(model_dir: Path) -> tuple[torch.nn.Module, np.ndarray]:
    """The model and the two example images preprocessed as the server does, (2, 1, 28, 28)."""
    model = tntvision.load_model(model_dir).eval()
    transform = eval_transform(model.meta)
    return model, torch.stack([transform(open_image(p)) for p in (EXAMPLE, SECOND)]).numpy()


def test_tritonclient_health_and_metadata(v2_url):
    from tritonclient.utils import InferenceServerException

    client = _triton(v2_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert not client.is_model_ready("resnet50")
    server = client.get_server_metadata()
    assert server["name"] == "tntvision" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("input", "FP32"), ("image", "BYTES")}
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["outputs"][0]["shape"] == [-1, 10]
    assert client.get_model_metadata(NAME, model_version="1")["name"] == NAME
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("resnet50")
    assert unknown.value.status() == "404" and NAME in unknown.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_a_tensor(v2_url, model_dir, binary):
    import tritonclient.http as triton

    model, x = _inputs(model_dir)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    result = _triton(v2_url).infer(NAME, [tensor], outputs=outputs, request_id="r-1")
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    assert np.allclose(result.as_numpy("logits"), want.numpy(), atol=1e-5)
    assert np.allclose(result.as_numpy("probabilities"), want.softmax(-1).numpy(), atol=1e-6)
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == NAME


def test_tritonclient_sends_image_files_and_reads_classes(v2_url):
    import tritonclient.http as triton

    files = np.array([EXAMPLE.read_bytes(), SECOND.read_bytes()], dtype=np.object_)
    images = triton.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(files)  # binary tensor data extension
    client = _triton(v2_url)
    classes = client.infer(
        NAME, [images], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)]
    )
    everything = client.infer(NAME, [images])  # no outputs named: all of them, binary
    for row, path in zip(classes.as_numpy("probabilities"), (EXAMPLE, SECOND), strict=True):
        top = _post(v2_url, path.read_bytes(), params={"topk": 3}).json()["top"]
        got = [s.decode().split(":") for s in row]
        assert [int(i) for _, i, _ in got] == [t["index"] for t in top]
        assert [label for _, _, label in got] == [t["label"] for t in top]
        assert [float(p) for p, _, _ in got] == pytest.approx([t["prob"] for t in top], abs=1e-5)
    assert everything.as_numpy("logits").shape == (2, 10)
    assert np.allclose(everything.as_numpy("probabilities").sum(-1), 1, atol=1e-5)


def _infer(url: str, body: dict, path: str = f"/v2/models/{NAME}/infer") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=WAIT)


def _image_input(*files: bytes) -> dict:
    data = [base64.b64encode(f).decode() for f in files]
    return {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}


def test_v2_json_with_base64_images_and_its_refusals(v2_url):
    r = _infer(v2_url, {"id": "7", "inputs": [_image_input(EXAMPLE.read_bytes())]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "7" and [o["name"] for o in body["outputs"]] == ["logits", "probabilities"]
    assert body["outputs"][1]["shape"] == [1, 10] and sum(body["outputs"][1]["data"]) == pytest.approx(1)
    pixels = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}
    refused = {
        "wrong shape": (
            {"inputs": [{**pixels, "shape": [1, 3, 28, 28], "data": [0.0] * 2352}]},
            400,
            "shape",
        ),
        "too few values": ({"inputs": [{**pixels, "data": [0.0] * 10}]}, 400, "FP32 values"),
        "strings for pixels": ({"inputs": [{**pixels, "data": ["a"] * 784}]}, 400, "FP32"),
        "datatype": ({"inputs": [{**pixels, "datatype": "INT8", "data": [0] * 784}]}, 400, "datatype"),
        "two inputs": ({"inputs": [_image_input(WHITE), _image_input(BLACK)]}, 400, "one input"),
        "no input": ({"inputs": []}, 400, "one input"),
        "not base64": ({"inputs": [{**_image_input(WHITE), "data": ["%%%"]}]}, 400, "base64"),
        "not an image": ({"inputs": [_image_input(b"hello")]}, 400, "input 'image'[0]: "),
        "unknown output": (
            {"inputs": [_image_input(WHITE)], "outputs": [{"name": "x"}]},
            400,
            "unknown output",
        ),
        "bad classification": (
            {
                "inputs": [_image_input(WHITE)],
                "outputs": [{"name": "logits", "parameters": {"classification": "3"}}],
            },
            400,
            "classification",
        ),
        "too many images": ({"inputs": [_image_input(*[WHITE] * 65)]}, 413, "at most 64"),
        "not a request": ({"inputs": "all"}, 400, "not an inference request"),
    }
    for case, (body, status, words) in refused.items():
        r = _infer(v2_url, body)
        assert r.status_code == status and words in r.json()["error"], (case, r.text)
    for raw, tensor, words in [
        (struct.pack("<I", 16) + b"abc", {"name": "image", "datatype": "BYTES", "shape": [1]}, "truncated"),
        (np.full(784, np.nan, "<f4").tobytes(), pixels, "NaN"),
    ]:
        head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
        r = httpx.post(
            v2_url + f"/v2/models/{NAME}/infer",
            content=head + raw,
            headers={"inference-header-content-length": str(len(head))},
            timeout=WAIT,
        )
        assert r.status_code == 400 and words in r.json()["error"], r.text
    assert _infer(v2_url, {"inputs": []}, f"/v2/models/{NAME}/versions/2/infer").status_code == 404
    assert httpx.post(v2_url + f"/v2/models/{NAME}/infer", content=b"{", timeout=WAIT).status_code == 400
    assert _infer(v2_url, {"inputs": [_image_input(WHITE)]}).status_code == 200  # serving goes on


def test_a_fuzzer_over_the_whole_schema_finds_no_server_error_and_no_hang(v2_url, tmp_path):
    """schemathesis over every operation of /openapi.json (valid and invalid requests, then sequences of
    them): no 5xx, every status and body as declared, no request slower than its timeout (a hang)."""
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    command = [str(Path(sys.executable).with_name("st")), "run", v2_url + "/openapi.json", "--checks", checks]
    command += ["--max-examples", "5", "--seed", "1", "--workers", "1", "--request-timeout", "30"]
    command += ["--no-shrink", "--generation-database", "none", "--suppress-health-check", "all"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "16 selected" in run.stdout and " passed" in run.stdout
