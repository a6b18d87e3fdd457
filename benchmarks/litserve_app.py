"""The LitServe side of the serving comparison: the same model, preprocessing and answer as `tnt serve`,
batched by LitServe instead of our batcher. Not part of the library (LitServe is not a dependency); run by
``benchmarks/serve_load.py --server litserve`` in an environment that has ``litserve`` installed:

    python benchmarks/litserve_app.py --checkpoint PATH --port PORT [--max-batch 32] [--max-wait-ms 5]
        [--threads N] [--batch-log FILE]

``POST /predict`` takes a multipart form with the image in the field ``file`` (LitServe decodes JSON or
forms, not raw bodies) and answers ``{"top": [...], "model": ...}`` like `tnt serve`. Each batch's size is
appended to ``--batch-log`` (the worker runs in another process; the load script reads the file to get the
mean batch size).
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch

from tntvision.data import eval_transform, open_image
from tntvision.serve.engine import _Upload
from tntvision.tools.checkpoints import open_model
from tntvision.tools.predict import class_labels, prepare_model, top_k


class TNTAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, threads: int | None, batch_log: str | None, **kw) -> None:
        super().__init__(**kw)
        self.checkpoint, self.threads, self.batch_log = checkpoint, threads, batch_log

    def setup(self, device: str) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        model = open_model(self.checkpoint)
        self.labels = class_labels(model)
        self.name = str(getattr(model, "model_name", type(model).__name__))
        self.transform = eval_transform(model.meta)
        self.model = prepare_model(model)
        self.log = open(self.batch_log, "a", buffering=1) if self.batch_log else None  # noqa: SIM115
        with torch.inference_mode():  # warm up as `tnt serve` does before it reports healthy
            self.model(torch.zeros(1, *model.meta.input_size))

    def decode_request(self, request) -> torch.Tensor:
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return self.transform(open_image(_Upload(data), name="upload"))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)  # (b, C, H, W)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.log is not None:
            self.log.write(f"{x.shape[0] if x.dim() == 4 else 1}\n")
        return self.model(x if x.dim() == 4 else x[None]).float()  # (b, classes)

    def unbatch(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(logits[:, None])  # b x (1, classes)

    def encode_response(self, logits: torch.Tensor) -> dict:
        logits = logits if logits.dim() == 2 else logits[None]
        p = top_k(logits, self.labels, 5, ["upload"])[0]
        top = [
            {"label": lab, "index": i, "prob": pr}
            for lab, i, pr in zip(p.labels, p.indices, p.probs, strict=True)
        ]
        return {"top": top, "model": self.name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-log", default=None)
    args = p.parse_args()
    api = TNTAPI(
        args.checkpoint,
        args.threads,
        args.batch_log,
        max_batch_size=args.max_batch,
        batch_timeout=args.max_wait_ms / 1000,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    # uvicorn[standard]'s parser and event loop, as `tnt serve` picks them (uvicorn's "auto"): the comparison
    # is of the serving cores, not of h11 against httptools
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
