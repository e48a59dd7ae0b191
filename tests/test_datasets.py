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


# -- same-distance ----------------------------------------------------------------------------------------------


def test_same_distance_places_two_equal_weight_codes_exactly_k_apart():
    from fxrf.training.datasets import _codes, same_distance
    k, patch = 7, 3
    s = same_distance(k, n_train=300, n_test=10, noise=0.0, seed=3, patch=patch, distractors=0)
    x, y = s.train.tensors
    table = _codes(patch, 4, 42)
    lit = int(table[0].sum())
    assert all(int(t.sum()) == lit for t in table)  # every code lights the same number of pixels
    for img, label in zip(x[:, 0].numpy(), y.tolist()):
        assert img.sum() == 2 * lit  # so the brightness of an image says nothing
        # find the two patches: every 3x3 window equal to a code
        found = [(i, j, c) for i in range(img.shape[0] - patch + 1) for j in range(img.shape[1] - patch + 1)
                 for c in range(len(table)) if np.array_equal(img[i:i + patch, j:j + patch], table[c])
                 and img[i:i + patch, j:j + patch].sum() == lit]
        pairs = [(p, q) for p in found for q in found if p < q and
                 ((p[0] == q[0] and abs(p[1] - q[1]) == k) or (p[1] == q[1] and abs(p[0] - q[0]) == k))]
        assert any((p[2] == q[2]) == bool(label) for p, q in pairs), (label, found)
    assert 0.4 < float(y.float().mean()) < 0.6


def test_a_distractor_is_never_k_from_another_patch():
    from fxrf.training.datasets import _codes, same_distance
    k, patch = 6, 3
    table = _codes(patch, 4, 42)
    x = same_distance(k, n_train=200, n_test=10, noise=0.0, seed=1).train.tensors[0]
    for img in x[:, 0].numpy():
        assert img.sum() == 3 * table[0].sum()  # three patches of equal weight
        found = [(i, j) for i in range(img.shape[0] - patch + 1) for j in range(img.shape[1] - patch + 1)
                 if any(np.array_equal(img[i:i + patch, j:j + patch], t) for t in table)]
        pairs = [(p, q) for p in found for q in found if p < q and
                 ((p[0] == q[0] and abs(p[1] - q[1]) == k) or (p[1] == q[1] and abs(p[0] - q[0]) == k))]
        assert len(pairs) == 1  # the pair, and no other


def test_same_distance_defeats_a_linear_model_on_pixels():
    # no linear function of the pixels compares two codes at a random place: logistic regression stays near chance
    from sklearn.linear_model import LogisticRegression

    from fxrf.training.datasets import same_distance
    s = same_distance(6, n_train=3000, n_test=1000, seed=0)
    xtr, ytr = s.train.tensors
    xte, yte = s.test.tensors
    clf = LogisticRegression(max_iter=300).fit(xtr.flatten(1).numpy(), ytr.numpy())
    assert clf.score(xte.flatten(1).numpy(), yte.numpy()) < 0.6


def test_same_distance_stream_draws_fresh_batches_each_epoch():
    from fxrf.training.datasets import SameDistanceStream, same_distance
    st = SameDistanceStream(5, batch_size=8, batches=2, seed=1)
    e1, e2 = [x for x, _ in st], [x for x, _ in st]
    assert len(e1) == 2 and e1[0].shape == (8, 1, 24, 24) and not torch.equal(e1[0], e2[0])
    again = [x for x, _ in SameDistanceStream(5, batch_size=8, batches=2, seed=1)]
    assert torch.equal(again[0], e1[0])  # reproducible from the seed
    assert torch.equal(same_distance(5, n_train=10, n_test=10).train.tensors[0],
                       same_distance(5, n_train=10, n_test=10).train.tensors[0])


@pytest.mark.parametrize("k, msg", [(2, "at least the patch"), (30, "at most the map"), (0, "positive integer")])
def test_same_distance_refuses_a_distance_that_does_not_fit(k, msg):
    from fxrf.training.datasets import same_distance
    from fxrf.errors import InputError
    with pytest.raises(InputError, match=msg):
        same_distance(k)
