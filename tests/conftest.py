import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and the block zoo are plain modules beside the tests

import torch  # noqa: E402

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
