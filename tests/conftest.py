import ctypes
import ctypes.util
import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and the block zoo are plain modules beside the tests
# benchmarks/ holds the scripts that reproduce the paper's tables (table6.py); the tests check their figures
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch  # noqa: E402

os.environ["FXRF_PROGRESS"] = "0"  # no progress bars or lines in the tests' captured stderr (fxrf.progress)

# CI (.ci/run sets FXRF_CI=1) draws the same random models every run, so a red CI is reproducible and never a draw's
# luck; elsewhere each run draws anew and explores (a failing draw is kept in .hypothesis/ and replayed first)
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("FXRF_CI") == "1":
    settings.load_profile("ci")

DEFAULT_THREADS = 2  # CI's machine has 2 cores


def pytest_configure(config):
    config.addinivalue_line("markers", "threads(n): run the test with torch.set_num_threads(n) (default "
                            f"{DEFAULT_THREADS}); restored afterwards")


@pytest.fixture(autouse=True)
def _threads(request):
    """Every test starts with the same thread count, and a test that asks for another (`@pytest.mark.threads(1)`,
    or `pytestmark` for a module) gets it for itself only: set at import, a count leaked into every later test."""
    mark = request.node.get_closest_marker("threads")
    n = mark.args[0] if mark else DEFAULT_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
_TRIM_ABOVE = 1 << 30  # bytes of resident memory after a test that make it worth handing back


def _resident() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def _hand_memory_back():
    """After a test that left the process large (a sweep's model: organizing maxvit_t on meta peaks near 5 GB),
    collect its cycles and return the freed heap to the system: glibc keeps freed blocks mapped, so without this
    the suite's resident memory only grows, one large model after another."""
    yield
    if _resident() > _TRIM_ABOVE:
        gc.collect()
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
