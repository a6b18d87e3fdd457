"""Load test of `tnt serve` on 127.0.0.1: requests/s, latency percentiles, mean batch size, errors.

    .venv/bin/python benchmarks/serve_load.py [--checkpoint PATH | --model NAME] [--clients 1,8,32,128]
        [--seconds 10] [--max-requests 20000] [--max-batch 32] [--max-wait-ms 5] [--threads N] [--json]

Starts one `tnt serve` process per setting (batching on: ``--max-batch``; off: ``--max-batch 1``), warms
it up, then for every client count runs that many clients for ``--seconds`` (or until
``--max-requests`` answers), each POSTing the same image (raw ``image/png`` bytes) on a keep-alive
connection and sending the next one as soon as the answer is in. The mean batch size comes from the
server's own ``tnt_serve_batch_size`` histogram, scraped before and after. ``--model`` serves a random
model of that name (speed does not depend on the weights). The client is a plain asyncio HTTP/1.1 loop so
that it costs the two cores little next to the server. Prints a markdown table.

``--server litserve`` runs the same model, preprocessing and answer under LitServe instead
(``benchmarks/litserve_app.py``, started with ``--litserve-python``, an interpreter that has ``litserve``;
it is not a dependency of tntvision): the comparison docs/serving.md reports. LitServe decodes JSON or
forms only, so ``--body multipart`` (the image as the form field ``file``, which `tnt serve` takes too)
is what both servers should get in that comparison; its mean batch size comes from a log its worker writes.
Both servers run on uvicorn[standard] (httptools and uvloop): the script checks that each interpreter has
them and records their versions; LitServe is told to use them, `tnt serve` picks them (uvicorn's "auto").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    checkpoint: Path, *, max_batch: int, max_wait_ms: float, threads: int | None, extra: Sequence[str] = ()
):
    """`tnt serve` on a free port of 127.0.0.1 (``extra``: more flags); returns once it has warmed up."""
    cmd = [sys.executable, "-m", "tntvision.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the URL, once warmed up
    match = re.search(r"http://([^:/]+):(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"tnt serve did not start: {line!r}")
    return proc, match.group(1), int(match.group(2))


def uvicorn_standard(python: str) -> str:
    """The versions of uvicorn, httptools and uvloop in ``python``'s environment; exits if one is missing
    (both servers of a comparison must run on uvicorn[standard])."""
    code = "import uvicorn, httptools, uvloop\nfor m in (uvicorn, httptools, uvloop): print(m.__version__)"
    found = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"{python} lacks uvicorn[standard] (httptools, uvloop): {found.stderr.strip()}")
    uvicorn, httptools, uvloop = found.stdout.split()
    return f"uvicorn {uvicorn}, httptools {httptools}, uvloop {uvloop}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_litserve(
    checkpoint: Path, *, max_batch: int, max_wait_ms: float, threads: int | None, python: str, batch_log: Path
):
    """benchmarks/litserve_app.py on a free port; returns once its /health answers 200 (model warmed up)."""
    port = _free_port()
    cmd = [python, str(ROOT / "benchmarks" / "litserve_app.py"), "--checkpoint", str(checkpoint)]
    cmd += ["--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    cmd += ["--batch-log", str(batch_log)] + (["--threads", str(threads)] if threads else [])
    # its own process group: LitServe's worker processes are stopped with it (see main)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the LitServe app exited with {proc.returncode}")
        try:
            if asyncio.run(_get("127.0.0.1", port, "/health")).strip() == "ok":
                return proc, "127.0.0.1", port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the LitServe app did not become healthy in 180 s")


def multipart(image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with the image as the field ``file``, and its content type."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body += image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _request(reader, writer, host: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


async def _get(host: str, port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


async def metrics_batches(host: str, port: int) -> tuple[float, float]:
    """(batches run, images in them) so far, from `tnt serve`'s /metrics."""
    return _batches(await _get(host, port, "/metrics"))


def log_batches(path: Path) -> Callable[[], Awaitable[tuple[float, float]]]:
    """(batches run, images in them) so far, from the LitServe app's batch log."""

    async def read() -> tuple[float, float]:
        sizes = [int(v) for v in path.read_text().split()] if path.exists() else []
        return float(len(sizes)), float(sum(sizes))

    return read


def _batches(metrics: str) -> tuple[float, float]:
    values = {}
    for name in ("tnt_serve_batch_size_count", "tnt_serve_batch_size_sum"):
        match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    return values["tnt_serve_batch_size_count"], values["tnt_serve_batch_size_sum"]


async def load(
    host: str,
    port: int,
    image: bytes,
    *,
    clients: int,
    seconds: float,
    max_requests: int,
    ctype: str = "image/png",
    batches: Callable[[], Awaitable[tuple[float, float]]] | None = None,
) -> dict:
    latencies: list[float] = []
    errors = 0
    batches = batches or (lambda: metrics_batches(host, port))
    deadline = time.perf_counter() + seconds
    before = await batches()

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                t0 = time.perf_counter()
                try:
                    status, _ = await _request(reader, writer, host, "/predict", image, ctype)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    after = await batches()
    batches, images = after[0] - before[0], after[1] - before[1]
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
        "mean_batch": images / batches if batches else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="what `tnt serve --checkpoint` takes")
    which.add_argument("--model", default="tnt_mini_patch4_28", help="a random model of this name")
    parser.add_argument("--image", default=str(ROOT / "docs" / "examples" / "bag_18.png"))
    parser.add_argument("--clients", default="1,8,32,128", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="per row")
    parser.add_argument("--max-requests", type=int, default=20000, help="per row")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compare", action="store_true", help="skip the --max-batch 1 run")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="also time the model offline (tnt bench's inference, same threads) at each row's mean batch: "
        "served / offline images/s, and p99 against 2 x (max wait + one batch's compute)",
    )
    parser.add_argument("--server", choices=("tnt", "litserve"), default="tnt", help="what serves the model")
    parser.add_argument("--body", choices=("raw", "multipart"), default="raw", help="how the image is sent")
    parser.add_argument("--litserve-python", default=sys.executable, help="an interpreter with litserve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.server == "litserve" and args.body != "multipart":
        parser.error("LitServe reads forms, not raw bodies: use --body multipart")
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    stack = uvicorn_standard(args.litserve_python if args.server == "litserve" else sys.executable)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model"
        if not args.checkpoint:
            import tntvision

            tntvision.save_model(tntvision.create_model(args.model), checkpoint)
        image, ctype = Path(args.image).read_bytes(), "image/png"
        if args.body == "multipart":
            image, ctype = multipart(image)
        counts = [int(c) for c in args.clients.split(",")]
        rows = []
        for max_batch in [args.max_batch] + ([] if args.no_compare or args.max_batch == 1 else [1]):
            batch_log = Path(tmp) / f"batches_{max_batch}.txt"
            if args.server == "litserve":
                proc, host, port = start_litserve(
                    checkpoint,
                    max_batch=max_batch,
                    max_wait_ms=args.max_wait_ms,
                    threads=args.threads,
                    python=args.litserve_python,
                    batch_log=batch_log,
                )
                batches = log_batches(batch_log)
            else:
                proc, host, port = start_server(
                    checkpoint, max_batch=max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads
                )
                batches = None
            try:
                for clients in counts:
                    row = asyncio.run(
                        load(
                            host,
                            port,
                            image,
                            clients=clients,
                            seconds=args.seconds,
                            max_requests=args.max_requests,
                            ctype=ctype,
                            batches=batches,
                        )
                    )
                    rows.append({"server": args.server, "body": args.body, "max_batch": max_batch, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                if args.server == "litserve":
                    with contextlib.suppress(ProcessLookupError):  # workers that outlive the main process
                        os.killpg(proc.pid, signal.SIGKILL)
        if args.offline:
            model = _model_name(args, checkpoint)
            offline_columns(rows, model, threads=args.threads, wait_ms=args.max_wait_ms)
    result = {
        "command": command,
        "checkpoint": args.checkpoint or f"{args.model} (random weights)",
        "server": args.server,
        "body": args.body,
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
        "cpu": _cpu(),
        "http": stack,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['checkpoint']}, server {args.server}, body {args.body}, "
        f"--max-wait-ms {args.max_wait_ms:g}, {result['cpu']}, {stack}"
    )
    extra = " offline img/s | served / offline | p99 bound ms |" if args.offline else ""
    head = "| --max-batch | clients | requests/s | p50 ms | p95 ms | p99 ms | mean batch | requests | errors"
    head += " |"
    print(head + extra)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.offline else ""))
    for r in rows:
        line = (
            f"| {r['max_batch']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['requests']} | "
            f"{r['errors']} |"
        )
        if args.offline:
            line += f" {r['offline_img_per_s']:.1f} | {r['served_over_offline']:.2f} |"
            line += f" {r['p99_bound_ms']:.1f} |"
        print(line)
    print(f"\ncommand: {command}")


def _model_name(args: argparse.Namespace, checkpoint: Path) -> str:
    if not args.checkpoint:
        return args.model
    import tntvision

    return tntvision.load_model(checkpoint).model_name


def offline_columns(rows: list[dict], model: str, *, threads: int | None, wait_ms: float) -> None:
    """Offline images/s of ``model`` at each row's mean batch (rounded; ``tnt bench`` inference, random
    weights, same threads), served / offline, and the p99 bound 2 x (max wait + one batch's compute)."""
    from tntvision.tools.bench import bench_model

    cache: dict[int, dict] = {}
    for r in rows:
        batch = max(1, round(r["mean_batch"])) if r["mean_batch"] == r["mean_batch"] else 1
        if batch not in cache:
            res = bench_model(
                model_name=model,
                batch_size=batch,
                rounds=10,
                warmup=3,
                memory=False,
                threads=threads,
                workloads=("inference",),
            )
            cache[batch] = res["inference"]["per_impl"]["ours"]
        s = cache[batch]
        r["offline_batch"] = batch
        r["offline_img_per_s"] = s["img_per_s"]
        r["served_over_offline"] = r["requests_per_s"] / s["img_per_s"]
        r["p99_bound_ms"] = 2 * (wait_ms + s["median_ms"])


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
