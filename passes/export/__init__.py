"""Write a GraphModule as plain, readable PyTorch source: one nn.Module class, submodules declared in __init__,
the graph's code as forward.

    >>> import importlib.util, os, tempfile, torch, torch.nn as nn, fxrf
    >>> gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (1, 3, 8, 8))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.py")
    >>> src = emit_source(gm, path, class_name="Net")
    >>> print(src.split("class Net")[1].split("def forward")[0].strip())
    (nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("0", nn.Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)))
            self.add_module("1", nn.ReLU())
    >>> spec = importlib.util.spec_from_file_location("net", path)
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> net = mod.Net(); net.load_state_dict(gm.state_dict())
    <All keys matched successfully>
    >>> x = torch.rand(1, 3, 8, 8); torch.equal(net(x), gm(x))
    True

emit_source writes the architecture: load the weights with `model.load_state_dict(graph_module.state_dict())`.
Tensors outside the state dict (non-persistent buffers, constants fx makes from tensors created in forward) are
written as literals when small; larger ones are declared as persistent buffers, so that `save` puts their values
in the weights file. A submodule that cannot be rebuilt from its constructor arguments raises a SaveError naming
it. An exported graph's output structure (a ModelOutput, a dict) is rebuilt by name in the forward.

`save` writes what a fresh process loads with plain torch (what `fxrf optimize --out` writes): for a `.pt` path
the source next to it (`net.py`) plus the class's state_dict (`net.pt`, plain tensors); for `.safetensors` the
same with the weights as safetensors; for a `.pt2` path a `torch.export` program and for `.onnx` an ONNX model, both
of any nn.Module and with a dynamic batch where the model exports so. It reloads what it wrote and compares outputs
(a program also at a second batch size, an ONNX model run by onnxruntime) before putting the files in place (a
SaveError otherwise), and never replaces a file fxrf did not write (every source it writes starts with the line
MARKER) unless overwrite=True. `load_hint` is the one line of Python that loads them back; it imports a source by
its path, under a name that no other saved result shares:

    >>> d = tempfile.mkdtemp()
    >>> paths = save(gm, os.path.join(d, "net.pt"), class_name="Net")
    >>> paths == [os.path.join(d, "net.py"), os.path.join(d, "net.pt")]
    True
    >>> scope = {}; exec(load_hint(paths, "Net"), scope)
    >>> torch.equal(scope["model"](x), gm(x))
    True

One job per module: `emit` (the source), `saving` (save: stage, reload, compare, put in place), `programs` (the
.pt2 and .onnx exports with their dynamic batch, and running them back), `hints` (load_hint), `files` (the formats,
fxrf's mark on what it wrote, the overwrite refusal, reading weights back).
"""
from .emit import emit_source
from .files import MARKER, PROGRAM_FORMATS, SAVE_FORMATS, fxrf_wrote, load_weights_file, missing_onnx_packages, \
    refuse_overwrite
from .hints import load_hint
from .saving import Saved, save

__all__ = ["emit_source", "save", "Saved", "load_hint", "load_weights_file", "fxrf_wrote", "refuse_overwrite",
           "missing_onnx_packages", "SAVE_FORMATS", "PROGRAM_FORMATS", "MARKER"]
