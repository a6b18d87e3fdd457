"""Soak test of `tnt serve` on 127.0.0.1: minutes of mixed, partly hostile load, then SIGTERM.

    .venv/bin/python benchmarks/serve_soak.py [--checkpoint PATH | --model NAME] [--minutes 10]
        [--clients 8] [--max-queue 64] [--max-batch 32] [--max-wait-ms 5] [--timeout 5]
        [--max-upload-mb 2] [--threads N] [--json]

Starts one `tnt serve` process and runs rounds of five phases until ``--minutes`` are spent. Throughout,
``--clients`` keep-alive clients send valid images ("steady"); each phase adds its own traffic:

- ``normal``: nothing more;
- ``cancel``: clients that send a request and close the connection before the answer (a place in the
  queue must be given back);
- ``bad``: bytes that are no image, truncated PNGs, decompression bombs, a 1 x 100,000 PNG (400 / 413);
- ``oversize``: uploads past ``--max-upload-mb``, sent whole, whose 413 must be read (not a reset);
- ``burst``: 4 x ``--max-queue`` requests at once, past the queue (200, or 503 with Retry-After, or 504).

At the end: every request answered or refused (no transport error, no hang: every request has a
client-side limit of ``--timeout`` + 30 s), the server's RSS sampled every 2 s (first round against the
last), p50 / p99 per phase, 5xx that are not expected (503 / 504 outside a burst, any other 5xx), the
queue depth back at 0, the slowest burst answer against ``--timeout`` + one batch, and a SIGTERM with
requests in flight: they are answered and the server exits 0. Prints a table and the command that made
it (``--json``: the numbers). Every loop is bounded in time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from serve_load import _cpu, start_server  # this folder is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("normal", "cancel", "bad", "oversize", "burst")
OWN = {
    "normal": "2 more",
    "cancel": "cancelling",
    "bad": "bad images",
    "oversize": "oversized",
    "burst": "4 x queue",
}


# ---------------------------------------------------------------------------------------- requests


@dataclass
class Tally:
    """What one kind of traffic got: statuses, latencies of answered requests, transport failures."""

    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)
    lost: int = 0  # no status read: reset, closed, or past the client's limit
    cancelled: int = 0  # closed by the client on purpose, before the answer
    retry_after_missing: int = 0  # 503s without a Retry-After header

    def add(self, status: int, seconds: float, headers: dict[str, str]) -> None:
        self.statuses[status] += 1
        self.latencies.append(seconds)
        if status == 503 and "retry-after" not in headers:
            self.retry_after_missing += 1


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("closed before an answer")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers


def _head(path: str, ctype: str, length: int) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {ctype}\r\nContent-Length: {length}"
    return (head + "\r\n\r\n").encode()


async def one_request(
    port: int, body: bytes, tally: Tally, limit_s: float, *, ctype: str = "image/png"
) -> None:
    """One request on a connection of its own; its status (or its loss) into ``tally``."""
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_head("/predict", ctype, len(body)) + body)
            await writer.drain()
            status, headers = await _read_answer(reader)
        tally.add(status, time.perf_counter() - started, headers)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
        tally.lost += 1
    finally:
        if writer is not None:
            writer.close()


async def keep_alive_client(port: int, image: bytes, tally: Tally, until: float, limit_s: float) -> None:
    """Valid images back to back on one connection until ``until`` (reconnecting after a failure)."""
    writer = None
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit_s):
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_head("/predict", "image/png", len(image)) + image)
                await writer.drain()
                status, headers = await _read_answer(reader)
            tally.add(status, time.perf_counter() - started, headers)
            if headers.get("connection") == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            tally.lost += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def cancelling_client(port: int, image: bytes, tally: Tally, until: float, rng: random.Random) -> None:
    """Requests whose connection is closed 0-30 ms after the body is sent, before the answer is read."""
    while time.perf_counter() < until:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_head("/predict", "image/png", len(image)) + image)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.03))
            writer.transport.abort()  # gone, as a client that gave up
            tally.cancelled += 1
        except OSError:
            tally.lost += 1
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------ inputs


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = random.Random(seed).randbytes(width * height)
    buffer = io.BytesIO()
    Image.frombytes("L", (width, height), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def bad_inputs(image: bytes) -> list[bytes]:
    """Bodies every one of which must be refused with a 4xx."""
    return [
        b"not an image at all",
        image[: len(image) // 2],  # truncated
        _bomb(20000, 20000),
        _png(1, 100_000),  # passes the pixel limit; resized for the model, it would not
        b"",
    ]


# ------------------------------------------------------------------------------------------- server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


# -------------------------------------------------------------------------------------------- phases


async def run_phase(
    phase: str,
    port: int,
    image: bytes,
    args: argparse.Namespace,
    seconds: float,
    tallies: dict[str, Tally],
    rng: random.Random,
) -> None:
    """``seconds`` of the steady clients plus this phase's own traffic."""
    limit_s = args.timeout + 30
    until = time.perf_counter() + seconds
    steady_tally = tallies[f"{phase}: steady"]
    steady = [keep_alive_client(port, image, steady_tally, until, limit_s) for _ in range(args.clients)]
    extra = []
    own = tallies[f"{phase}: {OWN[phase]}"]
    if phase == "normal":
        extra = [keep_alive_client(port, image, own, until, limit_s) for _ in range(2)]
    elif phase == "cancel":
        extra = [cancelling_client(port, image, own, until, rng) for _ in range(4)]
    elif phase == "bad":
        bodies = bad_inputs(image)

        async def bad_client() -> None:
            while time.perf_counter() < until:
                await one_request(port, rng.choice(bodies), own, limit_s)

        extra = [bad_client() for _ in range(2)]
    elif phase == "oversize":
        big = b"\0" * int(args.max_upload_mb * 2**20 * 1.5)

        async def oversize_client() -> None:
            while time.perf_counter() < until:
                await one_request(port, big, own, limit_s)

        extra = [oversize_client()]
    elif phase == "burst":

        async def bursts() -> None:
            while time.perf_counter() < until:
                await asyncio.gather(
                    *(one_request(port, image, own, limit_s) for _ in range(4 * args.max_queue))
                )
                await asyncio.sleep(1)

        extra = [bursts()]
    await asyncio.gather(*steady, *extra)


async def sigterm_with_requests_in_flight(
    proc: subprocess.Popen, port: int, image: bytes, timeout: float
) -> dict:
    """SIGTERM while 8 requests are on their way: their statuses and the exit code."""
    tally = Tally()
    flight = [asyncio.ensure_future(one_request(port, image, tally, timeout + 30)) for _ in range(8)]
    await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*flight)
    code = await asyncio.to_thread(proc.wait, 60)
    return {"exit_code": code, "in_flight": dict(tally.statuses), "lost": tally.lost}


async def soak(proc: subprocess.Popen, port: int, image: bytes, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    tallies: dict[str, Tally] = defaultdict(Tally)
    total_s = args.minutes * 60
    phase_s = min(args.phase_seconds, total_s / len(PHASES))
    rounds = max(1, math.floor(total_s / (phase_s * len(PHASES))))
    samples: list[tuple[int, float]] = []  # (round, RSS MB)
    stop_sampling = asyncio.Event()

    async def sample(current: list[int]) -> None:
        while not stop_sampling.is_set():
            samples.append((current[0], rss_mb(proc.pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 2)

    current = [0]
    sampler = asyncio.ensure_future(sample(current))
    started = time.perf_counter()
    for r in range(rounds):
        current[0] = r
        for phase in PHASES:
            await run_phase(phase, port, image, args, phase_s, tallies, rng)
    stop_sampling.set()
    await sampler
    await asyncio.sleep(args.timeout + 1)  # what the cancelled and timed-out requests left has settled
    metrics = await scrape(port)
    return {
        "rounds": rounds,
        "phase_s": phase_s,
        "wall_s": time.perf_counter() - started,
        "tallies": tallies,
        "rss": samples,
        "queue_depth_end": _metric(metrics, "tnt_serve_queue_depth"),
        "batch_p_mean_s": _metric(metrics, "tnt_serve_batch_seconds_sum")
        / max(1.0, _metric(metrics, "tnt_serve_batch_seconds_count")),
        "sigterm": await sigterm_with_requests_in_flight(proc, port, image, args.timeout),
    }


# ------------------------------------------------------------------------------------------- report


def _quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1] * 1000


EXPECTED = {  # statuses each phase's own traffic may get; anything else is counted as unexpected
    "normal": {200},
    "cancel": set(),
    "bad": {400, 413},
    "oversize": {413},
    "burst": {200, 503, 504},
}


def expected(phase: str, kind: str) -> set[int]:
    """The steady clients get 200, but a burst may fill the queue under them too (503, 504)."""
    if kind == "steady":
        return EXPECTED["burst"] if phase == "burst" else {200}
    return EXPECTED[phase]


def summarize(result: dict, args: argparse.Namespace) -> dict:
    rows = []
    for phase in PHASES:
        for kind in ("steady", OWN[phase]):
            t = result["tallies"][f"{phase}: {kind}"]
            statuses = dict(sorted(t.statuses.items()))
            allowed = expected(phase, kind)
            unexpected = sum(n for s, n in statuses.items() if s not in allowed)
            rows.append(
                {
                    "phase": phase,
                    "traffic": kind,
                    "requests": sum(statuses.values()) + t.lost + t.cancelled,
                    "statuses": statuses,
                    "cancelled": t.cancelled,
                    "lost": t.lost,
                    "unexpected": unexpected,
                    "unexpected_5xx": sum(n for s, n in statuses.items() if s >= 500 and s not in allowed),
                    "retry_after_missing": t.retry_after_missing,
                    "p50_ms": _quantile(t.latencies, 50),
                    "p99_ms": _quantile(t.latencies, 99),
                    "max_ms": max(t.latencies, default=float("nan")) * 1000,
                }
            )
    first = [mb for r, mb in result["rss"] if r == 0]
    last = [mb for r, mb in result["rss"] if r == result["rounds"] - 1]
    rss = {
        "first_round_median_mb": statistics.median(first) if first else float("nan"),
        "last_round_median_mb": statistics.median(last) if last else float("nan"),
        "max_mb": max((mb for _, mb in result["rss"]), default=float("nan")),
    }
    rss["growth_mb"] = rss["last_round_median_mb"] - rss["first_round_median_mb"]
    burst_bound_ms = 1000 * (args.timeout + result["batch_p_mean_s"]) + 1000  # + 1 s for the client side
    burst = max(r["max_ms"] for r in rows if r["phase"] == "burst")
    checks = {
        "every request answered or refused": all(r["lost"] == 0 for r in rows),
        "0 unexpected 5xx": sum(r["unexpected_5xx"] for r in rows) == 0,
        "0 unexpected statuses": sum(r["unexpected"] for r in rows) == 0,
        "every 503 has Retry-After": sum(r["retry_after_missing"] for r in rows) == 0,
        "queue depth back to 0": result["queue_depth_end"] == 0,
        "RSS flat (last round within 10% or 30 MB of the first)": rss["growth_mb"]
        <= max(30.0, 0.1 * rss["first_round_median_mb"]),
        "burst answered within --timeout + one batch (+1 s)": burst <= burst_bound_ms,
        "SIGTERM: in-flight answered, exit 0": result["sigterm"]["exit_code"] == 0
        and result["sigterm"]["lost"] == 0,
    }
    return {"rows": rows, "rss": rss, "burst_bound_ms": burst_bound_ms, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="what `tnt serve --checkpoint` takes")
    which.add_argument("--model", default="tnt_mini_patch4_28", help="a random model of this name")
    parser.add_argument("--image", default=str(ROOT / "docs" / "examples" / "bag_18.png"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--phase-seconds", type=float, default=12.0, help="each phase of a round")
    parser.add_argument("--clients", type=int, default=8, help="steady keep-alive clients")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--max-upload-mb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    command = "python benchmarks/serve_soak.py " + " ".join(sys.argv[1:])

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model"
        if not args.checkpoint:
            import tntvision

            tntvision.save_model(tntvision.create_model(args.model), checkpoint)
        image = Path(args.image).read_bytes()
        extra = ["--max-queue", str(args.max_queue), "--timeout", str(args.timeout)]
        extra += ["--max-upload-mb", str(args.max_upload_mb), "--drain-s", "30"]
        proc, _host, port = start_server(
            checkpoint,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            threads=args.threads,
            extra=extra,
        )
        try:
            result = asyncio.run(soak(proc, port, image, args))
        finally:
            if proc.poll() is None:
                proc.kill()
    summary = summarize(result, args)
    report = {
        "command": command,
        "checkpoint": args.checkpoint or f"{args.model} (random weights)",
        "cpu": _cpu(),
        "minutes": args.minutes,
        "rounds": result["rounds"],
        "phase_s": result["phase_s"],
        **summary,
        "queue_depth_end": result["queue_depth_end"],
        "sigterm": result["sigterm"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['checkpoint']}, {report['cpu']}; {result['rounds']} rounds of {len(PHASES)} phases of "
        f"{result['phase_s']:g} s; --max-queue {args.max_queue} --timeout {args.timeout:g} "
        f"--max-upload-mb {args.max_upload_mb:g}, {args.clients} steady clients"
    )
    print(
        "| phase | traffic | requests | statuses | cancelled | lost | unexpected | p50 ms | p99 ms | max ms |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in summary["rows"]:
        statuses = ", ".join(f"{s}: {n}" for s, n in r["statuses"].items()) or "-"
        print(
            f"| {r['phase']} | {r['traffic']} | {r['requests']} | {statuses} | {r['cancelled']} | "
            f"{r['lost']} | {r['unexpected']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |"
        )
    rss = summary["rss"]
    print(
        f"\nserver RSS: first round {rss['first_round_median_mb']:.1f} MB, last round "
        f"{rss['last_round_median_mb']:.1f} MB (growth {rss['growth_mb']:+.1f} MB), "
        f"max {rss['max_mb']:.1f} MB"
    )
    sig = result["sigterm"]
    print(
        f"SIGTERM with 8 requests in flight: statuses {sig['in_flight']}, lost {sig['lost']}, "
        f"exit {sig['exit_code']}"
    )
    print(f"burst bound (--timeout + mean batch + 1 s): {summary['burst_bound_ms']:.0f} ms")
    for check, ok in summary["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"\ncommand: {command}")
    if not all(summary["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
