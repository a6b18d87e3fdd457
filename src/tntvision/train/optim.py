"""Optimizers of a training run: torch's AdamW, or torch's Muon on the weight matrices and AdamW on the rest.

Muon (``torch.optim.Muon``) orthogonalises the momentum of each 2-D weight matrix with a few bf16
Newton-Schulz steps. It is meant for the hidden matrices only, so :class:`MuonAdamW` gives it every 2-D
weight but the classifier head's, and leaves the word-embedding convolution, norms, biases, class token and
position tables to AdamW. With ``adjust_lr_fn="match_rms_adamw"`` Muon's update has AdamW's RMS, so one
learning rate and one weight decay serve both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["MuonAdamW", "build_optimizer", "param_groups", "split_muon_params"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only; none on norms, biases, class token, tables."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def split_muon_params(model: nn.Module) -> list[nn.Parameter]:
    """Muon's parameters: the 2-D weight matrices, except the classifier head's and any table the model
    keeps out of weight decay (``no_weight_decay``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and p.ndim == 2 and id(p) not in head_ids and name not in skip
    ]


class MuonAdamW:
    """Muon on the hidden weight matrices, AdamW on everything else, stepped together.

    Behaves as one optimizer for the training loop, the learning-rate schedule (``param_groups`` lists
    both optimizers' groups), gradient scaling and checkpoints (``state_dict`` holds both).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, lr: float, fused: bool) -> None:
        muon_params = split_muon_params(model)
        muon_ids = {id(p) for p in muon_params}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
            for g in param_groups(model, cfg.weight_decay)
        ]
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
        self.muon = torch.optim.Muon(
            muon_params,
            lr=lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # read through each time: load_state_dict gives the inner optimizers new group dicts
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, lr: float, device: torch.device
) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer ``cfg.name`` names, at learning rate ``lr`` (the schedule changes it per step)."""
    fused = cfg.fused and device.type in ("cpu", "cuda")
    if cfg.name == "muon":
        return MuonAdamW(model, cfg, lr=lr, fused=fused)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused
    )
