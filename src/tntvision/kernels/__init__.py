"""Fused kernels for TNT's inner transformer, and the one place that decides when they run.

:func:`run_inner` is what a TNT block calls: the C++ op on CPU tensors (:mod:`.cpu`), the Triton op on
CUDA tensors (:mod:`.triton_op`), or the block's own modules (the reference path, which computes the same
numbers), chosen from static facts by the rules of :mod:`.rules` and the switches of :mod:`.settings`.
Both ops share one schema, fake kernel and autograd formula (:mod:`.op`). :mod:`.lean` holds the
reference path's memory-lean attention and MLP. docs/performance.md has the design and the measurements.
"""

from . import settings, rules, lean, op, cpu, triton_op, backend, inner  # noqa: I001  (the order of import)
from .backend import fused_backend, kernel_backend, kernels_info
from .cpu import (
    BF16_MODES,
    ISAS,
    LAYOUTS,
    build,
    build_directory,
    fused_available,
    kernel_dispatch,
    kernel_layout,
    kernel_options,
    set_kernel_dispatch,
)
from .inner import inner_backend, inner_op, run_inner
from .op import InnerWeights, compute_dtype, fake_gradients, output_mask, register_autograd
from .rules import DROPOUT, PLAIN_MODULES, exactly, global_hooks, plain_module
from .settings import (
    BACKENDS,
    fused_kernels,
    fused_kernels_enabled,
    kernel_backend_set,
    kernel_backend_setting,
    set_fused_kernels,
    set_kernel_backend,
)

__all__ = [
    "BACKENDS",
    "BF16_MODES",
    "DROPOUT",
    "ISAS",
    "LAYOUTS",
    "PLAIN_MODULES",
    "InnerWeights",
    "backend",
    "build",
    "build_directory",
    "compute_dtype",
    "cpu",
    "exactly",
    "fake_gradients",
    "fused_available",
    "fused_backend",
    "fused_kernels",
    "fused_kernels_enabled",
    "global_hooks",
    "inner",
    "inner_backend",
    "inner_op",
    "kernel_backend",
    "kernel_backend_set",
    "kernel_backend_setting",
    "kernel_dispatch",
    "kernel_layout",
    "kernel_options",
    "kernels_info",
    "lean",
    "op",
    "output_mask",
    "plain_module",
    "register_autograd",
    "rules",
    "run_inner",
    "set_fused_kernels",
    "set_kernel_backend",
    "set_kernel_dispatch",
    "settings",
    "triton_op",
]
