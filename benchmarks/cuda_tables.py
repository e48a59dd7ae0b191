"""The CUDA tables of docs/benchmarks.md in one call that fits a 10-minute device session: bench_models.py on
resnet50 and mobilenet_v2 (224 px) and VGG16-CIFAR at batches 1, 32 and 128, the original against MACs-aware and
latency-aware decomposition (recipe="auto", with decompose's whole-model check), eager, compiled, and compiled with
CUDA graphs (torch.compile mode="reduce-overhead"), then one Markdown table naming the device.

    python benchmarks/cuda_tables.py --out out/cuda                      # on a CUDA machine: out/cuda/table.md
    python benchmarks/cuda_tables.py --device cpu --dry-run --out out/dry  # here: the same code path, tiny sizes

The work is split into steps, in the order they matter (each one a bench_models.py process writing its own JSON
after every measurement); each step gets at most what is left of --budget (default 540 s) and is stopped there, so
a slow step costs its own rows, not the table: the table is written from whatever the JSONs hold, after every
step. Block timings of the latency search go to one cache (FXRF_CACHE_DIR=OUT/cache), so the CUDA-graph step
re-uses the searches of the first steps. --dry-run: --px 32, batches 1 and 2, two timed calls, two pairs, each
step stopped at its share of the budget: every step runs on a CPU, to catch what would fail on first contact
with the GPU (the CUDA-only parts -- CUDA events, cudnn.benchmark, CUDA graphs -- are skipped or no-ops there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VGG = "vgg16,vgg16/auto-macs,vgg16/auto-latency"
IMAGENET_MODELS = "resnet50,mobilenet_v2"
IMAGENET_AUTO = "resnet50/auto-macs,resnet50/auto-latency,mobilenet_v2/auto-macs,mobilenet_v2/auto-latency"
MODES = {"eager": "eager", "compile": "compiled", "reduce-overhead": "compiled + CUDA graphs"}


def steps(batches: str) -> list:
    """(name, bench_models.py arguments) in the order they matter: the CIFAR VGG and its rewrites (small, quick to
    compile), the 224 px originals, CUDA graphs for everything measured, then the 224 px rewrites (their latency
    searches are the longest part)."""
    return [
        ("vgg16", ["--models", VGG, "--batch", batches]),
        ("imagenet", ["--models", IMAGENET_MODELS, "--batch", batches]),
        ("cudagraphs", ["--models", f"{VGG},{IMAGENET_MODELS}", "--batch", batches, "--compiled-only",
                        "--mode", "reduce-overhead"]),
        ("imagenet-auto", ["--models", f"{IMAGENET_MODELS},{IMAGENET_AUTO}", "--batch", batches, "--compiled-only"]),
        ("imagenet-auto-cudagraphs", ["--models", f"{IMAGENET_MODELS},{IMAGENET_AUTO}", "--batch", batches,
                                      "--compiled-only", "--mode", "reduce-overhead"]),
    ]


def rows(docs: dict) -> tuple[list, dict]:
    """(table rows, machine) from the steps' JSONs: per (model, batch), the median ms eager, compiled and compiled
    with CUDA graphs, MACs per image, the compiled speedup over the original, and the whole-model check's verdict."""
    cell: dict = {}
    machine = {}
    for name, doc in docs.items():
        machine = machine or doc.get("machine", {})
        mode_opt = doc.get("config", {}).get("mode")
        for r in doc.get("results", []):
            mode = "reduce-overhead" if (r["mode"] == "compile" and mode_opt == "reduce-overhead") else r["mode"]
            c = cell.setdefault((r["model"], r["batch"]), {"macs": r.get("macs")})
            c[mode] = r["median_ms"]
            if r.get("verified"):
                c["verified"] = r["verified"]
            if r.get("assignment") is not None:
                c["assignment"] = r["assignment"]
    out = []
    for (model, batch), c in sorted(cell.items(), key=lambda kv: (kv[0][0].split("/")[0], kv[0][1], kv[0][0])):
        base = cell.get((model.split("/")[0], batch), {})
        speed = {m: (base[m] / c[m] if m in c and m in base and c[m] else None) for m in MODES}
        v = c.get("verified") or {}
        if v:
            kept = v.get("models", {}).get(v.get("chosen"), {})
            err = kept.get("scaled_error")
            check = f"kept {v.get('chosen')}" + (f", prediction {err:+.0%}" if err is not None else "")
        else:
            check = "" if "/" not in model else "nothing replaced" if c.get("assignment") == [] else "-"
        out.append({"model": model, "batch": batch, "macs": c.get("macs"), **{m: c.get(m) for m in MODES},
                    **{f"x_{m}": speed[m] for m in MODES}, "check": check})
    return out, machine


def markdown(table: list, machine: dict, notes: list) -> str:
    device = machine.get("gpu") or machine.get("cpu_model") or "?"
    head = [f"### {device}: original, MACs-aware and latency-aware decomposition, eager / compiled / CUDA graphs",
            "",
            f"Device: {device}" + (f" ({machine.get('gpu_memory_gib')} GiB, CUDA {machine.get('cuda')}, "
                                   f"cuDNN {machine.get('cudnn')})" if machine.get("gpu") else "")
            + f"; host {machine.get('cpu_model')} x{machine.get('cpu_count')}; torch {machine.get('torch')}, "
              f"torchvision {machine.get('torchvision')}. Median ms per batch; (x: speedup over the original in the "
              f"same mode). Check: what decompose's whole-model check kept (latency, macs or original) and its "
              f"scaled prediction error for it.", ""]
    cols = ["model", "batch", "MMACs/img", "eager ms", "compiled ms", "CUDA graphs ms", "check"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def ms(r, m):
        if r[m] is None:
            return "-"
        x = r[f"x_{m}"]
        return f"{r[m]:.2f}" + (f" ({x:.2f}x)" if x is not None and "/" in r["model"] else "")
    for r in table:
        lines.append(f"| {r['model']} | {r['batch']} | {r['macs'] / 1e6:.0f} | " if r["macs"] else
                     f"| {r['model']} | {r['batch']} | - | ")
        lines[-1] += " | ".join(ms(r, m) for m in MODES) + f" | {r['check']} |"
    return "\n".join(head + lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="out/cuda", help="directory for the JSONs, the log and table.md")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps (default 540)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, every step: does the code path run?")
    p.add_argument("--only", help="comma-separated step names (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible (use --device cpu --dry-run to check the code path)")
    os.makedirs(args.out, exist_ok=True)
    batches = "1,2" if args.dry_run else "1,32,128"
    common = ["--device", args.device, "--warmup", "3", "--iters", "20", "--min-iters", "5", "--budget", "2",
              "--pairs", "10"]
    if args.dry_run:
        common = ["--device", args.device, "--px", "32", "--warmup", "1", "--iters", "2", "--min-iters", "1",
                  "--budget", "0.2", "--pairs", "2", "--threads", "1"]
    env = dict(os.environ, FXRF_CACHE_DIR=os.path.join(os.path.abspath(args.out), "cache"))
    start, docs, notes = time.perf_counter(), {}, []
    wanted = None if not args.only else set(args.only.split(","))
    for name, extra in steps(batches):
        if wanted is not None and name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - start)
        if args.dry_run:  # every step gets its share: the point is that each one runs, not that it finishes
            left = min(left, args.budget / len(steps(batches)))
        if left < 20:
            notes.append(f"- step {name}: not run ({left:.0f} s of the budget left)")
            continue
        path = os.path.join(args.out, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_models.py"), *common, *extra, "--json", path]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])} (at most {left:.0f} s)", flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
                why = f"exit {rc}" if rc else "done"
            except subprocess.TimeoutExpired:
                why = "stopped at the budget (its rows so far are kept)"
        notes.append(f"- step {name}: {why} in {time.perf_counter() - t0:.0f} s")
        print(f"  {notes[-1][2:]}", flush=True)
        if os.path.exists(path):
            with open(path) as f:
                docs[name] = json.load(f)
            for fail in docs[name].get("failed", []):
                notes.append(f"- {fail['model']} b{fail.get('batch')}: FAILED {fail['why'][:200]}")
        table, machine = rows(docs)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(markdown(table, machine, notes))
    print(open(os.path.join(args.out, "table.md")).read() if docs else "no step ran")
    return 0 if docs and not any("FAILED" in n for n in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
