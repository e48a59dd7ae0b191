"""Calibration after a rewrite: bring a decomposed model close to the trained original before any training.

`decompose(..., transfer_weights=True)` initialises each block from its conv's weight alone (transfer.py): exact
only when the conv's kernels are separable and the activation between the factors passes everything, which a
trained conv and a ReLU do not. Two data-driven steps, as compression tools do, fix most of that on a few batches:

1. `recalibrate_bn(model, loader, batches=...)`: re-estimate every batch norm's running mean and variance on
   calibration batches (cumulative averages, as `torch.optim.swa_utils.update_bn` does, over a few batches).
   The rewritten model's maps no longer have the statistics the old running averages describe.
2. `fit_blocks(original, result, loader, ...)`: fit each block to reproduce its conv's output on calibration
   inputs, block by block in graph order (sequentially: each block sees the rewritten model's own inputs, so it
   also absorbs the error the blocks before it left). Per block:
   a. every norm inside the block (after a factor, before the model's activation) gets the measured per-channel
      mean m and variance v of its input as running statistics, weight sqrt(v + eps) and bias m + s, so that in
      eval mode it adds s to each channel and its train-mode output agrees. s = max(0, -(the channel's minimum
      on the calibration data)) lifts every calibration value to >= 0, so the activation after it (ReLU) passes
      what the calibration data produces and the factors compose linearly, as the SVD transfer assumes (the
      "bias absorption" of data-free quantization, Nagel et al. 2019); the shift is taken back by the bias of
      the last conv in step b;
   b. the block's last conv (the pointwise conv of DW+PW, DW+GPW, DW+RPW and PW+DW+PW; the grouped conv of
      GC+shuffle, whose output shuffle is undone on the target) is then the only unknown, and the block's output
      is linear in its weights: min_W ||conv_orig(x) - conv_W(z)||^2 over the calibration pixels, z the last
      conv's actual input (after the depthwise factor, its norm, activation and any channel rotation), is an
      ordinary least-squares problem per group of the conv, solved exactly from its normal equations (accumulated
      over batches in float64, with a small ridge term for ill-conditioned inputs). Output channels of one group
      share the group's inputs, so each group is one solve with several right-hand sides.
   Finally every batch norm is re-estimated (step 1), the model's own norms after each block and the inner
   ones included (re-estimating the inner norms too was measured better right after a transfer than keeping
   step a's statistics: 34-39% vs 18-25% on the digits benchmark's DW+GPW-g4, 77-80% vs 75-77% on DW+PW).

    >>> import torch, torch.nn as nn, fxrf
    >>> from fxrf.training.calibrate import fit_blocks
    >>> _ = torch.manual_seed(0)
    >>> m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                   nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    >>> batches = [torch.randn(32, 1, 8, 8) for _ in range(4)]
    >>> r = fxrf.decompose(m, (1, 1, 8, 8), recipe="DW+PW")
    >>> c = fit_blocks(m, r, batches)
    >>> [(b.conv, b.recipe, b.fitted, b.error_after < b.error_before) for b in c.blocks]
    [('_3', 'DW+PW', 'pw', True)]
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrf.errors import InputError
from fxrf.progress import bar

from .distill import _find_logits

__all__ = ["recalibrate_bn", "fit_blocks", "fidelity", "Calibration", "BlockFit"]


@dataclass(frozen=True)
class BlockFit:
    """What the least-squares transfer did to one block."""

    conv: str  # the original conv's node
    target: str  # module path of the block (the conv's, in the original model)
    recipe: str
    fitted: str | None  # the child conv solved for (None: declined)
    norms: int  # inner norms re-estimated (and shifted)
    error_before: float | None  # ||conv(x) - block(x)||_F / ||conv(x)||_F on the calibration data, before ...
    error_after: float | None  # ... and after the fit (both after step a)
    samples: int  # calibration inputs (images) the fit saw
    reason: str = ""  # why a block was declined


@dataclass
class Calibration:
    graph_module: fx.GraphModule  # a new GraphModule; the decomposition's is not modified
    blocks: list = field(default_factory=list)  # BlockFit per block, graph order
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"blocks": [asdict(b) for b in self.blocks], "summary": self.summary}


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


# ------------------------------------------------------------------------------------------------ batch norms


def _bns(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, *, batches: int = 20, device=None, inplace: bool = False) -> nn.Module:
    """Re-estimate the running mean and variance of every batch norm of `model` on the first `batches` batches of
    `loader` (inputs, or (input, label) tuples). Returns a copy (the model itself with inplace=True), in the
    training mode `model` had; nothing but the norms' running statistics changes.

    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> r = recalibrate_bn(m, [torch.randn(64, 1, 8, 8) + 5.0 for _ in range(3)], batches=3)
    >>> float(m[1].running_mean.abs().max()), bool(r[1].running_mean.abs().max() > 0)
    (0.0, True)
    """
    _check_batches(batches)
    m = model if inplace else copy.deepcopy(model)
    norms = _bns(m)
    if not norms:
        return m
    was = m.training
    dev = _device_of(m, device)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    m.eval()
    for bn in norms:
        bn.train()
    seen = 0
    try:
        for x in input_batches(loader, batches):
            m(x.to(dev))
            seen += 1
    finally:
        for bn, mom in zip(norms, momenta):
            bn.momentum = mom
        m.train(was)
    if seen == 0:
        raise InputError("recalibrate_bn() got an empty loader")
    return m


# ---------------------------------------------------------------------------------------------- block fitting


def fit_blocks(original: nn.Module, result, loader, *, batches: int = 8, ridge: float = 1e-4,
               shift: bool = True, recalibrate: bool = True, device=None) -> Calibration:
    """Fit every block of a decomposition to reproduce its original conv's output (the module docstring says how).

    original: the model given to `decompose`; result: what `decompose` returned (its `graph_module` and
    `changes`); loader: calibration batches (inputs or (input, label) tuples), the first `batches` of them are
    used. ridge: Tikhonov term, relative to the mean diagonal of each normal matrix. shift: shift the inner norms
    so the activation inside a block passes nearly everything (step a). recalibrate: re-estimate all batch norms
    afterwards. Neither `original` nor the decomposition is modified.
    """
    _check_batches(batches)
    if not isinstance(original, nn.Module):
        raise InputError(f"original must be the nn.Module given to decompose(), got {type(original).__name__}")
    gm = getattr(result, "graph_module", None)
    changes = getattr(result, "changes", None)
    if not isinstance(gm, nn.Module) or changes is None:
        raise InputError(f"result must be what fxrf.decompose() returned (with graph_module and changes), got "
                         f"{type(result).__name__}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise InputError(f"ridge must be >= 0, got {ridge!r}")
    folded = (getattr(result, "summary", None) or {}).get("permutations_folded", 0)
    if folded:
        raise InputError(f"{folded} channel permutation(s) were folded into neighbouring convs, so some maps no "
                         f"longer have the original channel order; decompose with fold=False, fit, then "
                         f"fxrf.passes.fold.fold_permutations")
    ref = copy.deepcopy(original).eval()
    new = copy.deepcopy(gm).eval()
    dev = _device_of(new, device)
    ref.to(dev)
    cached = [x.to(dev) for x in input_batches(loader, batches)]
    if not cached:
        raise InputError("fit_blocks() got an empty loader")
    samples = sum(len(x) for x in cached)
    fits = []
    for c in bar(changes, "calibration: fitting the blocks by least squares", unit="changes"):
        if not (hasattr(c, "recipe") and hasattr(c, "target") and hasattr(c, "conv")):
            continue  # fold records and the like
        fits.append(_fit_one(ref, new, c, cached, ridge, shift, samples))
    if recalibrate:  # all norms, the inner ones included: measured better after a transfer than keeping step a's
        recalibrate_bn(new, cached, batches=len(cached), device=dev, inplace=True)
    done = [f for f in fits if f.fitted]
    summary = {"blocks": len(fits), "fitted": len(done), "batches": len(cached), "samples": samples,
               "ridge": ridge, "shift": shift, "recalibrated": recalibrate,
               "mean_error_before": _mean([f.error_before for f in done]),
               "mean_error_after": _mean([f.error_after for f in done])}
    return Calibration(new, fits, summary)


def _fit_one(ref, new, change, inputs, ridge, shift, samples) -> BlockFit:
    def declined(reason):
        return BlockFit(change.conv, change.target, change.recipe, None, 0, None, None, samples, reason)

    try:
        conv = ref.get_submodule(change.target)
        block = new.get_submodule(change.target)
    except AttributeError:
        return declined(f"no module {change.target!r} in the original model and the result")
    if not isinstance(conv, nn.Conv2d):
        return declined(f"{change.target!r} of the original model is {type(conv).__name__}, not nn.Conv2d")
    children = list(block.named_children())
    convs = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Conv2d)]
    if not convs:
        return declined("the block holds no conv")
    last_i = convs[-1]
    name, last = children[last_i]
    tail = [m for _, m in children[last_i + 1:]]
    if any(not isinstance(m, nn.ChannelShuffle) for m in tail) or len(tail) > 1:
        return declined(f"the block's last conv {name!r} is followed by {', '.join(type(m).__name__ for m in tail)}")
    if last.padding_mode != "zeros" or isinstance(last.padding, str):
        return declined(f"{name!r} pads with {last.padding_mode!r} / {last.padding!r}: only explicit zero padding")
    # a. inner norms, in block order: re-estimated, and shifted so that the activation after them passes all
    norms = [(n, m) for n, m in children[:last_i] if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for _, bn in norms:
        mean, var, low = _channel_stats(new, bn, inputs)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            if bn.affine:
                s = (-low).clamp_min(0) if shift else torch.zeros_like(mean)
                bn.weight.copy_((var + bn.eps).sqrt())
                bn.bias.copy_(mean + s)
    # b. the last conv: least squares per group against the original conv's output
    perm = None
    if tail:  # output p of the block is the conv's output perm[p]
        idx = torch.arange(last.out_channels, dtype=torch.float32).view(1, -1, 1, 1)
        perm = tail[0](idx).view(-1).round().long()
    eqs = _normal_equations(ref, conv, new, last, inputs, perm)
    before, after = _solve(last, eqs, ridge)
    return BlockFit(change.conv, change.target, change.recipe, name, len(norms), before, after, samples)


@torch.no_grad()
def _channel_stats(model, module, inputs):
    """Per-channel mean, (biased) variance and minimum of `module`'s input over the calibration batches."""
    acc = {}

    def hook(_, args):
        x = args[0].double()
        dims = [0] + list(range(2, x.dim()))
        acc["n"] = acc.get("n", 0) + x.numel() // x.shape[1]
        acc["s"] = acc.get("s", 0) + x.sum(dims)
        acc["q"] = acc.get("q", 0) + (x * x).sum(dims)
        low = x.transpose(0, 1).reshape(x.shape[1], -1).amin(1)
        acc["min"] = torch.minimum(acc["min"], low) if "min" in acc else low
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            _run(model, x)
    finally:
        h.remove()
    mean = acc["s"] / acc["n"]
    var = (acc["q"] / acc["n"] - mean * mean).clamp_min(0)
    like = module.running_mean
    return mean.to(like), var.to(like), acc["min"].to(like)


@torch.no_grad()
def _normal_equations(ref, conv, new, last, inputs, perm):
    """Per group g of `last`: (A_g = P^T P, B_g = P^T T, sum of T^2), P the unfolded patches of the last conv's
    input (plus a ones column for the bias), T the original conv's output channels that group produces."""
    got = {}

    def take(key):
        def hook(_, args, out=None):
            got[key] = (out if out is not None else args[0]).double()
            raise _Stop
        return hook

    g = last.groups
    cin, cout = last.in_channels // g, last.out_channels // g
    kk = math.prod(last.kernel_size)
    bias = last.bias is not None
    dim = cin * kk + int(bias)
    A = torch.zeros(g, dim, dim, dtype=torch.float64, device=last.weight.device)
    B = torch.zeros(g, dim, cout, dtype=torch.float64, device=last.weight.device)
    tt = torch.zeros(g, dtype=torch.float64, device=last.weight.device)
    inv = torch.argsort(perm) if perm is not None else None
    for x in inputs:
        h = conv.register_forward_hook(take("t"))
        try:
            _run(ref, x)
        finally:
            h.remove()
        h = last.register_forward_pre_hook(take("z"))
        try:
            _run(new, x)
        finally:
            h.remove()
        t, z = got["t"], got["z"]
        if inv is not None:  # the block's output p is the conv's output perm[p]: the conv must produce t[:, inv]
            t = t[:, inv]
        cols = F.unfold(z, last.kernel_size, last.dilation, last.padding, last.stride)  # [N, C*kk, L]
        n, _, L = cols.shape
        if t.shape[-2] * t.shape[-1] != L:
            raise InputError(f"the block at {conv!r} produces {L} pixels, its conv {t.shape[-2]}x{t.shape[-1]}")
        cols = cols.view(n, g, cin * kk, L).permute(1, 0, 3, 2).reshape(g, n * L, cin * kk)
        if bias:
            cols = torch.cat([cols, cols.new_ones(g, n * L, 1)], 2)
        tg = t.reshape(n, g, cout, L).permute(1, 0, 3, 2).reshape(g, n * L, cout)
        A += cols.transpose(1, 2) @ cols
        B += cols.transpose(1, 2) @ tg
        tt += (tg * tg).sum((1, 2))
    return A, B, tt


@torch.no_grad()
def _solve(last: nn.Conv2d, eqs, ridge: float):
    """Write the least-squares weights into `last`; (relative error before, after) on the calibration data."""
    A, B, tt = eqs
    g = last.groups
    cout = last.out_channels // g
    bias = last.bias is not None

    def current():
        w = last.weight.detach().double().reshape(g, cout, -1).transpose(1, 2)  # [g, C*kk, cout]
        if bias:
            w = torch.cat([w, last.bias.detach().double().view(g, 1, cout)], 1)
        return w

    def error(w):  # ||T - P W||^2 = T.T - 2 <W, B> + <W, A W>, summed over groups
        res = tt.sum() - 2 * (w * B).sum() + (w * (A @ w)).sum()
        return float(res.clamp_min(0).sqrt() / tt.sum().clamp_min(1e-300).sqrt())

    before = error(current())
    n = A.shape[-1]
    reg = ridge * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # per group
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    if bias:
        eye[-1, -1] = 0.0  # the intercept is not shrunk
    w = torch.linalg.solve(A + reg[:, None, None] * eye, B)
    if error(w) > before:  # a degenerate calibration set: keep what the transfer gave
        return before, before
    k = w[:, :-1] if bias else w
    last.weight.copy_(k.transpose(1, 2).reshape(last.weight.shape).to(last.weight))
    if bias:
        last.bias.copy_(w[:, -1].reshape(-1).to(last.bias))
    return before, error(w)


# --------------------------------------------------------------------------------------------------- fidelity


@torch.no_grad()
def fidelity(reference: nn.Module, model: nn.Module, batches) -> dict:
    """How close `model` computes to `reference` on `batches` (input tensors): the relative output error
    ||model(x) - reference(x)||_F / ||reference(x)||_F over all of them, and, for class scores (a 2-d output: batch x
    classes), the fraction of inputs whose top-1 class agrees. Outputs that are ModelOutputs, dicts or tuples are
    compared on their logits (the `logits` entry, else the first tensor). Both models run in eval mode on copies'
    worth of state: their modes are restored.

    >>> import torch, torch.nn as nn
    >>> m = nn.Linear(4, 3)
    >>> fidelity(m, m, [torch.randn(5, 4)])
    {'relative_error': 0.0, 'top1_agreement': 1.0, 'samples': 5}
    """
    err2 = ref2 = 0.0
    agree = seen = 0
    classes = True
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        for x in batches:
            a, b = logits_of(reference(x)).double(), logits_of(model(x)).double()
            if a.shape != b.shape:
                raise InputError(f"the two models' outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
            err2 += float((b - a).pow(2).sum())
            ref2 += float(a.pow(2).sum())
            seen += len(x)
            classes = classes and a.dim() == 2
            if classes:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    if not seen:
        raise InputError("fidelity() got no batches")
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return {"relative_error": round(rel, 6), "top1_agreement": round(agree / seen, 6) if classes else None,
            "samples": seen}


def logits_of(out) -> torch.Tensor:
    """The tensor to compare of a model's output: distill's lookup (itself, a ModelOutput's / dict's `logits`, a
    `logits` attribute, a tuple's first tensor), and a mapping of several tensors without `logits` read at its
    first tensor."""
    got = _find_logits(out)
    if got is None and hasattr(out, "keys"):
        got = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    if got is None:
        raise InputError(f"cannot find the logits in a model output of type {type(out).__name__}: return a tensor, a "
                         f"dict or ModelOutput with 'logits', or a tuple whose first tensor is them")
    return got


# ---------------------------------------------------------------------------------------------------- helpers


def _run(model, x):
    try:
        model(x)
    except _Stop:
        pass


def _check_batches(batches) -> None:
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise InputError(f"batches must be a positive integer, got {batches!r}")


def input_batches(loader, batches: int) -> list:
    """The first `batches` input tensors of a loader of tensors or (input, label) tuples."""
    if loader is None or isinstance(loader, torch.Tensor) or not hasattr(loader, "__iter__"):
        raise InputError(f"loader must be an iterable of batches (a DataLoader or a list of tensors), got "
                         f"{type(loader).__name__}")
    out = []
    for batch in loader:
        if len(out) >= batches:
            break
        x = batch if isinstance(batch, torch.Tensor) else batch[0] if isinstance(batch, (tuple, list)) else None
        if not isinstance(x, torch.Tensor):
            raise InputError(f"a calibration batch must be a tensor or an (input, label) tuple, got "
                             f"{type(batch).__name__}")
        out.append(x)
    return out


def _device_of(model: nn.Module, device):
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
