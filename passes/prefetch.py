"""Compile ahead, in parallel: what makes a cold latency search slow is compiling, not timing.

A site compiles in 0.2-1.2 s on a CPU (dynamo, inductor, and a C++ compiler run for each kernel not built before)
and times in 1-30 ms, and the search compiles its sites one after the other on one core. `Prefetcher` compiles
the sites a step of the search is about to time all at once: in this process and in `workers` worker processes
(each a fresh `python -c`, so a user's script is never re-imported). Every compile lands in inductor's FX graph
cache (on disk, shared by the processes), so the timing process's own compile of the same graph is then a cache
hit (about 0.08 s). The timings themselves run afterwards, one after the other, on a machine no longer busy
compiling: the phases never overlap, so no timing shares the CPU with a compiler.

A prefetch is only ever a head start: a site it misses (or fails to build) is compiled when it is timed, as
before, and nothing it does changes a figure. It runs only where it can help: inductor on the CPU with the FX
graph cache on, and a timer that runs what it times (a fake one compiles nothing).

Worker count: `workers` (LatencyModel's argument), else $FXRF_COMPILE_WORKERS, else the CPUs the load leaves idle
(at most one less than the CPUs, and 7); 0 turns prefetching off.
"""
from __future__ import annotations

import base64
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import Callable

ENV = "FXRF_COMPILE_WORKERS"
MAX_WORKERS = 7


def default_workers() -> int:
    """$FXRF_COMPILE_WORKERS if set (0: off), else the CPUs left idle by the load (the 1-minute load average,
    this process included while it works), at most one less than the CPUs this process may use, and 7: a
    compiler on a CPU another process keeps busy only slows both (measured: no gain at load 1.8 on 2 CPUs)."""
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            from fxrf.errors import InputError
            raise InputError(f"{ENV}={env!r} must be a number of worker processes (0: no compiling ahead)")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        idle = int(cpus - os.getloadavg()[0])
    except (AttributeError, OSError):
        idle = cpus - 1
    return max(0, min(cpus - 1, idle, MAX_WORKERS))


def pack(job) -> bytes | None:
    """A job as a worker reads it (a pickled, base64 line); None where pickle cannot carry it: this process
    compiles that one itself."""
    try:
        return base64.b64encode(pickle.dumps(job))
    except Exception:  # noqa: BLE001
        return None


def serve(handle: Callable) -> None:
    """A worker's loop: for each job read from stdin (`pack`), `handle(job)`, then "ok" or "err <why>" on stdout
    (which is kept for the replies: anything torch prints goes to stderr, which is discarded)."""
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1  # this process is one of the parallel compilers: no pool of its own
    out, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        try:
            handle(pickle.loads(base64.b64decode(line)))
            out.write("ok\n")
        except Exception as e:  # noqa: BLE001 -- a head start only: the timing process compiles it itself
            out.write("err " + f"{type(e).__name__}: {e}".replace("\n", " ")[:300] + "\n")
        out.flush()


class Prefetcher:
    """Worker processes started on first use and kept until `close` (the search closes it when it ends, before
    the whole-model check times anything)."""

    def __init__(self, workers: int, entry: str):
        self.workers = max(0, int(workers))
        self.entry = entry  # "module:function" a worker runs: a loop calling `serve`
        self._procs: list = []
        self.compiled = 0  # sites compiled ahead (in this process or a worker)
        self.failed: list = []  # (what, why) of those that did not build ahead: compiled when timed instead

    def _start(self) -> None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        # the same interpreter, environment and working directory: the workers import the fxrf this process did,
        # and compile into the cache this process reads
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir(), TORCHINDUCTOR_COMPILE_THREADS="1",
                   OMP_NUM_THREADS="1", FXRF_PROGRESS="0")
        for _ in range(self.workers - len(self._procs)):
            module, function = self.entry.split(":")
            self._procs.append(subprocess.Popen([sys.executable, "-c", f"from {module} import {function}; "
                                                 f"{function}()"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                                text=True))

    def run(self, jobs: list) -> None:
        """Compile `jobs` ((what, spec bytes or None, local: a function compiling it here) each) at once: in the
        workers and in this thread, each taking the next job until none is left (a job without a spec only
        here); returns when all are done."""
        if not jobs:
            return
        self._start()
        todo: queue.Queue = queue.Queue()
        here: queue.Queue = queue.Queue()  # the jobs only this process can compile
        for job in jobs:
            (todo if job[1] is not None else here).put(job)
        lock = threading.Lock()

        def done(what, why=None):
            with lock:
                if why is None:
                    self.compiled += 1
                else:
                    self.failed.append((what, why))

        def remote(proc):
            while True:
                try:
                    what, data, _ = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    proc.stdin.write(data.decode() + "\n")
                    proc.stdin.flush()
                    reply = proc.stdout.readline().strip()
                except (OSError, ValueError) as e:  # the worker died: this thread stops, the rest go on
                    done(what, f"worker gone ({type(e).__name__})")
                    return
                done(what, None if reply == "ok" else (reply[4:] if reply.startswith("err ") else "worker gone"))
                if not reply:
                    return

        threads = [threading.Thread(target=remote, args=(p,), daemon=True) for p in self._procs]
        for t in threads:
            t.start()
        while True:  # this process compiles too: it would only wait otherwise
            try:
                what, _, local = (here if not here.empty() else todo).get_nowait()
            except queue.Empty:
                break
            try:
                local()
                done(what)
            except Exception as e:  # noqa: BLE001 -- compiled again (and the error raised) when timed
                done(what, f"{type(e).__name__}: {e}")
        for t in threads:
            t.join()

    def close(self) -> None:
        for p in self._procs:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                p.kill()
        self._procs = []
