"""`fxrf.optimize`: the pipeline the CLI and fxrf.compile run (organize, then decompose, then calibrate), its
result's shape, and the calibration that brings a decomposed trained model back before any training.

Oracles: the passes run one after the other by hand (the same graph), and the two models' outputs compared with
torch directly (relative error, top-1 agreement)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxrf
import fxrf.training.calibrate
from fxrf.training.datasets import digits, loaders  # scikit-learn's bundled digits: the test extra
from fxrf.training.distill import train
from fxrf.errors import InputError

pytestmark = pytest.mark.threads(1)  # small models: one thread is faster than two on a busy machine
SHAPE = (1, 1, 8, 8)


def cnn(width: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * width, 10))


@pytest.fixture(scope="module")
def trained():
    """A digits CNN (width 16) trained 6 epochs (seed 1), and 12 batches of its training inputs for calibration."""
    s = digits(n_train=400, n_test=200, seed=1)
    tr, te = loaders(s, batch_size=32, seed=1)
    torch.manual_seed(1)
    m = cnn(16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(m, tr, 6, seed=1, progress=False)
    finally:
        torch.set_num_threads(n)
    xs = [x for x, _ in tr][:12]
    return m.eval(), xs


def _agreement(a: nn.Module, b: nn.Module, xs) -> tuple[float, float]:
    """(relative output error, top-1 agreement) computed here with torch alone."""
    with torch.no_grad():
        ya = torch.cat([a(x) for x in xs]).double()
        yb = torch.cat([b(x) for x in xs]).double()
    return float((yb - ya).norm() / ya.norm()), float((ya.argmax(1) == yb.argmax(1)).double().mean())


def test_the_pipeline_is_the_passes_in_order():
    """optimize(stages, kernels) builds the graph the two passes build when run by hand, one after the other."""
    from fxrf.models import vgg11_cifar
    with torch.device("meta"):
        model = vgg11_cifar()
    r = fxrf.optimize(model, (1, 3, 32, 32), stages=True, kernels="DW+PW")
    o = fxrf.organize_stages(model, (1, 3, 32, 32))
    d = fxrf.decompose(o.graph_module, (1, 3, 32, 32), recipe="DW+PW")
    assert r.graph_module.code == d.graph_module.code
    assert list(r.steps) == ["stages", "kernels"]
    assert r.changes == r.steps["stages"].changes + r.steps["kernels"].changes
    assert r.declined == r.steps["stages"].declined + r.steps["kernels"].declined
    # before/after: fresh analyses of the model and of the result, in the organizer's spatial cap
    assert len(r.before.convs()) == 8 and r.after.graph_module is not r.before.graph_module
    assert len(r.after.convs()) == len(fxrf.analyze(r.graph_module, (1, 3, 32, 32)).convs())
    assert r.summary["stages"] is r.steps["stages"].summary and r.summary["calibration"] is None
    assert r.summary["function_preserved"] is False  # the blocks' weights are transferred, not exact
    assert json.dumps(r.to_dict(), default=str)


def test_every_pass_result_has_one_shape():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    for r in (fxrf.organize_stages(net, (1, 3, 16, 16)), fxrf.decompose(net, (1, 3, 16, 16), recipe="DW+PW"),
              fxrf.optimize(net, (1, 3, 16, 16), kernels="DW+PW")):
        assert isinstance(r.graph_module, torch.fx.GraphModule)
        assert isinstance(r.changes, list) and isinstance(r.declined, list) and isinstance(r.summary, dict)
        assert isinstance(r.analysis, fxrf.Analysis) and r.analysis.graph_module is not None
        assert all(isinstance(c.describe(r.analysis, r.analysis), str) for c in r.changes)


def test_nothing_asked_is_refused():
    with pytest.raises(InputError, match="say what to optimize"):
        fxrf.optimize(nn.Conv2d(3, 3, 3), (1, 3, 8, 8))
    with pytest.raises(InputError, match="kernels="):
        fxrf.optimize(nn.Conv2d(3, 3, 3), (1, 3, 8, 8), kernels=3)


def test_calibration_brings_the_decomposed_model_back(trained):
    """Right after the SVD transfer a trained CNN's decomposition computes something else; the least-squares fit
    on 8 batches brings it to the model's predictions on held-out batches (measured here with torch alone)."""
    model, xs = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    raw = fxrf.optimize(model, SHAPE, kernels="DW+PW")
    cal = fxrf.optimize(model, SHAPE, kernels="DW+PW", calibration=xs)
    held = xs[8:10]
    err_raw, agree_raw = _agreement(model, raw.graph_module, held)
    err_cal, agree_cal = _agreement(model, cal.graph_module, held)
    c = cal.summary["calibration"]
    assert (c["batches"], c["held_out"], c["fitted"]) == (8, 2, 2)
    assert c["transfer"]["relative_error"] == pytest.approx(err_raw, rel=1e-4)
    assert c["calibrated"]["relative_error"] == pytest.approx(err_cal, rel=1e-4)
    assert c["calibrated"]["top1_agreement"] == pytest.approx(agree_cal)
    # observed (seed 1, one thread): transfer 1.04 / 17% agreement, calibrated 0.50 / 91%
    assert err_cal < 0.6 * err_raw and agree_cal >= 0.85 and agree_raw < 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is untouched


def test_calibration_after_removals_re_estimates_the_norms(trained):
    """The organizer's removals change the function: with data, the norms are re-estimated (nothing to fit)."""
    _, xs = trained
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(3):  # 5x5, 7x7, 9x9 on an 8x8 map: the last two convs gain little (0.30, 0.03 < 0.3)
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10))
    model = fxrf.training.calibrate.recalibrate_bn(model, xs, batches=12).eval()  # norms that describe the data
    r = fxrf.optimize(model, SHAPE, stages=True, calibration=xs)
    assert r.steps["stages"].summary["removed"] == 2
    c = r.summary["calibration"]
    assert c["norms_only"] and "fitted" not in c
    assert c["calibrated"]["relative_error"] == pytest.approx(_agreement(model, r.graph_module, xs[8:10])[0],
                                                              rel=1e-4)


def test_a_single_batch_is_fit_and_judged_and_says_so(trained):
    model, xs = trained
    c = fxrf.optimize(model, SHAPE, kernels="DW+PW", calibration=xs[:1]).summary["calibration"]
    assert (c["batches"], c["held_out"]) == (1, 0) and "themselves" in c["measured_on"]


def test_bad_calibration_is_an_input_error(trained):
    model, _ = trained
    with pytest.raises(InputError, match="no batch"):
        fxrf.optimize(model, SHAPE, kernels="DW+PW", calibration=[])
    with pytest.raises(InputError, match="calibration_batches"):
        fxrf.optimize(model, SHAPE, kernels="DW+PW", calibration=[torch.randn(2, 1, 8, 8)], calibration_batches=0)


def test_cli_calibrate_from_a_tensor_and_an_npz(trained, tmp_path, capsys):
    from fxrf.cli import main
    model, xs = trained
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "digits_net.py").write_text("import torch.nn as nn\n\n\ndef make():\n    w = 16\n    return nn.Sequential("
                                     "nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, 2 * w,"
                                     " 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d("
                                     "2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2), "
                                     "nn.Flatten(), nn.Linear(8 * w, 10))\n")
    data = torch.cat(xs)  # 12 batches of 32 = 384 inputs: 8 batches fit, 2 held out
    torch.save(data, tmp_path / "x.pt")
    np.savez(tmp_path / "x.npz", x=data.numpy())
    outs = {}
    for f in ("x.pt", "x.npz"):
        code = main(["optimize", f"{tmp_path / 'digits_net.py'}:make", "--input", "1,1,8,8", "--kernels", "DW+PW", "--goal", "paper",
                     "--weights", str(tmp_path / "w.pt"), "--calibrate", str(tmp_path / f), "--dry-run", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        outs[f] = json.loads(out)["calibration"]
    assert outs["x.pt"] == outs["x.npz"]
    assert outs["x.pt"]["calibrated"]["top1_agreement"] >= 0.85 and outs["x.pt"]["held_out"] == 2
    code = main(["optimize", f"{tmp_path / 'digits_net.py'}:make", "--input", "1,1,8,8", "--kernels", "DW+PW",
                 "--goal", "paper", "--dry-run"])
    out, _ = capsys.readouterr()
    assert code == 0 and "not calibrated" in out
    code = main(["optimize", f"{tmp_path / 'digits_net.py'}:make", "--input", "1,1,8,8", "--kernels", "DW+PW", "--dry-run",
                 "--calibrate", str(tmp_path / "missing.pt")])
    _, err = capsys.readouterr()
    assert code == 2 and "no such file" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- goal="speed", measure


class _Clock:
    """A fake timer: whole models by label (the LatencyModel's probe), every block and conv the same."""

    def __init__(self, model_s: dict):
        self.model_s = model_s

    def __call__(self, fn, x, probe):
        return self.model_s.get(probe.label, 1e-3) if probe.recipe == "model" else 1e-3


def _lm(model_s):
    from fxrf.passes.latency import LatencyModel
    return LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=_Clock(model_s))


def _vgg():
    from fxrf.models import vgg11_cifar
    torch.manual_seed(0)
    return vgg11_cifar().eval()


def test_measure_reports_the_whole_model_times_and_the_noise():
    r = fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", measure=3,
                      latency=_lm({"model": 4e-3, "result": 1e-3, "model (2nd instance)": 4.2e-3}))
    t = r.summary["latency"]
    # by hand: result / model = 1/4 in every round; the second instance runs 4.2/4 = 1.05x the first
    assert (t["result_vs_model"], t["noise"], t["rounds"], t["kept"]) == (0.25, 0.05, 3, "result")
    assert t["ms"] == {"model": 4.0, "result": 1.0, "model (2nd instance)": 4.2}
    assert r.changes and r.summary["goal"] == "paper"


def test_speed_returns_the_model_when_the_result_is_not_faster():
    model = _vgg()
    r = fxrf.optimize(model, (1, 3, 32, 32), kernels="DW+PW", goal="speed",
                      latency=_lm({"model": 1e-3, "result": 1.2e-3}))
    t = r.summary["latency"]
    assert t["kept"] == "model" and t["result_vs_model"] == 1.2 and "nothing is changed" in t["why"]
    assert r.changes == [] and any(type(d).__name__ == "Reverted" for d in r.declined)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the model's own function, exactly
        assert torch.equal(r.graph_module.eval()(x), model(x))
    assert r.summary["function_preserved"] is True


def test_speed_keeps_a_faster_result_and_prices_the_steps_in_time():
    r = fxrf.optimize(_vgg(), (1, 3, 32, 32), stages=True, kernels="auto", goal="speed",
                      latency=_lm({"model": 2e-3, "result": 1e-3, "model (2nd instance)": 2e-3}))
    assert r.summary["latency"]["kept"] == "result"
    assert r.steps["kernels"].summary["objective"] == "latency"  # auto priced in measured time
    assert r.steps["stages"].summary["latency_budget"] == 1.0  # the organizer never predicted slower


def test_goal_and_measure_are_checked():
    with pytest.raises(InputError, match="goal 'fast' is unknown"):
        fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", goal="fast")
    with pytest.raises(InputError, match="measure >= 1"):
        fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", goal="speed", measure=0)
    with pytest.raises(InputError, match="measure=-1"):
        fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", measure=-1)


def test_the_report_flags_a_slower_result():
    from fxrf.optimize_report import optimize_summary
    r = fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", measure=2,
                      latency=_lm({"model": 1e-3, "result": 1.5e-3}))
    text = optimize_summary(r)
    assert "eager: model 1.000 ms, result 1.500 ms: 1.500x" in text
    assert any(line.startswith("slower than the input: eager 1.500x its time (noise 0.000)")
               for line in text.splitlines())  # its own line


def test_cli_goal_and_measure_reach_the_pipeline(monkeypatch, capsys, tmp_path):
    """--goal/--measure are passed through; a fake timer (the LatencyModel's default one) makes the result 4x
    slower, so --goal speed prints that the model was kept and writes the JSON's latency block."""
    import fxrf.passes.latency as latency
    from fxrf.cli import main
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency, "default_timer", lambda *a, **k: _Clock({"model": 1e-3, "result": 4e-3}))
    code = main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+PW", "--goal", "speed",
                 "--measure", "2", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kept the model unchanged" in out and "4.000x the model's time" in out
    code = main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+PW", "--goal", "fast",
                 "--dry-run"])
    _, err = capsys.readouterr()
    assert code == 2 and "goal 'fast' is unknown" in err


def test_speed_returns_the_model_when_the_result_is_faster_only_within_the_noise():
    # by hand: result / model = 0.97 in every round, but two instances of the model differ by 1.05: not measured
    # faster, so the model comes back
    r = fxrf.optimize(_vgg(), (1, 3, 32, 32), kernels="DW+PW", goal="speed",
                      latency=_lm({"model": 1e-3, "result": 0.97e-3, "model (2nd instance)": 1.05e-3}))
    assert r.summary["latency"]["kept"] == "model" and not r.changes
    assert "not faster beyond the noise (0.050" in r.summary["latency"]["why"]
