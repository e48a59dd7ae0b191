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

`fxrf.distill` is this module's `distill` function.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

try:  # a progress bar when tqdm is installed; training works the same without it
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

__all__ = ["distill", "train", "evaluate", "kl_to_teacher", "FitResult"]


@dataclass
class FitResult:
    """What `train` and `distill` return."""

    model: nn.Module  # the trained model (distill: a copy of the student; train: the model given)
    history: list = field(default_factory=list)  # per epoch: epoch, loss, ce, kl, accuracy (train batches), lr, seconds
    seconds: float = 0.0  # wall time of the whole run
    world_size: int = 1  # processes that trained together (torchrun)
    device: str = "cpu"


# --------------------------------------------------------------------------------------------- public entry points


def distill(student: nn.Module, teacher: nn.Module, loader, *, epochs: int, lr: float | None = None,
            temperature: float = 4.0, kd_weight: float = 0.5, weight_decay: float = 0.0, device=None,
            progress: bool | None = None, seed: int | None = None) -> FitResult:
    """Fine-tune a copy of `student` against `teacher` on `loader`; neither model is modified.

    loader yields input tensors, or (input, label) tuples (then the cross-entropy term is added with weight
    1 - kd_weight). lr: AdamW's learning rate (None: 1e-3), annealed to zero on a cosine over all steps.
    temperature: T of the softened outputs. device: "cpu", "cuda", a torch.device (None: the local CUDA device
    under torchrun when CUDA is present, else CUDA if available, else CPU). progress: a tqdm bar (None: only on a
    terminal). seed: seeds torch and the DistributedSampler. Returns FitResult (.model, .history).
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
    return _fit(copy.deepcopy(student), copy.deepcopy(teacher), loader, epochs=epochs,
                lr=1e-3 if lr is None else lr, weight_decay=weight_decay, temperature=float(temperature),
                kd_weight=float(kd_weight), device=device, progress=progress, seed=seed)


def train(model: nn.Module, loader, epochs: int, *, lr: float = 3e-3, weight_decay: float = 5e-4, device=None,
          progress: bool | None = None, seed: int | None = None) -> FitResult:
    """Train `model` in place with the cross-entropy on a loader of (input, label) batches: AdamW, cosine decay.

    The same loop as `distill` (torchrun data parallelism included), without a teacher.
    """
    _check_module(model, "model")
    _check_values(model, "model")
    return _fit(model, None, loader, epochs=epochs, lr=lr, weight_decay=weight_decay, temperature=1.0,
                kd_weight=0.0, device=device, progress=progress, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device=None) -> float:
    """Top-1 accuracy (a fraction) of `model` on a loader of (input, label) batches, in eval mode (the model's
    mode is restored afterwards)."""
    _check_module(model, "model")
    _check_values(model, "model")
    dev = _device(device)
    was = model.training
    model.eval()
    right = seen = 0
    try:
        for batch in _iterable(loader):
            x, y = _batch(batch)
            if y is None:
                raise InputError("evaluate() needs (input, label) batches; the loader yields inputs only")
            out = _forward(model, x.to(dev))
            right += int((out.argmax(1) == y.to(dev)).sum())
            seen += len(y)
    finally:
        model.train(was)
    if seen == 0:
        raise InputError("evaluate() got an empty loader")
    return right / seen


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, loader, *, temperature: float = 4.0,
                  device=None) -> float:
    """Mean KL(teacher || student) per sample at `temperature` (no T^2 factor), both in eval mode."""
    _check_values(student, "student")
    _check_values(teacher, "teacher")
    dev = _device(device)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total = n = 0.0
    try:
        for batch in _iterable(loader):
            x = _batch(batch)[0].to(dev)
            s, t = _forward(student, x), _forward(teacher, x)
            total += float(_kl(s, t, temperature, reduction="sum"))
            n += len(x)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return total / max(n, 1)


# ------------------------------------------------------------------------------------------------------ the loop


def _fit(model, teacher, loader, *, epochs, lr, weight_decay, temperature, kd_weight, device, progress, seed):
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise InputError(f"weight_decay must be >= 0, got {weight_decay!r}")
    _iterable(loader)
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
    try:
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
                out = _forward(net, x)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = _forward(teacher, x)
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
            if not math.isfinite(float(sums[0])):
                raise InputError(_non_finite(float(sums[0]), epoch + 1, int(bad[0]), int(bad[1]), lr))
            n = max(float(sums[4]), 1.0)
            history.append({"epoch": epoch + 1, "loss": float(sums[0]) / n, "ce": float(sums[1]) / n,
                            "kl": float(sums[2]) / n / temperature ** 2 if teacher is not None else None,
                            "accuracy": float(sums[3]) / n if labelled else None,
                            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
        if dist is not None:
            for b in model.buffers():  # batch-norm statistics saw each rank's own batches: take rank 0's
                dist.broadcast(b.data, 0)
    finally:
        if bar is not None:
            bar.close()
        if created:
            dist.destroy_process_group()
    model.eval()
    return FitResult(model, history, time.perf_counter() - start, world, str(dev))


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


def _forward(model, x):
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(f"the model must return class logits [batch, classes], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


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
