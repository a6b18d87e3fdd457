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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(checkpoint: Path, *, max_batch: int, max_wait_ms: float, threads: int | None):
    cmd = [sys.executable, "-m", "tntvision.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the URL, once warmed up
    match = re.search(r"http://([^:/]+):(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"tnt serve did not start: {line!r}")
    return proc, match.group(1), int(match.group(2))


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


def _batches(metrics: str) -> tuple[float, float]:
    values = {}
    for name in ("tnt_serve_batch_size_count", "tnt_serve_batch_size_sum"):
        match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    return values["tnt_serve_batch_size_count"], values["tnt_serve_batch_size_sum"]


async def load(
    host: str, port: int, image: bytes, *, clients: int, seconds: float, max_requests: int
) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    before = _batches(await _get(host, port, "/metrics"))

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                t0 = time.perf_counter()
                try:
                    status, _ = await _request(reader, writer, host, "/predict", image, "image/png")
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
    after = _batches(await _get(host, port, "/metrics"))
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model"
        if not args.checkpoint:
            import tntvision

            tntvision.save_model(tntvision.create_model(args.model), checkpoint)
        image = Path(args.image).read_bytes()
        counts = [int(c) for c in args.clients.split(",")]
        rows = []
        for max_batch in [args.max_batch] + ([] if args.no_compare or args.max_batch == 1 else [1]):
            proc, host, port = start_server(
                checkpoint, max_batch=max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads
            )
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
                        )
                    )
                    rows.append({"max_batch": max_batch, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        if args.offline:
            model = _model_name(args, checkpoint)
            offline_columns(rows, model, threads=args.threads, wait_ms=args.max_wait_ms)
    result = {
        "command": command,
        "checkpoint": args.checkpoint or f"{args.model} (random weights)",
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
        "cpu": _cpu(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['checkpoint']}, --max-wait-ms {args.max_wait_ms:g}, {result['cpu']}")
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
