"""progress: what a long step is doing, on stderr -- a tqdm bar with an ETA on a terminal, one summary line when
stderr is piped (a log), nothing when the library is used quietly.

One switch decides whether anything is shown: the CLI turns it on for its run (`show()`), the library is quiet
by default, and the environment overrides both: FXRF_PROGRESS=0 silences everything (the test suite sets it),
FXRF_PROGRESS=1 shows progress from library calls too.

The long steps use three forms: `bar(iterable, what)` around a loop (a known total gives an ETA; a loop that
ends by `return` or `break` is closed when its iterator is released), `Bar(what)` as a context manager for a step
of unknown length, and `tick(label)` for work done inside the innermost open step (each block the latency model
times: counted in that step's bar or line). `progress(what)` is the CLI's step: a bar (terminal) or a line after
the step (piped), both only when the step lasts longer than `after` seconds.

    >>> with show(False):                   # quiet: the loop runs, nothing is printed
    ...     [x * 2 for x in bar(range(3), "doubling")]
    [0, 2, 4]
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar

AFTER = 2.0  # seconds: a step shorter than this shows nothing (its bar never appears, no line is printed)
ENV = "FXRF_PROGRESS"
STEP = "step"  # the unit of a step that counts nothing itself (`progress`): its line says "done in"

_SHOW: ContextVar[bool] = ContextVar("fxrf_progress_show", default=False)
_OPEN: ContextVar[tuple] = ContextVar("fxrf_progress_open", default=())  # the open bars, innermost last


def shown() -> bool:
    """Whether progress is shown now: FXRF_PROGRESS=0 / 1 if set, else what `show` set (off by default)."""
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return _SHOW.get()


@contextmanager
def show(on: bool = True):
    """Show progress (or not) for the code run inside: the CLI wraps each command in `show()`."""
    token = _SHOW.set(bool(on))
    try:
        yield
    finally:
        _SHOW.reset(token)


def _terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class Bar:
    """One long step: `update(n)` counts its units, `tick(label)` work done inside it, `close()` ends it. A tqdm
    bar on a terminal (after `after` seconds), else one line when it closes (if it lasted `after` seconds), else
    (quiet) nothing."""

    def __init__(self, what: str, total: int | None = None, unit: str = "it", *, after: float | None = None,
                 stream=None):
        self.what, self.total, self.unit = what, total, unit
        self.after = AFTER if after is None else after
        self.n, self.ticks = 0, {}
        self.start = time.perf_counter()
        self._tqdm, self._stream, self._closed, self._token = None, None, False, None
        if not shown():
            self._closed = True  # quiet: counts nothing, prints nothing
            return
        stream = stream or sys.stderr
        if _terminal(stream):
            from tqdm import tqdm
            fmt = None if total is not None else "{desc} [{elapsed}{postfix}]" if unit == STEP else \
                "{desc}: {n_fmt} " + unit + " [{elapsed}{postfix}]"
            self._tqdm = tqdm(total=total, desc=f"fxrf: {what}", unit=f" {unit}", leave=False, delay=self.after,
                              file=stream, dynamic_ncols=True, bar_format=fmt)
        else:
            self._stream = stream
        self._token = _OPEN.set(_OPEN.get() + (self,))

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)

    def tick(self, label: str, n: int = 1) -> None:
        if self._closed:
            return
        self.ticks[label] = self.ticks.get(label, 0) + n
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(self._counts(), refresh=True)

    def _counts(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.ticks.items())

    def summary(self) -> str:
        """The line a piped run prints when the step ends."""
        done = "done" if self.unit == STEP else \
            f"{self.n} {self.unit}" + (f" of {self.total}" if self.total not in (None, self.n) else "")
        extra = f" ({self._counts()})" if self.ticks else ""
        return f"fxrf: {self.what}: {done} in {time.perf_counter() - self.start:.1f} s{extra}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _OPEN.reset(self._token)
        except ValueError:  # closed in another context (a generator released elsewhere): drop it from the stack
            _OPEN.set(tuple(b for b in _OPEN.get() if b is not self))
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._stream is not None and time.perf_counter() - self.start >= self.after:
            print(self.summary(), file=self._stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(iterable, what: str, total: int | None = None, unit: str = "it"):
    """`iterable`, counted by a `Bar` (total: len(iterable) when it has one). Quiet: `iterable` itself."""
    if not shown():
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _counted(iterable, Bar(what, total, unit))


def _counted(iterable, b: Bar):
    try:
        for x in iterable:
            yield x
            b.update()
    finally:
        b.close()


def tick(label: str, n: int = 1) -> None:
    """Count `n` of `label` (e.g. "timed": a block timed) in the innermost open bar; nothing when none is open."""
    stack = _OPEN.get()
    if stack:
        stack[-1].tick(label, n)


@contextmanager
def progress(what: str, after: float | None = None, stream=None, announce: bool = False):
    """A long step of the CLI: a bar on a terminal, one line when it ends if stderr is piped (each after `after`
    seconds). announce=True: a line when it starts, at once, and one when it ends (fxrf.compile's first call).
    A `stream` given is always written to: a line when the step has taken `after` seconds, and its time when it
    ends."""
    if stream is None and announce:
        if not shown():
            yield None
            return
        start = time.perf_counter()
        print(f"fxrf: {what} ...", file=sys.stderr, flush=True)
        yield None
        print(f"fxrf: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return
    if stream is None:
        with Bar(what, unit=STEP, after=after) as b:
            yield b
        return
    after = AFTER if after is None else after
    start = time.perf_counter()
    shown_ = threading.Event()

    def say():
        shown_.set()
        print(f"fxrf: {what} ...", file=stream, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield None
        ok = True
    finally:
        timer.cancel()
        if shown_.is_set() and ok:
            print(f"fxrf: {what}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
