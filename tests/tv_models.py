"""Building torchvision classification models cheaply (meta device, no weights) at their usual input size."""
from __future__ import annotations

import contextlib
import warnings

import torch
import torchvision.models as tvm
from torchvision.models import get_model, get_model_weights, list_models


def classification_models() -> list[str]:
    return sorted(list_models(module=tvm))


@contextlib.contextmanager
def _regnet_params_on_cpu():
    """RegNet computes its block widths with tensor ops and .tolist(): do that on the CPU, not on meta."""
    from torchvision.models import regnet
    orig = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return orig(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = classmethod(orig)


def build(name: str, device: str = "meta"):
    with warnings.catch_warnings(), _regnet_params_on_cpu(), torch.device(device):
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = get_model(name, **kwargs)
    return model.eval()


def input_size(name: str, model) -> int:
    size = getattr(model, "image_size", None)  # ViTs are built for one size
    if size is None:
        size = get_model_weights(name).DEFAULT.transforms().crop_size[0]
    return int(size)
