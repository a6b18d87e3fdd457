import pytest
import torch

import tntvision


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ALL_MODELS = tntvision.list_models()
SMALL_MODELS = [n for n in ALL_MODELS if n.endswith("_28")]


def small_input_size(name: str) -> int:
    """The smallest cheap input for a model: a 2x2 patch grid for the 224 models, native for the minis."""
    model_cfg = tntvision.models.registry.get_model_entry(name).config
    return model_cfg.img_size if model_cfg.img_size <= 32 else 2 * model_cfg.patch_size
