"""load_hint: the one line of Python that loads what `save` wrote in a fresh process, read from the files themselves
(the modules a .pt2's output type needs, an .onnx's input names and shapes). A source is imported by its path under a
module name made from that path, so two results in two folders, both `opt.py`, load side by side in one process."""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

from .emit import _identifier
from .files import IMPORTS_KEY


def load_hint(paths, class_name: str) -> str:
    """One line of Python that loads what `save` wrote: the first .pt2, else the first .onnx, else the source and the
    state_dict (the class named `class_name`), as `model` in eval mode (an onnxruntime session `sess` for an .onnx,
    with the call that runs it in a comment)."""
    paths = [str(p) for p in paths]
    program = next((p for p in paths if p.lower().endswith(".pt2")), None)
    if program is not None:
        imports = "".join(f"import {m}; " for m in _program_imports(program))  # registers the output type
        return f"import torch; {imports}model = torch.export.load({_q(program)}).module()"
    onnx_file = next((p for p in paths if p.lower().endswith(".onnx")), None)
    if onnx_file is not None:
        return _onnx_hint(onnx_file)
    source = next(p for p in paths if p.endswith(".py"))
    weights = next(p for p in paths if not p.endswith(".py"))
    name = _identifier(class_name)
    load = (f"import importlib.util as iu, sys, torch; spec = iu.spec_from_file_location({_q(module_name(source))}, "
            f"{_q(source)}); mod = sys.modules.setdefault(spec.name, iu.module_from_spec(spec)); "
            f"spec.loader.exec_module(mod); model = mod.{name}(); ")
    if weights.lower().endswith(".safetensors"):
        return (f"{load}from safetensors.torch import load_file; model.load_state_dict(load_file({_q(weights)})); "
                f"model.eval()")
    return f"{load}model.load_state_dict(torch.load({_q(weights)})); model.eval()"


def module_hint(paths, build: str, imports: str = "") -> str:
    """One line that loads what module_form.save_module wrote (the user's class: weights + structure plan): `build`
    is the expression that builds the original model (e.g. `torchvision.models.resnet50()`), `imports` what it
    needs imported (e.g. "fxrf.sources")."""
    weights = next(p for p in paths if not p.endswith(".plan.json"))
    plan = next(p for p in paths if p.endswith(".plan.json"))
    head = f"import torch, fxrf{', ' + imports if imports else ''}; "
    load = f"torch.load({_q(weights)}, weights_only=True)"
    if weights.lower().endswith(".safetensors"):
        head, load = f"{head}from safetensors.torch import load_file; ", f"load_file({_q(weights)})"
    return f"{head}model = fxrf.apply({build}, {_q(plan)}); model.load_state_dict({load}); model.eval()"


def module_name(source: str) -> str:
    """The module name a hint imports `source` as: its stem and a digest of its absolute path (two `opt.py` in two
    folders get two names; the same file always the same one)."""
    stem = re.sub(r"\W", "_", Path(source).stem)
    digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:12]
    return f"fxrf_{stem}_{digest}"


def _q(text: str) -> str:
    """A Python string literal of `text` (a path with backslashes or quotes stays right)."""
    return json.dumps(str(text), ensure_ascii=False)


def _program_imports(path: str) -> list:
    """The modules save recorded in a .pt2 (its extra file IMPORTS_KEY), none if it has no such record."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(f"/extra/{IMPORTS_KEY}")), None)
            text = z.read(name).decode() if name else ""
    except (OSError, zipfile.BadZipFile):
        return []
    return [m for m in text.split() if re.fullmatch(r"[A-Za-z_][\w.]*", m)]


def _onnx_hint(path: str) -> str:
    """Open the session; how to call it in a comment (the line runs as pasted): the graph's input names with their
    dtype and shape, and its outputs (read from the file; the first input's name from the session when the onnx
    package is not there)."""
    head = f"import onnxruntime as ort; sess = ort.InferenceSession({_q(path)})"
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
        graph = onnx.load(path, load_external_data=False).graph
        inputs = [(i.name, tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
                   tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)) for i in graph.input]
        outputs = [o.name for o in graph.output]
    except Exception:  # no onnx package, or a file it cannot read
        return f"{head}  # outputs = sess.run(None, {{sess.get_inputs()[0].name: x}}) with x a numpy array"
    args = ", ".join(f"{_q(n)}: {_arg(n, k)}" for k, (n, _, _) in enumerate(inputs))
    shapes = ", ".join(f"{_arg(n, k)} a {dtype} numpy array of shape ({', '.join(map(str, shape))})"
                       for k, (n, dtype, shape) in enumerate(inputs))
    return f"{head}  # outputs = sess.run(None, {{{args}}}) with {shapes}; outputs: [{', '.join(outputs)}]"


def _arg(name: str, k: int) -> str:
    """The variable a hint passes for input k: x, x1, x2 ..."""
    return f"x{k}" if k else "x"
