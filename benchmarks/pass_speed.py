"""How long the passes take on the largest models: `fxrf.analyze`, `fxrf.organize_stages` and
`fxrf.decompose(recipe="auto")` on torchvision models built on the meta device (no weights), at 224 px.

Each model is measured in a fresh Python process (nothing cached from another model or an earlier call on it),
single-threaded (OMP_NUM_THREADS=1 and torch.set_num_threads(1)); in that process the three passes first run once
on a small conv net (so that imports and torch's first meta kernels are not billed to the model), then on the
model in the table's order: analyze 4 times (the figure: the median of the last 3; the first call on a model also
pays torch.fx's one-time costs for its module classes, kept in the JSON as analyze_first), then organize_stages
once and decompose(recipe="auto") once. `--python` adds a second interpreter (another checkout's virtual
environment, e.g. the code before a change): both are run for each model, alternating, `--rounds` times, and the
table shows each one's median, so both sides see the same machine load. A second table sets
`fxrf.analyze(GraphModule)` against one eager forward of resnet50 (random weights) at 224 px on the same single
thread, also in a fresh process per round and interpreter (benchmarks/analysis_speed.py has the full study). Only
the public API is used, so any checkout's fxrf can be measured by this script.

    python benchmarks/pass_speed.py                              # the table for this checkout
    python benchmarks/pass_speed.py --python ../base/.venv/bin/python --label-other before --label after
    python benchmarks/pass_speed.py --models resnet50,vit_b_16 --rounds 3 --json speed.json

Exit status 0 unless a measurement failed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("resnet50", "resnet152", "efficientnet_v2_l", "vit_b_16", "vit_h_14")
SIZE = 224
STEPS = ("analyze", "organize_stages", "decompose_auto")
RATIO = "resnet50-ratio"  # the analyze / forward measurement's key
ANALYZE_CALLS = 4  # analyze: the first call on a model also pays torch.fx's one-time costs for its module classes


def measure(name: str) -> dict:
    """One model, in this process: node count and the seconds of each step."""
    import torch
    import torchvision

    import fxrf

    torch.set_num_threads(1)
    # one-time costs (lazy imports, torch's first meta kernels) paid on a small net first, not by the model
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU()).eval()
    for warm in (fxrf.analyze, fxrf.organize_stages, lambda m, s: fxrf.decompose(m, s, "auto")):
        warm(small, (1, 3, 32, 32))
    with torch.device("meta"):
        model = torchvision.models.get_model(name).eval()
    shape = (1, 3, SIZE, SIZE)
    out = {"model": name, "fxrf": os.path.dirname(fxrf.__file__)}
    steps = {"analyze": lambda: fxrf.analyze(model, shape),
             "organize_stages": lambda: fxrf.organize_stages(model, shape),
             "decompose_auto": lambda: fxrf.decompose(model, shape, "auto")}
    for step in STEPS:
        times = []
        for _ in range(ANALYZE_CALLS if step == "analyze" else 1):
            t0 = time.perf_counter()
            steps[step]()
            times.append(time.perf_counter() - t0)
        out[step] = statistics.median(times[1:]) if len(times) > 1 else times[0]
        out[f"{step}_first"] = times[0]
    out["nodes"] = len(fxrf.trace(model, shape).graph.nodes)
    return out


def measure_ratio(calls: int = 20) -> dict:
    """analyze from a traced GraphModule against one eager forward, resnet50 at 224 px, batch 1, in this process on
    one thread: medians of `calls` timed calls each, after warm-up (benchmarks/analysis_speed.py measures more)."""
    import torch
    import torchvision

    import fxrf

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    shape = (1, 3, SIZE, SIZE)
    gm = fxrf.trace(model, shape)
    x = torch.randn(shape)

    def forward():
        with torch.no_grad():
            model(x)

    out = {"model": "resnet50", "fxrf": os.path.dirname(fxrf.__file__)}
    for key, fn in (("analyze_gm", lambda: fxrf.analyze(gm, shape)), ("forward", forward)):
        for _ in range(5):
            fn()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[key] = statistics.median(times)
    out["ratio"] = out["analyze_gm"] / out["forward"]
    return out


def run_child(python: str, name: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    flag = "--child-ratio" if name == RATIO else "--child"
    p = subprocess.run([python, os.path.abspath(__file__), flag, name], capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        return {"model": name, "error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    p.add_argument("--rounds", type=int, default=1, help="cold processes per model and interpreter (default 1)")
    p.add_argument("--python", help="a second interpreter to measure alternately (another checkout's venv)")
    p.add_argument("--label", default="this", help="this interpreter's column label (default 'this')")
    p.add_argument("--label-other", default="other", help="--python's column label (default 'other')")
    p.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    p.add_argument("--no-ratio", action="store_true", help="skip the analyze / forward table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-ratio", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    if args.child_ratio:
        print(json.dumps(measure_ratio()))
        return 0

    sides = [(args.label, sys.executable)] + ([(args.label_other, args.python)] if args.python else [])
    print(f"meta device, {SIZE} px, batch 1, one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), a cold "
          f"process per model and measurement; median of {args.rounds} round(s), interpreters alternating")
    for label, python in sides:
        print(f"  {label}: {python}")
    runs: dict = {label: {} for label, _ in sides}
    failed = False
    names = args.models.split(",") + ([] if args.no_ratio else [RATIO])
    for name in names:
        for r in range(args.rounds):
            for label, python in (sides if r % 2 == 0 else sides[::-1]):  # alternate who goes first
                got = run_child(python, name)
                runs[label].setdefault(name, []).append(got)
                keys = ("analyze_gm", "forward") if name == RATIO else STEPS
                shown = got.get("error") or "  ".join(f"{s} {got[s]:.3f} s" for s in keys)
                print(f"  {name} [{label}] round {r + 1}: {shown}", file=sys.stderr, flush=True)

    def cell(rows, step):
        ok = [x[step] for x in rows if "error" not in x]
        return f"{statistics.median(ok):.2f} s" if ok else "failed"

    head = "| model (meta, 224 px) | nodes | " + " | ".join(
        f"{step.replace('_auto', ' auto')}{f' ({label})' if len(sides) > 1 else ''}"
        for step in STEPS for label, _ in sides) + " |"
    print()
    print(head)
    print("|---|---:|" + "---:|" * (len(STEPS) * len(sides)))
    for name in args.models.split(","):
        rows = {label: runs[label][name] for label, _ in sides}
        nodes = next((x["nodes"] for rs in rows.values() for x in rs if "nodes" in x), "?")
        failed |= any("error" in x for rs in rows.values() for x in rs)
        print(f"| {name} | {nodes} | " + " | ".join(cell(rows[label], step) for step in STEPS
                                                     for label, _ in sides) + " |")
    if not args.no_ratio:
        print(f"\nfxrf.analyze(GraphModule) against one eager forward, resnet50, {SIZE} px, batch 1, one thread "
              f"(medians of 20 calls each, in one process per round)")
        print("| fxrf | analyze(gm) | eager forward | ratio |")
        print("|---|---:|---:|---:|")
        for label, _ in sides:
            ok = [x for x in runs[label][RATIO] if "error" not in x]
            if ok:
                med = {k: statistics.median(x[k] for x in ok) for k in ("analyze_gm", "forward", "ratio")}
                print(f"| {label} | {med['analyze_gm'] * 1e3:.1f} ms | {med['forward'] * 1e3:.1f} ms | "
                      f"{med['ratio']:.3f}x |")
            failed |= len(ok) < len(runs[label][RATIO])
    for label, _ in sides:
        errors = [x for rs in runs[label].values() for x in rs if "error" in x]
        for x in errors:
            print(f"  {label} {x['model']}: {x['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sides": dict(sides), "rounds": args.rounds, "runs": runs}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
