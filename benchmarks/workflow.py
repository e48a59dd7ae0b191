"""The workflow of docs/workflow.md, measured end to end for three models: the digits CNN of that doc, a timm CNN
and a Hugging Face CNN (built from its config), each trained here on scikit-learn's digits (upsampled), then
`fxrf.optimize` (goal "speed" and goal "paper"), calibrated on training batches, fine-tuned briefly against the
original, saved in the user's form (weights + structure plan) and reloaded in a fresh process.

Prints, per model and goal: params and MACs before/after, the measured whole-model latency (eager and compiled,
in alternation against the original, with the noise of two instances of one model), test accuracy of the teacher; top-1
agreement with the teacher on held-out calibration batches right after the weight transfer and after calibration;
test accuracy right after calibration, after the fine-tune, and after the reload; and for the
timm and Hugging Face models that the returned object is the user's class with its API working.

    python benchmarks/workflow.py [--models digits,timm,hf] [--batch 32] [--measure 5] [--epochs 8] [--json F]

Choices (calibration batches, fine-tune epochs) use the training split only; the test split is read once per
reported figure. The validation split the fine-tune keeps its best epoch by is carved from the training data.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import fxrf
from fxrf.cost import total
from fxrf.training.datasets import digits, loaders
from fxrf.training.distill import evaluate, train


def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """docs/workflow.md's model: three VGG-style stages for 16x16 digits."""

    def __init__(self, num_classes=10, width=16):
        w = width
        super().__init__()
        self.features = nn.Sequential(*block(1, w), *block(w, w), nn.MaxPool2d(2),
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 4 * w), *block(4 * w, 4 * w), *block(4 * w, 4 * w),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 2 * 2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def make(name: str):
    """(model, input size in pixels, how to build it again in a fresh process)."""
    if name == "digits":
        return DigitsCNN(), 16, "DigitsCNN()"
    if name == "timm":
        import timm
        return (timm.create_model("resnet10t", num_classes=10, in_chans=1), 32,
                'timm.create_model("resnet10t", num_classes=10, in_chans=1)')
    if name == "hf":
        from transformers import ResNetConfig, ResNetForImageClassification
        cfg = "ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10)"
        return (ResNetForImageClassification(eval(cfg, {"ResNetConfig": ResNetConfig})), 32,
                f"transformers.ResNetForImageClassification(transformers.{cfg})")
    raise SystemExit(f"unknown model {name!r}: digits, timm or hf")


class Logits(nn.Module):
    """evaluate/train need class scores: the HF model's ModelOutput read at .logits."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(x)
        return out.logits if hasattr(out, "logits") else out


def accuracy(model, loader) -> float:
    return round(100 * evaluate(Logits(model).eval(), loader), 2)


RELOAD = """
import sys, torch, fxrf, timm, transformers
sys.path.insert(0, {bench!r})
from workflow import DigitsCNN, Logits, accuracy
from fxrf.training.datasets import digits, loaders
torch.manual_seed(0)
model = fxrf.apply({build}, {plan!r})
model.load_state_dict(torch.load({weights!r}, weights_only=True))
_, test = loaders(digits(n_train=1000, size={size}, seed=0), batch_size=64, seed=0)
print(accuracy(model, test))
"""


def run(name: str, goal: str, args, teacher, size, build, train_loader, test_loader) -> dict:
    shape = (1, 1, size, size)
    calib = [x for x, _ in train_loader][:10]
    kernels = "auto" if goal == "speed" else "DW+PW"
    t0 = time.time()
    r = fxrf.optimize(teacher, shape, kernels=kernels, goal=goal, batch=args.batch, measure=args.measure,
                      calibration=calib)
    row = {"model": name, "goal": goal, "kernels": kernels, "form": r.form, "form_why": r.form_why,
           "replaced": len(r.changes), "optimize_s": round(time.time() - t0, 1)}
    cb, ca = total(r.before.costs), total(r.after.costs)
    row.update(params=(cb.params, ca.params), macs=(cb.macs, ca.macs), latency=r.summary["latency"])
    row["acc_teacher"] = accuracy(teacher, test_loader)
    cal = r.summary["calibration"]  # right after the transfer, and calibrated: against the teacher, held out
    row["agree_transfer"] = round(100 * cal["transfer"]["top1_agreement"], 1)
    row["agree_calibrated"] = round(100 * cal["calibrated"]["top1_agreement"], 1)
    row["acc_calibrated"] = accuracy(r.model, test_loader)
    if r.changes:
        fit = fxrf.distill(Logits(r.model), Logits(teacher), train_loader, epochs=args.finetune, seed=0,
                           progress=False)
        tuned = fit.model.m
        row["acc_finetuned"] = accuracy(tuned, test_loader)
    else:
        tuned = r.model
        row["acc_finetuned"] = row["acc_calibrated"]
    if r.form == "module":
        with tempfile.TemporaryDirectory() as d:
            weights, plan = os.path.join(d, "opt.pt"), os.path.join(d, "opt.plan.json")
            torch.save(tuned.state_dict(), weights)
            fxrf.passes.user_model.write_plan(r.plan, plan)
            code = RELOAD.format(bench=os.path.dirname(os.path.abspath(__file__)), build=build, plan=plan,
                                 weights=weights, size=size)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            row["acc_reloaded"] = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-300:]
    row["api"] = api_checks(name, tuned, r.plan) if r.form == "module" else None
    return row


def api_checks(name: str, model, plan) -> dict:
    x = torch.randn(2, 1, 32, 32)
    model = model.eval()
    if name == "timm":
        return {"class": type(model).__name__, "forward_features": tuple(model.forward_features(x).shape),
                "pretrained_cfg": model.pretrained_cfg.get("architecture")}
    if name == "hf":
        from safetensors.torch import load_file
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            # from_pretrained builds the original structure; the plan, then the saved weights, make it the result
            back = fxrf.apply(type(model).from_pretrained(d), plan)
            back.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            with torch.no_grad():
                same = bool(torch.allclose(back.eval()(x).logits, model(x).logits, atol=1e-5))
            return {"class": type(model).__name__, "output": type(model(x)).__name__,
                    "logits": tuple(model(x).logits.shape), "save_pretrained_from_pretrained_same_logits": same}
    return {"class": type(model).__name__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,timm,hf")
    p.add_argument("--goals", default="speed,paper")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--measure", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8, help="teacher training epochs")
    p.add_argument("--finetune", type=int, default=3, help="fine-tune epochs (fxrf.distill's defaults)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timings on a shared machine: 1)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        teacher, size, build = make(name)
        train_loader, test_loader = loaders(digits(n_train=1000, size=size, seed=0), batch_size=64, seed=0)
        train(Logits(teacher), train_loader, epochs=args.epochs, progress=False, seed=0)
        teacher.eval()
        for goal in args.goals.split(","):
            row = run(name, goal, args, teacher, size, build, train_loader, test_loader)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
