"""Bring a rewritten model back to accuracy: knowledge distillation from the original, plus the small training
and evaluation helpers the accuracy benchmark and its tests share.

`distill(student, teacher, loader, epochs=...)` fine-tunes a copy of `student` (any nn.Module, e.g. the
GraphModule a pass returned) to match `teacher` (the original model) with the usual distillation loss (Hinton et
al. 2015): the KL divergence between the temperature-softened outputs, scaled by T^2 so that its gradients keep
their size as T changes, plus the cross-entropy on the labels when the loader yields (input, label) pairs:

    loss = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - kd_weight) * CE(s, y)

Launched under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) the same call trains
data-parallel: it joins the process group (gloo on CPU, nccl on CUDA), wraps the student in
DistributedDataParallel and gives each process its shard of the loader's dataset through a DistributedSampler
(each process keeps the loader's batch size). Every process returns the same trained weights (batch-norm
statistics are broadcast from rank 0 at the end). `train` is the same loop without a teacher.

Fine-tuning a model that calibration already brought close to the teacher must not make it worse: by default
`distill` holds out VALIDATION (10%) of the training data, at least one batch (a DataLoader's dataset is split by a
seeded permutation; a list of batches loses whole batches), measures the student on it before training and after
every epoch (accuracy when the batches carry labels, else top-1 agreement with the teacher), and returns the best
of those states, the starting one included (`FitResult.kept_epoch`, 0: the start). Data too small to spare a batch
is measured on itself; data without a length (a generator) cannot be split: pass `validation=` batches, or 0.

The student and the teacher may return what models return: a tensor, a dict (its "logits", else its only tensor),
a transformers ModelOutput (its `logits`), a tuple or list (its first tensor); `logits=` names the key or
attribute, or takes a function output -> logits, for anything else.

    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from fxrf.training.distill import distill, evaluate
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8); y = (x[:, 0] > 0).long()
    >>> teacher = nn.Linear(8, 2)
    >>> with torch.no_grad():
    ...     _ = teacher.weight.zero_(); teacher.weight[1, 0] = 4.0
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    >>> r = distill(nn.Linear(8, 2), teacher, loader, epochs=10, lr=0.05, progress=False)
    >>> r.history[-1]["kl"] < r.history[0]["kl"], evaluate(r.model, loader) > 0.9
    (True, True)
    >>> r.metric, len(r.validation), r.validation[r.kept_epoch]["accuracy"] >= r.validation[0]["accuracy"]
    ('accuracy', 11, True)

`fxrf.distill` is this module's `distill` function.
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

try:  # a progress bar when tqdm is installed; training works the same without it
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

__all__ = ["distill", "train", "evaluate", "kl_to_teacher", "finetune_options", "FitResult", "VALIDATION",
           "DEFAULT_LR"]

VALIDATION = 0.1  # distill's default: the fraction of the data held out (at least one batch) to pick the state kept
DEFAULT_LR = 1e-3  # distill's default AdamW step, cosine-annealed to zero (3e-3 measured to undo a calibration)


@dataclass
class FitResult:
    """What `train` and `distill` return."""

    model: nn.Module  # the trained model (distill: a copy of the student; train: the model given)
    history: list = field(default_factory=list)  # per epoch: epoch, loss, ce, kl, accuracy (train batches), lr, seconds
    seconds: float = 0.0  # wall time of the whole run
    world_size: int = 1  # processes that trained together (torchrun)
    device: str = "cpu"
    # distill's validation: per state (epoch 0: before training, then after each epoch) epoch, accuracy and ce (None
    # without labels), agreement (top-1 with the teacher), kl (to the teacher, T = 1), samples; empty: nothing held out
    validation: list = field(default_factory=list)
    metric: str | None = None  # the figure that picks the state kept: "accuracy" (labelled data) or "agreement"
    kept_epoch: int | None = None  # the epoch whose weights `model` holds (0: the student as given)
    validated_on: str = ""  # what the validation figures were measured on

    def validation_summary(self) -> dict:
        """The validation figures as one JSON-friendly dict: metric, before (epoch 0), after (the state kept),
        kept_epoch, per-epoch figures, what they were measured on."""
        figures = [v[self.metric] for v in self.validation] if self.metric else []
        return {"metric": self.metric, "before": figures[0] if figures else None,
                "after": figures[self.kept_epoch] if figures and self.kept_epoch is not None else None,
                "kept_epoch": self.kept_epoch, "epochs": len(self.history), "per_epoch": figures,
                "validated_on": self.validated_on, "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------------------------- public entry points


def distill(student: nn.Module, teacher: nn.Module, loader, *, epochs: int, lr: float | None = None,
            temperature: float = 4.0, kd_weight: float = 0.5, weight_decay: float = 0.0, device=None,
            progress: bool | None = None, seed: int | None = None, logits=None, validation=VALIDATION,
            keep_best: bool = True) -> FitResult:
    """Fine-tune a copy of `student` against `teacher` on `loader`; neither model is modified.

    loader yields input tensors, or (input, label) tuples (then the cross-entropy term is added with weight
    1 - kd_weight). lr: AdamW's learning rate (None: DEFAULT_LR, 1e-3), annealed to zero on a cosine over all
    steps. temperature: T of the softened outputs. device: "cpu", "cuda", a torch.device (None: the local CUDA
    device under torchrun when CUDA is present, else CUDA if available, else CPU). progress: a tqdm bar (None: only
    on a terminal). seed: seeds torch, the validation split and the DistributedSampler.
    logits: where the class logits are in what both models return: None (a tensor, a dict's "logits" or only
    tensor, a ModelOutput's `logits`, a tuple's first tensor), a key / attribute name, or a function output -> tensor.
    validation: the fraction of `loader`'s data held out to measure the student on (default VALIDATION, 0.1; at
    least one batch), batches of its own (an iterable), or 0 / None (no validation). keep_best: return the state
    that measured best on it, the student as given included (False: the last). Returns FitResult (.model,
    .history, .validation, .metric, .kept_epoch).

        >>> import torch, torch.nn as nn, fxrf
        >>> class Dict(nn.Module):  # a model that returns a dict, as many do
        ...     def __init__(self):
        ...         super().__init__(); self.fc = nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return {"scores": self.fc(x), "features": x}
        >>> batches = [torch.randn(16, 4) for _ in range(10)]
        >>> r = fxrf.distill(Dict(), Dict(), batches, epochs=2, logits="scores", progress=False)
        >>> r.metric, r.validated_on, len(r.validation), r.kept_epoch in (0, 1, 2)
        ('agreement', '1 of 10 batches held out', 3, True)
    """
    _check_module(student, "student")
    _check_module(teacher, "teacher")
    _check_values(student, "student")
    _check_values(teacher, "teacher")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(kd_weight, (int, float)) and 0.0 <= kd_weight <= 1.0):
        raise InputError(f"kd_weight weighs the distillation term against the cross-entropy and must be in [0, 1], "
                         f"got {kd_weight!r}")
    _check_logits(logits)
    return _fit(copy.deepcopy(student), copy.deepcopy(teacher), loader, epochs=epochs,
                lr=DEFAULT_LR if lr is None else lr, weight_decay=weight_decay, temperature=float(temperature),
                kd_weight=float(kd_weight), device=device, progress=progress, seed=seed, logits=logits,
                validation=validation, keep_best=keep_best)


def train(model: nn.Module, loader, epochs: int, *, lr: float = 3e-3, weight_decay: float = 5e-4, device=None,
          progress: bool | None = None, seed: int | None = None) -> FitResult:
    """Train `model` in place with the cross-entropy on a loader of (input, label) batches: AdamW, cosine decay.

    The same loop as `distill` (torchrun data parallelism included), without a teacher.
    """
    _check_module(model, "model")
    _check_values(model, "model")
    return _fit(model, None, loader, epochs=epochs, lr=lr, weight_decay=weight_decay, temperature=1.0,
                kd_weight=0.0, device=device, progress=progress, seed=seed, logits=None, validation=None,
                keep_best=False)


def finetune_options(finetune, default_data=None) -> dict:
    """`fxrf.optimize(finetune=...)` checked and made `distill`'s keyword arguments plus "data" (the batches to
    train on; default `default_data`, the calibration batches): {"epochs": 3, "data": batches, "lr": 1e-3}."""
    import inspect
    if not isinstance(finetune, Mapping):
        raise InputError(f"finetune must be a dict such as {{'epochs': 3, 'data': batches}} (other keys: "
                         f"fxrf.distill's keyword arguments) or None, got {type(finetune).__name__}")
    opts = dict(finetune)
    if "epochs" not in opts:
        raise InputError("finetune needs 'epochs': how many passes over the data, e.g. {'epochs': 3, 'data': batches}")
    if opts.get("data") is None:
        if default_data is None:
            raise InputError("finetune needs 'data': batches of inputs or (input, label) pairs to fine-tune on (or "
                             "give calibration=..., which it then uses)")
        opts["data"] = default_data
    known = [n for n, p in inspect.signature(distill).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(known) - {"data"})
    if unknown:
        raise InputError(f"finetune: unknown option(s) {', '.join(map(repr, unknown))}; it takes 'data' and "
                         f"fxrf.distill's {', '.join(map(repr, known))}")
    return opts


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device=None, logits=None) -> float:
    """Top-1 accuracy (a fraction) of `model` on a loader of (input, label) batches, in eval mode (the model's
    mode is restored afterwards). logits: as for `distill`."""
    _check_module(model, "model")
    _check_values(model, "model")
    _check_logits(logits)
    dev = _device(device)
    was = model.training
    model.eval()
    right = seen = 0
    try:
        for batch in _iterable(loader):
            x, y = _batch(batch)
            if y is None:
                raise InputError("evaluate() needs (input, label) batches; the loader yields inputs only")
            out = _forward(model, x.to(dev), logits)
            right += int((out.argmax(1) == y.to(dev)).sum())
            seen += len(y)
    finally:
        model.train(was)
    if seen == 0:
        raise InputError("evaluate() got an empty loader")
    return right / seen


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, loader, *, temperature: float = 4.0,
                  device=None, logits=None) -> float:
    """Mean KL(teacher || student) per sample at `temperature` (no T^2 factor), both in eval mode. logits: as for
    `distill`."""
    _check_values(student, "student")
    _check_values(teacher, "teacher")
    _check_logits(logits)
    dev = _device(device)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total = n = 0.0
    try:
        for batch in _iterable(loader):
            x = _batch(batch)[0].to(dev)
            s, t = _forward(student, x, logits, "student"), _forward(teacher, x, logits, "teacher")
            total += float(_kl(s, t, temperature, reduction="sum"))
            n += len(x)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return total / max(n, 1)


# ------------------------------------------------------------------------------------------------------ the loop


def _fit(model, teacher, loader, *, epochs, lr, weight_decay, temperature, kd_weight, device, progress, seed, logits,
         validation, keep_best):
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise InputError(f"weight_decay must be >= 0, got {weight_decay!r}")
    _iterable(loader)
    loader, held, held_on = _hold_out(loader, validation, seed) if teacher is not None else (loader, None, "")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dev = _device(device, distributed=world > 1)
    if seed is not None:
        torch.manual_seed(seed)
    model.to(dev).train()
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    dist, created, rank = None, False, 0
    net = model
    if world > 1:
        dist, created = _join(dev)
        rank = dist.get_rank()
        loader, sampler = _sharded(loader, world, rank, seed)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    else:
        sampler = None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    steps = epochs * max(len(loader), 1) if hasattr(loader, "__len__") else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if steps else None
    show = progress if progress is not None else None  # None: tqdm decides (off when not a terminal)
    bar = None
    if _tqdm is not None and rank == 0 and show is not False:
        bar = _tqdm(total=steps, disable=None if show is None else not show, leave=False,
                    desc="distill" if teacher is not None else "train")
    history = []
    start = time.perf_counter()
    keeper = _Keeper(held, held_on, keep_best, model, teacher, dev, logits, dist)
    try:
        keeper.check(0)  # the student as given: the state to beat
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            sums = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, ce, kl, right, samples (sample sums)
            bad = torch.zeros(2, dtype=torch.float64, device=dev)  # batches with non-finite inputs, teacher outputs
            checked = labelled = False
            for batch in loader:
                x, y = _batch(batch)
                if teacher is None and y is None:
                    raise InputError("train() needs (input, label) batches; the loader yields inputs only")
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True) if y is not None else None
                if x.is_floating_point() or x.is_complex():  # counted on the device: no host sync per step
                    bad[0] += (~torch.isfinite(x)).any()
                labelled = labelled or y is not None
                out = _forward(net, x, logits, "student" if teacher is not None else "model")
                if teacher is not None:
                    with torch.no_grad():
                        t_out = _forward(teacher, x, logits, "teacher")
                    bad[1] += (~torch.isfinite(t_out)).any()
                    if not checked:
                        _same_outputs(out, t_out)
                        checked = True
                ce = F.cross_entropy(out, y) if y is not None else out.new_zeros(())
                if teacher is not None:
                    kl = _kl(out, t_out, temperature) * temperature ** 2
                    loss = kd_weight * kl + (1 - kd_weight) * ce if y is not None else kl
                else:
                    kl, loss = out.new_zeros(()), ce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                n = len(x)
                right = (out.argmax(1) == y).sum() if y is not None else out.new_zeros(())
                # summed on the device: no host sync per step
                sums += torch.stack([loss.detach() * n, ce.detach() * n, kl.detach() * n, right.to(out.dtype),
                                     out.new_tensor(float(n))]).to(torch.float64)
                if bar is not None and not bar.disable:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
            if dist is not None:
                dist.all_reduce(sums)  # every rank reports the same history
                dist.all_reduce(bad)
            sums, bad = sums.cpu(), bad.cpu()
            if float(sums[4]) == 0:
                raise InputError(f"the loader yielded no samples in epoch {epoch + 1}: nothing was trained; give it "
                                 f"a non-empty dataset (drop_last=True drops a dataset smaller than one batch)")
            if not math.isfinite(float(sums[0])):  # (the teacher's NaN on held-out batches counts with the rest)
                raise InputError(_non_finite(float(sums[0]), epoch + 1, int(bad[0]), int(bad[1]) + keeper.bad_teacher,
                                             lr))
            n = max(float(sums[4]), 1.0)
            history.append({"epoch": epoch + 1, "loss": float(sums[0]) / n, "ce": float(sums[1]) / n,
                            "kl": float(sums[2]) / n / temperature ** 2 if teacher is not None else None,
                            "accuracy": float(sums[3]) / n if labelled else None,
                            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
            keeper.check(epoch + 1)
        keeper.restore(epochs)
        if dist is not None:
            for b in model.buffers():  # batch-norm statistics saw each rank's own batches: take rank 0's
                dist.broadcast(b.data, 0)
    finally:
        if bar is not None:
            bar.close()
        if created:
            dist.destroy_process_group()
    model.eval()
    return FitResult(model, history, time.perf_counter() - start, world, str(dev), keeper.figures, keeper.metric,
                     keeper.kept, keeper.on)


# ---------------------------------------------------------------------------------------------- validation


def _hold_out(loader, validation, seed):
    """(the batches to train on, the batches to validate on or None, what the figures are measured on): the
    fraction `validation` of the data held out by a permutation seeded with `seed`, at least one batch."""
    if validation is None or validation is False or (isinstance(validation, (int, float)) and validation == 0):
        return loader, None, ""
    if not isinstance(validation, (int, float)) or isinstance(validation, bool):
        if validation is True or isinstance(validation, (torch.Tensor, str)) or not hasattr(validation, "__iter__"):
            raise InputError(f"validation must be a fraction in [0, 1) of the training data to hold out, batches of "
                             f"its own, or None; got {type(validation).__name__}")
        return loader, validation, "the validation batches given"
    if not 0 < validation < 1:
        raise InputError(f"validation must be a fraction in [0, 1) of the training data to hold out, batches of its "
                         f"own, or None; got {validation!r}")
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    if isinstance(loader, DataLoader):
        ds, b = loader.dataset, loader.batch_size
        if b is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__") or \
                type(loader.sampler) not in (SequentialSampler, RandomSampler):
            return loader, loader, ("the training data itself (a DataLoader with its own sampler or batch sampler "
                                    "cannot be split: pass validation=batches)")
        n = len(ds)
        k = max(b, round(validation * n))
        if n - k < b:
            return loader, loader, f"the training data itself ({n} samples: too few to hold out a batch of {b})"
        perm = torch.randperm(n, generator=g)
        common = dict(batch_size=b, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn)
        train = DataLoader(Subset(ds, sorted(perm[k:].tolist())), shuffle=type(loader.sampler) is RandomSampler,
                           generator=loader.generator, drop_last=loader.drop_last, **common)
        return train, DataLoader(Subset(ds, sorted(perm[:k].tolist())), **common), f"{k} of {n} samples held out"
    if hasattr(loader, "__len__") and hasattr(loader, "__getitem__"):  # a list of batches: whole batches held out
        n = len(loader)
        k = max(1, round(validation * n))
        if n - k < 1:
            return loader, loader, f"the training data itself ({n} batch(es): too few to hold one out)"
        pick = set(torch.randperm(n, generator=g)[:k].tolist())
        return ([loader[i] for i in range(n) if i not in pick], [loader[i] for i in sorted(pick)],
                f"{k} of {n} batches held out")
    return loader, None, ("nothing: the loader has no length to hold data out of (pass validation=batches, or "
                          "validation=0)")


class _Keeper:
    """Measures the student on the held-out batches before training and after each epoch, and keeps the state that
    measured best: the higher accuracy (or agreement); on a tie (a small held-out set saturates) the lower loss
    there (cross-entropy on the labels, else KL to the teacher at T = 1); on a tie of both, the earlier state."""

    def __init__(self, batches, on, keep_best, model, teacher, dev, logits, dist):
        self.batches, self.on, self.keep_best = batches, on, keep_best
        self.model, self.teacher, self.dev, self.logits, self.dist = model, teacher, dev, logits, dist
        self.figures, self.metric, self.kept, self.bad_teacher = [], None, None, 0
        self.best, self.best_value = None, (-math.inf, -math.inf)

    def check(self, epoch: int) -> None:
        if self.batches is None:
            return
        if self.dist is not None:  # each rank's norms saw its own batches: measure rank 0's, on every rank
            for b in self.model.buffers():
                self.dist.broadcast(b.data, 0)
        f = _measure(self.model, self.teacher, self.batches, self.dev, self.logits)
        if f["bad_inputs"]:
            raise InputError(f"{f['bad_inputs']} of the {f['batches']} validation batch(es) hold NaN or inf inputs; "
                             f"clean the data (e.g. drop those samples or torch.nan_to_num)")
        if f["bad_teacher"] and epoch > 0:  # (before training: counted with the training batches' in epoch 1)
            raise InputError(f"the teacher returned NaN or inf logits on {f['bad_teacher']} validation batch(es); "
                             f"check the teacher model on this data")
        self.bad_teacher = f["bad_teacher"]
        if f["samples"] == 0:  # nothing to measure on: the training loop says why
            self.batches = None
            return
        if self.metric is None:
            self.metric = "accuracy" if f["accuracy"] is not None else "agreement"
        value = (f[self.metric], -(f["ce"] if self.metric == "accuracy" else f["kl"]))
        if self.dist is not None:  # one decision on every rank
            t = torch.tensor(value, dtype=torch.float64, device=self.dev)
            self.dist.broadcast(t, 0)
            value = tuple(t.tolist())
        self.figures.append({"epoch": epoch, "accuracy": f["accuracy"], "agreement": f["agreement"],
                             "ce": f["ce"], "kl": f["kl"], "samples": f["samples"]})
        if not self.keep_best:
            self.kept = epoch
        elif value > self.best_value:
            self.best_value, self.kept = value, epoch
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def restore(self, epochs: int) -> None:
        if self.best is not None and self.kept != epochs:
            self.model.load_state_dict(self.best)
        self.best = None
        if not self.figures:
            self.kept = epochs


@torch.no_grad()
def _measure(model, teacher, batches, dev, logits) -> dict:
    """Top-1 agreement with the teacher, KL(teacher || model) at T = 1 and (every batch labelled) accuracy and
    cross-entropy of `model` in eval mode, per sample; the batches whose inputs or teacher outputs are not finite."""
    model.eval()
    agree = right = seen = labelled = n = bad_inputs = bad_teacher = 0
    kl = ce = 0.0
    try:
        for batch in batches:
            x, y = _batch(batch)
            x = x.to(dev)
            n += 1
            if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
                bad_inputs += 1
                continue
            s = _forward(model, x, logits, "student")
            t = _forward(teacher, x, logits, "teacher")
            _same_outputs(s, t)
            bad_teacher += not bool(torch.isfinite(t).all())
            agree += int((s.argmax(1) == t.argmax(1)).sum())
            kl += float(_kl(s.float(), t.float(), 1.0, reduction="sum"))
            if y is not None:
                right += int((s.argmax(1) == y.to(dev)).sum())
                ce += float(F.cross_entropy(s.float(), y.to(dev), reduction="sum"))
                labelled += len(y)
            seen += len(x)
    finally:
        model.train()
    full = seen and labelled == seen
    return {"agreement": agree / seen if seen else None, "kl": kl / seen if seen else None,
            "accuracy": right / seen if full else None, "ce": ce / seen if full else None,
            "samples": seen, "batches": n, "bad_inputs": bad_inputs, "bad_teacher": bad_teacher}


# ----------------------------------------------------------------------------------------------------- helpers


def _check_module(m, what: str) -> None:
    if not isinstance(m, nn.Module):
        raise InputError(f"the {what} must be a torch.nn.Module (or a GraphModule a pass returned), got "
                         f"{type(m).__name__}")


def _check_values(m: nn.Module, what: str) -> None:
    """An InputError for a model whose tensors hold no values (the meta device): it can be neither run nor trained."""
    for name, t in (*m.named_parameters(), *m.named_buffers()):
        if t.is_meta:
            raise InputError(f"the {what}'s tensor {name!r} is on the meta device (a shape without values): "
                             f"materialise it first, e.g. {what}.to_empty(device='cpu') then load_state_dict(...), "
                             f"or load_state_dict(..., assign=True)")


def _non_finite(loss: float, epoch: int, bad_inputs: int, bad_teacher: int, lr) -> str:
    """Why the loss became NaN or inf: the data, the teacher, or (neither) the step size."""
    if bad_inputs:
        return (f"the loss became {loss} in epoch {epoch}: {bad_inputs} batch(es) of the loader hold NaN or inf "
                f"inputs; clean the data (e.g. drop those samples or torch.nan_to_num)")
    if bad_teacher:
        return (f"the loss became {loss} in epoch {epoch}: the teacher returned NaN or inf logits on {bad_teacher} "
                f"batch(es); check the teacher model on this data")
    return f"the loss became {loss} in epoch {epoch} with finite inputs: lower lr (now {lr})"


def _iterable(loader):
    if loader is None or isinstance(loader, (torch.Tensor, str)) or not hasattr(loader, "__iter__"):
        raise InputError(f"loader must be an iterable of batches such as a torch DataLoader, got "
                         f"{type(loader).__name__}")
    return loader


def _batch(batch):
    """(inputs, labels or None) from a tensor or an (input, label, ...) tuple."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        if len(batch) == 1:
            return batch[0], None
        y = batch[1]
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InputError(f"a batch's second item must be integer class labels, got "
                             f"{getattr(y, 'dtype', type(y).__name__)}")
        return batch[0], y
    raise InputError(f"a batch must be a tensor or an (input, label) tuple of tensors, got {type(batch).__name__}")


def _forward(model, x, logits=None, who: str = "model"):
    """The class logits [batch, classes] of model(x), found in what it returns (see `distill`'s logits=)."""
    out = model(x)
    got = logits(out) if callable(logits) else _find_logits(out, logits)
    if isinstance(got, torch.Tensor) and got.dim() == 2:
        return got
    if logits is None:
        found = "" if got is None or got is out else f" (the logits found: {_describe(got)})"
        raise InputError(f"the {who} returned {_describe(out)}{found}: no class logits [batch, classes] in it; pass "
                         f"logits='key' (a key or attribute of the output) or logits=lambda out: ... returning them")
    raise InputError(f"the {who} returned {_describe(out)} and logits={logits!r} gave "
                     f"{_describe(got) if got is not None else 'nothing'}: make it give the class logits "
                     f"[batch, classes]")


def _find_logits(out, key=None):
    """The logits tensor in a model's output: `key` (a key or attribute) when given; else a tensor itself, a
    mapping's "logits" or only tensor (transformers' ModelOutput is a mapping), a `logits` attribute, a tuple's or
    list's first tensor. None where there is none."""
    if key is not None:
        return out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        return tensors[0] if len(tensors) == 1 else None
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)):
        return next((v for v in out if isinstance(v, torch.Tensor)), None)
    return None


def _describe(out) -> str:
    """A model's output in a few words: types, keys and shapes."""
    def one(v):
        return f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        items = list(out.items())
        return f"a {type(out).__name__} with " + (", ".join(f"{k!r}: {one(v)}" for k, v in items[:6])
                                                + (", ..." if len(items) > 6 else "") if items else "no keys")
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: " + ", ".join(one(v) for v in out[:6]) + \
            (", ..." if len(out) > 6 else "")
    return f"a {type(out).__name__}"


def _check_logits(logits) -> None:
    if logits is not None and not isinstance(logits, str) and not callable(logits):
        raise InputError(f"logits must be None, a key or attribute name, or a function output -> logits tensor; got "
                         f"{type(logits).__name__}")


def _same_outputs(s, t) -> None:
    if s.shape != t.shape:
        raise InputError(f"the student returns {tuple(s.shape)} and the teacher {tuple(t.shape)}: distillation "
                         f"needs the same classes")


def _kl(s, t, temperature: float, reduction: str = "batchmean"):
    return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                    reduction=reduction)


def _device(device, distributed: bool = False) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for CUDA, which this machine does not have; use device='cpu'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
    return dev


def _join(dev: torch.device):
    """(torch.distributed, whether this call created the process group)."""
    import torch.distributed as dist
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist, False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist, True


def _sharded(loader, world: int, rank: int, seed):
    """The loader rebuilt on a DistributedSampler (the same batch size, workers and collate function)."""
    from torch.utils.data import DataLoader, DistributedSampler
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise InputError("under torchrun (WORLD_SIZE > 1) the loader must be a torch DataLoader with a batch_size, "
                         "so that each process can get its shard of the dataset")
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=0 if seed is None else seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last), sampler
