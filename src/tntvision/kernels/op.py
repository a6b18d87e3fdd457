"""What the inner-transformer ops take and give, shared by the C++ op and the Triton op.

Both ops have one schema: ``(x, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w,
fc1_b, fc2_w, fc2_b, attn_scale, mlp_scale, num_heads, eps, <precision>)``, words ``x`` (S, m, c) in and out.
:class:`InnerWeights` is that list of parameters as one named structure, read off a block; the fake
kernel checks shapes with ``torch._check``; the autograd formula (:func:`register_autograd`) saves the
inputs by name, recomputes in backward and asks the backward op only for the gradients autograd needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "InnerWeights",
    "check_inputs",
    "compute_dtype",
    "fake_gradients",
    "output_mask",
    "register_autograd",
]

# The gradients the backward op returns come in groups (the words, then each module's parameters), and its
# output_mask says which groups to compute.
GROUPS = {
    "x": ("x",),
    "ln1": ("ln1_w", "ln1_b"),
    "qkv": ("qk_w", "qk_b", "v_w", "v_b"),
    "proj": ("proj_w", "proj_b"),
    "ln2": ("ln2_w", "ln2_b"),
    "fc1": ("fc1_w", "fc1_b"),
    "fc2": ("fc2_w", "fc2_b"),
}
EVERY_GRADIENT = (True,) * len(GROUPS)


@dataclass(frozen=True)
class InnerWeights:
    """The inner transformer's parameters as the ops take them (q and k stacked in ``qk_w``, as in TNT's
    checkpoints). ``qk_b`` and ``v_b`` are both present or both None."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qk_w: torch.Tensor
    qk_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor

    @classmethod
    def of(cls, block: nn.Module) -> InnerWeights:
        """The weights of a block's ``norm_in``, ``attn_in`` (``qk``, ``v``, ``proj``), ``norm_mlp_in``
        and ``mlp_in`` (``fc1``, ``fc2``)."""
        attn, mlp, ln1, ln2 = block.attn_in, block.mlp_in, block.norm_in, block.norm_mlp_in
        return cls(ln1.weight, ln1.bias, attn.qk.weight, attn.qk.bias, attn.v.weight, attn.v.bias,
                   attn.proj.weight, attn.proj.bias, ln2.weight, ln2.bias, mlp.fc1.weight, mlp.fc1.bias,
                   mlp.fc2.weight, mlp.fc2.bias)  # fmt: skip

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The parameters by their names in the ops' schema."""
        return {name: getattr(self, name) for name in PARAMS}


PARAMS = tuple(f.name for f in dataclasses.fields(InnerWeights))
INPUTS = ("x", *PARAMS, "attn_scale", "mlp_scale")  # the tensor inputs, in schema order
SCALARS = ("num_heads", "eps")  # then the precision option, whose name differs between the two ops


def check_inputs(x: torch.Tensor, w: dict[str, torch.Tensor | None], num_heads: int) -> None:
    """``torch._check`` that the inputs fit one another (what the real ops also check): words (S, m, c),
    parameters of an inner transformer of width c, per-sentence scales (S,)."""
    torch._check(x.dim() == 3, lambda: f"words must be (S, m, c), got {tuple(x.shape)}")
    S, c = x.shape[0], x.shape[2]
    hidden = w["fc1_w"].shape[0]
    torch._check(c % num_heads == 0, lambda: f"{num_heads} heads do not divide the width {c}")
    shapes = {"ln1_w": (c,), "ln1_b": (c,), "qk_w": (2 * c, c), "qk_b": (2 * c,), "v_w": (c, c),
              "v_b": (c,), "proj_w": (c, c), "proj_b": (c,), "ln2_w": (c,), "ln2_b": (c,),
              "fc1_w": (hidden, c), "fc1_b": (hidden,), "fc2_w": (c, hidden), "fc2_b": (c,),
              "attn_scale": (S,), "mlp_scale": (S,)}  # fmt: skip
    for name, shape in shapes.items():
        t = w.get(name)
        if t is not None:
            torch._check(
                tuple(t.shape) == shape, lambda n=name, t=t, s=shape: f"{n}: {tuple(t.shape)}, not {s}"
            )
    torch._check((w["qk_b"] is None) == (w["v_b"] is None), lambda: "qk_b and v_b: both or neither")


def output_mask(needs_input_grad: tuple[bool, ...]) -> list[bool]:
    """The backward op's ``output_mask`` from autograd's ``needs_input_grad`` over the op's inputs: a group
    (the words, or one module's weight and bias) is computed when any of its tensors needs a gradient."""
    needs = dict(zip(INPUTS, needs_input_grad, strict=False))
    return [any(needs[name] for name in group) for group in GROUPS.values()]


def fake_gradients(x: torch.Tensor, tensors, mask) -> list[torch.Tensor]:
    """What a backward op returns, as fake tensors: for ``x`` and each parameter (``tensors``, in schema
    order) a contiguous gradient of its shape and dtype; what ``mask`` does not ask for, or an absent bias,
    an empty fp32 tensor, as from the real ops."""
    asked = {name: m for m, group in zip(mask, GROUPS.values(), strict=True) for name in group}
    return [
        t.new_empty(t.shape) if t is not None and asked[name] else x.new_empty((0,), dtype=torch.float32)
        for name, t in zip(("x", *PARAMS), tensors, strict=True)
    ]


def register_autograd(op: str, backward_op) -> None:
    """The autograd formula of an inner-transformer op (``op``, the forward's qualified name) whose backward
    is ``backward_op(grad, <the forward's inputs>, output_mask)``: saves the inputs, recomputes the forward
    in backward and asks only for the gradients autograd needs."""

    def setup_context(ctx, inputs, output):
        named = dict(zip(INPUTS, inputs, strict=False))
        ctx.present = {name: t is not None for name, t in named.items()}
        ctx.save_for_backward(*(t for t in named.values() if t is not None))
        ctx.options = inputs[len(INPUTS) :]  # num_heads, eps and the precision option

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        named = {name: next(saved) if present else None for name, present in ctx.present.items()}
        grads = backward_op(grad, *named.values(), *ctx.options, output_mask(ctx.needs_input_grad))
        needs = dict(zip(INPUTS, ctx.needs_input_grad, strict=False))
        # a gradient for x and each parameter that needs one (an unasked group came back empty); none for
        # the drop-path scales and the options
        out = [g if needs[name] and named[name] is not None else None
               for name, g in zip(("x", *PARAMS), grads, strict=True)]  # fmt: skip
        return (*out, None, None, *(None for _ in ctx.options))

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_cpu_op_kernels() -> None:
    """Fake kernels (shape checks, for tracing) and the autograd formula of the C++ ops, once they load."""

    @torch.library.register_fake("tntvision::inner_transformer")
    def _fake_forward(x, *args):
        check_inputs(x, dict(zip(INPUTS[1:], args, strict=False)), args[len(INPUTS) - 1])
        return x.new_empty(x.shape)  # contiguous, as the op's output (whatever x's strides)

    @torch.library.register_fake("tntvision::inner_transformer_backward")
    def _fake_backward(grad, x, *args):
        named = dict(zip(INPUTS[1:], args, strict=False))
        check_inputs(x, named, args[len(INPUTS) - 1])
        torch._check(grad.shape == x.shape, lambda: f"grad is {tuple(grad.shape)}, words {tuple(x.shape)}")
        mask = args[len(INPUTS) + 2] if len(args) > len(INPUTS) + 2 else EVERY_GRADIENT
        return fake_gradients(x, [x, *(named[p] for p in PARAMS)], mask)

    register_autograd("tntvision::inner_transformer", torch.ops.tntvision.inner_transformer_backward)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision of the fused op's products for words ``x``: bf16 / fp16 words, else the autocast
    dtype of x's device when autocast is on there, else fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return autocast if autocast in (torch.bfloat16, torch.float16) else torch.float32
