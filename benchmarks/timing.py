"""What the benchmark scripts share to time a call: warm-up until the timings settle, the timed loop, and the
machine and load a figure was measured on.

    from timing import machine, time_calls, warm_up
    warm_up(lambda: model(x), min_calls=3, extra=8)           # seconds of each warm-up call
    times = time_calls(lambda: model(x), 30, min_n=5, budget_s=10.0)

CPU: `time.perf_counter` around each call. CUDA (`device="cuda"`): the warm-up synchronises after each call, the
timed calls are measured by CUDA events around each call, synchronised.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import time
from typing import Callable

import torch

SETTLED = 1.25  # two consecutive warm-up calls within 25% of each other: the timings have settled


def warm_up(call: Callable[[], object], min_calls: int, extra: int, device: str = "cpu") -> list:
    """Seconds of each untimed call of `call()`: `min_calls` at least, then up to `extra` more until two
    consecutive calls agree within 25% -- a CPU forward's first calls cost many times the steady state (oneDNN
    primitive creation, allocator growth), so a fixed count of warm-up calls is not always enough."""
    last = []
    for i in range(min_calls + extra):
        t0 = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        last.append(time.perf_counter() - t0)
        if i + 1 >= min_calls and len(last) >= 2 and max(last[-2:]) <= SETTLED * min(last[-2:]):
            break
    return last


def time_calls(call: Callable[[], object], n: int, *, device: str = "cpu", min_n: int = 1,
               budget_s: float = math.inf) -> list:
    """Seconds of each of up to `n` timed calls of `call()`, stopping once `budget_s` seconds have passed and
    `min_n` calls are in. The garbage collector runs once before (and stays on, as in real use)."""
    gc.collect()
    times, t_start = [], time.perf_counter()
    for i in range(n):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        if i + 1 >= min_n and time.perf_counter() - t_start > budget_s:
            break
    return times


# ------------------------------------------------------------------------------------------ where it was measured


def cpu_model() -> str | None:
    from fxrf.passes.latency import cpu_model as model  # one reader of /proc/cpuinfo; the cache keys use it too
    return model()


def cpu_capability() -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return None


def load_average() -> tuple | None:
    """The 1, 5 and 15 minute load averages, None where the platform has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine(device: str = "cpu") -> dict:
    """The processor, the software versions and torch's thread counts (and the GPU, for device "cuda")."""
    import fxrf
    info = {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "cpu_capability": cpu_capability(),
            "fxrf": getattr(fxrf, "__version__", "?")}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info
