"""`tnt serve`: every endpoint and every refused input, in-process and through a real `tnt serve` process.

The same tests run against the app in-process (Starlette's test client) and against a `tnt serve`
subprocess on 127.0.0.1 (a free port, its URL read from stdout). Served probabilities are compared with
`tnt predict --json` for the same files; batched answers with unbatched ones; the batch-size metric shows
that concurrent requests share forward passes. Every request loop is bounded; no test measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import tntvision
from tntvision.cli import main
from tntvision.data import eval_transform, open_image
from tntvision.serve import Engine, EngineConfig, create_app
from tntvision.tools.visualize import capture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "bag_18.png"
CLASSES = [f"class_{i}" for i in range(10)]
MAX_WAIT_MS = 100  # long enough for concurrent requests to meet in one batch on a busy machine
MAX_BATCH = 8
MAX_UPLOAD_MB = 1


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tnt_mini_patch4_28 with CLASSES; TNT_SERVE_CHECKPOINT serves another (only for the page's
    screenshot: `TNT_SERVE_CHECKPOINT=runs/<demo>/model TNT_SERVE_SCREENSHOT=docs/figures/serve_page.png
    pytest tests/test_serve.py::test_the_page_in_headless_chromium`)."""
    if os.environ.get("TNT_SERVE_CHECKPOINT"):
        return Path(os.environ["TNT_SERVE_CHECKPOINT"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve") / "model"
    tntvision.save_model(tntvision.create_model("tnt_mini_patch4_28"), folder, class_names=CLASSES)
    return folder


def _noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Files of several formats, modes and sizes; one JPEG carries an EXIF rotation."""
    folder = tmp_path_factory.mktemp("images")
    files = {"grey_png": EXAMPLE}
    rotated = Image.fromarray(_noise((40, 90, 3), 1))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when shown
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    files["exif_jpeg"] = folder / "rotated.jpg"
    Image.fromarray(_noise((33, 31), 2).astype(np.uint16) * 200).save(folder / "deep.png")
    files["png_16bit"] = folder / "deep.png"
    Image.fromarray(_noise((50, 50, 4), 3)).save(folder / "alpha.png")
    files["rgba_png"] = folder / "alpha.png"
    Image.fromarray(_noise((300, 200, 3), 4)).convert("P").save(folder / "palette.gif")
    files["palette_gif"] = folder / "palette.gif"
    return files


@pytest.fixture(scope="module")
def cli_probs(model_dir, images) -> dict[str, dict[int, float]]:
    """`tnt predict --json --topk 10` of every file: name -> {class index: probability}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", "--checkpoint", str(model_dir), *map(str, images.values()), "--json"])
    assert code == 0
    by_path = {p["path"]: p["top"] for p in json.loads(out.getvalue())["predictions"]}
    # --topk defaults to 5; ask the server for 5 too and compare those
    return {name: {t["index"]: t["prob"] for t in by_path[str(path)]} for name, path in images.items()}


def _wait_healthy(client: httpx.Client, tries: int = 600) -> None:
    for _ in range(tries):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


@pytest.fixture(scope="module")
def app_client(model_dir):
    engine = Engine(
        tntvision.load_model(model_dir), EngineConfig(max_batch=MAX_BATCH, max_wait_ms=MAX_WAIT_MS)
    )
    with TestClient(create_app(engine, max_upload_mb=MAX_UPLOAD_MB)) as client:
        _wait_healthy(client)
        yield client


class Served:
    """A `tnt serve` subprocess; ``url`` is read from its stdout once it is ready."""

    def __init__(self, checkpoint: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "tntvision.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=300)  # the first start may build the fused kernel
        except queue.Empty:
            self.stop()
            raise AssertionError(f"tnt serve printed no URL: {self.proc.stderr.read()}") from None
        match = re.search(r"http://\S+", line)
        assert match, line
        self.url = match.group(0)
        self.lines = lines

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def process_client(model_dir):
    served = Served(
        model_dir,
        *("--max-batch", str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS)),
        *("--max-upload-mb", str(MAX_UPLOAD_MB), "--threads", "1"),
    )
    with httpx.Client(base_url=served.url, timeout=60) as client:
        _wait_healthy(client)
        yield client
    assert served.stop() == 0


@pytest.fixture(scope="module", params=["in-process", "process"])
def client(request) -> httpx.Client:
    return request.getfixturevalue("app_client" if request.param == "in-process" else "process_client")


def _post_file(client: httpx.Client, path: str, data: bytes, *, name: str = "x.png", **kw) -> httpx.Response:
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, **kw)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------------------------- the endpoints


def test_health_metadata_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tnt_mini_patch4_28"}
    meta = client.get("/metadata").json()
    assert meta["classes"] == CLASSES and meta["input_size"] == [1, 28, 28]
    assert meta["runtime"] == "torch" and meta["explain"] is True and meta["max_batch"] == MAX_BATCH
    assert meta["preprocessing"]["mean"] == [0.286]
    scrape = client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    for name in ("tnt_serve_requests_total", "tnt_serve_request_seconds", "tnt_serve_batch_size"):
        assert name in scrape.text
    assert 'tnt_serve_requests_total{code="200",endpoint="/health"}' in scrape.text
    assert "tnt_serve_queue_depth 0.0" in scrape.text


def test_page_is_served_and_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and '"explain"' in page.text
    # every URL the script asks for is relative to the page, so it works behind a path prefix
    assert re.findall(r"""(?:fetch|post)\(\s*["'`]([^"'`]*)""", page.text) == [
        "metadata",
        "predict",
        "explain",
    ]
    # nothing fetched from elsewhere: no absolute URLs in src/href, no CSS imports or fonts
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page.text)
    assert "@import" not in page.text and "url(" not in page.text


@pytest.mark.parametrize("how", ["multipart", "raw"])
@pytest.mark.parametrize("name", ["grey_png", "exif_jpeg", "png_16bit", "rgba_png", "palette_gif"])
def test_predict_gives_what_tnt_predict_gives(client, images, cli_probs, name, how):
    data = images[name].read_bytes()
    if how == "multipart":
        r = _post_file(client, "/predict", data, name=images[name].name)
    else:
        r = client.post("/predict", content=data, headers={"content-type": "image/whatever"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tnt_mini_patch4_28" and body["latency_ms"] > 0
    top = body["top"]
    assert [t["index"] for t in top] == list(cli_probs[name])
    assert all(t["label"] == CLASSES[t["index"]] for t in top)
    assert [t["prob"] for t in top] == pytest.approx(list(cli_probs[name].values()), abs=1e-5)


def test_topk(client):
    data = EXAMPLE.read_bytes()
    assert len(_post_file(client, "/predict", data, params={"topk": 2}).json()["top"]) == 2
    every = _post_file(client, "/predict", data, params={"topk": 50}).json()["top"]  # capped at 10 classes
    assert sorted(t["index"] for t in every) == list(range(10))
    assert sum(t["prob"] for t in every) == pytest.approx(1.0, abs=1e-5)


def test_batch_endpoint_equals_single_requests(client, images):
    names = ["grey_png", "exif_jpeg", "rgba_png", "palette_gif"]
    files = [("file", (images[n].name, images[n].read_bytes(), "image/png")) for n in names]
    r = client.post("/predict/batch", files=files, params={"topk": 3})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [p["filename"] for p in got] == [images[n].name for n in names]
    for n, p in zip(names, got, strict=True):
        single = _post_file(client, "/predict", images[n].read_bytes(), params={"topk": 3}).json()["top"]
        assert [t["index"] for t in p["top"]] == [t["index"] for t in single]
        assert [t["prob"] for t in p["top"]] == pytest.approx([t["prob"] for t in single], abs=1e-5)


def test_concurrent_requests_share_batches(client, images):
    """8 requests at once: fewer forward passes than requests (batch-size histogram), same answers."""
    before = client.get("/metrics").text
    data = [images[n].read_bytes() for n in ("grey_png", "exif_jpeg", "rgba_png", "palette_gif")] * 2
    with ThreadPoolExecutor(len(data)) as pool:
        answers = list(pool.map(lambda d: _post_file(client, "/predict", d, params={"topk": 10}), data))
    after = client.get("/metrics").text
    assert all(a.status_code == 200 for a in answers)
    batches = _metric(after, "tnt_serve_batch_size_count") - _metric(before, "tnt_serve_batch_size_count")
    served = _metric(after, "tnt_serve_batch_size_sum") - _metric(before, "tnt_serve_batch_size_sum")
    assert served == len(data)
    assert batches < len(data), "no two concurrent requests ran in one batch"
    for i in range(4):  # the same image, in whatever batches it landed in
        first, second = (answers[j].json()["top"] for j in (i, i + 4))
        assert [t["index"] for t in first] == [t["index"] for t in second]
        assert [t["prob"] for t in first] == pytest.approx([t["prob"] for t in second], abs=1e-5)


def test_explain_returns_the_class_token_attention(client, model_dir):
    r = _post_file(client, "/explain", EXAMPLE.read_bytes(), params={"topk": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    model = tntvision.load_model(model_dir).eval()
    x = eval_transform(model.meta)(open_image(EXAMPLE)).unsqueeze(0)
    cap = capture(model, x, blocks=[len(model.blocks) - 1])
    expected = cap.attn_out[len(model.blocks) - 1].mean(0)[0, 1:].reshape(7, 7)
    assert body["block"] == len(model.blocks) and body["grid"] == [7, 7]
    assert np.allclose(body["attention"], expected.numpy(), atol=1e-6)
    single = _post_file(client, "/predict", EXAMPLE.read_bytes(), params={"topk": 3}).json()["top"]
    assert [t["prob"] for t in body["top"]] == pytest.approx([t["prob"] for t in single], abs=1e-5)
    prefix = "data:image/png;base64,"
    assert body["overlay"].startswith(prefix)
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"][len(prefix) :])))
    assert overlay.format == "PNG" and overlay.size == (28 * 11, 28 * 11)  # 11x: about 320 px


# --------------------------------------------------------------------------------------- bad input


def _png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise((64, 64, 3), 5)).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"\0" * 65536


OVERSIZE = (MAX_UPLOAD_MB * 2**20) * 3 // 2
RAW = "image/png"
BAD_INPUTS = {  # name -> (request arguments, status, words the error has)
    "empty body": (dict(content=b"", headers={"content-type": RAW}), 400, "empty"),
    "empty file field": (dict(files={"file": ("a.png", b"", RAW)}), 400, "empty"),
    "not an image": (
        dict(content=b"hello, world", headers={"content-type": RAW}),
        400,
        "not a readable image",
    ),
    "not an image (form)": (
        dict(files={"file": ("a.txt", b"%PDF-1.4", "text/plain")}),
        400,
        "not a readable",
    ),
    "truncated PNG": (dict(content=_encoded("PNG")[:300], headers={"content-type": RAW}), 400, "readable"),
    "truncated JPEG": (dict(content=_encoded("JPEG")[:400], headers={"content-type": RAW}), 400, "readable"),
    "bomb 20000x20000": (
        dict(content=_png_declaring(20000, 20000), headers={"content-type": RAW}),
        413,
        "pixels",
    ),
    "bomb 8000x8000": (
        dict(content=_png_declaring(8000, 8000), headers={"content-type": RAW}),
        413,
        "pixels",
    ),
    "oversize upload": (dict(content=b"\0" * OVERSIZE, headers={"content-type": RAW}), 413, "limit"),
    "oversize, chunked": (dict(content=_chunks(OVERSIZE), headers={"content-type": RAW}), 413, "limit"),
    "wrong content type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "content type"),
    "no content type": (dict(content=b"abc"), 415, "content type"),
    "missing field": (dict(files={"image": ("a.png", b"x", RAW)}), 422, "'file'"),
    "topk 0": (dict(files={"file": ("a.png", b"x", RAW)}, params={"topk": "0"}), 422, "topk"),
    "topk negative": (dict(files={"file": ("a.png", b"x", RAW)}, params={"topk": "-3"}), 422, "topk"),
    "topk not a number": (dict(files={"file": ("a.png", b"x", RAW)}, params={"topk": "five"}), 422, "topk"),
    "topk fraction": (dict(files={"file": ("a.png", b"x", RAW)}, params={"topk": "1.5"}), 422, "topk"),
    "topk a digit that is no number": (
        dict(files={"file": ("a.png", b"x", RAW)}, params={"topk": "²"}),
        422,
        "topk",
    ),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/explain"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_serving_goes_on(client, case, endpoint):
    kwargs, status, words = BAD_INPUTS[case]
    if case == "oversize, chunked":  # a generator is used up by one request
        kwargs = {**kwargs, "content": _chunks(OVERSIZE)}
    r = client.post(endpoint, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error and "Traceback" not in error
    assert _post_file(client, "/predict", EXAMPLE.read_bytes()).status_code == 200


def test_batch_endpoint_names_the_bad_file(client):
    files = [("file", ("good.png", EXAMPLE.read_bytes(), RAW)), ("file", ("bad.png", b"nope", RAW))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 400 and r.json()["error"].startswith("bad.png: ")


def test_unknown_paths_and_methods_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").json()
    scrape = client.get("/metrics").text
    assert 'tnt_serve_errors_total{code="404",endpoint="other"}' in scrape


# ------------------------------------------------------------------------------ warm-up, batching


def test_health_is_503_until_the_model_has_warmed_up(model_dir):
    engine = Engine(tntvision.load_model(model_dir))
    app = create_app(engine)
    cold = TestClient(app)  # outside `with`: the lifespan (which starts the engine) has not run
    assert cold.get("/health").status_code == 503
    assert cold.get("/health").json() == {"status": "warming up"}
    r = _post_file(cold, "/predict", EXAMPLE.read_bytes())
    assert r.status_code == 503 and "not started" in r.json()["error"]
    with TestClient(app) as warm:
        _wait_healthy(warm)
        assert _post_file(warm, "/predict", EXAMPLE.read_bytes()).status_code == 200


def test_engine_runs_concurrent_requests_as_one_batch(model_dir):
    """A full batch runs at once (without waiting out max_wait_ms); rows equal unbatched forwards."""
    model = tntvision.load_model(model_dir).eval()
    sizes: list[int] = []
    engine = Engine(
        model, EngineConfig(max_batch=4, max_wait_ms=60_000), on_batch=lambda n, _s: sizes.append(n)
    )
    images = [torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    engine.start()
    try:

        async def ask() -> list[torch.Tensor]:
            return await asyncio.gather(*(engine.infer(x) for x in images[:4]))

        rows = asyncio.run(ask())
        engine.config = EngineConfig(max_batch=4, max_wait_ms=10)  # a lone request runs after 10 ms
        last = asyncio.run(engine.infer(images[4]))
    finally:
        engine.stop()
    assert sizes == [4, 1]
    with torch.inference_mode():
        assert torch.allclose(last, model(images[4][None])[0], atol=1e-5)
    with torch.inference_mode():
        alone = torch.cat([model(x[None]) for x in images[:4]])
    assert torch.allclose(torch.stack(rows), alone, atol=1e-5)


# ------------------------------------------------------------------------------ the real process


def test_sigterm_finishes_the_request_in_flight_and_exits_0(model_dir):
    served = Served(model_dir, "--max-wait-ms", "3000", "--max-batch", "8")
    try:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            _wait_healthy(client)
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(_post_file, client, "/predict", EXAMPLE.read_bytes())
                for _ in range(200):  # until the request waits in the batcher (it waits up to 3 s)
                    if _metric(httpx.get(served.url + "metrics").text, "tnt_serve_queue_depth") >= 1:
                        break
                    time.sleep(0.02)
                else:
                    raise AssertionError("the request never reached the queue")
                served.proc.send_signal(signal.SIGTERM)
                answer = pending.result(timeout=60)
        assert answer.status_code == 200 and len(answer.json()["top"]) == 5
        assert served.proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(served.url + "health", timeout=5)
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--checkpoint", "missing_dir"], "missing_dir"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-wait-ms", "-1"], "--max-wait-ms"),
        (["--runtime", "onnxruntime"], "--runtime onnxruntime"),
        (["--port", "70000"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
        (["--timeout", "-1"], "--timeout"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--topk", "0"], "--topk"),
        (["--drain-s", "-1"], "--drain-s"),
        (["--name", "a/b"], "--name"),
    ],
)
def test_serve_user_errors_exit_2_with_one_line(model_dir, capsys, args, words):
    argv = ["serve", "--checkpoint", str(model_dir), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tnt serve: error: ") and words in err and "\n" not in err


def test_port_in_use_is_a_user_error(model_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err


# ------------------------------------------------------------------------------------- the browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@contextlib.contextmanager
def chrome(profile: Path):
    """A headless Chromium (selenium), with nothing reaching out to the network; quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=900,700",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


@needs_chromium
def test_the_page_in_headless_chromium(process_client, tmp_path):
    """Load /, upload docs/examples/bag_18.png through the file input, see the class and the overlay."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = _post_file(process_client, "/predict", EXAMPLE.read_bytes()).json()["top"][0]["label"]
    with chrome(tmp_path / "profile") as driver:
        driver.get(str(process_client.base_url))
        driver.find_element(By.ID, "file").send_keys(str(EXAMPLE))
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top .label"))
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#top .label")]
        assert labels[0] == expected and len(labels) == 5
        wait.until(
            lambda d: d.execute_script(
                "const o = document.getElementById('overlay');"
                "return o.complete && o.naturalWidth > 0 && o.src.startsWith('data:image/png');"
            )
        )
        assert "server latency" in driver.find_element(By.ID, "latency").text
        out = os.environ.get("TNT_SERVE_SCREENSHOT")
        if out:  # how docs/figures/serve_page.png is made (with a trained model)
            driver.save_screenshot(out)


def test_the_socket_sends_small_answers_at_once():
    """Nagle's algorithm off on the listening socket and on every connection it accepts: asyncio only
    sets TCP_NODELAY on sockets created with proto IPPROTO_TCP, and with Nagle on, each answer on a
    keep-alive connection after the first waited for the client's delayed ACK (~40 ms per request)."""
    import socket

    from tntvision.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        sock.listen()
        with socket.create_connection(sock.getsockname()[:2]):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
