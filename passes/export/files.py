"""Which files `save` writes and which of them fxrf may replace: the formats, the mark every written file carries,
the refusal to overwrite anything else, reading a weights file back (safetensors or torch.load with
weights_only=True), and the optional packages the formats need."""
from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import torch

from fxrf.errors import SaveError

# state_dict + source (torch.save, torch.save, safetensors); a torch.export program; an ONNX model
SAVE_FORMATS = (".pt", ".pth", ".safetensors", ".pt2", ".onnx")
PROGRAM_FORMATS = (".pt2", ".onnx")  # one file holding architecture and weights: any nn.Module can be written so
MARKER = "# fxrf-generated"  # the first line of every source fxrf writes: fxrf may overwrite such a file
MARKER_KEY = "fxrf"  # the same mark in a .safetensors file's / .onnx model's metadata and a .pt2 archive's extra files
IMPORTS_KEY = "fxrf_imports"  # a .pt2's extra file naming the modules that define its output type (load_hint's)
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx's exporter needs the first two; the check the third
ONNX_INSTALL = "pip install 'fxrf[onnx]'"


def missing_onnx_packages() -> list:
    """The packages of ONNX_PACKAGES that are not installed (found without importing them)."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise SaveError("reading or writing .safetensors needs the safetensors package: pip install safetensors") from e
    return safetensors.torch


def load_weights_file(path: str) -> dict:
    """A state dict from `path`: safetensors for .safetensors, else torch.load(weights_only=True) explicitly, so that
    no pickle code runs whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
    if str(path).lower().endswith(".safetensors"):
        return _safetensors().load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# -- which files fxrf wrote ---------------------------------------------------------------------------------------


def fxrf_wrote(path: str, companion: str | None = None) -> bool:
    """Whether the existing file `path` is one fxrf wrote (and may therefore overwrite):
    a .py whose first line starts with MARKER; a .pt2 holding the extra file `fxrf`; a .safetensors or .onnx whose
    metadata has the key `fxrf` (an .onnx is read with the onnx package: without it, none is fxrf's); a .pt/.pth
    whose companion source (`companion`, default the .py beside it) starts with MARKER and names it as its weights,
    or whose structure plan beside it (`NAME.plan.json`, the user's class's form) names it (torch.save files carry
    no metadata of their own); a .plan.json that is a structure plan."""
    path = str(path)
    ext = Path(path).suffix.lower()
    try:
        if ext == ".py":
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.readline().startswith(MARKER)
        if ext == ".pt2":
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(f"/extra/{MARKER_KEY}") for n in z.namelist())
        if ext == ".safetensors":
            with open(path, "rb") as fh:  # the header: 8 bytes of length, then JSON with "__metadata__"
                n = int.from_bytes(fh.read(8), "little")
                head = json.loads(fh.read(n)) if 0 < n < 100_000_000 else {}
            return MARKER_KEY in (head.get("__metadata__") or {})
        if ext == ".onnx":
            if importlib.util.find_spec("onnx") is None:
                return False
            import onnx
            try:
                props = onnx.load(path, load_external_data=False).metadata_props
            except Exception:  # not a protobuf at all (onnx raises protobuf's DecodeError, not a ValueError)
                return False
            return any(p.key == MARKER_KEY for p in props)
        if path.lower().endswith(".plan.json"):  # a structure plan (module_form.py)
            return "fxrf_plan" in _json_object(path)
        plan = _json_object(str(Path(path).with_suffix(".plan.json")))  # the user's class's weights: named by it
        if "fxrf_plan" in plan and plan.get("weights") == os.path.basename(path):
            return True
        companion = companion or str(Path(path).with_suffix(".py"))
        with open(companion, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        return first.startswith(MARKER) and f"(weights: {os.path.basename(path)})" in first
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def _json_object(path: str) -> dict:
    """The JSON object in `path`; {} when there is none (no file, or JSON that is not an object)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    return doc if isinstance(doc, dict) else {}


def refuse_overwrite(paths, *, overwrite: bool = False, companion: str | None = None) -> None:
    """SaveError naming the first existing file of `paths` that fxrf did not write, unless overwrite=True."""
    if overwrite:
        return
    for p in paths:
        if os.path.exists(p) and (os.path.isdir(p) or not fxrf_wrote(p, companion)):
            raise SaveError(f"{p} exists and was not written by fxrf (it may be your model's source or checkpoint); "
                            f"choose another name or pass overwrite=True (--force on the command line)")
