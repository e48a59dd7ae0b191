"""A latency model for the decomposer: each candidate block timed at the exact shapes of each site, on the target
device, cached on disk.

MACs are the wrong proxy for latency wherever memory traffic or kernel launches dominate (depthwise and grouped
convs, small maps, GPUs), and what a rewrite buys changes from one machine to the next. So, as FBNet's and
ProxylessNAS's latency tables do, each candidate is priced by running it: a site is one standard conv of the model
followed by the model's own norm and activation (which stay after the block that replaces the conv, and which
inductor fuses into the conv's epilogue); the candidate is the same with the conv replaced by a catalog block
(`blocks.build`, its intermediate norms and activations included, the DW+RPW rotation as the decomposer emits it).
Both run alone on a random input of shape (batch, C, H, W), eager or under `torch.compile` (inductor, after the
backend's `roll_as_cat` graph pass, as `fxrf.compile` deploys), on the CPU (the threads torch uses) or CUDA.

Figures are cached in one JSON file (`cache_path()`: $FXRF_CACHE_DIR, else $XDG_CACHE_HOME/fxrf, else
~/.cache/fxrf), keyed by the device (CPU model, ISA level and torch threads, or the CUDA device's name and
capability), the torch version, the mode, the batch, the block (recipe and rotation), the conv's signature, the
input shape and the model's norm/activation kinds: a second run with the same keys times nothing. A block that
builds the same module as another (a rotation at shift 0) shares its figure; a block with a channel permutation
has a lower bound, its block without it (`unpermuted`, `LatencyModel.bound`), which the search ranks by first.

Whole models are timed too (`time_model`, cached by structure, `fingerprint`), and `compare` times several in
alternation, round by round, so that `paired_ratio` compares them under one machine state: the decomposer's
whole-model check (decompose(objective="latency", verify=N)) and the organizer's latency budget use them. A
compiled CPU site gets a channels-last input, as inductor lays out every conv of a CPU graph.

The timer is injectable: `timer(module, x, probe) -> seconds`, `probe` a `Probe` naming what is timed (tests pass a
fake one; the default runs the module: warm-up, then timed calls until the estimate settles, `settled`).

    >>> import torch.nn as nn
    >>> fake = lambda module, x, probe: 1e-3 if probe.recipe == "S" else 4e-4
    >>> lm = LatencyModel("cpu", batch=8, cache=None, timer=fake)
    >>> conv = nn.Conv2d(64, 64, 3, padding=1)
    >>> lm.time("S", conv, (1, 64, 16, 16)), lm.time("DW+PW", conv, (1, 64, 16, 16)), lm.calls
    (0.001, 0.0004, 2)
    >>> lm.time("DW+PW", conv, (1, 64, 16, 16)), lm.calls        # the same key: no second timing
    (0.0004, 2)
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import InputError
from fxrf.progress import bar, tick

from . import prefetch
from .blocks import CATALOG, Kind, Pattern, Recipe, build, emit, model_pattern, parse, signature

MODES = ("eager", "compile")
_CONV = "S"  # the catalog's recipe for a conv kept as it is: `time_conv` times it
CACHE_FILE = "latency-v2.json"  # v2: CPU compiled sites timed on a channels-last input


@dataclass(frozen=True)
class Probe:
    """What one timing measures: a block (recipe "S": the conv itself) at one site, on one device and mode."""

    recipe: str
    shift: int  # DW+RPW: the channel rotation inside the block (0: none)
    conv: tuple  # blocks.signature of the conv it replaces
    in_shape: tuple  # the input, batch included
    pattern: tuple  # the model's norm/activation kinds (blocks.Pattern.signature)
    mode: str  # "eager" | "compile"
    device: str  # device key (see device_key)
    label: str = ""  # a whole model (recipe "model"): what the caller calls it ("original", "latency", ...)

    def key(self, torch_version: str = torch.__version__) -> str:
        return json.dumps([self.device, torch_version, self.mode, self.recipe, self.shift, list(self.conv),
                           list(self.in_shape), list(self.pattern)], default=str)


Timer = Callable[[Callable, torch.Tensor, Probe], float]


PERMUTATIONS = ("roll", "shuffle")  # block steps that only move channels: a copy, no arithmetic


def unpermuted(recipe: Recipe | str, catalog=CATALOG) -> Recipe:
    """The block `recipe` builds without its channel permutations (its roll and shuffle steps): the catalog kind
    with those steps, at the same groups and expansion (DW+RPW-g4-o50 -> DW+GPW-g4), else a kind made for the
    purpose ("GC+shuffle-g4 without shuffle": the grouped conv alone); the recipe itself where it has none. A
    permutation is a copy (read and write one activation) or an index map fused into a neighbour, so the block
    without it is never slower: its time is a lower bound of the block's (`LatencyModel.bound`). A DW+RPW block
    at shift 0 builds no roll, so it is exactly its unpermuted block (`LatencyModel.time` shares the figure).

        >>> unpermuted("DW+RPW-g4-o33").name, unpermuted("GC+shuffle-g8").name, unpermuted("DW+PW").name
        ('DW+GPW-g4', 'GC+shuffle-g8 without shuffle', 'DW+PW')
    """
    recipe = parse(recipe, catalog)
    steps = tuple(s for s in recipe.kind.steps if s.op not in PERMUTATIONS)
    if steps == recipe.kind.steps:
        return recipe
    for kind in catalog:
        if kind.steps == steps and set(kind.params) <= set(recipe.kind.params):
            return Recipe(kind, **{f: getattr(recipe, f) for f in kind.params})
    dropped = sorted({s.op for s in recipe.kind.steps if s.op in PERMUTATIONS})
    kind = Kind(f"{recipe.name} without {' and '.join(dropped)}", (), steps, None, "")
    return Recipe(kind, groups=recipe.groups, overlap=recipe.overlap, expansion=recipe.expansion)


def _built(recipe: Recipe | str, shift: int) -> Recipe:
    """The recipe of the module `recipe` builds at `shift`: a rotation at shift 0 builds no roll, so it is its
    unpermuted block (one figure for both: each distinct block is timed once)."""
    recipe = parse(recipe)
    return unpermuted(recipe) if recipe.kind.rotates and not shift else recipe


def _permutes(recipe: Recipe, shift: int) -> bool:
    """Whether the block `recipe` builds at `shift` has a permutation step (a roll builds only at shift > 0)."""
    return any(s.op == "shuffle" or (s.op == "roll" and shift) for s in recipe.kind.steps)


def cache_dir() -> Path:
    """Where latency figures are kept: $FXRF_CACHE_DIR, else $XDG_CACHE_HOME/fxrf, else ~/.cache/fxrf."""
    if os.environ.get("FXRF_CACHE_DIR"):
        return Path(os.environ["FXRF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxrf"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def device_key(device: str = "cpu", threads: int | None = None) -> str:
    """The device a figure is valid for: 'cpu:<model>:<ISA level>:t<threads>' or 'cuda:<name>:sm<major><minor>'."""
    dev = torch.device(device)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"cuda:{p.name}:sm{p.major}{p.minor}"
    if dev.type != "cpu":
        raise InputError(f"latency: device {device!r} is not supported; use 'cpu' or 'cuda'")
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:
        isa = "?"
    return f"cpu:{cpu_model()}:{isa}:t{threads or torch.get_num_threads()}"


# ------------------------------------------------------------------------------------------------- the module


def site_module(recipe: Recipe | str, conv: nn.Conv2d, pattern: Pattern = Pattern(), shift: int = 0,
                device: str = "cpu") -> fx.GraphModule:
    """The block replacing `conv` (recipe "S": the conv), then the model's norm and activation, as one eval-mode
    GraphModule with fresh weights on `device` (timing does not depend on the values)."""
    recipe = parse(recipe)
    real = nn.Conv2d(*_conv_args(signature(conv)), device=device)
    root = nn.Module()
    block, program = build(recipe, real, pattern, shift)
    root.add_module("block", block)
    graph = fx.Graph()
    x = emit(graph, "block", program, graph.placeholder("x"))[-1]
    for name, layer in (("norm", pattern.make_norm(real.out_channels, real.weight)),
                        ("act", pattern.make_act(real.out_channels))):
        if layer is not None:
            root.add_module(name, layer.to(device))
            x = graph.create_node("call_module", name, (x,), {}, name=name)
    graph.output(x)
    return fx.GraphModule(root, graph).eval()


def site_input(in_shape: tuple, device: str, mode: str) -> torch.Tensor:
    """The random input a site is timed on."""
    x = torch.randn(in_shape, device=device)
    if mode == "compile" and x.device.type == "cpu":
        # inductor runs every conv of a CPU graph channels-last (graph.py, decide_layout_opt: always, with
        # mkldnn), converting the model's input once; a site alone on an NCHW input would pay that conversion
        # per block (a read and a write of its input: most of a depthwise block's time) and time 20-90% slow
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def compile_site(recipe: Recipe, conv_sig: tuple, pattern: Pattern, shift: int, in_shape: tuple) -> None:
    """Build and compile the site `LatencyModel.time` times for these keys (CPU), and run it once (inductor
    compiles on the first call): the graph lands in inductor's FX graph cache, where the timing finds it."""
    gm = site_module(recipe, nn.Conv2d(*_conv_args(conv_sig)), pattern, shift, "cpu")
    x = site_input(in_shape, "cpu", "compile")
    with torch.no_grad():
        compiled(gm, x)(x)


def _site_job(recipe: Recipe, conv_sig: tuple, pattern: Pattern, shift: int, in_shape: tuple, threads: int):
    """A site as a compile worker gets it: the recipe without its weight transfer (a function the catalog
    defines inline, which pickle cannot carry, and which building a block for timing never calls)."""
    bare = dataclasses.replace(recipe, kind=dataclasses.replace(recipe.kind, factorize=None))
    return prefetch.pack((threads, bare, tuple(conv_sig), pattern, int(shift), tuple(in_shape)))


def _compile_job(job) -> None:
    threads, *args = job
    torch.set_num_threads(threads)  # the timing process's count: a cpp kernel's code depends on it
    compile_site(*args)


def serve_compiles() -> None:
    """A compile worker's loop (passes/prefetch.py)."""
    prefetch.serve(_compile_job)


WORKER = f"{__name__}:serve_compiles"


def conv_pattern(gm: fx.GraphModule) -> Pattern:
    """The norm and activation `LatencyModel.time_conv` times after a conv of `gm`: the graph's most common
    conv -> norm -> activation pattern."""
    return model_pattern(gm)


def _conv_args(sig) -> tuple:
    cin, cout, k, s, p, d, bias, mode = sig
    return cin, cout, k, s, p, d, 1, bias, mode


def compiled(gm: nn.Module, x: torch.Tensor) -> Callable:
    """`gm` as fxrf.compile deploys it: the backend's roll_as_cat graph pass (on a GraphModule), then inductor
    (dynamic=False); built on the first call, so a timer that never calls it (a fake one) costs no compile."""
    fn = None

    def call(inp):
        nonlocal fn
        if fn is None:
            from .graph_passes import roll_as_cat
            model = roll_as_cat(gm, [x]) if isinstance(gm, fx.GraphModule) else gm
            fn = torch.compile(model, backend="inductor", dynamic=False)
        return fn(inp)
    return call


def input_shape(gm: fx.GraphModule, what: str, fix: str) -> tuple:
    """The shape of `gm`'s one input tensor, which a whole-model timing feeds; else an InputError saying that
    `what` times the whole model on one input and naming the `fix`."""
    shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if n.op == "placeholder" and "tensor_meta" in n.meta]
    if len(shapes) != 1:
        raise InputError(f"{what} times the whole model on one input tensor; this model takes {len(shapes)}: {fix}")
    return shapes[0]


def paired_ratio(times: dict, a: str, b: str) -> float:
    """The median over rounds of time(a) / time(b) in the same round (`LatencyModel.compare`): a drift in the
    machine's load between rounds cancels out, which a ratio of two separate minima would not do."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]) if y > 0) if any(times[b]) else math.inf


def fingerprint(model: nn.Module) -> str:
    """A model's structure, not its values: its generated code (a GraphModule) and its modules' reprs and
    parameter and buffer shapes and dtypes, hashed. Two models with equal fingerprints run the same kernels."""
    import hashlib
    h = hashlib.sha1()
    h.update(getattr(model, "code", "").encode())
    h.update(repr(model).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()[:16]


SETTLE = 0.02  # a timing stops once another call would not move it by more than this (`settled`)


def settled(times: list, stat: str = "min", rel: float = SETTLE) -> bool:
    """The stopping rule of `default_timer`: whether the estimate from `times` (seconds of calls so far) is tight.
    "min": the three lowest calls lie within `rel` of each other (the minimum was reached three times; other
    processes only add time, so a lower call would need a quieter moment than three have seen). "median": the
    distribution-free confidence interval of the median, [x_(j), x_(n+1-j)] of the sorted calls with j the
    largest for which a binomial(n, 1/2) falls below j with probability <= 4% (92% coverage or more), lies
    within +-`rel` of the median; 5 calls at least (j = 1 there: the interval is the range).

        >>> settled([1.0, 1.3, 1.01, 1.015]), settled([1.0, 1.3, 1.1])
        (True, False)
        >>> settled([1.0, 1.01, 0.99, 1.0, 1.005], "median"), settled([1.0, 1.2, 0.99, 1.0, 1.005], "median")
        (True, False)
    """
    if stat == "min":
        low = sorted(times)[:3]
        return len(low) == 3 and low[-1] <= low[0] * (1 + rel)
    n = len(times)
    if n < 5:
        return False
    xs, j, below = sorted(times), 0, 0.0
    while True:  # the largest j with P(binomial(n, 1/2) < j) <= 4%
        below += math.comb(n, j) / 2 ** n
        if below > 0.04:
            break
        j += 1
    j = max(j, 1)
    med = statistics.median(xs)
    return xs[n - j] - med <= rel * med and med - xs[j - 1] <= rel * med


def default_timer(iters: int = 20, warmup: int = 2, budget_s: float = 0.5, stat: str = "min",
                  rel: float = SETTLE) -> Timer:
    """A timer running the module: `warmup` calls (more, up to 4, until two agree within 25%), then timed calls
    until the estimate has settled (`settled`: 3 calls at least, `rel`), or `iters` calls, or `budget_s` seconds;
    their minimum (stat="min") or median, in seconds. CUDA: events, synchronised. The minimum by default: on a
    shared machine other processes only ever add time to a call, so the least disturbed call is the best
    estimate of the block's own cost (and needs few calls)."""
    pick = {"min": min, "median": statistics.median}[stat]

    def timer(fn: Callable, x: torch.Tensor, probe: Probe) -> float:
        cuda = x.is_cuda
        with torch.no_grad():
            last: list = []
            for i in range(warmup + 4):
                t0 = time.perf_counter()
                fn(x)
                if cuda:
                    torch.cuda.synchronize()
                last.append(time.perf_counter() - t0)
                if i + 1 >= warmup and max(last[-2:]) <= 1.25 * min(last[-2:]):
                    break
            times, start = [], time.perf_counter()
            for i in range(iters):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn(x)
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - t0)
                if i + 1 >= 3 and (settled(times, stat, rel) or time.perf_counter() - start > budget_s):
                    break
        return pick(times)
    timer.runs = True  # it calls the module (so compiles it): compiling ahead helps it (`LatencyModel.prefetch`)
    return timer


# ------------------------------------------------------------------------------------------------- the model


class LatencyModel:
    """Seconds per call of each block at each site, on one device, at one batch size, eager or compiled; cached.

    device: "cpu" or "cuda[:n]". batch: the batch size the figures are for. mode: "compile" (torch.compile with
    inductor, how fxrf.compile deploys) or "eager". threads: the CPU threads (None: torch's current setting; set
    it with torch.set_num_threads before timing). cache: a JSON file path, "default" (cache_path()), or None (in
    memory only). timer: timer(module, x, probe) -> seconds (default: default_timer()). `calls` counts the timings
    actually made (cache misses).
    """

    def __init__(self, device: str = "cpu", batch: int = 1, mode: str = "compile", *, threads: int | None = None,
                 cache: str | os.PathLike | None = "default", timer: Timer | None = None,
                 workers: int | None = None):
        if mode not in MODES:
            raise InputError(f"latency: mode {mode!r} is unknown; use {' or '.join(MODES)}")
        if int(batch) < 1:
            raise InputError(f"latency: batch {batch!r} must be >= 1")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"latency: device {device!r} requested but no CUDA device is visible; use --device cpu")
        self.device, self.batch, self.mode = str(device), int(batch), mode
        self.key = device_key(device, threads)
        self.path = None if cache is None else Path(cache_path() if cache == "default" else cache)
        if self.path is not None:
            _check_cache_path(self.path)
        self.timer = timer or default_timer()
        self.workers = prefetch.default_workers() if workers is None else max(0, int(workers))
        self._ahead: prefetch.Prefetcher | None = None
        self._ahead_keys: set = set()
        # whole models: the median of a round's calls, the typical latency a user sees; the minimum, right for a
        # block's own cost, favours a model whose memory-bound kernels vary most with the load
        self.model_timer = timer or default_timer(iters=15, budget_s=1.0, stat="median")
        self.calls = 0
        self._figures: dict | None = None

    def __repr__(self) -> str:
        return f"LatencyModel({self.key!r}, batch={self.batch}, mode={self.mode!r})"

    def in_mode(self, mode: str) -> "LatencyModel":
        """This model in `mode` ("eager" or "compile"): the same device, batch, cache and timers (itself when
        `mode` is its own). Figures are keyed by mode, so both share one cache."""
        if mode not in MODES:
            raise InputError(f"latency: mode {mode!r} is unknown; use {' or '.join(MODES)}")
        if mode == self.mode:
            return self
        other = copy.copy(self)
        other.mode, other.calls = mode, 0
        return other

    def probe(self, recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern(),
              shift: int = 0) -> Probe:
        recipe = _built(recipe, shift)
        return Probe(recipe.name, int(shift) if recipe.kind.rotates else 0, signature(conv),
                     (self.batch,) + tuple(in_shape[1:]), pattern.signature, self.mode, self.key)

    def time(self, recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern(),
             shift: int = 0) -> float:
        """Seconds per call of `recipe` replacing `conv` (followed by the model's norm and activation) on an input
        of `in_shape` (its batch replaced by this model's batch); measured once per key, then read back."""
        recipe = _built(recipe, shift)  # the module it builds (its probe's recipe)
        probe = self.probe(recipe, conv, in_shape, pattern, shift)
        return self._cached(probe, lambda: self._measure(recipe, conv, pattern, probe))

    def known(self, recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern(),
              shift: int = 0) -> float | None:
        """The figure `time` would return if it is measured already (cached), else None; times nothing."""
        v = self._load().get(self.probe(recipe, conv, in_shape, pattern, shift).key())
        return float(v) if _seconds(v) else None

    def bound(self, recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern(),
              shift: int = 0) -> tuple[float, bool]:
        """(seconds, exact): the block's figure if it is measured already; else, for a block with a channel
        permutation (a roll at shift > 0, a shuffle), the time of the same block without it (`unpermuted`, timed
        if need be: a cheap compile, its kernels mostly those of blocks timed already), which the block can only
        exceed, with exact False; else the block is timed (exact True). The search ranks by these and times such
        a block only when its bound puts it in front (plan.py)."""
        recipe = parse(recipe)
        got = self.known(recipe, conv, in_shape, pattern, shift)
        if got is not None:
            return got, True
        if _permutes(recipe, shift):
            return self.time(unpermuted(recipe), conv, in_shape, pattern), False
        return self.time(recipe, conv, in_shape, pattern, shift), True

    @contextmanager
    def ahead(self):
        """Within the block, `prefetch` keeps its worker processes between calls; they are closed at its end."""
        if self._ahead is not None:
            yield self
            return
        self._ahead = prefetch.Prefetcher(self.workers, WORKER)
        try:
            yield self
        finally:
            self._ahead.close()
            self._ahead = None

    def prefetch(self, items, pattern: Pattern = Pattern(), bounds: bool = False) -> int:
        """Compile ahead, at once in this process and `workers` worker processes (passes/prefetch.py), the sites
        `time` would build for `items` ((recipe, conv, in_shape, shift) each; with `bounds`, what `bound` would
        time: the block without its permutation where it has one) that are not measured yet; returns how many
        were compiled. A head start only: no figure changes, and it does nothing unless `compiles_ahead` and
        there are 2 sites or more to compile."""
        if not self.compiles_ahead:
            return 0
        jobs, seen, threads = [], set(), torch.get_num_threads()
        for recipe, conv, in_shape, shift in items:
            recipe = parse(recipe)
            if self.known(recipe, conv, in_shape, pattern, shift) is not None:
                continue
            if bounds and _permutes(recipe, shift):
                recipe, shift = unpermuted(recipe), 0
                if self.known(recipe, conv, in_shape, pattern, shift) is not None:
                    continue
            recipe = _built(recipe, shift)
            probe = self.probe(recipe, conv, in_shape, pattern, shift)
            key = probe.key()
            if key in seen or key in self._ahead_keys:
                continue
            seen.add(key)
            sig = signature(conv)
            jobs.append((f"{probe.recipe} at {probe.in_shape}",
                         _site_job(recipe, sig, pattern, probe.shift, probe.in_shape, threads),
                         functools.partial(compile_site, recipe, sig, pattern, probe.shift, probe.in_shape)))
        if len(jobs) < 2:
            return 0  # one compile has nothing to overlap with: it is compiled when timed
        self._ahead_keys |= seen  # compiled ahead once: a later prefetch does not send it again
        with self.ahead():
            before = self._ahead.compiled
            self._ahead.run(jobs)
            tick("compiled ahead", self._ahead.compiled - before)
            return self._ahead.compiled - before

    @property
    def compiles_ahead(self) -> bool:
        """Whether `prefetch` does anything: workers, compiled CPU timing, a timer that runs the module
        (`default_timer`; a fake one compiles nothing) and inductor's FX graph cache on."""
        runs = getattr(self.timer, "runs", False)
        if not (self.workers and runs and self.mode == "compile" and torch.device(self.device).type == "cpu"):
            return False
        import torch._inductor.config as inductor_config
        return bool(inductor_config.fx_graph_cache) and not inductor_config.force_disable_caches

    def time_conv(self, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern()) -> float:
        """Seconds per call of `conv` alone, then the model's norm and activation (`pattern`: `conv_pattern(gm)`),
        on an input of `in_shape`: what inserting or removing that conv costs. The same site (and cache entry) as
        the decomposer's kept conv."""
        return self.time(_CONV, conv, in_shape, pattern)

    def time_model(self, model: nn.Module, in_shape: tuple, label: str = "model") -> float:
        """Seconds per call of a whole model on an input of `in_shape` (its batch replaced by this model's batch),
        compiled as `compiled` deploys it (or eager); cached by the model's structure (`fingerprint`), not its
        values."""
        probe = self._model_probe(model, in_shape, label)
        return self._cached(probe, lambda: self._run(model, probe))

    def _cached(self, probe: Probe, measure: Callable[[], float]) -> float:
        """The figure for `probe`: read back, or measured once (`measure()`) and written to the cache."""
        key = probe.key()
        figures = self._load()
        if not _seconds(figures.get(key)):  # missing, or damaged (a string, NaN, negative): measure again
            figures[key] = float(measure())
            self.calls += 1
            tick("timed")  # the step this timing is part of counts it (fxrf.progress)
            self._save(key, figures[key])
        return figures[key]

    def compare(self, models: dict, in_shape: tuple, rounds: int = 5, *, fresh: bool = False) -> dict:
        """{label: (seconds per call in round 1, round 2, ...)} of whole models timed in alternation: round r
        times every model once, in turn, so the models of one round see the same machine state, which separately
        cached figures taken minutes apart do not (on a shared CPU the load moves a block's time by 2-3x).
        Compare per round (`paired_ratio`). Cached as one entry keyed by every model's structure: the same
        comparison again times nothing, unless `fresh` (a measurement of this run is asked for: timed, then cached)."""
        if not models:
            return {}
        rounds = max(1, int(rounds))
        probes = {k: self._model_probe(m, in_shape, k) for k, m in models.items()}
        key = json.dumps(["compare-rounds", rounds] + [[k, p.key()] for k, p in probes.items()])
        figures = self._load()
        got = None if fresh else figures.get(key)
        if (isinstance(got, dict) and set(got) == set(models)
                and all(isinstance(v, list) and len(v) == rounds and all(map(_seconds, v)) for v in got.values())):
            return {k: tuple(v) for k, v in got.items()}
        x = torch.randn(next(iter(probes.values())).in_shape, device=self.device)
        fns = {k: self._callable(m, x) for k, m in models.items()}
        times: dict = {k: [] for k in models}
        what = f"timing {', '.join(models)} in alternation ({self.mode}, {self.device}, batch {self.batch})"
        for _ in bar(range(rounds), what, unit="rounds"):  # the first round compiles (mode "compile")
            for k, fn in fns.items():
                times[k].append(self._checked(self.model_timer(fn, x, probes[k]), probes[k]))
        self.calls += len(models) * rounds
        figures[key] = times
        self._save(key, times)
        return {k: tuple(v) for k, v in times.items()}

    def _model_probe(self, model: nn.Module, in_shape: tuple, label: str) -> Probe:
        return Probe("model", 0, (fingerprint(model),), (self.batch,) + tuple(in_shape[1:]), (), self.mode,
                     self.key, label)

    def _run(self, model: nn.Module, probe: Probe) -> float:
        x = torch.randn(probe.in_shape, device=self.device)
        return self._checked(self.model_timer(self._callable(model, x), x, probe), probe)

    def _measure(self, recipe: Recipe, conv: nn.Conv2d, pattern: Pattern, probe: Probe) -> float:
        gm = site_module(recipe, conv, pattern, probe.shift, self.device)
        x = site_input(probe.in_shape, self.device, self.mode)
        return self._checked(self.timer(self._callable(gm, x), x, probe), probe)

    def _callable(self, module: nn.Module, x: torch.Tensor) -> Callable:
        """`module` as this model's mode runs it: compiled (`compiled`) or eager."""
        return compiled(module, x) if self.mode == "compile" else module

    @staticmethod
    def _checked(t, probe: Probe) -> float:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise InputError(f"latency: the timer returned {t!r} for {probe.recipe} at {probe.in_shape}; "
                             f"it must return seconds (a finite number >= 0)")
        return float(t)

    # ------------------------------------------------------------------------------------------------- the cache

    def _load(self) -> dict:
        if self._figures is None:
            self._figures = _read(self.path) if self.path is not None else {}
        return self._figures

    def _save(self, key: str, value) -> None:
        if self.path is None:
            return
        on_disk = _read(self.path)  # another process may have added figures since we read the file
        on_disk[key] = value
        self._figures.update(on_disk)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(on_disk, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except OSError as e:
            raise InputError(f"latency cache: cannot write {self.path} ({type(e).__name__}: {e}); set "
                             f"FXRF_CACHE_DIR to a writable directory, or pass cache=None to keep figures in "
                             f"memory") from e


def _seconds(v) -> bool:
    """Whether a cached figure is a time: a finite number >= 0 (a hand-edited or damaged entry is not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _check_cache_path(path: Path) -> None:
    """An InputError where the cache file cannot be: it is a directory, or its directory (or a folder above
    it) is a file."""
    if path.is_dir():
        raise InputError(f"latency cache: {path} is a directory, not a file; pass cache= a file path (or None)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                where = "FXRF_CACHE_DIR" if os.environ.get("FXRF_CACHE_DIR") else "the cache directory"
                raise InputError(f"latency cache: {parent} is a file, not a directory, so {path} cannot be "
                                 f"written; point {where} at a directory, or pass cache=None")
            return


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


# ------------------------------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Roofline:
    """A block's arithmetic against its memory traffic, and the time either one alone implies on a device."""

    recipe: str
    macs: int  # multiply-accumulates per call (batch included)
    bytes: int  # bytes moved per call if every fusable op is fused: each conv and each copy reads its input and
    #             weights and writes its output once; norms and activations ride in the conv's epilogue
    intensity: float  # FLOPs (2 per MAC) per byte
    compute_s: float  # 2 * macs / peak FLOP/s
    memory_s: float  # bytes / bandwidth
    bound: str  # "compute" or "memory": the larger of the two

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.memory_s)


def roofline(recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, flops_per_s: float, bytes_per_s: float,
             pattern: Pattern = Pattern(), shift: int = 0) -> Roofline:
    """MACs and bytes of the site module (`site_module`) at `in_shape` (batch included), read from its traced
    graph (shapes from fxrf.trace, MACs from fxrf.cost), against a device's peak FLOP/s and bandwidth (`peaks`)."""
    from fxrf.cost import model_cost, total
    from fxrf.trace import trace

    recipe = parse(recipe)
    gm = site_module(recipe, _meta_like(conv), pattern, shift, "meta")
    trace(gm, tuple(in_shape))
    macs = total(model_cost(gm)).macs
    modules = dict(gm.named_modules())
    moved = 0
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        copies = node.op == "call_function" or isinstance(mod, nn.ChannelShuffle)
        if not (isinstance(mod, nn.Conv2d) or copies):
            continue
        src, out = node.args[0].meta["tensor_meta"], node.meta["tensor_meta"]
        nbytes = (math.prod(src.shape) + math.prod(out.shape)) * 4
        if isinstance(mod, nn.Conv2d):
            nbytes += sum(p.numel() * 4 for p in mod.parameters())
        moved += nbytes
    intensity = 2 * macs / moved if moved else math.inf
    cs, ms = 2 * macs / flops_per_s, moved / bytes_per_s
    return Roofline(recipe.name, macs, moved, intensity, cs, ms, "compute" if cs >= ms else "memory")


def _meta_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(*_conv_args(signature(conv)), device="meta")


def peaks(device: str = "cpu", size_mib: int = 64, n: int = 1024, repeats: int = 5) -> dict:
    """Measured peaks of the device as torch reaches them: bandwidth of a large copy (bytes read + written per
    second) and FLOP/s of an n x n fp32 matmul; the best of `repeats`. Not cached (a second or two)."""
    numel = size_mib * 2**20 // 4
    a = torch.empty(numel, device=device).uniform_()
    b = torch.empty_like(a)
    m1, m2 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def best(fn) -> float:
        fn()
        out = math.inf
        for _ in range(repeats):
            if a.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if a.is_cuda:
                torch.cuda.synchronize()
            out = min(out, time.perf_counter() - t0)
        return out

    copy_s = best(lambda: b.copy_(a))
    mm_s = best(lambda: torch.mm(m1, m2))
    return {"bytes_per_s": 2 * numel * 4 / copy_s, "flops_per_s": 2 * n ** 3 / mm_s, "copy_mib": size_mib,
            "matmul_n": n}
