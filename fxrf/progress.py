"""progress: a line on stderr when a step takes long, and its time when it ends (the CLI's long steps)."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


@contextmanager
def progress(what: str, after: float = 2.0, stream=None):
    """A line on stderr when `what` takes longer than `after` seconds, and its time when it ends; only on a
    terminal (as tqdm bars), so that logs and captured errors stay one line (a `stream` given is always used)."""
    if stream is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        yield
        return
    stream = stream or sys.stderr
    start = time.perf_counter()
    shown = threading.Event()

    def say():
        shown.set()
        print(f"fxrf: {what} ...", file=stream, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        timer.cancel()
        if shown.is_set() and ok:
            print(f"fxrf: {what}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
