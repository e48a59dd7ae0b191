"""The one-file artefacts: a torch.export program (.pt2) and an ONNX model (.onnx) of any nn.Module, exported in eval
mode with a dynamic batch (dim 0 of every tensor input) where the model exports so, else at the example's batch with
a one-line note that says why; and running what was written, reloaded from disk (torch.export.load, onnxruntime)."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import Dim

from fxrf.errors import SaveError

from .files import IMPORTS_KEY, MARKER_KEY, ONNX_INSTALL, missing_onnx_packages

_MARK = "written by fxrf.passes.export"


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module of `model` in eval mode, each one's own training flag restored afterwards. (Not model.eval():
    a torch.export module refuses it; its ATen calls carry the mode.)"""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def batch_of(xs: tuple) -> int | None:
    """The batch size the tensor inputs share (dim 0 of each that has one), None when they do not share one."""
    sizes = {x.shape[0] for x in xs if isinstance(x, torch.Tensor) and x.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def at_batch(xs: tuple, n: int) -> tuple:
    """`xs` with batch n: floating inputs drawn uniformly in the range of the example's values (a fixed seed), other
    tensors (indices, masks) the example's rows repeated, everything else as it is."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in xs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
        elif x.is_floating_point():
            lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
            r = torch.rand((n, *x.shape[1:]), generator=gen, dtype=x.dtype)
            out.append((lo + (hi - lo) * r).to(x.device))
        else:
            out.append(x[torch.arange(n, device=x.device) % x.shape[0]])
    return tuple(out)


def write_program(model: nn.Module, xs: tuple, path: str, *, name: str, fixed: str | None = None, imports=(),
                  output_names=None) -> str | None:
    """Export `model` in eval mode on the example inputs `xs` with torch.export and write it to `path` (.pt2:
    torch.export.save; .onnx: that program through torch.onnx.export's dynamo exporter, one file), marked as fxrf's.
    Dim 0 of every tensor input is one dynamic batch size where torch.export keeps it so for every size (traced at
    batch 2 when the example's is 1: it fixes a size seen as 1); otherwise, or when the caller knows why it cannot be
    (`fixed`: the model does not run at another batch), the batch is fixed at the example's and the returned note
    (about `name`, the user's file name) says why. (torch.export decides for the .onnx too: given a model, torch.onnx
    relaxes a batch torch.export refuses and writes a graph that is right for some sizes only.)
    `imports`: modules that define the output type (a .pt2 records them for load_hint)."""
    b = batch_of(xs)
    if b is None:
        fixed = fixed or "the inputs do not share a first dimension"
    with eval_mode(model):
        program = None
        if fixed is None:
            dims = tuple({0: Dim("batch", min=1)} if isinstance(x, torch.Tensor) and x.dim() else None for x in xs)
            try:
                with _quiet_logs():  # torch logs the failed attempt's tracebacks: the note says what matters
                    program = torch.export.export(model, at_batch(xs, max(b, 2)), dynamic_shapes=dims)
            except Exception as e:  # a model that specialises on its batch: export it as it was given
                fixed = f"torch.export: {root_cause(e)}"
        if program is None:
            try:
                program = torch.export.export(model, xs)
            except Exception as e:
                raise SaveError(f"torch.export cannot export the model: {type(e).__name__}: {gist(e)}; nothing "
                                f"was written") from e
    if Path(path).suffix.lower() == ".pt2":
        extra = {MARKER_KEY: _MARK, **({IMPORTS_KEY: "\n".join(imports)} if imports else {})}
        torch.export.save(program, path, extra_files=extra)
    else:
        _write_onnx(program, path, name, output_names)
    return None if fixed is None else \
        f"{name}: the batch is fixed at {b if b is not None else 'the example'} ({fixed})"


def _write_onnx(program, path: str, name: str, output_names) -> None:
    """The exported program as one ONNX file, its batch dimension named `batch` (torch.export calls it s0, s31 ...)."""
    need_onnx()
    import onnx
    import torch.onnx
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its progress lines, warnings
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, verbose=False,
                                             output_names=output_names)
    except Exception as e:
        raise SaveError(f"torch.onnx.export cannot convert the model: {type(e).__name__}: {root_cause(e)}; "
                        f"nothing was written") from e
    proto = onnx_program.model_proto
    symbols = {i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input
               if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param}
    if len(symbols) == 1:
        symbol = re.compile(rf"\b{re.escape(symbols.pop())}\b")
        for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = symbol.sub("batch", d.dim_param)
    proto.metadata_props.add(key=MARKER_KEY, value=_MARK)
    try:
        onnx.save(proto, path)
    except Exception as e:  # protobuf's 2 GiB limit
        raise SaveError(f"{name}: the ONNX model cannot be written as one file: {gist(e)}") from e


def need_onnx() -> None:
    """SaveError naming the install command when the packages an .onnx needs are missing."""
    missing = missing_onnx_packages()
    if missing:
        raise SaveError(f"writing and checking an .onnx needs {', '.join(missing)}: {ONNX_INSTALL}")


def run_program(path: str, xs: tuple):
    """What the file at `path`, loaded from disk, computes on `xs`: a .pt2's output (its structure rebuilt), an
    .onnx's outputs as a list of tensors (its graph's outputs are the model's tensor leaves, in order)."""
    if Path(path).suffix.lower() == ".pt2":
        module = torch.export.load(path).module()
        with eval_mode(module), torch.no_grad():
            return module(*xs)
    need_onnx()
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    tensors = [x for x in xs if isinstance(x, torch.Tensor)]
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), tensors)}
    return [torch.from_numpy(y) for y in sess.run(None, feed)]


@contextlib.contextmanager
def _quiet_logs():
    """No log records up to ERROR while it runs (logging.disable, the previous level restored)."""
    before = logging.root.manager.disable
    logging.disable(max(before, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(before)


def root_cause(e: BaseException) -> str:
    """The first line of the innermost cause (torch.onnx wraps torch.export's error in its own)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return gist(e)


def gist(e: BaseException) -> str:
    """The gist of an error on one line: its first two lines (a heading such as "The following inconsistencies were
    found:" needs the next), without terminal colours and torch's pointer to its logs, at most 200 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(lines[:2]) if lines else type(e).__name__)
    text = text.split(" For more information")[0].strip()
    return text if len(text) <= 200 else text[:197] + "..."
