"""Fine-tuning after a rewrite (issue 22 item 5): fxrf.distill takes what models return (a transformers
ModelOutput, a dict), holds data out and never returns a state that measured worse there than the one it was given;
fxrf.optimize(finetune=...) runs it after calibration; `fxrf optimize --finetune EPOCHS [--train DATA]`."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import fxrf
from fxrf.cli import main
from fxrf.errors import InputError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cnn.py")

pytestmark = pytest.mark.threads(1)  # small models: one thread is faster on a busy machine


def hand_agreement(student, teacher, batches, logits=lambda o: o):
    """Top-1 agreement computed here, with torch alone (the oracle for distill's own figures)."""
    with torch.no_grad():
        same = sum(int((logits(student(x)).argmax(1) == logits(teacher(x)).argmax(1)).sum()) for x in batches)
    return same / sum(len(x) for x in batches)


def hand_accuracy(model, batches):
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


# ------------------------------------------------------------------------------------- what models return


def test_a_transformers_model_is_distilled():
    transformers = pytest.importorskip("transformers")

    def hf(seed):
        torch.manual_seed(seed)
        return transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)).eval()

    g = torch.Generator().manual_seed(0)
    train = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    held = [torch.randn(8, 3, 32, 32, generator=g)]
    student, teacher = hf(1), hf(0)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    r = fxrf.distill(student, teacher, train, epochs=2, validation=held, progress=False, seed=0, device="cpu")
    assert r.metric == "agreement" and [v["epoch"] for v in r.validation] == [0, 1, 2]
    assert r.validation[0]["agreement"] == hand_agreement(student, teacher, held, lambda o: o.logits)
    assert r.validation[r.kept_epoch]["agreement"] == hand_agreement(r.model.eval(), teacher, held,
                                                                      lambda o: o.logits)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())  # the student is untouched
    assert type(r.model) is type(student)


class DictNet(nn.Module):
    """Returns a dict, as many models do; `key` names the logits."""

    def __init__(self, key="logits", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.key = nn.Linear(8, 3), key

    def forward(self, x):
        return {"features": x, self.key: self.fc(x)}


def batches(n=10, size=16, labels=False):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(size, 8, generator=g) for _ in range(n)]
    return [(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()) for x in xs] if labels else xs


def test_a_dict_with_logits_and_tuples_are_understood():
    r = fxrf.distill(DictNet(seed=1), DictNet(seed=0), batches(), epochs=1, progress=False)
    assert r.metric == "agreement" and len(r.validation) == 2

    class TupleNet(DictNet):
        def forward(self, x):
            return (self.fc(x), x)
    r = fxrf.distill(TupleNet(seed=1), TupleNet(seed=0), batches(), epochs=1, progress=False)
    assert r.validated_on == "1 of 10 batches held out"


def test_logits_names_the_key_or_takes_a_function():
    student, teacher = DictNet("scores", seed=1), DictNet("scores", seed=0)
    with pytest.raises(InputError, match=r"^the student returned a dict with 'features': tensor \(16, 8\), 'scores': "
                                         r"tensor \(16, 3\): no class logits \[batch, classes\] in it; pass "
                                         r"logits='key'.* or logits=lambda out: \.\.\. returning them$"):
        fxrf.distill(student, teacher, batches(), epochs=1, progress=False)
    a = fxrf.distill(student, teacher, batches(), epochs=1, logits="scores", progress=False, seed=0)
    b = fxrf.distill(student, teacher, batches(), epochs=1, logits=lambda o: o["scores"], progress=False, seed=0)
    assert a.validation == b.validation
    assert a.validation[0]["agreement"] == hand_agreement(student, teacher, [batches()[a_held()]],
                                                          lambda o: o["scores"])
    with pytest.raises(InputError, match=r"logits='nope' gave nothing: make it give the class logits"):
        fxrf.distill(student, teacher, batches(), epochs=1, logits="nope", progress=False)
    with pytest.raises(InputError, match=r"logits must be None, a key or attribute name, or a function"):
        fxrf.distill(student, teacher, batches(), epochs=1, logits=3, progress=False)


def a_held():
    """The batch distill holds out of 10 with seed 0: torch.randperm(10) seeded 0, its first (the documented
    split)."""
    return int(torch.randperm(10, generator=torch.Generator().manual_seed(0))[0])


# --------------------------------------------------------------------------------- validation, best state


def test_a_state_worse_than_the_start_is_never_returned():
    """The student is the teacher itself (agreement 1.0, KL 0: nothing can measure better); a step size of 10
    wrecks it: the start comes back, bit for bit. Without keep_best the wrecked weights come back (the control)."""
    teacher = DictNet(seed=0)
    r = fxrf.distill(teacher, teacher, batches(), epochs=2, lr=10.0, progress=False, seed=0, device="cpu")
    assert r.metric == "agreement" and r.kept_epoch == 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in r.model.state_dict().items())
    assert r.validation[0]["agreement"] == 1.0 and min(v["agreement"] for v in r.validation[1:]) < 1.0
    s = r.validation_summary()
    assert (s["before"], s["after"], s["kept_epoch"], s["epochs"]) == (1.0, 1.0, 0, 2)
    last = fxrf.distill(teacher, teacher, batches(), epochs=2, lr=10.0, progress=False, seed=0, keep_best=False,
                        device="cpu")
    assert last.kept_epoch == 2 and not torch.equal(last.model.fc.weight, teacher.fc.weight)


def test_labelled_data_is_measured_by_accuracy():
    student, teacher, data = DictNet(seed=1), DictNet(seed=0), batches(labels=True)
    r = fxrf.distill(student, teacher, data, epochs=1, progress=False, device="cpu")
    assert r.metric == "accuracy"
    assert r.validation[0]["accuracy"] == hand_accuracy(lambda x: student(x)["logits"], [data[a_held()]])


class Recorded(Dataset):
    """Counts how often each sample is read."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x, self.reads = torch.randn(n, 8, generator=g), [0] * n

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.x[i]


def test_a_dataloader_holds_out_ten_percent_never_trained_on():
    ds = Recorded(200)
    r = fxrf.distill(DictNet(seed=1), DictNet(seed=0), DataLoader(ds, batch_size=16, shuffle=True), epochs=2,
                     progress=False, seed=0)
    assert r.validated_on == "20 of 200 samples held out" and r.validation[0]["samples"] == 20
    # held out: read once per measurement (3: before, after epochs 1 and 2); trained on: once per epoch (2)
    assert sorted(ds.reads) == [2] * 180 + [3] * 20


@pytest.mark.parametrize("data, on", [
    ([torch.randn(16, 8)], "the training data itself (1 batch(es): too few to hold one out)"),
    (DataLoader(Recorded(20), batch_size=16), "the training data itself (20 samples: too few to hold out a batch "
                                              "of 16)"),
])
def test_data_too_small_to_split_is_measured_on_itself(data, on):
    r = fxrf.distill(DictNet(seed=1), DictNet(seed=0), data, epochs=1, progress=False)
    assert r.validated_on == on and len(r.validation) == 2


def test_a_generator_cannot_be_split_and_says_so():
    r = fxrf.distill(DictNet(seed=1), DictNet(seed=0), (x for x in batches()), epochs=1, progress=False)
    assert r.validation == [] and r.kept_epoch == 1 and r.validated_on.startswith("nothing: the loader has no length")
    assert r.validation_summary()["before"] is None
    with pytest.raises(InputError, match=r"validation must be a fraction in \[0, 1\)"):
        fxrf.distill(DictNet(), DictNet(), batches(), epochs=1, validation=1.5, progress=False)


def test_nan_in_the_held_out_data_is_blamed():
    data = batches()
    data[a_held()] = data[a_held()].clone()
    data[a_held()][3, 2] = float("nan")
    with pytest.raises(InputError, match=r"1 of the 1 validation batch\(es\) hold NaN or inf inputs; clean the data"):
        fxrf.distill(DictNet(seed=1), DictNet(seed=0), data, epochs=1, progress=False)


# ------------------------------------------------------------------------------------------ fxrf.optimize


def small_cnn(width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * width, 10))


def test_optimize_fine_tunes_after_calibration_on_the_digits():
    from fxrf.training.datasets import digits, loaders
    from fxrf.training.distill import train
    s = digits(n_train=300, n_test=100, seed=0)
    tr, te = loaders(s, batch_size=32, seed=0)
    torch.manual_seed(0)
    model = small_cnn()
    train(model, tr, 4, seed=0, progress=False)
    model.eval()
    held = list(te)  # the figures' oracle: a labelled set of its own, measured here by hand
    calibrated = fxrf.optimize(model, (1, 1, 8, 8), kernels="DW+PW", calibration=tr)
    r = fxrf.optimize(model, (1, 1, 8, 8), kernels="DW+PW", calibration=tr,
                      finetune={"epochs": 2, "data": tr, "validation": held, "seed": 0, "progress": False})
    f = r.summary["finetune"]
    assert f["metric"] == "accuracy" and f["validated_on"] == "the validation batches given"
    assert f["before"] == hand_accuracy(calibrated.graph_module.eval(), held)
    assert f["after"] == hand_accuracy(r.graph_module.eval(), held) >= f["before"]
    assert f["after"] == f["per_epoch"][f["kept_epoch"]] == max(f["per_epoch"]) and len(f["per_epoch"]) == 3
    assert r.summary["calibration"] is not None and calibrated.summary["finetune"] is None
    with pytest.raises(InputError, match=r"finetune needs 'data'"):
        fxrf.optimize(model, (1, 1, 8, 8), kernels="DW+PW", finetune={"epochs": 1})
    with pytest.raises(InputError, match=r"finetune: unknown option\(s\) 'epoch'"):
        fxrf.optimize(model, (1, 1, 8, 8), kernels="DW+PW", calibration=tr, finetune={"epochs": 1, "epoch": 1})


# ---------------------------------------------------------------------------------------------------- CLI


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def npz(path, n=96, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}
    if labels:
        arrays["y"] = rng.integers(0, 10, n)
    np.savez(path, **arrays)
    return str(path)


OPT = ["optimize", f"{EXAMPLE}:make", "--input", "1,3,16,16", "--kernels", "DW+PW", "--goal", "paper", "--dry-run"]


def test_cli_fine_tunes_on_the_calibration_data_with_its_labels(tmp_path, capsys):
    data = npz(tmp_path / "d.npz")
    code, out, err = run(OPT + ["--calibrate", data, "--finetune", "2", "--json"], capsys)
    assert code == 0, err
    f = json.loads(out)["finetune"]
    assert f["metric"] == "accuracy" and f["epochs"] == 2 and f["validated_on"] == "1 of 3 batches held out"
    assert f["after"] == f["per_epoch"][f["kept_epoch"]] == max(f["per_epoch"]) >= f["before"]


def test_cli_fine_tunes_on_train_data_and_prints_one_line(tmp_path, capsys):
    code, out, err = run(OPT + ["--calibrate", npz(tmp_path / "c.npz", labels=False), "--finetune", "1",
                                "--train", npz(tmp_path / "t.npz", n=64, seed=1, labels=False)], capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("fine-tuned")]
    assert len(lines) == 1 and lines[0].startswith("fine-tuned 1 epoch(s): validation top-1 agreement with MODEL ")
    assert lines[0].endswith("measured on 1 of 2 batches held out)")


@pytest.mark.parametrize("extra, message", [
    (["--finetune", "2"], "--finetune needs data to train on: --train DATA"),
    (["--train", "x.npz"], "--train DATA is the fine-tuning data: give --finetune EPOCHS with it"),
    (["--finetune", "0", "--train", "x.npz"], "argument --finetune: must be a whole number >= 1"),
])
def test_cli_refuses_finetune_without_data(extra, message, capsys):
    code, out, err = run(OPT + extra, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_train_npz_labels_must_fit(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((8, 3, 16, 16), np.float32), y=np.zeros(7, np.int64))
    code, _, err = run(OPT + ["--finetune", "1", "--train", str(path)], capsys)
    assert code == 2 and "'y' must hold one integer class label per input (8), got torch.int64 (7,)" in err
