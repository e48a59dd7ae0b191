"""What a user names on the command line, loaded: the model (MODEL), its checkpoint (--weights) and input batches
(--calibrate). Problems are one-line UsageErrors (the CLI exits 2 with them).

MODEL is `torchvision:NAME` (random weights, no download), `fxrf:NAME` (the paper's models, see `fxrf models`),
`timm:NAME` (random weights; needs timm), `path/to/file.py:factory`, or `package.module:factory`; a factory is any
callable returning an nn.Module. An unknown NAME gets did-you-mean suggestions from every source.

torch is imported only inside the functions: the CLI imports this module at start-up, and `fxrf --help` does not
pay for torch.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from typing import Callable

from .errors import UsageError


def load_model(spec: str, kwargs: dict | None = None):
    """Build the model a MODEL argument names (see the module docstring), with `kwargs` for its constructor."""
    import torch.nn as nn
    factory = _factory(spec, kwargs or {})
    try:
        model = factory()
    except UsageError:
        raise
    except Exception as e:
        first = first_line(e) if str(e).strip() else ""
        raise UsageError(f"building {spec!r} failed: {type(e).__name__}: {first}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _suggest(name: str, pool, prefix: str) -> list:
    """Names of `pool` that start with `name` or look like it (difflib), as `prefix:NAME`."""
    pool = sorted(pool)
    low = name.lower()
    hits = [n for n in pool if n.lower().startswith(low)]
    hits += [n for n in difflib.get_close_matches(name, pool, n=5, cutoff=0.6) if n not in hits]
    return [f"{prefix}:{n}" for n in hits[:5]]


def _torchvision_names() -> set:
    import torchvision.models as tvm
    return set(tvm.list_models())


def _fxrf_names() -> set:
    from .models import MODELS
    return set(MODELS)


def _unknown(source: str, name: str, pool, hint: str) -> UsageError:
    """'unknown fxrf model ...; did you mean ...': the same name in another source first (torchvision:vgg16_cifar
    -> fxrf:vgg16_cifar), then names of this source that start with it or look like it, then the other sources'."""
    others = {k: f for k, f in (("torchvision", _torchvision_names), ("fxrf", _fxrf_names)) if k != source}
    pools = {k: f() for k, f in others.items()}
    close = [f"{k}:{name}" for k, names in pools.items() if name in names]
    close += [c for c in _suggest(name, pool, source) if c not in close]
    for k, names in pools.items():
        close += [c for c in _suggest(name, names, k) if c not in close]
    close = close[:5]
    return UsageError(f"unknown {source} model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                              else f"; {hint}"))


def _factory(spec: str, kwargs: dict) -> Callable:
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(f"MODEL must look like torchvision:resnet50, fxrf:vgg16_cifar, timm:resnet18, "
                         f"path/to/file.py:factory or package.module:factory, got {spec!r}")
    if source == "torchvision":
        import inspect

        import torchvision.models as tvm
        if name not in _torchvision_names():
            raise _unknown("torchvision", name, _torchvision_names(), "see torchvision.models.list_models()")
        builder = tvm.get_model_builder(name)
        extra = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:  # nothing is downloaded unless asked
            extra["weights_backbone"] = None
        return lambda: builder(**{**extra, **kwargs})
    if source == "fxrf":
        from .models import MODELS
        if name not in MODELS:
            raise _unknown("fxrf", name, MODELS, "`fxrf models` lists them")
        return lambda: MODELS[name](**kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError as e:
            raise UsageError(f"timm:{name} needs timm: pip install timm (or fxrf's `timm` extra)") from e
        names = set(timm.list_models())
        if name not in names and name.split(".")[0] not in names:
            raise _unknown("timm", name, names, "see timm.list_models()")
        return lambda: timm.create_model(name, pretrained=False, **kwargs)
    module = _import_file(source) if source.endswith(".py") else _import_module(source)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{source} has no callable {name!r}")
    return lambda: fn(**kwargs)


ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")  # colour and cursor codes (CSI, 2-byte escapes)


def plain(text: str) -> str:
    """`text` without ANSI escape codes: torch (dynamo, inductor) colours parts of its exception messages, which a
    one-line message must not carry into a log or a captured stderr."""
    return ANSI.sub("", text)


def first_line(e: BaseException) -> str:
    """An exception's message as one line of plain text: its first non-empty line, ANSI codes stripped."""
    text = plain(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _import_file(source: str):
    """Import `path/to/file.py` as `python path/to/file.py` would see it: its folder first on sys.path (so that it
    can import its sibling modules), the module in sys.modules while it runs (dataclasses and `from __future__
    import annotations` look it up there) under its own name when that is free, else under a fresh one."""
    import keyword
    if not os.path.isfile(source):
        raise UsageError(f"no such file: {source}")
    path = os.path.abspath(source)
    folder, stem = os.path.split(os.path.splitext(path)[0])
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = stem if stem.isidentifier() and not keyword.iskeyword(stem) and stem not in sys.modules else None
    if name is None:
        base = re.sub(r"\W", "_", stem)
        name = next(f"_fxrf_model_{base}_{i}" for i in range(len(sys.modules) + 1)
                    if f"_fxrf_model_{base}_{i}" not in sys.modules)
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)  # as a failed import leaves nothing behind
        raise UsageError(f"importing {source} failed: {type(e).__name__}: {first_line(e)}") from e
    return module


def _import_module(source: str):
    """Import `package.module` as `python -m` would: the current folder on sys.path (a console script has its own
    bin folder there instead)."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(source)
    except ImportError as e:
        raise UsageError(f"cannot import module {source!r}: {first_line(e)}") from e
    except Exception as e:
        raise UsageError(f"importing module {source!r} failed: {type(e).__name__}: {first_line(e)}") from e


WEIGHT_WRAPPERS = ("state_dict", "model", "model_state", "model_state_dict")  # {"state_dict": {...}, "epoch": 3}


def load_weights(model, path: str) -> None:
    """Load a state_dict checkpoint into `model`: a .safetensors file, or a torch.save file read with
    torch.load(weights_only=True) (explicitly: no pickled code runs, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says).
    A DDP `module.` prefix and one wrapper dict ({"state_dict": ...}, "model", "model_state", "model_state_dict")
    are accepted."""
    import torch

    from .errors import SaveError
    from .passes.export import load_weights_file
    if not os.path.isfile(path):
        raise UsageError(f"--weights: no such file: {path}")
    try:
        sd = load_weights_file(path)
    except SaveError as e:  # safetensors is not installed
        raise UsageError(f"--weights: {first_line(e)}") from e
    except Exception as e:
        if path.lower().endswith(".safetensors"):
            raise UsageError(f"--weights: {path} is not a safetensors file: {first_line(e)}") from e
        raise UsageError(f"--weights: {path} is not a state_dict torch.load reads with weights_only=True "
                         f"(save model.state_dict(), not the model): {first_line(e)}") from e

    def tensors(d):
        return isinstance(d, dict) and all(isinstance(v, torch.Tensor) for v in d.values())

    if isinstance(sd, dict) and not tensors(sd):
        inner = [k for k in WEIGHT_WRAPPERS if tensors(sd.get(k))]
        keys = ", ".join(map(str, list(sd)[:8])) + (", ..." if len(sd) > 8 else "")
        if len(inner) > 1:
            raise UsageError(f"--weights: {path} holds several state_dicts ({', '.join(inner)}); save the one to "
                             f"load alone")
        if not inner:
            raise UsageError(f"--weights: {path} holds a dict with keys {keys}: not a state_dict (a dict of "
                             f"tensors) nor one under {', '.join(WEIGHT_WRAPPERS)}; save model.state_dict()")
        sd = sd[inner[0]]
    if not tensors(sd):
        raise UsageError(f"--weights: {path} does not hold a state_dict (a dict of tensors), but a "
                         f"{type(sd).__name__}")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise UsageError(f"--weights: {path} does not fit the model: {lines[0] if lines else str(e).splitlines()[0]}"
                         + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "")) from e
    if missing or unexpected:
        parts = [f"{len(x)} {what} keys (e.g. {x[0]})" for what, x in (("missing", missing),
                                                                        ("unexpected", unexpected)) if x]
        raise UsageError(f"--weights: {path} does not fit the model: {', '.join(parts)}")


def load_batches(spec: str, option: str, batch_size: int = 32, labels: bool = False) -> list:
    """Input batches from a file or a factory: a .pt tensor (N, ...) or .npz array cut into batches of
    `batch_size`, or what `file.py:fn` / `package.module:fn` returns (an iterable of batches, taken as is).
    labels: a .npz's integer 'y' array (one class per input, beside 'x') too, as (input, label) batches."""
    import torch
    ext = os.path.splitext(spec)[1].lower()
    y = None
    if ext in (".pt", ".pth", ".npz", ".npy"):
        if not os.path.isfile(spec):
            raise UsageError(f"{option} {spec}: no such file")
        try:
            if ext in (".pt", ".pth"):
                x = torch.load(spec, map_location="cpu", weights_only=True)
            else:
                import numpy as np
                with np.load(spec) as z:
                    if isinstance(z, np.ndarray):
                        arr = z
                    else:
                        keys = list(z.keys())
                        if "x" not in keys and len(keys) != 1:
                            raise UsageError(f"{option} {spec}: name the inputs array 'x' (found {', '.join(keys)})")
                        arr = z["x" if "x" in keys else keys[0]]
                        if labels and "x" in keys and "y" in keys:
                            y = torch.from_numpy(np.asarray(z["y"]))
                x = torch.from_numpy(np.asarray(arr))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{option} {spec}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise UsageError(f"{option} {spec}: expected a tensor of inputs (N, ...), got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
        x = x.float() if not x.is_floating_point() else x
        if y is not None:
            if y.shape != x.shape[:1] or y.is_floating_point() or y.dtype == torch.bool:
                raise UsageError(f"{option} {spec}: 'y' must hold one integer class label per input ({len(x)}), got "
                                 f"{y.dtype} {tuple(y.shape)}")
            return list(zip(x.split(batch_size), y.long().split(batch_size)))
        return list(x.split(batch_size))
    if ":" not in spec:
        raise UsageError(f"{option} {spec}: give a .pt / .npz file of inputs, or file.py:fn returning batches")
    data = _factory(spec, {})()
    if not hasattr(data, "__iter__"):
        raise UsageError(f"{option} {spec}: the function returned {type(data).__name__}, not an iterable of batches")
    return data
