"""The MNIST-1D pool cache: a damaged file is generated again and replaced, never a raw BadZipFile/EOFError."""
import numpy as np
import pytest
import torch

from fxrf.training.datasets import mnist1d

pytest.importorskip("mnist1d")

KW = dict(n_train=100, n_test=100, pool=300, seed=1)
FILE = "mnist1d-300-42.npz"


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors))


def _truncated(path):
    np.savez(path, x=np.zeros((300, 40), np.float32), y=np.zeros(300, np.int64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_layout(path):
    np.savez(path, x=np.zeros((7, 40), np.float32), y=np.zeros(7, np.int64))


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b""), _truncated, lambda p: p.write_bytes(b"PK\x03"),
                                    _wrong_layout, lambda p: np.savez(p, a=np.zeros(3))],
                         ids=["empty", "truncated", "zip-header-only", "wrong-shape", "other-arrays"])
def test_a_damaged_cache_file_is_regenerated(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "fxrf" / FILE
    path.parent.mkdir()
    damage(path)
    got = mnist1d(**KW)
    fresh = mnist1d(**KW, cache=False)  # the generator itself, no file involved: the oracle
    assert _same(got, fresh)
    with np.load(path) as f:  # the file was replaced by a sound one
        assert f["x"].shape == (300, 40) and f["y"].shape == (300,)
    assert _same(mnist1d(**KW), fresh)  # and is read back
    assert sorted(p.name for p in path.parent.iterdir()) == [FILE]  # no temporary file left behind


def test_an_unwritable_cache_still_returns_the_data(tmp_path, monkeypatch):
    (tmp_path / "fxrf").write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _same(mnist1d(**KW), mnist1d(**KW, cache=False))
