import pytest
import torch

import tntvision


def pytest_report_header(config):
    """Which copy of the fused kernel this run exercises (its tests run whichever the CPU takes)."""
    from tntvision.models import kernels

    d = kernels.kernel_dispatch()
    if d["isa"] is None:
        return f"tntvision fused kernel: NOT BUILT ({d['error']})"
    return (
        f"tntvision fused kernel: isa={d['isa']} (this CPU can run {', '.join(d['cpu_isas'])}), "
        f"low-precision GEMMs={d['bf16']}"
    )


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
