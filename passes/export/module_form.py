"""save_module: write a result that is the user's own class (user_model.py) as that class's weights (.pt or
.safetensors) plus its structure plan (`NAME.plan.json` beside them); before anything is put in place, a copy of
the original model gets the plan from the staged file and the weights from the staged file, and must compute what
the result computes. (hints.py's `module_hint` is the one line that loads them back in a fresh process.)

    >>> import os, tempfile, torch, torch.nn as nn, fxrf
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    >>> r = fxrf.optimize(net, (1, 3, 8, 8), kernels="DW+PW")
    >>> d = tempfile.mkdtemp()
    >>> [os.path.basename(p) for p in save_module(r.model, net, r.plan, os.path.join(d, "net.pt"),
    ...                                                         example_input=(1, 3, 8, 8))]
    ['net.pt', 'net.plan.json']
    >>> back = fxrf.apply(net, os.path.join(d, "net.plan.json"))
    >>> back.load_state_dict(torch.load(os.path.join(d, "net.pt"), weights_only=True))
    <All keys matched successfully>
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn

from fxrf.errors import SaveError

from .files import load_weights_file, refuse_overwrite

__all__ = ["plan_path", "save_module"]

WEIGHT_FORMATS = (".pt", ".pth", ".safetensors")


def plan_path(path) -> str:
    """Where the structure plan of weights file `path` goes: `opt.pt` -> `opt.plan.json`."""
    return str(Path(path).with_suffix(".plan.json"))


def save_module(model: nn.Module, original: nn.Module, plan: dict, path, *, example_input=None,
                overwrite: bool = False) -> list:
    """Write `model` (the user's class, changed by the plan) as its state_dict at `path` (.pt/.pth: torch.save,
    plain tensors; .safetensors) and `plan` beside it; reload both onto a copy of `original` and compare outputs
    before putting them in place (SaveError otherwise, nothing written). Returns the paths written."""
    from fxrf.passes.user_model import apply, dumps_plan

    from .saving import _compare, _device, _example, _run, _write_weights
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in WEIGHT_FORMATS:
        raise SaveError(f"cannot write the model's weights to {path!r}: use a .pt or .safetensors file name")
    targets = [path, plan_path(path)]
    refuse_overwrite(targets, overwrite=overwrite)
    if example_input is None:
        raise SaveError("save_module needs example_input (a tensor or a shape) to check what it writes")
    x = _example(model, example_input)
    expected = _run(model, x, "the model")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".fxrf-save-") as tmp:
        staged = {p: os.path.join(tmp, f"{i}{''.join(Path(p).suffixes[-2:]) or '.x'}") for i, p in enumerate(targets)}
        sd = {k: v.detach().to("cpu" if ext == ".safetensors" else v.device).clone().contiguous()
              for k, v in model.state_dict().items()}
        _write_weights(sd, staged[path], ext)
        Path(staged[targets[1]]).write_text(dumps_plan({**plan, "weights": os.path.basename(path)}))
        back = apply(original, staged[targets[1]])  # (a copy: apply never modifies its model)
        try:
            back.load_state_dict(load_weights_file(staged[path]), strict=True)
        except RuntimeError as e:
            raise SaveError(f"the saved weights do not load into {type(original).__name__} with the plan "
                            f"applied: {str(e).splitlines()[0]}") from e
        _compare(expected, _run(back.to(_device(x)), x, path), path,
                 "report it: the plan does not rebuild this model")
        for p in targets:
            shutil.move(staged[p], p)
    return targets
