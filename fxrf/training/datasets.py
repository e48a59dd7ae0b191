"""Small classification data sets that need no download, for the accuracy benchmarks and their tests.

- MNIST-1D (Greydanus 2020, the `mnist1d` package): 1-D signals of length 40, ten classes, made by the package's
  own generator (`mnist1d.data.make_dataset`) with a fixed seed; its download path is never used. Tensors are
  [N, 1, 40] (one channel, for nn.Conv1d).
- scikit-learn's 8x8 digits (`sklearn.datasets.load_digits`, 1,797 images shipped inside the wheel), used at their
  native 8x8 size, scaled to [0, 1]: tensors [N, 1, 8, 8].
- same-distance (`same_distance`, generated here): two binary patches on a noisy map, the second exactly `k` pixels
  from the first along a random axis direction, and a distractor patch elsewhere (never k from another); do the
  two hold the same code? A task where the receptive field matters: every code has the same number of lit pixels
  (brightness tells nothing), which codes occur says nothing (the distractor), and the pair can be anywhere, so
  some unit must see both patches, k + patch pixels end to end. `SameDistanceStream` draws fresh samples
  every epoch (a fixed small set is memorised).

Both splits are stratified: the training set holds exactly `n_train // 10` samples of every class, so a small
training set (the benchmarks keep the baselines below saturation that way) stays balanced. Generated MNIST-1D
data is cached under `cache_dir()` ($XDG_CACHE_HOME/fxrf or ~/.cache/fxrf), one file per generator setting; the
same arguments always give the same tensors.

    >>> from fxrf.training.datasets import digits, loaders
    >>> s = digits(n_train=200, seed=0)
    >>> s.train.tensors[0].shape, s.test.tensors[0].shape, s.classes
    (torch.Size([200, 1, 8, 8]), torch.Size([1597, 1, 8, 8]), 10)
    >>> train, test = loaders(s, batch_size=64, seed=0)
    >>> x, y = next(iter(train)); x.shape, y.dtype
    (torch.Size([64, 1, 8, 8]), torch.int64)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import InputError

__all__ = ["Split", "mnist1d", "digits", "same_distance", "SameDistanceStream", "loaders", "cache_dir", "describe",
           "MNIST1D_LENGTH"]

MNIST1D_LENGTH = 40  # the generator's final_seq_length (its default)
CLASSES = 10


@dataclass
class Split:
    """A train/test pair of TensorDatasets (inputs float32, labels int64) and how they were made."""

    train: TensorDataset
    test: TensorDataset
    name: str
    classes: int = CLASSES
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple:
        """The shape of one batch-of-one input, e.g. (1, 1, 40): what fxrf.analyze takes as example input."""
        return (1,) + tuple(self.train.tensors[0].shape[1:])


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/fxrf, else ~/.cache/fxrf (created on first use)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxrf"


def _check_sizes(n_train: int, n_test: int | None) -> None:
    if not isinstance(n_train, int) or n_train < CLASSES or n_train % CLASSES:
        raise InputError(f"n_train must be a positive multiple of {CLASSES} (a stratified split), got {n_train!r}")
    if n_test is not None and (not isinstance(n_test, int) or n_test < CLASSES or n_test % CLASSES):
        raise InputError(f"n_test must be a positive multiple of {CLASSES} or None, got {n_test!r}")


def _stratified(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int | None, seed: int, name: str,
                info: dict) -> Split:
    """n_train // 10 samples of each class for training; the rest (or n_test // 10 per class) for testing."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = n_train // CLASSES
        if len(idx) <= k:
            raise InputError(f"{name}: class {c} has {len(idx)} samples, fewer than the {k + 1} a split needs")
        tr.append(idx[:k])
        te.append(idx[k:] if n_test is None else idx[k:k + n_test // CLASSES])
    tr, te = rng.permutation(np.concatenate(tr)), np.sort(np.concatenate(te))

    def ds(i):
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x[i], dtype=np.float32)),
                             torch.from_numpy(y[i].astype(np.int64)))

    return Split(ds(tr), ds(te), name, CLASSES, dict(info, n_train=len(tr), n_test=len(te), seed=seed))


def _generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's generator, all samples in one set (train_split 1.0); class-balanced by construction."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise InputError("MNIST-1D needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
    # make_dataset seeds numpy's and Python's global generators: keep the caller's streams untouched
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64)


def mnist1d(n_train: int = 1000, n_test: int | None = 4000, *, seed: int = 0, data_seed: int = 42,
            pool: int = 10000, cache: bool = True) -> Split:
    """MNIST-1D generated locally: a pool of max(pool, n_train + n_test) signals (generator seed `data_seed`),
    split per class with `seed` (n_test None: the whole rest of the pool). Inputs [N, 1, 40], standardised by the
    generator. One pool serves every split size, so it is generated (about 10 s for 10,000) and cached once.

    >>> s = mnist1d(n_train=100, n_test=100, pool=500, cache=False)
    >>> s.train.tensors[0].shape, sorted(set(s.train.tensors[1].bincount().tolist()))
    (torch.Size([100, 1, 40]), [10])
    """
    _check_sizes(n_train, n_test)
    total = max(pool, n_train + (n_test or 0))
    total += (-total) % CLASSES  # the generator makes num_samples // 10 per class
    path = cache_dir() / f"mnist1d-{total}-{data_seed}.npz"
    got = _read_pool(path, total) if cache else None
    if got is not None:
        x, y = got
    else:
        x, y = _generate_mnist1d(total, data_seed)
        if cache:
            _write_pool(path, x, y)
    info = {"source": "mnist1d.data.make_dataset", "pool": total, "data_seed": data_seed,
            "sha1": hashlib.sha1(x.tobytes()).hexdigest()[:12]}
    return _stratified(x[:, None, :], y, n_train, n_test, seed, "mnist1d", info)


def _read_pool(path: Path, total: int):
    """(x, y) from a cached pool, or None where there is none or it is damaged (empty, truncated, another
    layout): the pool is then generated again and the file replaced."""
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except Exception:  # none yet (FileNotFoundError), or damaged: BadZipFile, EOFError, ValueError, KeyError, ...
        return None
    if x.shape != (total, MNIST1D_LENGTH) or y.shape != (total,) or not np.isfinite(x).all():
        return None
    return x, y


def _write_pool(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write the pool atomically (a temporary file, then a rename); a cache that cannot be written is skipped."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # concurrent writers (DDP ranks) never clash
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)
    except OSError:  # a read-only or misplaced cache: the data is here already, only the next call pays again
        with contextlib.suppress(OSError):
            tmp.unlink()


def digits(n_train: int = 500, n_test: int | None = None, *, seed: int = 0, size: int = 8) -> Split:
    """scikit-learn's bundled 8x8 digits, pixel values / 16, at native size or bilinearly upsampled to
    `size` x `size` (e.g. 16: room for four stages of 2x2 pooling). The test set is every sample not used for
    training unless `n_test` says fewer."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InputError("the digits need scikit-learn: pip install scikit-learn") from e
    _check_sizes(n_train, n_test)
    d = load_digits()
    if not isinstance(size, int) or size < 8:
        raise InputError(f"size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    if size != 8:
        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                            align_corners=False).numpy()
    y = d.target.astype(np.int64)
    info = {"source": "sklearn.datasets.load_digits", "pool": len(y),
            "scale": "1/16, " + ("native 8x8" if size == 8 else f"bilinear 8x8 -> {size}x{size}")}
    return _stratified(x, y, n_train, n_test, seed, "digits", info)


def _codes(patch: int, codes: int, seed: int) -> np.ndarray:
    """`codes` distinct patch x patch binary patterns, each with patch*patch // 2 lit pixels."""
    import itertools
    n, lit = patch * patch, patch * patch // 2
    every = list(itertools.combinations(range(n), lit))
    if codes < 2 or codes > len(every):
        raise InputError(f"codes must be between 2 and {len(every)} for {patch}x{patch} patches, got {codes}")
    rng = np.random.default_rng(seed)
    out = np.zeros((codes, n), dtype=np.float32)
    for i, j in enumerate(rng.choice(len(every), size=codes, replace=False)):
        out[i, list(every[j])] = 1.0
    return out.reshape(codes, patch, patch)


def _same_distance_draw(n: int, k: int, size: int, patch: int, table: np.ndarray, noise: float, rng,
                        distractors: int = 1) -> tuple:
    """n images [n, 1, size, size] and labels (1: the two patches k apart hold the same code), plus `distractors`
    patches of random codes elsewhere, none of them k from another patch along an axis and none overlapping: with
    them, which codes occur in an image says nothing about the pair (without them, "one code type present" would
    give the label away to a global pool of local code detectors)."""
    codes = len(table)
    a = rng.integers(codes, size=n)
    same = rng.random(n) < 0.5
    b = np.where(same, a, (a + rng.integers(1, codes, size=n)) % codes)
    direction = rng.integers(4, size=n)  # +x, -x, +y, -y: the second patch's origin is the first's + k along it
    dy = np.where(direction == 2, k, np.where(direction == 3, -k, 0))
    dx = np.where(direction == 0, k, np.where(direction == 1, -k, 0))
    span = size - patch  # origins 0..span
    y0 = rng.integers(np.maximum(0, -dy), span - np.maximum(0, dy) + 1)
    x0 = rng.integers(np.maximum(0, -dx), span - np.maximum(0, dx) + 1)
    x = rng.normal(0.0, noise, size=(n, 1, size, size)).astype(np.float32) if noise else \
        np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        placed = [(int(y0[i]), int(x0[i])), (int(y0[i] + dy[i]), int(x0[i] + dx[i]))]
        for (y, xx), c in zip(placed, (a[i], b[i])):
            x[i, 0, y:y + patch, xx:xx + patch] += table[c]
        for _ in range(distractors):
            for _try in range(100):
                y, xx = (int(v) for v in rng.integers(0, span + 1, size=2))
                if all(max(abs(y - py), abs(xx - px)) >= patch and not ((y == py and abs(xx - px) == k) or
                                                                        (xx == px and abs(y - py) == k))
                       for py, px in placed):
                    placed.append((y, xx))
                    x[i, 0, y:y + patch, xx:xx + patch] += table[rng.integers(codes)]
                    break
            else:
                raise InputError(f"no room for {distractors} distractor(s) on a {size}x{size} map at k={k}: give a "
                                 f"larger size or fewer distractors")
    return x, same.astype(np.int64)


def _check_same_distance(k, size, patch) -> None:
    for name, v in (("k", k), ("size", size), ("patch", patch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if k < patch or k + patch > size:
        raise InputError(f"k={k} must be at least the patch ({patch}: the patches must not overlap) and k + patch "
                         f"at most the map ({size})")


def same_distance(k: int, n_train: int = 2000, n_test: int = 2000, *, size: int = 24, patch: int = 3,
                  codes: int = 4, noise: float = 0.1, distractors: int = 1, seed: int = 0,
                  data_seed: int = 42) -> Split:
    """The same-distance task at distance `k` (fixed train and test sets; for training on fresh samples every epoch
    use `SameDistanceStream` and keep this split's test set). Images [N, 1, size, size]; two classes (1: same code).
    The codes depend on `data_seed` only, so every k and seed share them; the samples on `seed`.

    >>> s = same_distance(8, n_train=100, n_test=50, seed=0)
    >>> s.train.tensors[0].shape, s.classes, s.info["k"]
    (torch.Size([100, 1, 24, 24]), 2, 8)
    """
    _check_same_distance(k, size, patch)
    _check_sizes(n_train, n_test)
    table = _codes(patch, codes, data_seed)
    rng = np.random.default_rng([data_seed, seed, k])
    xtr, ytr = _same_distance_draw(n_train, k, size, patch, table, noise, rng, distractors)
    xte, yte = _same_distance_draw(n_test, k, size, patch, table, noise,
                                   np.random.default_rng([data_seed, 10 ** 6 + seed, k]), distractors)
    info = {"k": k, "size": size, "patch": patch, "codes": codes, "noise": noise, "distractors": distractors,
            "seed": seed,
            "data_seed": data_seed, "lit": int(table[0].sum())}
    return Split(TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)),
                 TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)), "same_distance", 2, info)


class SameDistanceStream:
    """Training batches of the same-distance task drawn afresh every epoch (iterate it once per epoch), like a
    DataLoader of (input, label) batches: epoch e draws from seed (seed, e)."""

    def __init__(self, k: int, *, batch_size: int = 64, batches: int = 30, size: int = 24, patch: int = 3,
                 codes: int = 4, noise: float = 0.1, distractors: int = 1, seed: int = 0, data_seed: int = 42):
        _check_same_distance(k, size, patch)
        self.distractors = distractors
        self.k, self.batch_size, self.batches, self.size, self.patch = k, batch_size, batches, size, patch
        self.noise, self.seed, self.data_seed = noise, seed, data_seed
        self.table = _codes(patch, codes, data_seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        rng = np.random.default_rng([self.data_seed, self.seed, self.k, 2 ** 20 + self.epoch])
        self.epoch += 1
        for _ in range(self.batches):
            x, y = _same_distance_draw(self.batch_size, self.k, self.size, self.patch, self.table, self.noise, rng,
                                       self.distractors)
            yield torch.from_numpy(x), torch.from_numpy(y)


def loaders(split: Split, batch_size: int = 128, *, seed: int = 0, test_batch_size: int = 1024,
            drop_last: bool = False) -> tuple[DataLoader, DataLoader]:
    """(train loader, shuffled by a generator seeded with `seed`; test loader, in order)."""
    if not isinstance(split, Split):
        raise InputError(f"loaders() takes a fxrf.training.datasets.Split (from mnist1d() or digits()), got "
                         f"{type(split).__name__}")
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=g, drop_last=drop_last)
    test = DataLoader(split.test, batch_size=test_batch_size, shuffle=False)
    return train, test


def describe(split: Split) -> str:
    """One line: name, sizes, pool and seeds (for logs)."""
    return f"{split.name}: " + json.dumps(split.info, sort_keys=True)
