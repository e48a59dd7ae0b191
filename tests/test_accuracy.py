"""The accuracy tooling: data loaders, training, distillation (one process and two under torchrun), and the
calibration that follows a decomposition. The accuracy figures themselves are benchmarks
(benchmarks/accuracy.py), not tests; everything here is small enough for a few seconds on one core."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf.training.datasets import digits, loaders, mnist1d  # needs scikit-learn and mnist1d: the test extra
from fxrf.training.distill import distill, evaluate, kl_to_teacher, train
from fxrf.errors import InputError
from fxrf.training.calibrate import fit_blocks, recalibrate_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cnn(width: int = 8) -> nn.Sequential:
    """8x8 digits: three conv + BN + ReLU layers (two of them decomposable), two poolings, a linear layer."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * width, 10))


# These tests train small models: one thread is faster than two on a busy machine (no spinning).
pytestmark = pytest.mark.threads(1)


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on 300 digits (8 epochs, seed 1): (model, train loader, test loader)."""
    s = digits(n_train=300, n_test=500, seed=1)
    tr, te = loaders(s, batch_size=32, seed=1)
    torch.manual_seed(1)
    m = small_cnn()
    n = torch.get_num_threads()  # (module scope: set up before the per-test thread fixture runs)
    torch.set_num_threads(1)
    try:
        train(m, tr, 8, seed=1, progress=False)
    finally:
        torch.set_num_threads(n)
    return m.eval(), tr, te


# ---------------------------------------------------------------------------------------------------- loaders


def test_mnist1d_shapes_balance_determinism_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = mnist1d(n_train=200, n_test=100, pool=300, seed=3)  # generated, then cached
    assert (tmp_path / "fxrf" / "mnist1d-300-42.npz").exists()
    b = mnist1d(n_train=200, n_test=100, pool=300, seed=3, cache=False)  # generated again
    c = mnist1d(n_train=200, n_test=100, pool=300, seed=4)  # from the cache, another split
    x, y = a.train.tensors
    assert x.shape == (200, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert a.test.tensors[0].shape == (100, 1, 40)
    assert y.bincount(minlength=10).tolist() == [20] * 10  # stratified: exactly n_train / 10 per class
    assert a.test.tensors[1].bincount(minlength=10).tolist() == [10] * 10
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(y, b.train.tensors[1])
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(x, c.train.tensors[0])  # another split seed, another split of the same pool
    pool = {tuple(r.tolist()) for r in torch.cat([x, a.test.tensors[0]]).view(300, -1)}
    assert pool == {tuple(r.tolist()) for r in torch.cat([c.train.tensors[0], c.test.tensors[0]]).view(300, -1)}
    # train and test never share a sample
    tr = {tuple(r.tolist()) for r in x.view(200, -1)}
    assert not any(tuple(r.tolist()) in tr for r in a.test.tensors[0].view(100, -1))


def test_digits_shapes_balance_determinism_and_loaders():
    a, b = digits(n_train=100, seed=0), digits(n_train=100, seed=0)
    x, y = a.train.tensors
    assert x.shape == (100, 1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert a.test.tensors[0].shape == (1797 - 100, 1, 8, 8)  # the rest of the 1,797 bundled images
    assert y.bincount(minlength=10).tolist() == [10] * 10
    assert torch.equal(x, b.train.tensors[0])
    up = digits(n_train=100, seed=0, size=16)
    assert up.train.tensors[0].shape == (100, 1, 16, 16) and up.input_shape == (1, 1, 16, 16)
    tr1, _ = loaders(a, batch_size=32, seed=5)
    tr2, te = loaders(a, batch_size=32, seed=5)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(tr1, tr2))  # the same shuffle for the same seed
    assert sum(len(b[1]) for b in te) == 1697


def test_loader_input_errors():
    with pytest.raises(InputError, match="multiple of 10"):
        digits(n_train=15)
    with pytest.raises(InputError, match="fewer than"):
        digits(n_train=1790)
    with pytest.raises(InputError, match="Split"):
        loaders(torch.zeros(3))


# ------------------------------------------------------------------------------------------- train, distill


def test_training_beats_chance_by_a_wide_margin(trained):
    m, _, te = trained
    assert evaluate(m, te) > 0.8  # chance is 0.1; observed 0.95


def test_distillation_lowers_the_kl_to_the_teacher(trained):
    teacher, tr, te = trained
    torch.manual_seed(0)
    student = small_cnn(4)
    before = kl_to_teacher(student, teacher, te, temperature=1.0)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    r = distill(student, teacher, tr, epochs=4, lr=1e-2, progress=False, seed=0)
    after = kl_to_teacher(r.model, teacher, te, temperature=1.0)
    assert after < 0.5 * before  # observed: 1.17 -> 0.29 nats per test sample
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())  # the student is untouched
    assert len(r.history) == 4 and r.history[-1]["kl"] < r.history[0]["kl"]
    assert evaluate(r.model, te) > 0.7  # observed 0.85


def test_distill_without_labels_uses_the_kl_only(trained):
    teacher, tr, _ = trained
    inputs = [x for x, _ in tr]
    torch.manual_seed(0)
    r = fxrf.distill(small_cnn(4), teacher, inputs, epochs=2, progress=False)  # fxrf.distill is the function
    assert r.history[0]["ce"] == 0.0 and r.history[0]["accuracy"] is None
    assert r.history[-1]["kl"] < r.history[0]["kl"]


def test_distill_input_errors(trained):
    teacher, tr, _ = trained
    with pytest.raises(InputError, match="epochs must be a positive integer"):
        distill(small_cnn(4), teacher, tr, epochs=0)
    with pytest.raises(InputError, match="temperature must be a positive number"):
        distill(small_cnn(4), teacher, tr, epochs=1, temperature=0)
    with pytest.raises(InputError, match="kd_weight"):
        distill(small_cnn(4), teacher, tr, epochs=1, kd_weight=2.0)
    with pytest.raises(InputError, match="loader must be an iterable"):
        distill(small_cnn(4), teacher, 3, epochs=1)
    with pytest.raises(InputError, match="student must be a torch.nn.Module"):
        distill("model", teacher, tr, epochs=1)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(InputError, match=r"student returns \(32, 7\) and the teacher \(32, 10\)"):
        distill(wrong, teacher, tr, epochs=1, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="asked for CUDA, which this machine does not have"):
            distill(small_cnn(4), teacher, tr, epochs=1, device="cuda")


# ------------------------------------------------------------------------------------------------ calibration


def _capture(model, module, x):
    out = {}
    h = module.register_forward_hook(lambda m, a, o: out.setdefault("y", o.detach()))
    try:
        model(x)
    finally:
        h.remove()
    return out["y"]


def test_calibration_improves_accuracy_right_after_the_transfer(trained):
    """On a trained CNN, DW+PW with the SVD transfer alone is at chance (the ReLU between the factors cuts what
    the transfer assumes passes); re-estimating the norms helps a little, the least-squares fit a lot."""
    m, tr, te = trained
    d = fxrf.decompose(m, (1, 1, 8, 8), recipe="DW+PW")
    svd = evaluate(d.graph_module, te)
    bn = evaluate(recalibrate_bn(d.graph_module, tr, batches=4), te)
    cal = fit_blocks(m, d, tr, batches=4)
    lsq = evaluate(cal.graph_module, te)
    # observed (seed 1): svd 0.108, bn 0.146, lsq 0.588 (teacher 0.954)
    assert bn >= svd + 0.02
    assert lsq >= svd + 0.3 and lsq >= bn + 0.2
    assert [b.fitted for b in cal.blocks] == ["pw", "pw"]
    # the fit reduces each block's output error against its conv, measured here by real forwards
    x = torch.cat([xb for xb, _ in tr][:4])
    for b in cal.blocks:
        want = _capture(m, m.get_submodule(b.target), x)
        got_svd = _capture(d.graph_module, d.graph_module.get_submodule(b.target + ".pw"), x)
        got_lsq = _capture(cal.graph_module, cal.graph_module.get_submodule(b.target + ".pw"), x)
        e_svd, e_lsq = float((got_svd - want).norm() / want.norm()), float((got_lsq - want).norm() / want.norm())
        assert e_lsq < 0.8 * e_svd
    assert cal.summary["fitted"] == 2


def test_least_squares_fit_recovers_a_separable_conv():
    """A conv whose kernel is separable per input channel, W[o, c] = P[o, c] D[c], is a DW+PW block exactly, but
    the depthwise outputs change sign, so the ReLU between the factors breaks the SVD transfer. After the fit
    (inner norm shifted 3 standard deviations up, pointwise weights by least squares) the block reproduces the
    conv up to the ~0.1% of a Gaussian that stays below zero."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(12, 6, 1, 1) * torch.randn(1, 6, 3, 3))
    pre = nn.Conv2d(3, 6, 3, padding=1)
    m = nn.Sequential(pre, nn.BatchNorm2d(6), nn.ReLU(), conv, nn.BatchNorm2d(12), nn.ReLU()).eval()
    batches = [torch.randn(32, 3, 8, 8) for _ in range(4)]
    m = recalibrate_bn(m, batches, batches=4)  # norms that describe their data, as in a trained model
    d = fxrf.decompose(m, (1, 3, 8, 8), recipe="DW+PW")
    cal = fit_blocks(m, d, batches, batches=4)
    x = torch.randn(64, 3, 8, 8)
    want = _capture(m, m[3], x)
    e_svd = float((_capture(d.graph_module, d.graph_module.get_submodule("3.pw"), x) - want).norm() / want.norm())
    e_lsq = float((_capture(cal.graph_module, cal.graph_module.get_submodule("3.pw"), x) - want).norm()
                  / want.norm())
    assert e_svd > 0.3 and e_lsq < 0.05  # observed: 0.63 and 0.01


def test_recalibrate_bn_matches_the_batch_statistics():
    """After re-estimation the norm's running statistics are the mean and (unbiased) variance of its input over
    the calibration batches, computed here directly."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(16, 2, 6, 6) * 3 + 1 for _ in range(3)]
    r = recalibrate_bn(m, batches, batches=3)
    with torch.no_grad():
        y = torch.cat([m[0](b) for b in batches])  # [48, 4, 4, 4]
    per_batch_mean = torch.stack([m[0](b).mean((0, 2, 3)) for b in batches]).detach()
    assert torch.allclose(r[1].running_mean, per_batch_mean.mean(0), atol=1e-5)
    assert torch.allclose(r[1].running_var, y.var((0, 2, 3)), rtol=0.05)  # per-batch unbiased variances averaged
    assert float(m[1].running_mean.abs().max()) == 0.0  # the model given is untouched
    assert not r.training


def test_calibration_input_errors(trained):
    m, tr, _ = trained
    d = fxrf.decompose(m, (1, 1, 8, 8), recipe="DW+PW")
    with pytest.raises(InputError, match="batches must be a positive integer"):
        recalibrate_bn(m, tr, batches=0)
    with pytest.raises(InputError, match="what fxrf.decompose"):
        fit_blocks(m, m, tr)
    with pytest.raises(InputError, match="loader must be an iterable"):
        fit_blocks(m, d, None)


# -------------------------------------------------------------------------------------------- torchrun (DDP)

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    from fxrf.training.distill import distill

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, 6, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(),
                             nn.Linear(36, 3))
    rank = int(os.environ["RANK"])
    # a different student initialisation per rank: DDP must start every rank from rank 0's weights
    r = distill(net(100 + rank), net(7), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                epochs=2, seed=0, device="cpu", progress=False)
    torch.save(r.model.state_dict(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": r.world_size, "history": r.history}, f)
""")


def test_two_gloo_processes_started_as_torchrun_does_end_with_identical_weights(tmp_path):
    """Two processes with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), started directly: the launcher itself would add a third interpreter to this test's time."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # parameters and batch-norm statistics alike
    h0, h1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert h0["world_size"] == h1["world_size"] == 2

    def strip(h):  # the loss history is all-reduced: every rank reports the same (wall times aside)
        return [{k: v for k, v in e.items() if k != "seconds"} for e in h["history"]]
    assert strip(h0) == strip(h1) and len(strip(h0)) == 2
