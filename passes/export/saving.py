"""save: write a result in a staging folder, reload it from disk (the source imported, the weights read with
weights_only=True, or the program loaded), compare its outputs with the model's, and only then put it in place;
load_hint, the one line that loads it back."""
from __future__ import annotations

import importlib.util
import itertools
import keyword
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import SaveError

from ..util import fetch_attr
from .emit import _children, _identifier, _source
from .files import MARKER_KEY, SAVE_FORMATS, _safetensors, load_weights_file, refuse_overwrite

_counter = itertools.count()

# -- save: write, reload, compare --------------------------------------------------------------------------------


def save(gm: fx.GraphModule, path, *, source=None, class_name: str | None = None, example_input=None,
         overwrite: bool = False) -> list:
    """Write `gm` so that a fresh process loads it back with plain torch; return the paths written.

    path ending in .pt or .pth: the source (`emit_source`, to `source` or next to `path` with the .py suffix) and
    the class's state_dict with torch.save (tensors only: `torch.load(path, weights_only=True)` reads it).
    path ending in .safetensors: the source and the state_dict as safetensors (needs `pip install safetensors`).
    path ending in .pt2: a `torch.export` program of `gm` in eval mode, written with torch.export.save; `source`,
    if given, is written as well.

    Before anything is written in place, what was written is reloaded from disk (the source imported, the
    weights read with weights_only=True and loaded strictly, or the program loaded) and its outputs on
    `example_input` (a tensor, a shape, or None for the shape `gm` was traced with) compared with `gm`'s, both in
    eval mode: a difference raises SaveError and leaves the destination untouched. Existing files that fxrf did not
    write (`fxrf_wrote`) are never replaced unless overwrite=True.
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in SAVE_FORMATS:
        raise SaveError(f"cannot save to {path!r}: use a .pt or .safetensors (state_dict + source) or .pt2 "
                        f"(torch.export) file name")
    source = str(source) if source else (None if ext == ".pt2" else str(Path(path).with_suffix(".py")))
    targets = [p for p in (source, path) if p]
    if len(set(map(os.path.abspath, targets))) < len(targets):
        raise SaveError(f"the source and the weights would both be written to {path!r}: give them different names")
    refuse_overwrite(targets, overwrite=overwrite, companion=source)
    x = _example(gm, example_input)
    expected = _run(gm, x, "the model")
    for p in targets:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".fxrf-save-") as tmp:
        staged = {p: os.path.join(tmp, f"{i}{Path(p).suffix}") for i, p in enumerate(targets)}
        if ext == ".pt2":
            _write_program(gm, x, staged[path])
            _compare(expected, _run(torch.export.load(staged[path]).module(), x, path), path)
            if source:  # the class alone (its weights are in the program): checked with gm's own tensors
                src, _ = _source(gm, class_name)
                Path(staged[source]).write_text(src)
                model = _load_class(staged[source], _identifier(class_name or type(gm).__name__))()
                model.load_state_dict({k: fetch_attr(gm, k) for k in model.state_dict()}, strict=True)
                _compare(expected, _run(model.to(x.device), x, source), source)
        else:
            name = _identifier(class_name or type(gm).__name__)
            src, _ = _source(gm, class_name, weights=os.path.basename(path))
            Path(staged[source]).write_text(src)
            model = _load_class(staged[source], name)()
            _write_weights(_weights_of(gm, model, path), staged[path], ext)
            try:
                model.load_state_dict(load_weights_file(staged[path]), strict=True)
            except RuntimeError as e:
                raise SaveError(f"the saved weights do not load into the saved class {name}: "
                                f"{_first_line(e)}") from e
            _compare(expected, _run(model.to(x.device), x, path), path)
        for p in targets:  # every check passed: move the files in place
            shutil.move(staged[p], p)
    return targets


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[:2]) if text else type(e).__name__


def _example(gm: fx.GraphModule, example_input):
    """The input to compare on: the one given (a tensor or a shape) or a random one of the traced shape."""
    if isinstance(example_input, torch.Tensor):
        return example_input
    device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
    if example_input is not None:
        return torch.randn(*example_input, device=device)
    metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"]
    if len(metas) != 1 or metas[0] is None or not hasattr(metas[0], "shape"):
        raise SaveError("save needs example_input (a tensor or a shape) to check what it writes: pass it")
    m = metas[0]
    if m.dtype.is_floating_point:
        return torch.randn(*m.shape, dtype=m.dtype, device=device)
    return torch.zeros(*m.shape, dtype=m.dtype, device=device)


def _run(model: nn.Module, x, what: str):
    """model(x) in eval mode without autograd; every module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # (not model.eval(): a torch.export module refuses it; its ATen calls carry the mode)
        m.training = False
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        raise SaveError(f"running {what} on the example input {tuple(x.shape)} failed: {type(e).__name__}: "
                        f"{_first_line(e)}; nothing was written") from e
    finally:
        for m, training in modes:
            m.training = training


def _compare(expected, got, what: str) -> None:
    """SaveError unless `got` has `expected`'s structure and values (tight tolerance: the same ops run)."""
    from torch.utils._pytree import tree_flatten
    a, spec_a = tree_flatten(expected)
    b, spec_b = tree_flatten(got)
    if _shape_of(spec_a) != _shape_of(spec_b):
        raise SaveError(f"reloading {what} gives a {type(got).__name__} where the model returns a "
                        f"{type(expected).__name__} ({spec_b} vs {spec_a}); nothing was written")
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor):
            ok = (isinstance(v, torch.Tensor) and u.shape == v.shape and u.dtype == v.dtype
                  and (torch.allclose(u, v.to(u.device), rtol=1e-5, atol=1e-6 * (1 + float(u.abs().max())),
                                      equal_nan=True) if u.is_floating_point() and u.numel() else torch.equal(u, v.to(u.device))))
            if not ok:
                diff = (float((u.double() - v.to(u.device).double()).abs().max()) if isinstance(v, torch.Tensor)
                        and u.shape == v.shape else "shape")
                raise SaveError(f"reloading {what} does not reproduce the model: output {i} differs (max abs "
                                f"difference {diff}); nothing was written. Save a .pt2 (torch.export program) instead "
                                f"or report it")
        elif u != v:
            raise SaveError(f"reloading {what} does not reproduce the model: output {i} is {v!r}, not {u!r}; "
                            f"nothing was written")


def _shape_of(spec):
    """A TreeSpec as nested (type, context, children), fx's immutable containers read as the plain ones."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list
    t = {immutable_dict: dict, immutable_list: list}.get(spec.type, spec.type)
    return None if spec.is_leaf() else (t, spec.context, [_shape_of(c) for c in _children(spec)])


def _load_class(source: str, name: str) -> type:
    """Import the written source from disk under a fresh module name and return its class."""
    mod_name = f"_fxrf_saved_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(mod_name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # as a real import would (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SaveError(f"the written source does not import: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.modules.pop(mod_name, None)
    return getattr(module, name)


def _weights_of(gm: fx.GraphModule, model: nn.Module, path: str) -> dict:
    """The values of exactly the class's state-dict keys, from `gm`: no key the class lacks (an unused
    num_batches_tracked, the second name of a tied weight), every non-persistent buffer the class declares
    persistent."""
    out = {}
    for k in model.state_dict():
        try:
            t = fetch_attr(gm, k)
        except AttributeError as e:
            raise SaveError(f"the saved class has {k!r}, which the graph module lacks; cannot write {path}") from e
        out[k] = t.detach().to("cpu" if path.lower().endswith(".safetensors") else t.device).clone().contiguous()
    return out


def _write_weights(sd: dict, path: str, ext: str) -> None:
    if ext == ".safetensors":
        _safetensors().save_file(sd, path, metadata={MARKER_KEY: "written by fxrf.passes.export"})
    else:
        torch.save(sd, path)


def _write_program(gm: fx.GraphModule, x, path: str) -> None:
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()  # a deployable program: batch norms use their running statistics, dropout is off
    try:
        program = torch.export.export(gm, (x,))
    except Exception as e:
        raise SaveError(f"torch.export cannot export the result: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        for m, training in modes:
            m.training = training
    torch.export.save(program, path, extra_files={MARKER_KEY: "written by fxrf.passes.export"})


def load_hint(paths, class_name: str) -> str:
    """One line of Python that loads what `save` wrote (the first .pt2, else the source and the state_dict)."""
    paths = [str(p) for p in paths]
    program = next((p for p in paths if p.lower().endswith(".pt2")), None)
    if program is not None:
        return f'import torch; model = torch.export.load("{program}").module()'
    source = next(p for p in paths if p.endswith(".py"))
    weights = next(p for p in paths if not p.endswith(".py"))
    folder, stem = os.path.split(os.path.splitext(source)[0])
    name = _identifier(class_name)
    if stem.isidentifier() and not keyword.iskeyword(stem):
        where = f'import sys; sys.path.insert(0, "{folder}"); ' if folder else ""
        get = f"from {stem} import {name}; "
    else:  # not importable by name: load the file by path
        where = ""
        get = (f'import importlib.util as u; s = u.spec_from_file_location("m", "{source}"); '
               f'mod = u.module_from_spec(s); s.loader.exec_module(mod); {name} = mod.{name}; ')
    if weights.lower().endswith(".safetensors"):
        return (f'import torch; from safetensors.torch import load_file; {where}{get}model = {name}(); '
                f'model.load_state_dict(load_file("{weights}"))')
    return f'import torch; {where}{get}model = {name}(); model.load_state_dict(torch.load("{weights}"))'
