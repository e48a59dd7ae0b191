"""fxrf.prune: the coupled channel classes against a real forward (perturb a class's producer channels: exactly the
channels the class names change at every module's input), the pruned model against the original with the removed
channels' readers zeroed (done here, by hand, not by fxrf's surgery), MACs against torch's FlopCounterMode, the
plan against a fresh model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import fxrf
from fxrf.errors import FxrfError, InputError
from fxrf.trace import _as_shapes, trace_with_values
from fxrf.passes import private_copy
from fxrf.passes.prune.groups import channel_groups

from random_cnn import random_cnns


def valid(fn):
    """fn(), or the draw skipped when the random model does not fit its input (a window larger than the map)."""
    try:
        return fn()
    except InputError as e:
        assume("does not fit" not in str(e))
        raise


def groups_of(model, shape):
    gm = private_copy(model, shape)
    _, shapes, modules = trace_with_values(gm, shape)
    return channel_groups(gm, shapes, _as_shapes(shape), modules)


def module_inputs(model, paths, producers, x, perturb=None, base=None):
    """Each module's input(s) (a list per path, one per call) and each producer's output(s). With `base` (an earlier
    run's outputs), every producer returns its output from that run, plus, for those in `perturb` {path:
    [channels]}, a large offset on those channels: a change then travels only by position, never through a conv
    or linear that mixes channels."""
    seen = {p: [] for p in paths}
    outs = {p: [] for p in producers}
    hooks = []
    for p in paths:
        hooks.append(model.get_submodule(p).register_forward_pre_hook(
            lambda m, args, p=p: seen[p].append(args[0].detach().clone())))
    for p in producers:
        def hook(m, args, out, p=p):
            if base is not None:
                out = base[p][len(outs[p])].clone()
                if p in perturb:
                    idx = [slice(None)] * out.dim()
                    idx[-1 if isinstance(m, nn.Linear) else 1] = perturb[p]
                    g = torch.Generator().manual_seed(1)
                    out[tuple(idx)] += 50.0 + torch.rand(out[tuple(idx)].shape, generator=g)
            outs[p].append(out.detach().clone())
            return out
        hooks.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, outs


def changed_channels(before, after, axis) -> set:
    out = set()
    for a, b in zip(before, after):
        d = (a - b).abs().movedim(axis, 0).reshape(a.shape[axis], -1).amax(dim=1)
        out |= set(torch.nonzero(d > 1e-6).flatten().tolist())
    return out


def check_classes(model, shape, groups, classes):
    """For each class: perturbing its producers' channels changes, at every sliced module's input, exactly the
    channels the class names for that module (the convs and linears that read them hold their outputs, so a change
    reaches only what is coupled by position)."""
    x = torch.randn(*shape)
    paths = sorted(p for p, u in groups.uses.items() if u.kind != "attr")  # (modules; attrs are tensors)
    producers = [p for p in paths if groups.uses[p].kind in ("conv", "linear")]
    base, outs = module_inputs(model, paths, producers, x)
    for c in classes:
        perturb = {}
        for p, role, i in groups.members[c]:
            if role == "out":
                perturb.setdefault(p, []).append(i)
        got, _ = module_inputs(model, paths, producers, x, perturb, outs)
        for p in paths:
            axis = -1 if isinstance(model.get_submodule(p), nn.Linear) else 1
            named = {i for q, role, i in groups.members[c] if q == p and role == "in"}
            assert changed_channels(base[p], got[p], axis) == named, (p, c, groups.members[c])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns(), st.data())
def test_classes_match_a_real_forward(case, data):
    model, shape = case
    groups = valid(lambda: groups_of(model, shape))
    classes = sorted(groups.members)
    pick = data.draw(st.lists(st.sampled_from(classes), max_size=4, unique=True)) if classes else []
    check_classes(model, shape, groups, pick)


def zeroed_by_hand(model, groups, classes):
    """The original with every conv/linear input column that reads a removed channel set to zero (written here
    with plain indexing: for a conv of g groups, input j is column j % (in/g) of the rows of group j // (in/g))."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for c in classes:
            for p, role, j in groups.members[c]:
                if role != "in" or groups.uses[p].kind not in ("conv", "linear"):
                    continue
                m = ref.get_submodule(p)
                if isinstance(m, nn.Linear):
                    m.weight[:, j] = 0
                else:
                    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                    k, i = divmod(j, per_in)
                    m.weight[k * per_out:(k + 1) * per_out, i] = 0
    return ref


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns(), st.floats(0.1, 0.8))
def test_pruned_equals_zeroed_readers(case, amount):
    model, shape = case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = valid(lambda: fxrf.prune(model, shape, amount=amount))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    x = torch.randn(*shape)
    ref = zeroed_by_hand(model, r.groups, r.removed)  # (were they not the ones removed, outputs would differ)
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), ref(x), rtol=1e-4, atol=1e-5)


# -- hand-derived cases --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y + self.b(y))


def class_with(groups, member):
    return next(c for c, ms in groups.members.items() if member in ms)


def test_residual_add_couples_both_producers():
    # y + b(y): channel 3 of the sum is a's channel 3 and b's channel 3; c and b read it as their input 3
    g = groups_of(Residual().eval(), (1, 3, 8, 8))
    ms = set(g.members[class_with(g, ("a", "out", 3))])
    assert ms == {("a", "out", 3), ("b", "out", 3), ("b", "in", 3), ("c", "in", 3)}
    assert not any(("c", "out", i) in m for m in g.members.values() for i in range(4))  # c reaches the output


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.g, self.q = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.q(F.relu(self.g(F.relu(self.p(x)))))


def test_grouped_conv_couples_the_same_index_of_every_group():
    # g has 2 groups of 4 inputs and 3 outputs: input i goes with input i + 4, output o with output o + 3
    g = groups_of(Grouped().eval(), (1, 3, 8, 8))
    assert set(g.members[class_with(g, ("p", "out", 1))]) == {("p", "out", 1), ("p", "out", 5), ("g", "in", 1),
                                                             ("g", "in", 5)}
    assert set(g.members[class_with(g, ("g", "out", 2))]) == {("g", "out", 2), ("g", "out", 5), ("q", "in", 2),
                                                             ("q", "in", 5)}
    r = fxrf.prune(Grouped().eval(), (1, 3, 8, 8), amount=0.5)
    # p: 4 classes of 2, round(0.5 * 4) = 2 go; g's outputs: 3 classes of 2, round(1.5) = 2 go
    assert (r.model.g.in_channels, r.model.g.out_channels, r.model.g.groups) == (4, 2, 2)


class SR(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.ps, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1), \
            nn.PixelShuffle(2), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(self.ps(self.b(F.relu(self.a(x)))))


def test_pixel_shuffle_removes_blocks_of_r_squared():
    # pixel_shuffle(2): output channel k is made of input channels 4k..4k+3, which go together
    g = groups_of(SR().eval(), (1, 3, 8, 8))
    assert set(g.members[class_with(g, ("b", "out", 5))]) == {("b", "out", i) for i in range(4, 8)} | {("c", "in", 1)}
    r = fxrf.prune(SR().eval(), (1, 3, 8, 8), amount=0.34)
    assert (r.model.b.out_channels, r.model.c.in_channels) == (8, 2)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.conv(x), 2), 1))


def test_flatten_into_a_linear_removes_the_channel_s_columns():
    # flatten of [4, 2, 2]: channel c is columns 4c .. 4c+3 of fc
    g = groups_of(Head().eval(), (1, 3, 4, 4))
    assert set(g.members[class_with(g, ("conv", "out", 2))]) == {("conv", "out", 2)} | {("fc", "in", j)
                                                                                      for j in range(8, 12)}
    assert not any(m[1] == "out" and m[0] == "fc" for ms in g.members.values() for m in ms)  # logits stay


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(y).mean()


def test_an_op_that_mixes_channels_freezes_them_and_says_where():
    g = groups_of(LayerNormed().eval(), (1, 3, 4, 4))
    assert not any(m[0] == "a" for ms in g.members.values() for m in ms)
    assert any(n == "norm" and "mixes channels" in why for n, why in g.declined)


class GroupView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # a channel shuffle by hand
        return self.b(y).sum()


def test_a_view_into_groups_freezes_what_it_splits():
    g = groups_of(GroupView().eval(), (1, 3, 4, 4))
    assert not any(m[0] == "a" for ms in g.members.values() for m in ms)
    assert any("splits a channel axis" in why for _, why in g.declined)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(self.bn(self.a(x)) + self.bn(self.b(x)))


def test_a_module_called_twice_couples_what_it_reads():
    g = groups_of(Shared().eval(), (1, 3, 4, 4))
    assert set(g.members[class_with(g, ("a", "out", 4))]) == {("a", "out", 4), ("b", "out", 4), ("bn", "in", 4),
                                                             ("c", "in", 4)}


# -- the pass ---------------------------------------------------------------------------------------------------


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, groups=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10)).eval()


def flops(model, shape):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(*shape))
    return fc.get_total_flops()


def test_a_macs_target_is_met_by_torch_s_count():
    net = small_net()
    r = fxrf.prune(net, (1, 3, 16, 16), macs=0.5)
    ratio = flops(r.model, (1, 3, 16, 16)) / flops(net, (1, 3, 16, 16))
    assert 0.35 < ratio <= 0.5 + 0.02, ratio
    assert abs(r.summary["macs_after"] / r.summary["macs_before"] - ratio) < 0.02


def test_the_plan_rebuilds_the_model_from_a_fresh_instance():
    net = small_net()
    r = fxrf.prune(net, (1, 3, 16, 16), amount=0.5)
    assert r.form == "module" and type(r.model) is nn.Sequential
    fresh = fxrf.apply(small_net(), r.plan)
    fresh.load_state_dict(r.model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), r.model(x))


def test_a_pruned_model_trains():
    r = fxrf.prune(small_net(), (1, 3, 16, 16), amount=0.5)
    m = r.model.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    before = float(F.cross_entropy(m(x), y))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert float(F.cross_entropy(m(x), y)) < before


def test_calibration_re_estimates_the_norms():
    net = small_net()
    batches = [torch.randn(16, 3, 16, 16) * 3 + 1 for _ in range(3)]
    r = fxrf.prune(net, (1, 3, 16, 16), amount=0.5, calibration=batches)
    assert r.summary["calibration"]["batch_norms"] == "re-estimated"
    assert not torch.equal(r.model[1].running_mean, torch.zeros(8))  # estimated on the data, not the default


def test_include_and_exclude_choose_the_families():
    r = fxrf.prune(small_net(), (1, 3, 16, 16), amount=0.5, exclude="3")
    assert r.model[3].out_channels == 32 and r.model[0].out_channels == 8
    r = fxrf.prune(small_net(), (1, 3, 16, 16), amount=0.5, include="3")
    assert r.model[3].out_channels == 16 and r.model[0].out_channels == 16


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of"), ({"amount": 0.3, "macs": 0.5}, "exactly one of"), ({"amount": 1.0}, "0 <= amount < 1"),
    ({"macs": 0.0}, "0 < macs < 1"), ({"amount": 0.3, "importance": "taylor"}, "importance='taylor' is unknown"),
])
def test_bad_options_get_one_line(kwargs, match):
    with pytest.raises(InputError, match=match):
        fxrf.prune(small_net(), (1, 3, 16, 16), **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "resnext50_32x4d"])
def test_torchvision_models_prune_and_run(name):
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)().eval()
    shape = (1, 3, 64, 64)
    r = fxrf.prune(m, shape, amount=0.3)
    assert type(r.model) is type(m) and r.form == "module"
    assert flops(r.model, shape) < 0.9 * flops(m, shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert r.model(x).shape == m(x).shape


def test_an_unreachable_target_says_what_is_frozen():
    # only conv 0's 4 channels can go; conv 1 (4 -> 64 channels, the output) keeps >= 1/4 of its MACs
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 64, 3))
    with pytest.raises(InputError, match="macs=0.1 cannot be reached.*declined"):
        fxrf.prune(net, (1, 3, 8, 8), macs=0.1)


def test_nothing_to_prune_gives_the_model_back_and_says_why():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))  # its only channels are the output's
    r = fxrf.prune(net, (1, 3, 8, 8), amount=0.5)
    assert r.summary["removed_classes"] == 0 and r.model[0].out_channels == 4
    assert any("model output" in d["reason"] for d in r.declined)


# -- in the pipeline and on the command line ---------------------------------------------------------------------


def test_optimize_prunes_then_decomposes_and_one_plan_rebuilds_both():
    net = small_net()
    batches = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    r = fxrf.optimize(net, (1, 3, 16, 16), prune=0.5, kernels="DW+PW", calibration=batches)
    assert list(r.steps) == ["prune", "kernels"] and r.form == "module" and type(r.model) is nn.Sequential
    assert [c["op"] for c in r.plan["changes"]].count("resize") >= 3  # the pruner's, then the decomposer's
    assert "replace" in [c["op"] for c in r.plan["changes"]]
    fresh = fxrf.apply(small_net(), r.plan)
    fresh.load_state_dict(r.model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), r.model.eval()(x))
        torch.testing.assert_close(r.model(x), r.graph_module.eval()(x), rtol=1e-4, atol=1e-5)
    from fxrf.optimize_report import optimize_summary
    text = optimize_summary(r)
    assert text.startswith("prune (l1, rate 0.5):") and "kernels (DW+PW)" in text


def test_optimize_prune_alone_reports_its_own_calibration():
    batches = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    r = fxrf.optimize(small_net(), (1, 3, 16, 16), prune={"macs": 0.5}, calibration=batches)
    c = r.summary["calibration"]
    assert c["pruned"] and c["batch_norms"] == "re-estimated" and c["refit"]
    assert c["calibrated"]["relative_error"] < c["transfer"]["relative_error"]  # the refit brought it closer


def test_cli_prune_writes_the_class_and_a_fresh_process_reloads_it(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from fxrf.cli import main
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--prune", "macs=0.5", "--measure", "0",
                     "--out", "p.pt"]) == 0
        out = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.plan.json", "p.pt"]
    assert out.startswith("prune (l1") and "written as VGG itself" in out
    hint = next(line[len("load it with: "):] for line in out.splitlines() if line.startswith("load it with: "))
    code = (f"{hint}\nimport torch\nassert type(model).__name__ == 'VGG'\n"
            "print(sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    import torchvision  # noqa: F401  (vgg11_cifar's convs: 64+128+256*2+512*4 = 2752 channels before)
    assert int(done.stdout.strip()) < 2752


@pytest.mark.parametrize("spec", ["1.5", "macs=0", "flops=0.5", "x"])
def test_cli_bad_prune_spec_is_one_line(spec, capsys):
    from fxrf.cli import main
    assert main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--prune", spec, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--prune {spec}" in err and "Traceback" not in err


class FunctionalBN(nn.BatchNorm2d):
    """Traced into F.batch_norm on its own buffers (as timm's BatchNormAct2d is): get_attr nodes, no module call."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps))


def test_a_functional_norm_s_parameters_are_sliced_with_their_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FunctionalBN(8), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    r = fxrf.prune(net, (1, 3, 8, 8), amount=0.5)
    assert (r.model[0].out_channels, r.model[1].running_mean.shape[0], r.model[1].num_features) == (4, 4, 4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_by_hand(net, r.groups, r.removed)(x), rtol=1e-4, atol=1e-5)
    fresh = fxrf.apply(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FunctionalBN(8), nn.Conv2d(8, 4, 1)), r.plan)
    fresh.load_state_dict(r.model.state_dict())  # the plan rebuilt the norm at its pruned size


def test_an_exported_model_prunes_in_graph_form():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(cfg).eval()
    r = fxrf.prune(model, (1, 3, 32, 32), amount=0.5)  # captured by torch.export: no module paths of the model's
    assert r.form == "graph" and "torch.export" in r.form_why
    assert r.summary["macs_after"] < 0.6 * r.summary["macs_before"]
    out = r.model(torch.randn(1, 3, 32, 32))
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention" and out.logits.shape == (1, 3)


def test_goal_speed_chooses_between_pruning_and_decomposing_by_measured_time():
    net = small_net()
    r = fxrf.optimize(net, (1, 3, 16, 16), prune={"macs": 0.5}, kernels="DW+PW", goal="speed", measure=1)
    ch = r.summary["choice"]
    assert set(ch["ratios"]) == {"prune", "kernels", "prune+kernels"}
    assert ch["chosen"] == min(ch["ratios"], key=ch["ratios"].get)  # the fastest measured goes on
    want = {"prune": ["prune"], "kernels": ["kernels"], "prune+kernels": ["prune", "kernels"]}[ch["chosen"]]
    kept = r.summary["latency"]["kept"] == "result"
    assert list(r.steps) == want and (not kept or r.changes)
    from fxrf.optimize_report import optimize_summary
    assert f"chose {ch['chosen']}: timed with the model in alternation" in optimize_summary(r)


class ChannelsLastMLP(nn.Module):
    """A Swin/ConvNeXt block's shape: NHWC after a LayerNorm (frozen: it mixes channels), then an MLP."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 2, 2), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        y = self.norm(self.stem(x).permute(0, 2, 3, 1))
        y = y + self.fc2(F.gelu(self.fc1(y)))
        return y.mean((1, 2))


def test_the_hidden_channels_of_an_mlp_after_a_frozen_norm_are_prunable():
    # the norm's output is frozen but stays channels-last (N H W C): fc1's 32 outputs are 32 classes, each with
    # fc2's input column of the same index
    g = groups_of(ChannelsLastMLP().eval(), (1, 3, 8, 8))
    assert set(g.members[class_with(g, ("fc1", "out", 7))]) == {("fc1", "out", 7), ("fc2", "in", 7)}
    assert len(g.members) == 32
    r = fxrf.prune(ChannelsLastMLP().eval(), (1, 3, 8, 8), amount=0.5)
    assert (r.model.fc1.out_features, r.model.fc2.in_features, r.model.fc2.out_features) == (16, 16, 8)


def test_l1_does_not_change_when_a_scale_moves_from_a_filter_into_its_norm():
    # conv 0's filter i scaled by c_i and its norm's running variance by c_i^2, mean by c_i (eps 0): the same
    # function (checked), so the same channels must go
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=0.0), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    scaled = copy.deepcopy(net)
    c = torch.linspace(0.2, 5.0, 8)
    with torch.no_grad():
        scaled[0].weight.mul_(c[:, None, None, None])
        scaled[1].running_mean.mul_(c)
        scaled[1].running_var.mul_(c ** 2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), net(x), rtol=1e-4, atol=1e-5)
        a, b = fxrf.prune(net, (1, 3, 8, 8), amount=0.5), fxrf.prune(scaled, (1, 3, 8, 8), amount=0.5)
        torch.testing.assert_close(a.model(x), b.model(x), rtol=1e-4, atol=1e-5)


def test_calibration_of_a_1d_net_does_better_than_the_norms_alone():
    # the regression: the classifier was fit, then the norms before it re-estimated, so it was fit to activations
    # the model no longer computed (output error 2.04 against 0.71 for the norms alone)
    pytest.importorskip("mnist1d")
    from fxrf.training.calibrate import recalibrate_bn
    from fxrf.training.datasets import loaders, mnist1d
    from fxrf.training.distill import train
    torch.manual_seed(0)

    def blk(i, o):
        return [nn.Conv1d(i, o, 3, padding=1), nn.BatchNorm1d(o), nn.ReLU()]
    net = nn.Sequential(*blk(1, 16), nn.MaxPool1d(2), *blk(16, 32), nn.MaxPool1d(2), *blk(32, 32), nn.MaxPool1d(2),
                        nn.Flatten(), nn.Linear(160, 10))
    tr, te = loaders(mnist1d(n_train=1000, n_test=1000, seed=0), batch_size=32, seed=0)
    train(net, tr, 4, seed=0, progress=False)
    net.eval()
    calib = [x for x, _ in tr][:10]
    fitted = fxrf.prune(net, (1, 1, 40), macs=0.5, calibration=calib).model.eval()
    norms = recalibrate_bn(fxrf.prune(net, (1, 1, 40), macs=0.5).model, calib, batches=8).eval()
    x = next(iter(te))[0][:512]
    with torch.no_grad():
        y = net(x)
        err = [float((m(x) - y).norm() / y.norm()) for m in (fitted, norms)]
    assert err[0] < err[1], err
