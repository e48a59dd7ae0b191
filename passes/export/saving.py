"""save: write a result in a staging folder, reload it from disk (the source imported, the weights read with
weights_only=True, the program loaded, the ONNX model run by onnxruntime), compare its outputs with the model's, and
only then put it in place."""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
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
from .files import MARKER_KEY, PROGRAM_FORMATS, SAVE_FORMATS, _safetensors, load_weights_file, refuse_overwrite
from .programs import at_batch, batch_of, eval_mode, need_onnx, root_cause, run_program, write_program

_counter = itertools.count()

# -- save: write, reload, compare --------------------------------------------------------------------------------


class Saved(list):
    """The paths `save` wrote, in order (a plain list: compare it, extend a list with it), and `notes`: one line for
    each thing about them a deployer should know (a batch fixed at the example's, and why)."""

    def __init__(self, paths=(), notes=()):
        super().__init__(paths)
        self.notes = tuple(notes)


def save(model: nn.Module, path, *, source=None, class_name: str | None = None, example_input=None,
         overwrite: bool = False) -> Saved:
    """Write `model` so that a fresh process loads it back; return the paths written (a `Saved` list with `notes`).

    path ending in .pt or .pth: the source (`emit_source`, to `source` or next to `path` with the .py suffix) and
    the class's state_dict with torch.save (tensors only: `torch.load(path, weights_only=True)` reads it).
    path ending in .safetensors: the source and the state_dict as safetensors (needs `pip install safetensors`).
    These two emit source: `model` must be an fx.GraphModule.
    path ending in .pt2: a `torch.export` program of `model` (any nn.Module) in eval mode, written with
    torch.export.save; path ending in .onnx: an ONNX model (torch.onnx.export's dynamo exporter; needs
    `pip install 'fxrf[onnx]'`). Both take dim 0 of every tensor input as a dynamic batch size where the model
    exports so; otherwise the batch is fixed at the example's and a note in the result says why. `source`, if given
    (a GraphModule only), is written as well.

    Before anything is written in place, what was written is reloaded from disk (the source imported, the
    weights read with weights_only=True and loaded strictly, the program loaded, the ONNX model run by onnxruntime)
    and its outputs on `example_input` (a tensor or tuple of tensors, a shape or tuple of shapes, or None for the
    shapes a GraphModule was traced with) compared with `model`'s, both in eval mode; a program with a dynamic batch
    is compared at a second batch size (the example's + 2) too. A difference raises SaveError and leaves the
    destination untouched. Existing files that fxrf did not write (`fxrf_wrote`) are never replaced unless
    overwrite=True.
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in SAVE_FORMATS:
        raise SaveError(f"cannot save to {path!r}: use a .pt or .safetensors (state_dict + source), .pt2 "
                        f"(torch.export) or .onnx file name")
    program = ext in PROGRAM_FORMATS
    if not isinstance(model, fx.GraphModule) and (source or not program):
        raise SaveError(f"cannot save a {type(model).__name__} to {path!r}"
                        + (f" with its source {source!r}" if program else "")
                        + ": writing source needs a torch.fx GraphModule (fxrf.trace(model, shape)); a .pt2 or "
                          ".onnx takes any nn.Module")
    if ext == ".onnx":
        need_onnx()
    source = str(source) if source else (None if program else str(Path(path).with_suffix(".py")))
    targets = [p for p in (source, path) if p]
    if len(set(map(os.path.abspath, targets))) < len(targets):
        raise SaveError(f"the source and the weights would both be written to {path!r}: give them different names")
    refuse_overwrite(targets, overwrite=overwrite, companion=source)
    xs = _example(model, example_input)
    expected = _run(model, xs, "the model")
    notes = []
    for p in targets:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".fxrf-save-") as tmp:
        staged = {p: os.path.join(tmp, f"{i}{Path(p).suffix}") for i, p in enumerate(targets)}
        if program:
            note = _write_and_check_program(model, xs, expected, staged[path], path)
            notes += [note] if note else []
            if source:  # the class alone (its weights are in the program): checked with the model's own tensors
                src, _ = _source(model, class_name)
                Path(staged[source]).write_text(src)
                cls = _load_class(staged[source], _identifier(class_name or type(model).__name__))()
                cls.load_state_dict({k: fetch_attr(model, k) for k in cls.state_dict()}, strict=True)
                _compare(expected, _run(cls.to(_device(xs)), xs, source), source)
        else:
            name = _identifier(class_name or type(model).__name__)
            src, _ = _source(model, class_name, weights=os.path.basename(path))
            Path(staged[source]).write_text(src)
            cls = _load_class(staged[source], name)()
            _write_weights(_weights_of(model, cls, path), staged[path], ext)
            try:
                cls.load_state_dict(load_weights_file(staged[path]), strict=True)
            except RuntimeError as e:
                raise SaveError(f"the saved weights do not load into the saved class {name}: "
                                f"{_first_line(e)}") from e
            _compare(expected, _run(cls.to(_device(xs)), xs, path), path)
        for p in targets:  # every check passed: move the files in place
            shutil.move(staged[p], p)
    return Saved(targets, notes)


def _write_and_check_program(model: nn.Module, xs: tuple, expected, staged: str, path: str) -> str | None:
    """Write the .pt2 or .onnx to `staged` and check it, loaded from disk, against the model: on the example and,
    when its batch is dynamic, on inputs at the example's batch + 2 (the model run on them too: a model that does not
    run there gets a fixed batch). Returns the note of write_program."""
    checks, fixed = [(xs, expected)], None
    if batch_of(xs) is not None:
        more = at_batch(xs, batch_of(xs) + 2)
        try:
            checks.append((more, _run(model, more, "the model")))
        except SaveError as e:
            fixed = f"the model does not run at batch {batch_of(more)}: {root_cause(e)}"
    onnx = staged.lower().endswith(".onnx")
    note = write_program(model, xs, staged, name=path, fixed=fixed, imports=_output_modules(expected),
                         output_names=_leaf_names(expected) if onnx else None)
    for inputs, want in checks[:1] if note else checks:
        what = f"{path} (batch {batch_of(inputs)})"
        try:
            got = run_program(staged, inputs)
        except SaveError:
            raise
        except Exception as e:
            raise SaveError(f"running the written {what} on inputs {_shapes(inputs)} failed: {type(e).__name__}: "
                            f"{_first_line(e)}; nothing was written") from e
        if onnx:  # its outputs: the tensor leaves, in order; another runtime's kernels
            _compare_leaves(want, got, what)
        else:
            _compare(want, got, what, advice="report it")
    return note


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[:2]) if text else type(e).__name__


def _example(model: nn.Module, example_input) -> tuple:
    """The inputs to compare on: those given (a tensor or tuple of tensors; a shape or tuple of shapes, drawn at
    random on the model's device) or, for a GraphModule, random ones of the shapes it was traced with."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and \
            all(isinstance(x, torch.Tensor) for x in example_input):
        return tuple(example_input)
    device = next(itertools.chain((t.device for t in model.parameters()), (t.device for t in model.buffers())),
                  torch.device("cpu"))
    if example_input is not None:
        shapes = example_input if all(isinstance(s, (tuple, list)) for s in example_input) else (example_input,)
        return tuple(torch.randn(*s, device=device) for s in shapes)
    metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"] \
        if isinstance(model, fx.GraphModule) else []
    if not metas or not all(hasattr(m, "shape") for m in metas):
        raise SaveError("save needs example_input (a tensor or a shape) to check what it writes: pass it")
    return tuple(torch.randn(*m.shape, dtype=m.dtype, device=device) if m.dtype.is_floating_point
                 else torch.zeros(*m.shape, dtype=m.dtype, device=device) for m in metas)


def _device(xs: tuple) -> torch.device:
    return next((x.device for x in xs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _shapes(xs: tuple) -> str:
    shapes = [tuple(x.shape) for x in xs if isinstance(x, torch.Tensor)]
    return str(shapes[0]) if len(shapes) == 1 else ", ".join(map(str, shapes))


def _run(model: nn.Module, xs: tuple, what: str):
    """model(*xs) in eval mode without autograd; every module's own training flag restored afterwards."""
    try:
        with eval_mode(model), torch.no_grad():
            return model(*xs)
    except Exception as e:
        raise SaveError(f"running {what} on the example input {_shapes(xs)} failed: {type(e).__name__}: "
                        f"{_first_line(e)}; nothing was written") from e


def _output_modules(out) -> list:
    """The modules that define the types in the output's structure beyond Python's and torch's own (a Hugging Face
    ModelOutput's transformers.modeling_outputs): a fresh process imports them before loading a .pt2, so that
    torch.export finds the type registered."""
    from torch.utils._pytree import tree_flatten
    found: set = set()

    def walk(spec):
        mod = getattr(spec.type, "__module__", None) if spec.type is not None else None
        if mod and mod.split(".")[0] not in ("builtins", "torch", "collections", "__main__"):
            found.add(mod)
        for c in _children(spec):
            walk(c)
    walk(tree_flatten(out)[1])
    return sorted(found)


def _leaf_names(out) -> list | None:
    """Names for an ONNX graph's outputs, one per tensor leaf: the keys of a dict or ModelOutput (`logits`), `output`
    for a lone tensor, `output_0`, `output_1` ... for a tuple; None (the exporter's names) when they would clash."""
    from torch.utils._pytree import keystr, tree_flatten_with_path
    try:
        leaves = tree_flatten_with_path(out)[0]
    except Exception:  # a container registered without key paths
        return None
    if not all(isinstance(v, torch.Tensor) for _, v in leaves):
        return None
    names = []
    for path, _ in leaves:
        parts = re.findall(r"\w+", keystr(path))
        names.append("output" if not parts else "_".join(["output", *parts] if parts[0][0].isdigit() else parts))
    return names if len(set(names)) == len(names) else None


def _compare(expected, got, what: str, advice: str = "Save a .pt2 (torch.export program) instead or report it") -> None:
    """SaveError unless `got` has `expected`'s structure and values (tight tolerance: the same ops run)."""
    from torch.utils._pytree import tree_flatten
    a, spec_a = tree_flatten(expected)
    b, spec_b = tree_flatten(got)
    if _shape_of(spec_a) != _shape_of(spec_b):
        raise SaveError(f"reloading {what} gives a {type(got).__name__} where the model returns a "
                        f"{type(expected).__name__} ({spec_b} vs {spec_a}); nothing was written")
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor):
            _same_tensor(i, u, v, what, rtol=1e-5, atol=1e-6, advice=advice)
        elif u != v:
            raise SaveError(f"reloading {what} does not reproduce the model: output {i} is {v!r}, not {u!r}; "
                            f"nothing was written")


def _compare_leaves(expected, got: list, what: str) -> None:
    """SaveError unless the tensors `got` (an ONNX model's outputs) are the tensor leaves of `expected`, in order, to
    another runtime's precision (rtol 1e-4, atol 1e-5 * (1 + max|y|))."""
    from torch.utils._pytree import tree_flatten
    want = [t for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise SaveError(f"{what} has {len(got)} outputs where the model returns {len(want)} tensors; nothing was "
                        f"written")
    for i, (u, v) in enumerate(zip(want, got)):
        _same_tensor(i, u, v, what, rtol=1e-4, atol=1e-5, advice="report it")


def _same_tensor(i: int, u: torch.Tensor, v, what: str, *, rtol: float, atol: float, advice: str) -> None:
    """SaveError unless `v` is a tensor of `u`'s shape and dtype within rtol and atol * (1 + max|u|) of it (equal for
    integer tensors)."""
    ok = isinstance(v, torch.Tensor) and u.shape == v.shape and u.dtype == v.dtype
    if ok:
        v = v.to(u.device)
        ok = (torch.allclose(u, v, rtol=rtol, atol=atol * (1 + float(u.abs().max())), equal_nan=True)
              if u.is_floating_point() and u.numel() else torch.equal(u, v))
    if not ok:
        diff = (float((u.double() - v.to(u.device).double()).abs().max()) if isinstance(v, torch.Tensor)
                and u.shape == v.shape else
                f"shape {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} vs {tuple(u.shape)}")
        raise SaveError(f"reloading {what} does not reproduce the model: output {i} differs (max abs "
                        f"difference {diff}); nothing was written. {advice}")


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
