"""The latency cache on disk: damaged entries are measured again, a cache location that cannot be a file is one
clear InputError. Fake timers: nothing is really timed."""
import json

import pytest
import torch.nn as nn

from fxrf.errors import InputError
from fxrf.passes.latency import LatencyModel

CONV = nn.Conv2d(8, 8, 3, padding=1)
SHAPE = (1, 8, 8, 8)


def timer(module, x, probe):
    return 2e-3  # every block: 2 ms


@pytest.mark.parametrize("bad", ["fast", float("nan"), -1.0, None, True, [1e-3], {"s": 1e-3}, float("inf")])
def test_a_damaged_entry_is_measured_again_and_replaced(tmp_path, bad):
    path = tmp_path / "lat.json"
    key = LatencyModel("cpu", cache=None, mode="eager").probe("S", CONV, SHAPE).key()
    other = "an unrelated entry"
    path.write_text(json.dumps({key: bad, other: 5e-3}))  # (json writes nan as NaN, which json.load reads back)
    lm = LatencyModel("cpu", mode="eager", cache=path, timer=timer)
    assert lm.time("S", CONV, SHAPE) == 2e-3 and lm.calls == 1
    assert json.loads(path.read_text()) == {key: 2e-3, other: 5e-3}
    again = LatencyModel("cpu", mode="eager", cache=path, timer=lambda *a: pytest.fail("timed twice"))
    assert again.time("S", CONV, SHAPE) == 2e-3 and again.calls == 0  # the repaired entry is read back


def test_a_sound_entry_is_read_back(tmp_path):
    # control for the test above: 0 and an int are times (a fake 0 s block is allowed)
    path = tmp_path / "lat.json"
    key = LatencyModel("cpu", cache=None, mode="eager").probe("S", CONV, SHAPE).key()
    for value in (0, 3):
        path.write_text(json.dumps({key: value}))
        lm = LatencyModel("cpu", mode="eager", cache=path, timer=lambda *a: pytest.fail("timed"))
        assert lm.time("S", CONV, SHAPE) == value and lm.calls == 0


def test_a_damaged_comparison_is_timed_again(tmp_path):
    path = tmp_path / "lat.json"
    models = {"a": nn.Identity(), "b": nn.ReLU()}
    LatencyModel("cpu", mode="eager", cache=path, timer=timer).compare(models, SHAPE, rounds=2)
    data = json.loads(path.read_text())
    (key,) = data
    assert data[key] == {"a": [2e-3, 2e-3], "b": [2e-3, 2e-3]}
    for bad in ({"a": ["x", 1], "b": [1, 1]}, {"a": [1], "b": [1, 1]}, {"a": [-1, 1], "b": [1, 1]}):
        path.write_text(json.dumps({key: bad}))
        lm = LatencyModel("cpu", mode="eager", cache=path, timer=timer)
        assert lm.compare(models, SHAPE, rounds=2) == {"a": (2e-3, 2e-3), "b": (2e-3, 2e-3)}
        assert lm.calls == 4  # 2 models x 2 rounds


def test_cache_dir_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FXRF_CACHE_DIR", str(blocker))
    with pytest.raises(InputError, match=r"not-a-dir is a file, not a directory.*point FXRF_CACHE_DIR at a "
                                         r"directory, or pass cache=None"):
        LatencyModel("cpu", mode="eager", timer=timer)
    monkeypatch.setenv("FXRF_CACHE_DIR", str(blocker / "deeper"))  # a folder above the cache dir is the file
    with pytest.raises(InputError, match="is a file, not a directory"):
        LatencyModel("cpu", mode="eager", timer=timer)
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path / "fine"))  # control: a dir still to be made is fine
    assert LatencyModel("cpu", mode="eager", timer=timer).time("S", CONV, SHAPE) == 2e-3
    assert (tmp_path / "fine").is_dir()


def test_cache_path_that_is_a_directory_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="is a directory, not a file"):
        LatencyModel("cpu", mode="eager", cache=tmp_path, timer=timer)
