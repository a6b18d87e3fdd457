"""The model side of `tnt serve`: decoding uploads, dynamic batching on one inference thread, explanations.

An :class:`Engine` owns a model that :func:`tntvision.tools.checkpoints.load_checkpoint` returned (a PyTorch
model or an exported ``.onnx`` / ``.pt2`` file, the loader `tnt predict`, `eval` and `bench` use). Work
is split three ways:

- decoding and preprocessing (:meth:`Engine.preprocess`) run on whatever thread calls them: the web app
  hands them to its thread pool, so they overlap with inference;
- inference runs on one thread of its own (:meth:`Engine.start`): it warms the model up (first forward,
  fused kernel built), then takes requests from a queue and runs those that arrive within ``max_wait_ms``
  of the first one as one batch of at most ``max_batch``; a full batch runs at once;
- :meth:`Engine.explain` (class-token attention) runs on the caller's thread, under the same lock as the
  batches, because recording attention switches the model's attention modules to an explicit softmax.

Callers on an event loop await :meth:`Engine.infer`, which never blocks the loop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import eval_transform, open_image
from ..errors import ConfigError, DataError
from ..tools.predict import Prediction, class_labels, prepare_model, top_k
from ..utils.devices import non_blocking

__all__ = ["DEFAULT_MAX_PIXELS", "Engine", "EngineConfig", "Unavailable", "attention_overlay"]

DEFAULT_MAX_PIXELS = 40_000_000  # about 6300 x 6300; a 20000 x 20000 "bomb" declares 400 M


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`Engine` batches and what it accepts.

    Attributes:
        max_batch: images per forward pass, at most.
        max_wait_ms: how long the first request of a batch waits for others (0: run what is queued).
        max_pixels: the largest image (width x height, from its header) that is decoded.
        dtype: the dtype weights and images are held in (``torch.bfloat16``: PyTorch checkpoints only).
        device: where batches run (a GPU: PyTorch checkpoints only; explanations stay on the CPU).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")
        if self.max_pixels < 1:
            raise ConfigError(f"the pixel limit must be positive, got {self.max_pixels}")


class _Upload(io.BytesIO):
    """Uploaded bytes; Pillow's messages name a file object by its repr, so it reads 'upload'."""

    def __repr__(self) -> str:
        return "'upload'"


@dataclass
class _Job:
    image: torch.Tensor  # (C, H, W), preprocessed
    future: concurrent.futures.Future


class Unavailable(RuntimeError):
    """The engine cannot run requests: not started, or its warm-up failed."""


_STOP = None  # put on the queue by Engine.stop(): the inference thread finishes what is queued and ends


class Engine:
    """A loaded model behind a batching queue; see the module docstring.

    Args:
        model: what ``load_checkpoint`` returned (``.meta``, ``.num_classes``, optionally
            ``.class_names``, ``.model_name``, ``.runtime``).
        config: batching and limits.
        on_batch: called on the inference thread with the size and the seconds of every batch run
            (an attribute too: the web app sets it to its metrics).
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
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()  # one forward at a time: batches and explanations
        self._pending = 0  # images handed to infer() and not answered yet
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the first forward has run
        self.failure: BaseException | None = None  # why warm-up failed, if it did

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the inference thread: warm-up first, then batches. Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="tnt-serve-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then end the inference thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def queue_depth(self) -> int:
        """Images handed to :meth:`infer` and not answered yet: queued, gathered into a batch, or running."""
        with self._pending_lock:
            return self._pending

    # ------------------------------------------------------------------------------------- inputs

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes -> the model's input (C, H, W), as `tnt predict` preprocesses a file.

        Raises:
            DataError: empty, not an image, truncated, or declaring more than ``max_pixels`` pixels.
        """
        if not data:
            raise DataError("the upload is empty: send an image file")
        image = open_image(_Upload(data), max_pixels=self.config.max_pixels, name="upload")
        return self.transform(image)

    # ---------------------------------------------------------------------------------- inference

    async def infer(self, image: torch.Tensor) -> torch.Tensor:
        """The logits (classes,) of one preprocessed image, computed in the next batch."""
        if self.failure is not None:
            raise Unavailable(f"the model failed to warm up ({self.failure})")
        if self._thread is None:
            raise Unavailable("the model is not started")
        job = _Job(image=image, future=concurrent.futures.Future())
        with self._pending_lock:
            self._pending += 1
        job.future.add_done_callback(self._answered)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _answered(self, _future: concurrent.futures.Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def predictions(self, logits: torch.Tensor, k: int, names: list[str]) -> list[Prediction]:
        """Top-``k`` of logits (b, classes), one :class:`Prediction` per row, as `tnt predict` ranks them."""
        return top_k(logits, self.labels, k, names)

    def _serve(self) -> None:
        try:
            self._warm_up()
        except Exception as e:  # health stays 503 and says why; requests fail with the same reason
            self.failure = e
            self._fail_queued(e)
            return
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            jobs, stop = batch
            if jobs:
                self._run(jobs)
            if stop:
                break

    @torch.inference_mode()
    def _warm_up(self) -> None:
        x = torch.zeros(1, *self.meta.input_size, dtype=self.config.dtype, device=self.config.device)
        with self._lock:
            self._model(x)

    def _next_batch(self) -> tuple[list[_Job], bool] | None:
        """Block for a first job, then gather more until the batch is full or ``max_wait_ms`` passed.

        Returns (jobs, stop after them), or None when the queue held only the stop marker.
        """
        first = self._queue.get()
        if first is _STOP:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while len(jobs) < self.config.max_batch:
            try:
                remaining = deadline - time.monotonic()
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            x = torch.stack([job.image for job in jobs])  # (b, C, H, W)
            x = x.to(self.config.device, self.config.dtype, non_blocking=self._copy_async)
            with self._lock:
                logits = self._model(x).float().cpu()  # (b, classes)
        except Exception as e:  # a bug or a runtime failure: every request of the batch gets it
            for job in jobs:
                job.future.set_exception(e)
            return
        for job, row in zip(jobs, logits, strict=True):
            job.future.set_result(row)
        if self.on_batch is not None:
            self.on_batch(len(jobs), time.perf_counter() - started)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job.future.set_exception(error)

    # -------------------------------------------------------------------------------- explanation

    @torch.inference_mode()
    def explain(self, image: torch.Tensor, k: int) -> dict:
        """The class-token attention of the last block over the patches, for one preprocessed image.

        The map `tnt visualize` draws in ``cls_attention.png`` (mean over heads), as numbers on the patch
        grid and as a PNG of the model's input with the map laid over it (``overlay``, a data URL).
        Blocking: call it off the event loop. Only for PyTorch TNT models (:attr:`can_explain`).
        """
        from ..tools.visualize import capture

        last = len(self._source.blocks) - 1
        with self._lock:
            cap = capture(self._source, image.unsqueeze(0).float(), blocks=[last])
        gh, gw = cap.grid
        heat = cap.attn_out[last].mean(0)[0, 1:].reshape(gh, gw).numpy()  # (gh, gw): class token's row
        (prediction,) = self.predictions(cap.probs.log()[None], k, ["upload"])  # softmax(log p) = p
        png = attention_overlay(cap.image, heat)
        return {
            "top": prediction.to_dict()["top"],
            "block": last + 1,
            "grid": [gh, gw],
            "attention": heat.tolist(),
            "overlay": "data:image/png;base64," + base64.b64encode(png).decode(),
        }


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
