"""The model side of `tnt serve`: decoding uploads, a bounded queue, dynamic batching and explanations on
one inference thread.

An :class:`Engine` owns a model that :func:`tntvision.tools.checkpoints.open_model` returned (a PyTorch
model or an exported ``.onnx`` / ``.pt2`` file, the loader `tnt predict`, `eval` and `bench` use). Work
is split three ways:

- decoding and preprocessing (:meth:`Engine.preprocess`) run on whatever thread calls them: the web app
  hands them to its thread pool, so they overlap with inference;
- every forward pass runs on one thread of its own (:meth:`Engine.start`): it warms the model up (first
  forward, fused kernel built), then takes work from a queue: images that arrive within ``max_wait_ms``
  of the first one run as one batch of at most ``max_batch`` (a full batch runs at once), and an
  explanation (class-token attention, :meth:`Engine.explain`) runs alone, never twice in a row while
  images wait, so explanations cannot starve batches;
- callers on an event loop await :meth:`Engine.infer` / :meth:`Engine.explain`, which never block the loop.

Nothing is lost: a request is admitted only while fewer than ``max_queue`` images wait or run
(:class:`Overloaded` otherwise, with a hint of when to retry); one whose deadline passes gets
:class:`DeadlineExceeded` and, if its batch has not started, is never computed; a caller that gives up
(its task cancelled: a client that disconnected) frees its place at once. A cancelled or expired request
cannot stop the inference thread; if that thread ever ends for another reason, every waiting request is
answered with :class:`Unavailable` and :attr:`Engine.alive` turns false.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import eval_transform, open_image
from ..errors import ConfigError, DataError, ImageTooLargeError
from ..tools.predict import Prediction, class_labels, prepare_model, top_k
from ..utils.devices import non_blocking

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DeadlineExceeded",
    "Engine",
    "EngineConfig",
    "Overloaded",
    "Unavailable",
    "attention_overlay",
]

DEFAULT_MAX_PIXELS = 40_000_000  # about 6300 x 6300; a 20000 x 20000 "bomb" declares 400 M


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`Engine` batches, how much it holds, and what it accepts.

    Attributes:
        max_batch: images per forward pass, at most.
        max_wait_ms: how long the first request of a batch waits for others (0: run what is queued).
        max_queue: images admitted and not answered yet (waiting, or in the running batch), at most;
            explanations count as one image each. Past it requests are refused (:class:`Overloaded`).
        timeout_s: a request's deadline, from its arrival (None: no deadline).
        max_pixels: the largest image that is decoded (width x height, from its header), and the largest
            it may become when its short side is resized for the model (which bounds the long side).
        dtype: the dtype weights and images are held in (``torch.bfloat16``: PyTorch checkpoints only).
        device: where batches run (a GPU: PyTorch checkpoints only; explanations stay on the CPU).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float | None = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be positive, got {self.max_pixels}")


class _Upload(io.BytesIO):
    """Uploaded bytes; Pillow's messages name a file object by its repr, so it reads 'upload'."""

    def __repr__(self) -> str:
        return "'upload'"


class Unavailable(RuntimeError):
    """The engine cannot run requests: not started, warming up, shutting down, or its thread ended."""


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after_s`` is when the queue should have room again (whole seconds)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its answer was computed."""


@dataclass(eq=False)
class _Job:
    image: torch.Tensor  # (C, H, W), preprocessed
    deadline: float | None  # time.monotonic() after which the answer is no longer wanted
    topk: int = 0  # explanations only: how many classes the answer lists
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True)
class Explanation:
    """What the inference thread computes for :meth:`Engine.explain` (the overlay is drawn elsewhere)."""

    prediction: Prediction
    block: int  # 1-based, the last block
    heat: np.ndarray  # (gh, gw) class token's attention over the patches, mean of heads
    image: np.ndarray  # (H, W, C) in [0, 1], the model's input


class _Queue:
    """Images and explanations waiting for the inference thread, and the count of those not answered.

    Thread-safe. A job leaves its deque when the inference thread takes it or when its future is
    cancelled (the place is freed at once, the tensor dropped); ``pending`` counts admitted jobs whose
    futures are not done.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cond = threading.Condition()
        self.images: deque[_Job] = deque()
        self.explains: deque[_Job] = deque()
        self.pending = 0
        self.closed = False

    def admit(self, jobs: Sequence[_Job], kind: deque[_Job], retry_after: Callable[[int], int]) -> None:
        """Queue ``jobs`` together or not at all.

        Raises:
            Unavailable: the queue is closed (the server is shutting down).
            Overloaded: fewer than ``len(jobs)`` places are free.
        """
        with self.cond:
            if self.closed:
                raise Unavailable("the server is shutting down")
            if self.pending + len(jobs) > self.limit:
                raise Overloaded(
                    f"the server is busy ({self.pending} images queued, at most {self.limit}): retry later",
                    retry_after(self.pending),
                )
            self.pending += len(jobs)
            kind.extend(jobs)
            self.cond.notify_all()
        for job in jobs:  # after admission: a callback of a future already done runs at once
            job.future.add_done_callback(lambda _f, job=job, kind=kind: self._settled(job, kind))

    def _settled(self, job: _Job, kind: deque[_Job]) -> None:
        with self.cond:
            self.pending -= 1
            if job.future.cancelled():
                with contextlib.suppress(ValueError):  # still waiting: its place and its tensor go now
                    kind.remove(job)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drain(self) -> list[_Job]:
        """Every waiting job, removed (when the inference thread ends)."""
        with self.cond:
            jobs = [*self.images, *self.explains]
            self.images.clear()
            self.explains.clear()
            return jobs


def _settle(
    future: concurrent.futures.Future, result: object = None, error: BaseException | None = None
) -> None:
    """Resolve ``future`` unless it is already done (cancelled by its caller): never raises."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Engine:
    """A loaded model behind a bounded batching queue; see the module docstring.

    Args:
        model: what ``open_model`` returned (``.meta``, ``.num_classes``, optionally
            ``.class_names``, ``.model_name``, ``.runtime``).
        config: batching, queue and limits.
        on_batch: called on the inference thread with the size and the seconds of every batch run
            (an attribute too: the web app sets it to its metrics). What it raises is ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig | None = None,
        *,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        exported = next(model.parameters(), None) is None
        if exported and self.config.dtype != torch.float32:
            raise ConfigError("an exported .onnx / .pt2 file runs in float32: leave --dtype out")
        if exported and self.config.device.type != "cpu":
            raise ConfigError("an exported .onnx / .pt2 file runs on the CPU: leave --device out")
        self.labels = class_labels(model)
        self.meta = model.meta
        self.model_name = str(getattr(model, "model_name", None) or type(model).__name__)
        self.runtime = str(getattr(model, "runtime", "torch"))
        self.transform = eval_transform(model.meta)
        # Attention is drawn from the model as loaded (float32, on the CPU); batches run in --dtype on
        # --device (a copy if either differs).
        self._source = model.eval()
        self._model = prepare_model(model, device=self.config.device, dtype=self.config.dtype)
        self._copy_async = non_blocking(self.config.device)
        self.can_explain = not exported and hasattr(model, "blocks")  # isotropic TNT: a class token
        self.on_batch = on_batch
        self._queue = _Queue(self.config.max_queue)
        self._batch_s = 0.0  # running mean of a batch's seconds, for Retry-After
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the first forward has run
        self.failure: BaseException | None = None  # why warm-up failed or the inference thread ended

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the inference thread: warm-up first, then the queue. Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="tnt-serve-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new work, run what is queued, then end the inference thread."""
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False once the inference thread has failed (warm-up or later); true while it starts or runs."""
        return self.failure is None

    def queue_depth(self) -> int:
        """Images handed to :meth:`infer` (and explanations) not answered yet: queued, or running."""
        return self._queue.pending

    # ------------------------------------------------------------------------------------- inputs

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes -> the model's input (C, H, W), as `tnt predict` preprocesses a file.

        Raises:
            DataError: empty, not an image, or truncated.
            ImageTooLargeError: more than ``max_pixels`` pixels declared, or as many once its short side
                is resized for the model (an extreme aspect ratio: 1 x 100,000 pixels would become
                tens of gigabytes).
        """
        if not data:
            raise DataError("the upload is empty: send an image file")
        image = open_image(_Upload(data), max_pixels=self.config.max_pixels, name="upload")
        short, long = sorted(image.size)
        side = self.meta.resize_size
        if short * side == 0 or side * (long * side // short) > self.config.max_pixels:
            raise ImageTooLargeError(
                f"upload: the image is {image.size[0]}x{image.size[1]} pixels: resized to a short side of "
                f"{side} for the model it would exceed the limit of {self.config.max_pixels:,} pixels "
                "(its aspect ratio is too extreme)"
            )
        return self.transform(image)

    # ---------------------------------------------------------------------------------- inference

    def _deadline(self, deadline: float | None) -> float | None:
        if deadline is not None or self.config.timeout_s is None:
            return deadline
        return time.monotonic() + self.config.timeout_s

    def _check_running(self) -> None:
        if self.failure is not None:
            raise Unavailable(f"the model cannot run ({self.failure})")
        if self._thread is None:
            raise Unavailable("the model is not started")

    def _retry_after(self, pending: int) -> int:
        """Whole seconds until the queue ahead of a new request should have run (at least 1)."""
        return max(1, math.ceil(pending / self.config.max_batch * self._batch_s))

    async def infer(self, image: torch.Tensor, *, deadline: float | None = None) -> torch.Tensor:
        """The logits (classes,) of one preprocessed image, computed in the next batch.

        ``deadline`` is a ``time.monotonic()`` time (default: ``timeout_s`` from now).

        Raises:
            Overloaded, DeadlineExceeded, Unavailable: see the module docstring.
        """
        (row,) = await self.infer_many([image], deadline=deadline)
        return row

    async def infer_many(
        self, images: Sequence[torch.Tensor], *, deadline: float | None = None
    ) -> list[torch.Tensor]:
        """The logits of several images, admitted together (all or none) and answered together."""
        self._check_running()
        deadline = self._deadline(deadline)
        jobs = [_Job(image=x, deadline=deadline) for x in images]
        self._queue.admit(jobs, self._queue.images, self._retry_after)
        return await _wait([job.future for job in jobs], deadline)

    async def explain(self, image: torch.Tensor, k: int, *, deadline: float | None = None) -> dict:
        """The class-token attention of the last block over the patches, for one preprocessed image.

        The map `tnt visualize` draws in ``cls_attention.png`` (mean over heads), as numbers on the patch
        grid and as a PNG of the model's input with the map laid over it (``overlay``, a data URL, drawn
        in a worker thread). Queued like an image (it takes one place); runs on the inference thread,
        never twice in a row while images wait. Only for PyTorch TNT models (:attr:`can_explain`).
        """
        self._check_running()
        deadline = self._deadline(deadline)
        job = _Job(image=image, deadline=deadline, topk=k)
        self._queue.admit([job], self._queue.explains, self._retry_after)
        (result,) = await _wait([job.future], deadline)
        png = await asyncio.to_thread(attention_overlay, result.image, result.heat)
        return {
            "top": result.prediction.to_dict()["top"],
            "block": result.block,
            "grid": list(result.heat.shape),
            "attention": result.heat.tolist(),
            "overlay": "data:image/png;base64," + base64.b64encode(png).decode(),
        }

    def predictions(self, logits: torch.Tensor, k: int, names: list[str]) -> list[Prediction]:
        """Top-``k`` of logits (b, classes), one :class:`Prediction` per row, as `tnt predict` ranks them."""
        return top_k(logits, self.labels, k, names)

    # ---------------------------------------------------------------------------- inference thread

    def _serve(self) -> None:
        try:
            self._warm_up()
        except Exception as e:  # readiness stays 503 and says why; the server exits
            self._fail(e)
            return
        self.ready.set()
        try:
            self._loop()
        except BaseException as e:  # whatever ends the thread, nobody may wait forever
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self.ready.clear()
        self._queue.close()
        for job in self._queue.drain():
            if job.future.set_running_or_notify_cancel():
                _settle(job.future, error=Unavailable(f"the model cannot run ({error})"))

    @torch.inference_mode()
    def _warm_up(self) -> None:
        x = torch.zeros(1, *self.meta.input_size, dtype=self.config.dtype, device=self.config.device)
        self._model(x)

    def _loop(self) -> None:
        """Batches and explanations until the queue is closed and empty; an explanation runs when one
        waits and either no image waits or the last turn was a batch."""
        queue = self._queue
        last_was_batch = True
        while True:
            with queue.cond:
                while not (queue.images or queue.explains or queue.closed):
                    queue.cond.wait()
                if not (queue.images or queue.explains):
                    return  # closed and empty
                explain = bool(queue.explains) and (not queue.images or last_was_batch)
                job = queue.explains.popleft() if explain else None
            if job is not None:
                if self._start(job, time.monotonic()):
                    self._run_explain(job)
                last_was_batch = False
            else:
                jobs = self._next_batch()
                if jobs:
                    self._run(jobs)
                last_was_batch = True

    def _start(self, job: _Job, now: float) -> bool:
        """Mark ``job`` running (its caller can no longer cancel it); False if it was cancelled or its
        deadline has passed (then it is answered with :class:`DeadlineExceeded`, not computed)."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.deadline is not None and job.deadline <= now:
            _settle(job.future, error=DeadlineExceeded("the request's deadline passed while it was queued"))
            return False
        return True

    def _next_batch(self) -> list[_Job]:
        """Take images until the batch has ``max_batch`` or ``max_wait_ms`` passed since the first was
        taken (at once when the queue is closed); cancelled and expired ones are dropped."""
        queue = self._queue
        jobs: list[_Job] = []
        wait_until = time.monotonic() + self.config.max_wait_ms / 1000
        with queue.cond:
            while True:
                now = time.monotonic()
                while queue.images and len(jobs) < self.config.max_batch:
                    job = queue.images.popleft()
                    if self._start(job, now):
                        jobs.append(job)
                remaining = wait_until - now
                if len(jobs) >= self.config.max_batch or queue.closed or remaining <= 0 or not jobs:
                    return jobs
                queue.cond.wait(remaining)

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            x = torch.stack([job.image for job in jobs])  # (b, C, H, W)
            x = x.to(self.config.device, self.config.dtype, non_blocking=self._copy_async)
            logits = self._model(x).float().cpu()  # (b, classes)
        except Exception as e:  # a bug or a runtime failure: every request of the batch gets it
            for job in jobs:
                _settle(job.future, error=e)
            return
        seconds = time.perf_counter() - started
        for job, row in zip(jobs, logits, strict=True):
            _settle(job.future, row)
        self._batch_s = seconds if self._batch_s == 0 else 0.9 * self._batch_s + 0.1 * seconds
        if self.on_batch is not None:
            with contextlib.suppress(Exception):  # metrics must not stop inference
                self.on_batch(len(jobs), seconds)

    @torch.inference_mode()
    def _run_explain(self, job: _Job) -> None:
        from ..tools.visualize import capture

        try:
            last = len(self._source.blocks) - 1
            cap = capture(self._source, job.image.unsqueeze(0).float(), blocks=[last])
            gh, gw = cap.grid
            heat = cap.attn_out[last].mean(0)[0, 1:].reshape(gh, gw).numpy()  # (gh, gw): class token's row
            (prediction,) = self.predictions(
                cap.probs.log()[None], job.topk, ["upload"]
            )  # softmax(log p) = p
        except Exception as e:  # the request gets it, the thread goes on
            _settle(job.future, error=e)
            return
        _settle(job.future, Explanation(prediction=prediction, block=last + 1, heat=heat, image=cap.image))


async def _wait(futures: list[concurrent.futures.Future], deadline: float | None) -> list:
    """The results of ``futures``, awaited until ``deadline``; on any failure, timeout or cancellation
    the others are cancelled (those not started are never computed)."""
    waits = [asyncio.wrap_future(f) for f in futures]
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*waits))
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed before its answer was computed") from None
    finally:
        for w in waits:
            w.cancel()


def attention_overlay(image: np.ndarray, heat: np.ndarray, *, side: int = 320, alpha: float = 0.6) -> bytes:
    """PNG bytes of ``image`` (H, W, C) in [0, 1] with ``heat`` (gh, gw) over it, as `tnt visualize` draws.

    Nearest-neighbour upscaling to about ``side`` pixels (patches stay square blocks), the inferno map
    scaled from the smallest to the largest weight shown, blended with weight ``alpha``.
    """
    from matplotlib import colormaps

    H, W = image.shape[:2]
    scale = max(1, side // max(H, W))
    size = (W * scale, H * scale)
    span = max(float(heat.max() - heat.min()), 1e-6)
    colours = colormaps["inferno"]((heat - heat.min()) / span)[..., :3]  # (gh, gw, 3) in [0, 1]
    nearest = Image.Resampling.NEAREST
    heat_img = Image.fromarray((colours * 255).round().astype(np.uint8)).resize(size, nearest)
    pixels = (image * 255).round().astype(np.uint8)
    base = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).convert("RGB")
    out = Image.blend(base.resize(size, nearest), heat_img, alpha)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
