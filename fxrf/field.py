"""The per-channel receptive field of a tensor, and the algebra the op rules use on it.

A *reach* is what one output channel can see of a reference tensor (a stage input, or the model input): a set of
reference channels, and along each spatial dim k an interval [lo_k, hi_k] of reference pixels relative to the
neuron (the neuron at output position x sees [x*jump + lo, x*jump + hi], so its extent is hi - lo + 1).
Bounds stay uncapped here; capping at the stage size happens when a field is reported, which gives the same
result as the paper's per-layer min(., w_0) because the recurrence only ever adds.

A `Field` stores its distinct reaches once: `bits[i]` is reach i's channel set as a row of uint64 words (bit c =
channel c, so OR is union and popcount is the size, vectorised over all reaches at once) and `spans[i]` its
bounds as a row [lo_0, hi_0, lo_1, hi_1, ...]. An integer array `idx` over the tensor's channel-like axes
(every axis but batch and the spatial ones) says which reach each channel has. So reshape, transpose, cat, split,
roll and index_select are numpy ops on `idx`; a conv window is one vector add on `spans`; and after a standard
conv a 2048-channel field holds one reach.

`None` stands for "sees nothing of the reference" (constants, inputs from another stage); every function here
accepts it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False, init=False)
class Field:
    """Distinct reaches (`bits`, `spans`) plus, per channel, the index of its reach (`idx`)."""

    bits: np.ndarray  # (reaches, words) uint64: reach i's reference channels as a bitset
    spans: np.ndarray  # (reaches, 2 * dims) float: lo_0, hi_0, lo_1, hi_1, ...
    idx: np.ndarray  # int64 over the channel-like axes: which reach each channel has
    jump: tuple  # reference pixels per pixel of this tensor, per reference dim
    sp: tuple  # per reference spatial dim, the tensor axis (batch = 0) that holds it, or None once pooled away
    # Stage fields only: per reference dim k, a (reaches, 2*w0_k - 1) bool array of the offsets (-(w0-1)..w0-1,
    # column w0-1 is offset 0) a reach can see. Offsets beyond the map can never be seen, so this is exact and
    # bounded: a dilated conv whose outer taps fall off a small map does not count what it cannot see.
    taps: tuple | None = None
    # Stage fields: the reference map size; extents are then taken at the centre neuron, clipped by the map.
    # While no dilated or strided window has made holes, `taps` stays None and `spans` say it all (cheap).
    size: tuple | None = None

    def __init__(self, bits, spans, idx, jump, sp, taps=None, size=None):
        # the frozen dataclass's own __init__ sets each field through object.__setattr__, twice as slow: an
        # analysis makes fields by the hundred
        self.__dict__.update(bits=bits, spans=spans, idx=idx, jump=jump, sp=sp, taps=taps, size=size)

    @property
    def dims(self) -> int:
        """Number of reference spatial dims."""
        return len(self.sp)

    @property
    def ndim(self) -> int:
        """Rank of the tensor this field describes."""
        return 1 + self.idx.ndim + len(self.sp) - self.sp.count(None)

    @property
    def is_map(self) -> bool:
        """Whether every reference spatial dim is still an axis of the tensor."""
        return bool(self.sp) and None not in self.sp

    @property
    def channels(self) -> int:
        return int(self.idx.size)

    def channel_axes(self) -> list[int]:
        """Tensor axes that `idx` covers, in order."""
        return [a for a in range(1, self.ndim) if a not in self.sp]

    def idx_axis(self, tensor_axis: int) -> int:
        """Position in `idx` of a channel-like tensor axis (negative axes allowed); ValueError if it is spatial."""
        return self.channel_axes().index(tensor_axis % self.ndim)

    def replace(self, **kw) -> "Field":
        if not kw.keys() <= _FIELDS:
            raise TypeError(f"Field has no fields {sorted(set(kw) - _FIELDS)}")
        get = kw.get
        out = Field(get("bits", self.bits), get("spans", self.spans), get("idx", self.idx), get("jump", self.jump),
                    get("sp", self.sp), get("taps", self.taps), get("size", self.size))
        known = self.__dict__
        if len(known) > len(_FIELDS):  # facts remembered about the reaches: those of the arrays kept carry over
            for k, on in _FACTS.items():
                if k in known and not kw.keys() & on:
                    out.__dict__[k] = known[k]
        return out

    def with_idx(self, idx: np.ndarray, sp: tuple | None = None, jump: tuple | None = None) -> "Field":
        """Same reaches, channels rearranged by `idx` (reaches no channel refers to any more are dropped)."""
        idx = np.asarray(idx, dtype=np.int64)
        bits, spans, taps, used = self.bits, self.spans, self.taps, None
        if len(bits) > 1:
            used = np.bincount(idx.ravel(), minlength=len(bits))
            if not used.all():
                keep = np.flatnonzero(used)
                lut = np.full(len(bits), -1, dtype=np.int64)
                lut[keep] = np.arange(len(keep))
                idx = lut[idx]
                bits, spans, used = _frozen(bits[keep]), _frozen(spans[keep]), used[keep]
                taps = _rows(self.taps, keep)
        idx = _uniform(idx.shape) if len(bits) == 1 else _contiguous(idx)
        out = Field(bits, spans, _frozen(idx), self.jump if jump is None else tuple(jump),
                    self.sp if sp is None else tuple(sp), taps, self.size)
        if len(bits) > 1:  # counted above; and with every reach kept, what follows from the bits carries over
            out.__dict__["_per_reach"] = used
            if bits is self.bits:
                out.__dict__.update({k: self.__dict__[k] for k in _OF_BITS + _OF_SPANS + ("_one_row",)
                                     if k in self.__dict__})
        return out

    def sets(self) -> list[frozenset]:
        """The reference channels each channel can see, in flattened channel order (for tests and users)."""
        flags = np.unpackbits(self.bits.view(np.uint8), axis=1, bitorder="little")
        as_sets = [frozenset(np.flatnonzero(row).tolist()) for row in flags]
        return [as_sets[i] for i in self.idx.ravel().tolist()]

    def extents(self, cap: Sequence[int], sizes: Sequence[int], capped: bool = True) -> np.ndarray:
        """Per channel (flattened) and reference dim, the extent the neuron at the centre of this tensor's map
        (`sizes` pixels per reference dim, 1 where pooled away) sees of a reference map of `cap` pixels.
        capped=False: the classic extent of the stack, hi - lo + 1, which may exceed `cap` (see `summary`)."""
        return self._reach_extents(tuple(cap), tuple(sizes), capped)[self.idx.ravel()]

    def _reach_extents(self, cap, sizes, capped=True) -> np.ndarray:
        if not capped:  # the hull of the offsets, not clipped to the map: sum of (w_k - 1) * D_k, plus 1
            return np.rint(self.spans[:, 1::2] - self.spans[:, 0::2] + 1).astype(np.int64)
        if self.taps is None and self.size is None:  # the classic hull, capped as in the paper
            ext = np.rint(self.spans[:, 1::2] - self.spans[:, 0::2] + 1).astype(np.int64)
            return np.minimum(ext, np.asarray(cap, dtype=np.int64))
        if self.taps is None:  # dense offsets lo..hi: clip them to the map as seen from the centre neuron
            c = np.asarray([(n // 2) * j for n, j in zip(sizes, self.jump)], dtype=float)
            first = np.maximum(self.spans[:, 0::2], -c)
            last = np.minimum(self.spans[:, 1::2], np.asarray(cap, dtype=float) - 1 - c)
            return np.maximum(np.rint(last - first + 1), 0).astype(np.int64)
        out = np.zeros((len(self.bits), len(cap)), dtype=np.int64)
        for k, (t, w0, n) in enumerate(zip(self.taps, cap, sizes)):
            c = int((n // 2) * self.jump[k])  # the neuron's position in reference pixels
            # offsets -c .. w0-1-c: the map as seen from there (a padded map's centre may lie beyond the reference
            # map, where only part of that range is stored; the rest is never seen from inside the map)
            seen = t[:, max(w0 - 1 - c, 0): max(2 * w0 - 1 - c, 0)]
            if seen.shape[1] == 0:
                continue
            anyv = seen.any(axis=1)
            first = seen.argmax(axis=1)
            last = seen.shape[1] - 1 - seen[:, ::-1].argmax(axis=1)
            out[:, k] = np.where(anyv, last - first + 1, 0)
        return out

    def summary(self, cap: Sequence[int], sizes: Sequence[int] | None = None,
                capped: bool = True) -> tuple[tuple[int, ...], int, float]:
        """(spatial extent per dim, the largest over channels (see `extents`); min channels; mean channels).

        capped=False reports the uncapped extent (the recurrence w_k = w_{k-1} + (w_k - 1) * D_k without
        min(., w_0)), which is what the paper's Tables 3-5 use (docs/paper.md); channels are unaffected."""
        sizes = tuple(cap) if sizes is None else tuple(sizes)
        # one reach (or reaches all alike: a residual stream, `_one_row`), its hull: plain Python is faster
        if (len(self.bits) == 1 or self.__dict__.get("_one_row")) and (self.taps is None or not capped):
            row = self.spans[0].tolist()
            spatial = []
            for k, (w0, n, j) in enumerate(zip(cap, sizes, self.jump)):
                lo, hi = row[2 * k], row[2 * k + 1]
                if not capped:
                    spatial.append(int(round(hi - lo + 1)))
                elif self.size is None:
                    spatial.append(min(int(round(hi - lo + 1)), w0))
                else:
                    c = (n // 2) * j
                    spatial.append(max(int(round(min(hi, w0 - 1 - c) - max(lo, -c) + 1)), 0))
            n = int.from_bytes(self.bits[0].tobytes(), "little").bit_count()  # one popcount, no numpy call
            return tuple(spatial), n, float(n)
        spatial = self._max_extents(tuple(cap), sizes, capped)
        counts = self._counts
        if len(counts) == 1:
            return spatial, int(counts[0]), float(counts[0])
        return spatial, int(counts.min()), float(np.dot(self._per_reach, counts)) / self.idx.size

    def _max_extents(self, cap, sizes, capped) -> tuple:
        """The largest of `_reach_extents` per dim. Without taps, every step from a reach's bounds to its extent is
        non-decreasing in their difference, so the largest extent is that of the largest difference: one pass down a
        column, no row per reach (a stage field after a residual add has one reach per channel)."""
        if self.taps is not None and capped:
            return tuple(int(e) for e in np.ascontiguousarray(self._reach_extents(cap, sizes, capped).T).max(axis=1))
        out = []
        for k, (w0, n, j) in enumerate(zip(cap, sizes, self.jump)):
            lo, hi = self.spans[:, 2 * k], self.spans[:, 2 * k + 1]
            if capped and self.size is not None:  # as _reach_extents: clipped to the map seen from the centre
                c = float((n // 2) * j)
                d = float((np.minimum(hi, float(w0) - 1 - c) - np.maximum(lo, -c)).max())
                out.append(max(int(np.rint(d + 1)), 0))
            else:
                e = int(np.rint(float((hi - lo).max()) + 1))
                out.append(min(e, w0) if capped else e)
        return tuple(out)

    @functools.cached_property
    def _per_reach(self) -> np.ndarray:  # channels per reach (mix sets it: it knows them without counting)
        return np.bincount(self.idx.ravel(), minlength=len(self.bits))

    @functools.cached_property
    def _union(self) -> np.ndarray:  # every channel any reach sees: a mix's one reach (identity and merge set it)
        return _frozen(_or(self.bits))

    @functools.cached_property
    def _bounds(self) -> np.ndarray:  # the hull of the reaches' bounds: a mix's one reach (identity and merge set it)
        return _frozen(_hull(self.spans))

    @functools.cached_property
    def _full(self) -> bool:  # whether every reach sees a pixel (then _bounds is the plain min and max)
        return not _empty_rows(self.spans).any()

    @functools.cached_property
    def _counts(self) -> np.ndarray:  # cached: BN and activations pass the same Field object on
        if len(self.bits) == 1:  # (most fields of a CNN: numpy's per-call overhead is most of the cost)
            return np.array([sum(w.bit_count() for w in self.bits[0].tolist())], dtype=np.int64)
        per_word = np.bitwise_count(self.bits)
        if per_word.shape[1] == 1:
            return per_word[:, 0].astype(np.int64)
        # a row sum as a float32 product: twice as fast as sum(axis=1) on short rows, exact below 2**24 channels
        return (per_word.astype(np.float32) @ np.ones(per_word.shape[1], dtype=np.float32)).astype(np.int64)


_OF_BITS = ("_union", "_counts")  # the cached properties that depend on `bits` alone
_OF_SPANS = ("_bounds", "_full")  # ... on `spans` alone
_FIELDS = frozenset(("bits", "spans", "idx", "jump", "sp", "taps", "size"))
# each remembered fact and the fields it depends on (Field.replace keeps it where none of them changes)
_FACTS = {"_union": {"bits"}, "_counts": {"bits"}, "_bounds": {"spans"}, "_full": {"spans"},
          "_one_row": {"bits", "spans", "taps"}, "_per_reach": {"bits", "idx"}}


def _uniform(shape: tuple) -> np.ndarray:
    """The index of a one-reach field: zeros, as a read-only broadcast view (nothing allocated; a window partition
    of a ViT map has millions of channel positions, and a permute of such an index would copy all of them)."""
    return _uniform_view(tuple(shape)).view()  # a view of its own: merge tells fields by idx identity (numpy and
    # Python ints of one value hash alike, so either finds the cached view)


@functools.lru_cache(maxsize=1024)
def _uniform_view(shape: tuple) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype=np.int64), shape)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of the same shape (np.ascontiguousarray makes a 0-d array 1-d: one more channel axis)."""
    return np.ascontiguousarray(a).reshape(np.shape(a))


def _or(bits: np.ndarray) -> np.ndarray:
    """Union of the rows of a bitset matrix."""
    return np.bitwise_or.reduce(bits, axis=0)


def _dense_taps(f: Field) -> tuple:
    """Tap rows for a field whose offsets are still the dense intervals in `spans`."""
    out = []
    for k, w0 in enumerate(f.size):
        o = np.arange(-(w0 - 1), w0)
        out.append(_frozen((o >= f.spans[:, 2 * k, None]) & (o <= f.spans[:, 2 * k + 1, None])))
    return tuple(out)


def _all_taps(fields) -> list | None:
    """Everyone's taps if any of them has holes (materialising the dense ones), else None."""
    if all(f.taps is None for f in fields):
        return None
    return [f.taps if f.taps is not None else _dense_taps(f) for f in fields]


def _rows(taps, rows):
    """The same reaches' taps, picked or repeated by `rows` (None stays None)."""
    return None if taps is None else tuple(_frozen(t[rows]) for t in taps)


def _union_taps(taps, groups):
    """Per group of reach indices, the OR of their taps."""
    if taps is None:
        return None
    return tuple(_frozen(np.stack([t[list(g)].any(axis=0) for g in groups])) for t in taps)


def _shift_or(t: np.ndarray, offsets) -> np.ndarray:
    """OR of `t` shifted right by each offset (a Minkowski sum with the tap set), columns falling off dropped."""
    offsets = sorted(set(int(o) for o in offsets))
    n = t.shape[1]
    if len(offsets) > 2 and offsets == list(range(offsets[0], offsets[-1] + 1)):  # dense: a sliding any()
        cs = np.concatenate([np.zeros((t.shape[0], 1), dtype=np.int64), np.cumsum(t, axis=1)], axis=1)
        i = np.arange(n)
        lo = np.clip(i - offsets[-1], 0, n)
        hi = np.clip(i - offsets[0] + 1, 0, n)
        return _frozen((cs[:, hi] - cs[:, lo]) > 0)
    out = np.zeros_like(t)
    for o in offsets:
        if o >= 0:
            out[:, o:] |= t[:, :n - o] if o < n else False
        elif -o < n:
            out[:, :n + o] |= t[:, -o:]
    return _frozen(out)


def _hull(spans: np.ndarray) -> np.ndarray:
    """The smallest bounds containing every row: min of the lo columns, max of the hi columns (rows that see no
    pixel left out, unless all are such)."""
    if len(spans) <= 2:  # the same in plain Python: a residual add of two one-reach fields, a window of one
        rows = spans.tolist()
        live = [r for r in rows if not any(r[k] > r[k + 1] for k in range(0, len(r), 2))]
        rows = live if live else rows
        return np.array([min(c) if k % 2 == 0 else max(c) for k, c in enumerate(zip(*rows))], dtype=spans.dtype)
    empty = _empty_rows(spans)
    if empty.any() and not empty.all():
        spans = spans[~empty]
    cols = np.ascontiguousarray(spans.T)  # numpy reduces a few long rows far faster than many short ones
    out = cols.max(axis=1)
    out[0::2] = cols[0::2].min(axis=1)
    return out


def words_for(channels: int) -> int:
    """uint64 words per bitset for a reference with `channels` channels."""
    return max(1, -(-channels // 64))


def identity(channel_shape: tuple, dims: int, offset: int = 0, sp: tuple | None = None, words: int = 0,
             map_size: Sequence[int] | None = None) -> Field:
    """A reference tensor [N, *channel_shape, *spatial] itself: channel i sees channel offset+i, one pixel wide.
    `words`: bitset width of the whole reference (several tensors can share one, at different offsets).
    `map_size`: track exact tap sets for a reference map of that size (stage fields)."""
    n = int(np.prod(channel_shape)) if channel_shape else 1
    c = np.arange(offset, offset + n)
    bits = np.zeros((n, max(words, words_for(offset + n))), dtype=np.uint64)
    bits[np.arange(n), c >> 6] = np.left_shift(np.uint64(1), (c & 63).astype(np.uint64))
    bits = _frozen(bits)
    spans = _frozen(np.zeros((n, 2 * dims)))
    idx = _frozen(np.arange(n, dtype=np.int64).reshape(channel_shape))
    first = 1 + len(channel_shape)
    out = Field(bits, spans, idx, (1,) * dims, tuple(range(first, first + dims)) if sp is None else sp, None,
                None if map_size is None else tuple(map_size))
    # known without a pass over the bits (a stage input has thousands of channels): channels offset..offset+n-1
    whole = ((1 << n) - 1) << offset
    out.__dict__["_union"] = _frozen(np.frombuffer(whole.to_bytes(8 * bits.shape[1], "little"), dtype="<u8")
                                     .astype(np.uint64))
    out.__dict__["_counts"], out.__dict__["_per_reach"] = np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    out.__dict__["_bounds"], out.__dict__["_full"] = _frozen(np.zeros(2 * dims)), True
    return out


# ---- spatial transfer -------------------------------------------------------------------------------------------


def _empty_rows(spans: np.ndarray) -> np.ndarray:
    """Reaches that see no pixel (lo > hi: a constant channel, from cat or padding)."""
    out = np.zeros(len(spans), dtype=bool)  # a column pair at a time: any(axis=1) over pairs is slow for many rows
    for k in range(0, spans.shape[1], 2):
        out |= spans[:, k] > spans[:, k + 1]
    return out


def _shifted(f: Field, lo_add: Sequence, hi_add: Sequence, jump: tuple | None = None) -> Field:
    if not any(lo_add) and not any(hi_add):
        return f if jump is None else f.replace(jump=jump)
    if len(f.spans) == 1:  # one reach: the same arithmetic in plain Python (numpy's call overhead dominates)
        row = f.spans[0].tolist()
        if not any(row[2 * k] > row[2 * k + 1] for k in range(len(lo_add))):
            row = [v + float(d) for v, d in zip(row, (x for pair in zip(lo_add, hi_add) for x in pair))]
        return f.replace(spans=_frozen(np.array([row])), jump=f.jump if jump is None else jump)
    add = np.empty(2 * len(lo_add))
    add[0::2], add[1::2] = lo_add, hi_add
    spans = f.spans + add
    empty = _empty_rows(f.spans)
    if empty.any():  # a window over a constant channel is still a constant: no pixel
        spans[empty] = f.spans[empty]
    return f.replace(spans=_frozen(spans), jump=f.jump if jump is None else jump)


def _union_spans(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise hull of two span arrays; a row that sees no pixel does not widen the other."""
    out = np.maximum(a, b)
    out[:, 0::2] = np.minimum(a[:, 0::2], b[:, 0::2])
    ea, eb = _empty_rows(a)[:, None], _empty_rows(b)[:, None]
    return np.where(ea, b, np.where(eb, a, out))


def _union_row(a: np.ndarray, row: np.ndarray) -> np.ndarray:
    """_union_spans(a, row broadcast to a's shape), a column at a time (a residual add of a one-reach field to a
    stage field of a reach per channel)."""
    r = row.tolist()
    dtype = a.dtype if a.dtype == row.dtype else np.result_type(a, row)
    if any(r[k] > r[k + 1] for k in range(0, len(r), 2)):  # sees no pixel: widens nothing
        out = np.array(a, dtype=dtype)
    else:
        out = np.empty(a.shape, dtype=dtype)
        for k in range(0, a.shape[1], 2):
            np.minimum(a[:, k], row[k], out=out[:, k])
            np.maximum(a[:, k + 1], row[k + 1], out=out[:, k + 1])
    empty = _empty_rows(a)  # rows of `a` that see no pixel take the row's bounds
    if empty.any():
        out[empty] = row
    return out


def window(f: Field | None, kernel: Sequence, stride: Sequence, padding: Sequence, dilation: Sequence):
    """A sliding window along the reference dims: output x reads input x*s - p + t*dil, t < k."""
    if f is None:
        return None
    lo = [-p * j for j, p in zip(f.jump, padding)]
    hi = [((k - 1) * dl - p) * j for j, k, p, dl in zip(f.jump, kernel, padding, dilation)]
    out = _shifted(f, lo, hi, tuple(j * s for j, s in zip(f.jump, stride)))
    if f.size is None:
        return out
    if not all(float(x).is_integer() for x in out.jump):
        return out.replace(taps=None)  # a fractional pixel grid (adaptive pooling): intervals only
    holes = any(k > 1 and dl * j != 1 for k, dl, j in zip(kernel, dilation, f.jump))
    if f.taps is None and not holes:
        return out
    taps = f.taps if f.taps is not None else _dense_taps(f)
    taps = tuple(t if k == 1 and p == 0 else _shift_or(t, [(-p + i * dl) * j for i in range(int(k))])
                 for t, k, p, dl, j in zip(taps, kernel, padding, dilation, f.jump))
    return out.replace(taps=taps)


def widen(f: Field | None, sizes: Sequence[int]) -> Field | None:
    """Every position of a map of `sizes` pixels folded into one neuron (global pooling)."""
    if f is None:
        return None
    n = len(sizes)
    return window(f, sizes, (1,) * n, (0,) * n, (1,) * n)


def spread(f: Field | None, sizes: Sequence[int]) -> Field | None:
    """A value broadcast over a map of `sizes` (per reference dim; 1 = untouched): each position sees what any
    position of the map sees."""
    if f is None:
        return None
    out = _shifted(f, [-(s - 1) * j for s, j in zip(sizes, f.jump)], [(s - 1) * j for s, j in zip(sizes, f.jump)])
    if f.taps is not None:
        out = out.replace(taps=tuple(t if s == 1 else _shift_or(t, range(-(s - 1) * j, (s - 1) * j + 1))
                                     for t, s, j in zip(f.taps, sizes, f.jump)))
    return out


def wrap(f: Field | None, periods: Sequence) -> Field | None:
    """Circular padding: along reference dim k, offsets `periods[k]` reference pixels apart reach the same pixel
    (0: no wrap along that dim). Stage fields close their tap sets under that shift; intervals are left alone."""
    if f is None or f.size is None or not any(periods):
        return f
    if not all(float(p).is_integer() for p in periods):
        return f  # a fractional pixel grid: intervals only
    taps = f.taps if f.taps is not None else _dense_taps(f)
    out = []
    for t, period in zip(taps, periods):
        period, n = int(period), t.shape[1]
        closed = t.copy()
        for shift in range(period, n, period) if period > 0 else ():
            closed[:, shift:] |= t[:, :n - shift]
            closed[:, :n - shift] |= t[:, shift:]
        out.append(_frozen(closed))
    return f.replace(taps=tuple(out))


def rescale(f: Field | None, factor: Sequence) -> Field | None:
    """Resolution changed by `factor` (output pixels per input pixel) without mixing: upsampling."""
    if f is None:
        return None
    return f.replace(jump=tuple(j / s for j, s in zip(f.jump, factor)), taps=None)  # hull from here on


# ---- channel transfer -------------------------------------------------------------------------------------------


def mix(f: Field | None, out_channels: int, groups: int = 1, axis: int = -1) -> Field | None:
    """A conv/linear along idx `axis`: output o of group g sees every input channel of group g."""
    if f is None:
        return None
    idx = f.idx if axis in (-1, f.idx.ndim - 1) else np.moveaxis(f.idx, axis, -1)
    lead, cin = idx.shape[:-1], idx.shape[-1]
    per_out = out_channels // groups
    if groups == cin and per_out == 1:  # depthwise, multiplier 1: channel c sees what channel c saw
        return f
    if len(f.bits) == 1 or (groups == 1 and not lead):  # one reach for all outputs
        bits = f.bits if len(f.bits) == 1 else _frozen(f._union[None])
        spans = f.spans if len(f.bits) == 1 else _frozen(f._bounds[None])
        taps = f.taps if len(f.bits) == 1 else _union_taps(f.taps, [range(len(f.bits))])
        out = _uniform(lead + (out_channels,))
        return Field(bits, spans, _frozen(out if not lead else np.moveaxis(out, -1, axis)), f.jump, f.sp, taps,
                     f.size)
    if idx.strides[-1] == 0:  # each row one reach (a mix's broadcast output): its reaches in order of first use
        col = idx[..., ::cin // groups].reshape(-1)
        vals, at, inv = np.unique(col, return_index=True, return_inverse=True)
        order = np.argsort(at, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return _mixed(f, rank[inv.reshape(-1)], [[int(v)] for v in vals[order]], lead, groups, per_out, axis)
    rows = np.ascontiguousarray(idx).reshape(-1, cin // groups)  # one row per (leading position, group)
    # Equal rows are unioned once (a dict on the bytes: np.unique(axis=0) sorts structs, slowly). Rows equal as
    # they stand are found first and only those distinct rows are sorted: tokens of a ViT repeat one row hundreds
    # of times, and sorting every row was most of the walk there. Output reaches keep the order of first use.
    raw_of = _row_ids(rows)
    firsts = np.flatnonzero(np.diff(np.maximum.accumulate(raw_of), prepend=-1) > 0)  # ids count up from 0
    memo: dict = {}
    lut = np.fromiter((memo.setdefault(r.tobytes(), len(memo)) for r in np.sort(rows[firsts], axis=1)),
                      dtype=np.int64, count=len(firsts))
    out_rows = lut[raw_of]
    first = {}
    for i, j in enumerate(lut.tolist()):
        first.setdefault(j, firsts[i])
    return _mixed(f, out_rows, [np.unique(rows[first[j]]).tolist() for j in range(len(memo))], lead, groups,
                  per_out, axis)


def _row_ids(rows: np.ndarray, passes: int = 4) -> np.ndarray:
    """Per row, the number of the first row equal to it among the distinct rows, numbered in order of first
    occurrence. The first few distinct rows are matched by whole-array comparisons (a ViT's tokens: one row and the
    class token's), the rest through a dict on their bytes."""
    ids = np.full(len(rows), -1, dtype=np.int64)
    k = 0
    for _ in range(passes):
        free = np.flatnonzero(ids < 0)
        if not len(free):
            return ids
        ids[free[(rows[free] == rows[free[0]]).all(axis=1)]] = k
        k += 1
    free = np.flatnonzero(ids < 0)
    memo: dict = {}
    ids[free] = np.fromiter((memo.setdefault(r.tobytes(), len(memo)) for r in rows[free]), dtype=np.int64,
                            count=len(free)) + k
    return ids


def _mixed(f: Field, out_rows: np.ndarray, groups_of: list, lead: tuple, groups: int, per_out: int, axis: int):
    """mix's output: reach j unions `groups_of[j]`; row r (a leading position and group) has reach out_rows[r]."""
    bits = _frozen(np.stack([_or(f.bits[g]) for g in groups_of]))
    spans = _frozen(np.stack([_hull(f.spans[g]) for g in groups_of]))
    if groups == 1:  # every output channel of a row has the row's reach: a broadcast view, nothing written
        out = np.broadcast_to(out_rows[:, None], (len(out_rows), per_out)).reshape(lead + (per_out,))
    else:
        out = np.empty((len(out_rows), per_out), dtype=np.int64)
        out[:] = out_rows[:, None]  # (np.repeat is several times slower for long rows)
        out = out.reshape(lead + (groups * per_out,))
    g = Field(bits, spans, _frozen(np.moveaxis(out, -1, axis)), f.jump, f.sp, _union_taps(f.taps, groups_of), f.size)
    g.__dict__["_per_reach"] = np.bincount(out_rows, minlength=len(bits)) * per_out  # known here: no pass over idx
    return g


def channel_window(f: Field | None, axis: int, kernel: int, stride: int, padding: int, dilation: int,
                   out_size: int) -> Field | None:
    """A sliding window along a channel-like idx `axis` (a conv1d run across channels, as in ECA attention)."""
    if f is None:
        return None
    idx = np.moveaxis(f.idx, axis, -1)
    n = idx.shape[-1]
    pos = np.arange(out_size)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation  # (out, k)
    valid = (pos >= 0) & (pos < n)
    lead = idx.shape[:-1]
    if len(f.bits) == 1:  # every tap sees the one reach
        ax = axis % (len(lead) + 1)
        return f.replace(idx=_frozen(_uniform(lead[:ax] + (out_size,) + lead[ax:])))
    taps = np.where(valid, idx.reshape(-1, n)[:, np.clip(pos, 0, n - 1)], -1)  # (rows, out, k): reach per tap
    taps = np.sort(taps.reshape(-1, kernel), axis=1)
    keys, inv = np.unique(taps, axis=0, return_inverse=True)
    groups = [[int(r) for r in row if r >= 0] for row in keys.tolist()]  # [] : every tap on padding
    nothing = np.tile([0.0, -1.0], f.dims)  # an output made of padding alone sees nothing
    bits = _frozen(np.stack([_or(f.bits[g]) if g else np.zeros(f.bits.shape[1], dtype=np.uint64) for g in groups]))
    spans = _frozen(np.stack([_hull(f.spans[g]) if g else nothing for g in groups]))
    taps = None if f.taps is None else tuple(
        _frozen(np.stack([t[g].any(axis=0) if g else np.zeros(t.shape[1], dtype=bool) for g in groups]))
        for t in f.taps)
    out = np.moveaxis(inv.reshape(lead + (out_size,)), -1, axis)
    return Field(bits, spans, _frozen(np.ascontiguousarray(out)), f.jump, f.sp, taps, f.size)


def merge(fields: Sequence[Field | None], shape: tuple, sp: tuple) -> Field | None:
    """Elementwise op of fields already broadcast to one channel `shape`: each channel sees the union."""
    live = [f for f in fields if f is not None]
    if not live:
        return None
    jump = tuple(max(js) for js in zip(*(f.jump for f in live)))
    all_taps = _all_taps(live)
    if all_taps is not None:
        live = [f.replace(taps=t) for f, t in zip(live, all_taps)]
    acc = live[0]
    bits, spans, idx, taps = acc.bits, acc.spans, None, acc.taps  # idx: acc.idx broadcast, once a pairing needs it
    per_reach = None  # channels per reach of `idx`, where pairing counted them
    union, counts = acc.__dict__.get("_union"), acc.__dict__.get("_counts")  # of `bits`, where known
    one_row = acc.__dict__.get("_one_row", False)
    bounds, full = acc.__dict__.get("_bounds"), acc.__dict__.get("_full")  # of `spans`, where known
    if np.shape(acc.idx) == tuple(shape):
        per_reach = acc.__dict__.get("_per_reach")
    for f in live[1:]:
        if f.bits is bits and f.spans is spans and f.idx is acc.idx:  # add(x, x)
            continue
        counts, one_row = None, False
        if len(bits) == 1 and len(f.bits) == 1:
            bits, spans = bits | f.bits, _frozen(_hull(np.concatenate([spans, f.spans]))[None])
            taps = None if taps is None else tuple(_frozen(a | c) for a, c in zip(taps, f.taps))
            per_reach = union = bounds = full = None
            continue
        if len(bits) == 1 or len(f.bits) == 1:  # one side uniform (residual adds): broadcast, no pairing
            one, many = ((bits, spans, taps), (f.bits, f.spans, f.taps)) if len(bits) == 1 else \
                ((f.bits, f.spans, f.taps), (bits, spans, taps))
            if len(bits) == 1:  # the reaches are f's: its index, and what is known of them
                idx = np.broadcast_to(f.idx, shape)
                known, bounds, full = f.__dict__.get("_union"), f.__dict__.get("_bounds"), f.__dict__.get("_full")
                per_reach = f.__dict__.get("_per_reach") if np.shape(f.idx) == tuple(shape) else None
            else:
                idx = np.broadcast_to(acc.idx, shape) if idx is None else idx
                known = union
            lo_hi, covers = one[1][0].tolist(), False
            if not any(lo_hi[k] > lo_hi[k + 1] for k in range(0, len(lo_hi), 2)):  # `one` sees a pixel: so will
                if full and bounds is not None:  # every row, and the hull widens by `one`'s bounds
                    hull = bounds.tolist()
                    covers = all(x <= b if k % 2 == 0 else x >= b for k, (b, x) in enumerate(zip(hull, lo_hi)))
                    bounds = _frozen(np.array([min(b, x) if k % 2 == 0 else max(b, x)
                                               for k, (b, x) in enumerate(zip(hull, lo_hi))]))
                else:
                    bounds = None
                full = True
            elif not full:  # rows that see no pixel stay so, but may change (the hull of all-empty rows moves)
                bounds = None
            row = one[0][0]
            sees_all = known is not None and not (int.from_bytes(known.tobytes(), "little")  # (as Python ints:
                                                  & ~int.from_bytes(row.tobytes(), "little"))  # no numpy calls)
            if sees_all:  # `one` sees all `many` sees: every row of bits is `one`'s
                bits = np.repeat(one[0], len(many[0]), axis=0)
                counts = np.full(len(bits), int.from_bytes(row.tobytes(), "little").bit_count(), dtype=np.int64)
            else:
                bits = many[0] | one[0]
            taps = None if taps is None else tuple(_frozen(m | o) for m, o in zip(many[2], one[2]))
            # bounds covering every row's: every row of spans is `one`'s too
            spans = _frozen(np.repeat(one[1], len(many[1]), axis=0) if covers else _union_row(many[1], one[1][0]))
            one_row = sees_all and covers and taps is None
            union = None if known is None else _frozen(known | row)
            continue
        union = per_reach = bounds = full = None
        idx = np.broadcast_to(acc.idx, shape) if idx is None else idx
        b = np.broadcast_to(f.idx, shape)
        codes = idx.astype(np.int64) * len(f.bits) + b
        uniq, inv, per_reach = _unique(codes.ravel(), len(bits) * len(f.bits))
        ia, ib = uniq // len(f.bits), uniq % len(f.bits)
        bits = bits[ia] | f.bits[ib]
        taps = None if taps is None else tuple(_frozen(a[ia] | c[ib]) for a, c in zip(taps, f.taps))
        spans, idx = _frozen(_union_spans(spans[ia], f.spans[ib])), inv.reshape(shape)
    idx = _uniform(shape) if len(bits) == 1 else _contiguous(np.broadcast_to(acc.idx, shape) if idx is None else idx)
    out = Field(_frozen(bits) if bits.flags.writeable else bits, spans, _frozen(idx), jump, sp, taps, acc.size)
    if per_reach is not None and len(per_reach) == len(out.bits):  # counted while pairing: no pass over idx
        out.__dict__["_per_reach"] = per_reach
    if union is not None and len(out.bits) > 1:  # (a stage field's residual stream: no pass over its bits)
        out.__dict__["_union"] = union
    if counts is not None and len(counts) == len(out.bits):
        out.__dict__["_counts"] = counts
    if len(out.bits) > 1 and bounds is not None and full is not None:
        out.__dict__["_bounds"], out.__dict__["_full"] = bounds, full
    if one_row and len(out.bits) > 1:
        out.__dict__["_one_row"] = True
    return out


def _unique(codes: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """np.unique(codes, return_inverse=True) for codes in [0, bound), by a table rather than a sort while it is
    small, and then also how often each value occurs (else None)."""
    if bound > 4 * codes.size + 1024:
        return np.unique(codes, return_inverse=True) + (None,)
    counts = np.bincount(codes, minlength=bound)
    seen = counts > 0
    uniq = np.flatnonzero(seen)
    rank = np.cumsum(seen) - 1
    return uniq, rank[codes], counts[uniq]


def cat(fields: Sequence[Field | None], axis: int, sizes: Sequence[int]) -> Field | None:
    """Concatenation along a channel-like idx axis; inputs that see nothing contribute channels that see nothing."""
    live = [f for f in fields if f is not None]
    if not live:
        return None
    all_taps = _all_taps(live)
    if all_taps is not None:
        swap = {id(f): f.replace(taps=t) for f, t in zip(live, all_taps)}
        fields = [None if f is None else swap[id(f)] for f in fields]
        live = [f for f in fields if f is not None]
    like = live[0]
    bits, spans, parts, base = [], [], [], 0
    for f, n in zip(fields, sizes):
        if f is None:  # a constant slab: an empty reach, so channel counts stay honest
            shape = list(like.idx.shape)
            shape[axis] = n
            empty = np.tile([0.0, -1.0], like.dims)[None]  # lo > hi: no pixel either
            f = Field(np.zeros((1, like.bits.shape[1]), dtype=np.uint64), empty, np.zeros(shape, dtype=np.int64),
                      like.jump, like.sp,
                      None if like.taps is None else tuple(np.zeros((1, t.shape[1]), dtype=bool) for t in like.taps),
                      like.size)
        bits.append(f.bits)
        spans.append(f.spans)
        parts.append(f.idx + base)
        base += len(f.bits)
    jump = tuple(max(js) for js in zip(*(f.jump for f in live)))
    taps = None
    if like.taps is not None:
        taps = []
        for k in range(len(like.taps)):
            rows = []
            for f in fields:
                rows.append(f.taps[k] if f is not None else np.zeros((1, like.taps[k].shape[1]), dtype=bool))
            taps.append(_frozen(np.concatenate(rows)))
        taps = tuple(taps)
    return Field(_frozen(np.concatenate(bits)), _frozen(np.concatenate(spans)),
                 _frozen(np.concatenate(parts, axis=axis)), jump, like.sp, taps, like.size)


def assign(f: Field | None, region: tuple, new: Field | None, channel_shape: tuple, sp: tuple) -> Field | None:
    """`f` with the channels at `region` (a numpy basic index into its channel index array) replaced by `new`'s
    (broadcast to the region): a write into a part of a tensor. None sees nothing, as everywhere here; `f` is a
    tensor of `channel_shape` with spatial axes `sp`, `new` lines up with it (the caller checks)."""
    live = [g for g in (f, new) if g is not None]
    if not live:
        return None
    all_taps = _all_taps(live)
    if all_taps is not None:
        f, new = (None if g is None else g.replace(taps=all_taps[live.index(g)]) for g in (f, new))
    like = f if f is not None else new

    def blank(shape):  # sees nothing: one empty reach, as cat makes for a constant slab
        return Field(np.zeros((1, like.bits.shape[1]), dtype=np.uint64), np.tile([0.0, -1.0], like.dims)[None],
                     np.zeros(shape, dtype=np.int64), like.jump, sp,
                     None if like.taps is None else tuple(np.zeros((1, t.shape[1]), dtype=bool) for t in like.taps),
                     like.size)

    f = f if f is not None else blank(channel_shape)
    idx = np.array(f.idx, dtype=np.int64)
    part = idx[region]
    new = new if new is not None else blank(np.shape(part))
    idx[region] = np.broadcast_to(new.idx, np.shape(part)) + len(f.bits)
    taps = None if f.taps is None else tuple(_frozen(np.concatenate([a, b])) for a, b in zip(f.taps, new.taps))
    out = Field(_frozen(np.concatenate([f.bits, new.bits])), _frozen(np.concatenate([f.spans, new.spans])),
                _frozen(idx), f.jump, tuple(sp), taps, f.size)
    return out.with_idx(idx)  # reaches no channel has any more are dropped


def remap(f: Field | None, fn) -> Field | None:
    """Apply a numpy indexing/reshaping function to the channel index array (view, transpose, roll, slicing)."""
    if f is None:
        return None
    return f.with_idx(fn(f.idx))


def everything(fields: Sequence[Field | None], sizes: Sequence[Sequence[int]], channel_shape: tuple,
               sp: tuple) -> Field | None:
    """The conservative field: every output channel sees all that any input sees, over the whole of each map."""
    live = [spread(f, s) for f, s in zip(fields, sizes) if f is not None]
    if not live:
        return None
    bits = _or(np.concatenate([f.bits for f in live]))[None]
    spans = _hull(np.concatenate([f.spans for f in live]))[None]
    jump = tuple(max(js) for js in zip(*(f.jump for f in live)))
    taps = _all_taps(live)
    if taps is not None:
        taps = tuple(_frozen(np.concatenate([t[k] for t in taps]).any(axis=0)[None]) for k in range(live[0].dims))
    return Field(_frozen(bits), _frozen(spans), _frozen(_uniform(channel_shape)), jump, sp, taps, live[0].size)
