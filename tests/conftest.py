import os
import sys

import pytest
import torch

# The Triton op runs on CPU tensors only under Triton's interpreter, which must be on before Triton is
# imported (torch._dynamo imports it, and tntvision imports that): without a GPU the suite tests the GPU
# kernel that way (docs/testing.md, "The Triton op").
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import tntvision  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_report_header(config):
    """Which copy of the fused kernel this run exercises (its tests run whichever the CPU takes)."""
    from tntvision import kernels

    d = kernels.kernel_dispatch()
    if d["isa"] is None:
        return f"tntvision fused kernel: NOT BUILT ({d['error']})"
    return (
        f"tntvision fused kernel: isa={d['isa']} (this CPU can run {', '.join(d['cpu_isas'])}), "
        f"low-precision GEMMs={d['bf16']}"
    )


def need_fused_kernel() -> None:
    """Skip a test of the fused op where it cannot be built (it needs GCC or Clang with OpenMP: not MSVC,
    not Apple's clang without libomp), saying why; on Linux, CI's platform, its absence fails the test
    (TNTVISION_REQUIRE_KERNEL=0 turns that into a skip, =1 requires it anywhere)."""
    from tntvision import kernels

    if kernels.fused_available():
        return
    why = kernels.kernel_dispatch().get("error") or "not built"
    required = os.environ.get("TNTVISION_REQUIRE_KERNEL", "1" if sys.platform.startswith("linux") else "0")
    if required == "1":
        pytest.fail(f"the fused kernel must build here ({sys.platform}): {why}")
    pytest.skip(f"the fused kernel is not built on this platform ({sys.platform}): {why}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ALL_MODELS = tntvision.list_models()
SMALL_MODELS = [n for n in ALL_MODELS if n.endswith("_28")]
PYRAMID_MODELS = tntvision.list_models("ptnt_*")
TNT_MODELS = [n for n in ALL_MODELS if n not in PYRAMID_MODELS]  # isotropic: blocks, class token, fused op


def small_input_size(name: str) -> int:
    """The smallest cheap input for a model: a 2x2 patch grid for the 224 models, native for the minis."""
    model_cfg = tntvision.models.registry.get_model_entry(name).config
    if not hasattr(model_cfg, "patch_size"):  # PyramidTNT: 2x2 sentences in the last stage (one would
        return 128  # leave its relative table without a gradient: softmax over one key is constant)
    return model_cfg.img_size if model_cfg.img_size <= 32 else 2 * model_cfg.patch_size


def fewer_blocks(name: str) -> dict:
    """Constructor overrides for the per-model tests of structure and contracts (shapes, gradients,
    heads, features, torch.fx, pretrained_cfg, saving): the full-size models with fewer of their identical
    blocks, 2 for the 12-block TNTs, and PyramidTNT's four stages with 2, 1, 1, 1 (stage 0 keeps a block
    without an inner transformer). The registered depths stay tested where they matter: parameter counts
    and MACs, timm parity and checkpoints at 224 px, ``feature_info``'s levels."""
    model_cfg = tntvision.models.registry.get_model_entry(name).config
    if hasattr(model_cfg, "depths"):
        return {"depths": (2, 1, 1, 1)}
    return {"depth": 2} if model_cfg.depth > 4 else {}
