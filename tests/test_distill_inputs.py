"""distill()/train() refuse what cannot train: an empty loader, a model without values (meta device), NaN data;
each with an InputError that names the problem and the fix."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fxrf.training.distill import distill, evaluate, kl_to_teacher, train
from fxrf.errors import InputError


def data(n=64, nan_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    if nan_at is not None:
        x[nan_at, 3] = float("nan")
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def net():
    torch.manual_seed(0)
    return nn.Linear(8, 2)


@pytest.mark.parametrize("loader", [
    DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4),
    DataLoader(TensorDataset(torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)), batch_size=4, drop_last=True),
    [],
], ids=["empty-dataset", "drop-last-smaller-than-a-batch", "empty-list"])
def test_an_empty_loader_trains_nothing_and_says_so(loader):
    model = net()
    before = model.weight.detach().clone()
    with pytest.raises(InputError, match=r"the loader yielded no samples in epoch 1: nothing was trained"):
        train(model, loader, epochs=2, progress=False)
    with pytest.raises(InputError, match=r"yielded no samples"):
        distill(net(), net(), loader, epochs=1, progress=False)
    assert torch.equal(model.weight, before)  # no step was taken


def test_a_non_empty_loader_still_trains():
    # control: 64 samples in batches of 16, 4 steps per epoch, all samples seen each epoch
    r = train(net(), data(), epochs=2, progress=False)
    assert len(r.history) == 2 and all(h["loss"] > 0 for h in r.history)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_a_meta_model_is_refused_with_the_fix(which):
    with torch.device("meta"):
        meta = nn.Linear(8, 2)
    models = {"student": net(), "teacher": net(), which: meta}
    with pytest.raises(InputError, match=rf"the {which}'s tensor 'weight' is on the meta device.*to_empty"):
        distill(models["student"], models["teacher"], data(), epochs=1, progress=False)
    with pytest.raises(InputError, match=rf"the {which}'s tensor 'weight' is on the meta device"):
        kl_to_teacher(models["student"], models["teacher"], data())


def test_a_meta_model_is_refused_by_train_and_evaluate():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 2))
    with pytest.raises(InputError, match=r"the model's tensor '0.weight' is on the meta device"):
        train(meta, data(), epochs=1, progress=False)
    with pytest.raises(InputError, match=r"the model's tensor '0.weight' is on the meta device"):
        evaluate(meta, data())


def test_nan_inputs_are_blamed_not_the_learning_rate():
    # sample 20 lies in the second batch of 16: one bad batch per epoch
    with pytest.raises(InputError, match=r"1 batch\(es\) of the loader hold NaN or inf inputs; clean the data") as e:
        train(net(), data(nan_at=20), epochs=1, progress=False)
    assert "lr" not in str(e.value)
    with pytest.raises(InputError, match=r"hold NaN or inf inputs"):
        distill(net(), net(), data(nan_at=20), epochs=1, progress=False)


def test_a_nan_teacher_is_blamed():
    teacher = net()
    with torch.no_grad():
        teacher.bias.fill_(float("nan"))
    with pytest.raises(InputError, match=r"the teacher returned NaN or inf logits on 4 batch\(es\)"):
        distill(net(), teacher, data(), epochs=1, progress=False)


def test_a_divergent_step_size_still_blames_lr():
    # finite data, lr 1e37: Adam moves each weight by about lr, the logits overflow float32 (3.4e38) to inf
    x = torch.randn(64, 8) * 1e3
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    with pytest.raises(InputError, match=r"with finite inputs: lower lr"):
        train(net(), loader, epochs=3, lr=1e37, weight_decay=0.0, progress=False)
