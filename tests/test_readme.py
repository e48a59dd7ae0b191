"""The README's Python block runs as written, in a fresh process in an empty folder.

Its one line that times blocks on this CPU (`objective="latency"`) runs with a fake timer (every block and model
takes the same made-up time): that line's real timing is a benchmark (benchmarks/bench_models.py), not a test."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_TIMER = """
import fxrf.passes.latency as _latency
_latency.default_timer = lambda *a, **k: (lambda fn, x, probe: 1e-3)
"""


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_use_block_runs(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = _python_blocks(f.read())
    assert blocks, "the README has a ```python block"
    code = FAKE_TIMER + "\n".join(blocks)
    env = {**os.environ, "FXRF_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "relative_error" in r.stdout  # the calibration's report was printed
    assert (tmp_path / "out" / "opt.py").exists() and (tmp_path / "out" / "opt.pt").exists()
