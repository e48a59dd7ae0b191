"""goal="speed" on four models, two batch sizes: does `fxrf.optimize(kernels="auto", goal="speed")` ever return a
model slower than its input (issue 22)?

For each model and batch: `fxrf.optimize(model, shape, kernels="auto", goal="speed", batch=B, measure=R)`, then
from summary["latency"]: what was kept (result or model), the result/model ratio eager and compiled (median of R
paired rounds, in alternation), the noise (two instances of the model), and whether the model returned is slower
than its input beyond the noise in either mode (it must not be in the mode deployed, compiled).

    FXRF_CACHE_DIR=out/cache python benchmarks/goal_speed.py                     # all: ~1-2 hours on a CPU
    FXRF_CACHE_DIR=out/cache python benchmarks/goal_speed.py --models digits vgg16_cifar --batches 1 --rounds 2 \
        --threads 1
    python benchmarks/goal_speed.py --json out/goal_speed.json --device cuda
    python benchmarks/goal_speed.py --models vgg16_cifar resnet50 --batches 1 --prune 0.5 --objective macs \
        --threads 1           # goal speed's choice between pruning, decomposing and both

Models: vgg16_cifar (fxrf.models, 32x32), mobilenet_v2 and resnet50 (torchvision, random weights, 224x224), and
the digits CNN of docs/workflow.md (16x16, one channel). Random weights: timing does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

import fxrf
from fxrf.progress import show


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workflow import DigitsCNN  # noqa: E402  (docs/workflow.md's model, defined once)


def _torchvision(name: str):
    def make():
        import torchvision.models as tvm
        return getattr(tvm, name)(weights=None)
    return make


def _vgg16_cifar():
    from fxrf.models import vgg16_cifar
    return vgg16_cifar()


MODELS = {  # name -> (factory, input shape without the batch)
    "digits": (DigitsCNN, (1, 16, 16)),
    "vgg16_cifar": (_vgg16_cifar, (3, 32, 32)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), (3, 224, 224)),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224)),
}


def run_one(name: str, batch: int, rounds: int, device: str, prune: float | None = None,
            objective: str | None = None) -> dict:
    factory, chw = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    t0 = time.perf_counter()
    kernels = {"recipe": "auto", **({"objective": objective} if objective else {})}
    r = fxrf.optimize(model, (1, *chw), kernels=kernels, goal="speed", batch=batch, measure=rounds, device=device,
                      prune=None if prune is None else {"macs": prune})
    t = r.summary["latency"]
    modes = t["modes"]
    kept = t["kept"]
    # the model returned: the result when kept, else the input itself (ratio 1 by construction)
    returned_slower = t["slower_modes"]  # [] when the model came back or nothing changed
    return {"model": name, "batch": batch, "rounds": rounds, "device": t["device"], "kept": kept,
            "replaced": len(r.changes),
            "eager": modes["eager"]["result_vs_model"], "compiled": modes["compile"]["result_vs_model"],
            "noise_eager": modes["eager"]["noise"], "noise_compiled": modes["compile"]["noise"],
            "ms": {m: d["ms"] for m, d in modes.items()}, "returned_slower": returned_slower,
            "choice": r.summary.get("choice"), "seconds": round(time.perf_counter() - t0, 1)}


def _row(d: dict) -> str:
    slow = ", ".join("compiled" if m == "compile" else m for m in d["returned_slower"]) or "no"
    ch = d.get("choice")
    pick = "" if not ch else ("  chose " + ch["chosen"] + " (" + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                         ch["ratios"].items()) + ")")
    return (f"{d['model']:<13} {d['batch']:>5}  {d['kept']:<6} {d['replaced']:>8}  {d['eager']:>6.3f}  "
            f"{d['compiled']:>8.3f}  {d['noise_eager']:>5.3f}/{d['noise_compiled']:<5.3f}  {slow:<15} "
            f"{d['seconds']:>6.0f}{pick}")


HEADER = (f"{'model':<13} {'batch':>5}  {'kept':<6} {'replaced':>8}  {'eager':>6}  {'compiled':>8}  "
          f"{'noise e/c':<11}  {'slower?':<15} {'s':>6}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--rounds", type=int, default=5, help="measure=R: whole-model timing rounds per mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's); on a CPU shared with "
                                                "other jobs, fewer threads than cores avoids threads spinning on "
                                                "each other (100x slower calls measured on a loaded 2-core machine)")
    p.add_argument("--prune", type=float, metavar="MACS",
                   help="also prune to this fraction of the MACs: goal speed then chooses between pruning, "
                        "decomposing and both by measured time (the 'chose' column: each one's compiled ratio)")
    p.add_argument("--objective", choices=("macs", "latency"),
                   help="the decomposer's objective (default: goal speed's, latency; macs skips its block search)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.environ.get("FXRF_CACHE_DIR"):
        print("note: FXRF_CACHE_DIR is not set; latency figures go to ~/.cache/fxrf", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; ratios are "
          f"result/model (median of paired rounds); 'slower?': the model returned is slower than its input "
          f"beyond the noise")
    print(HEADER)
    rows = []
    with show():  # progress on stderr: bars on a terminal, a line per long step when piped
        for name in args.models:
            for batch in args.batches:
                d = run_one(name, batch, args.rounds, args.device, args.prune, args.objective)
                rows.append(d)
                print(_row(d), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(d["returned_slower"] and "compile" in d["returned_slower"] for d in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
