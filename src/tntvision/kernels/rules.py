"""The safety rules: when a fused op (or a shortcut that reads weights instead of calling modules) may stand
in for the user's modules.

Only when each slot holds exactly the module the op computes (its exact type: a subclass may compute
something else), with no hook of any kind, no parametrization and plain parameters. A LoRA adapter, a
quantized Linear, weight norm, another activation or a hook sends the computation back to the modules.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as nn_module
from torch.nn.utils import parametrize

__all__ = ["DROPOUT", "PLAIN_MODULES", "cached_verdict", "exactly", "global_hooks", "plain_module"]

# Exactly what the fused op computes; a subclass may override forward, so types must match exactly.
PLAIN_MODULES = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Dropout, torch.nn.Identity)
DROPOUT = (torch.nn.Dropout, torch.nn.Identity)  # a dropout slot: either computes x in eval


def global_hooks() -> bool:
    """Whether a global module hook is registered (``torch.nn.modules.module.register_module_*_hook``):
    forward, forward pre-, backward or backward pre-hooks, which must see every module call."""
    return bool(
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    )


def _hooked(mod: torch.nn.Module) -> bool:
    """A hook of the module's own: forward, forward pre-, backward (full or not) or backward pre-hook."""
    forward = mod._forward_hooks or mod._forward_pre_hooks
    return bool(forward or mod._backward_hooks or mod._backward_pre_hooks)


def _computes_its_type(mod: torch.nn.Module) -> bool:
    """No hook, no parametrization, plain parameters, and the variant of its type the shortcuts compute:
    an affine LayerNorm with a bias, the exact (erf) GELU."""
    if _hooked(mod) or parametrize.is_parametrized(mod):
        return False
    if isinstance(mod, torch.nn.GELU) and mod.approximate != "none":
        return False
    if isinstance(mod, torch.nn.LayerNorm) and (mod.weight is None or mod.bias is None):
        return False
    # a tensor-subclass weight (e.g. quantized) is not what the op reads; a trace holds fake tensors instead
    return torch.compiler.is_compiling() or all(
        type(p) is torch.nn.Parameter for p in mod._parameters.values() if p is not None
    )


def exactly(
    module: torch.nn.Module | None,
    kind: type | tuple[type, ...],
    slots: dict[str, type | tuple[type, ...]] | None = None,
) -> bool:
    """True when ``module`` is exactly of type ``kind`` (a subclass may compute something else) and holds,
    child by child, exactly the modules ``slots`` names (name -> the type(s) a shortcut computes for that
    slot; no child at all when None), each like ``module`` free of hooks (their own or global: forward,
    backward and their pre-hooks), parametrizations (``torch.nn.utils.parametrize``, weight norm) and
    tensor-subclass parameters.

    A fused op or a shortcut that reads weights instead of calling the modules may run only then:
    anything else (an ``nn.Identity`` where the GELU was, a LoRA adapter, a quantized Linear, a hook that
    inspects gradients) runs the user's modules."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if module is None or type(module) not in kinds or global_hooks() or not _computes_its_type(module):
        return False
    slots = slots or {}
    if set(module._modules) != set(slots):
        return False
    for name, child in module._modules.items():
        child_kinds = slots[name] if isinstance(slots[name], tuple) else (slots[name],)
        if child is None or type(child) not in child_kinds or child._modules:
            return False
        if not _computes_its_type(child):
            return False
    return True


def plain_module(module: torch.nn.Module, *, allowed: tuple[type, ...] = PLAIN_MODULES) -> bool:
    """True when ``module`` and every submodule are of exactly an ``allowed`` type and, like
    :func:`exactly` requires, free of hooks of any kind, parametrizations and tensor-subclass parameters.
    Checks types, not slots: to check what each slot holds, use :func:`exactly`."""
    if global_hooks():
        return False
    return all(type(mod) in allowed and _computes_its_type(mod) for mod in module.modules())


# ---------------------------------------------------------------------------------- cached verdicts


def _hooks(mod: torch.nn.Module) -> int:
    d = mod.__dict__
    return (
        len(d["_forward_hooks"])
        + len(d["_forward_pre_hooks"])
        + len(d["_backward_hooks"])
        + len(d["_backward_pre_hooks"])
    )


def cached_verdict(owner: torch.nn.Module, name: str, modules: tuple, extra: tuple, decide) -> bool:
    """``decide()``, a verdict of the rules about ``modules`` (and ``extra``, the plain values it reads),
    kept in ``owner`` under ``name`` and recomputed only when one of them may have changed: a module of
    another type in a slot (or one more or fewer), a parameter of another type or removed, a hook added or
    removed on one of them or globally, another ``extra``. Under ``torch.compile`` it is always
    recomputed (a trace evaluates it once and guards on what it read).

    Sound because every rule rejects any hook: the sum of the modules' hook counts is zero exactly when
    each count is."""
    if torch.compiler.is_compiling():
        return decide()
    key = (global_hooks(), extra, sum(_hooks(m) for m in modules if m is not None))
    # what the rules read of each module: its type and its parameters' types (NoneType for one removed)
    key += tuple((type(m), *map(type, m.__dict__["_parameters"].values())) for m in modules if m is not None)
    slot = f"_rules_{name}"
    cache = owner.__dict__.get(slot)
    if cache is not None and cache[0] == key:
        return cache[1]
    verdict = decide()
    owner.__dict__[slot] = (key, verdict)
    return verdict
