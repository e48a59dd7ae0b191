"""Coverage: which models users bring can fxrf read and rewrite, before (torch.fx only) and after (torch.export).

For every model in the sweep (torchvision classification, segmentation, detection, video and optical flow; ~60 timm
CNNs and hybrids; Hugging Face vision models built from their configs), built with random weights (torchvision:
weights=None, timm: pretrained=False, Hugging Face: `XForImageClassification(XConfig(...))`; nothing is downloaded)
and run on a small input (64x64 unless the model needs more), the script records:

* eager: the model itself runs on the example input (else the row says why and nothing else is tried);
* fx: `fxrf.analyze(model, x, capture="fx")` works (what fxrf could do before the export front end);
* auto: `fxrf.analyze(model, x, capture="auto")` works, and which capture it used ("fx" or "export");
* export: `capture="export"` too where fx works, and then whether the conv records agree per module path
  (receptive field, gain, kernel kind): `agree` = paths whose three agree / paths either capture has;
* organizer / decomposer: `fxrf.organize_stages(model, x)` and `fxrf.decompose(model, x, recipe="auto")` return a
  GraphModule that runs on the example input;
* the nodes each analysis lists in `unsupported` (ATen ops without a rule: "no rule"; rules that failed), the time of
  each step, and for each failure its one-line reason (exception type and first line). An exception that is not an
  `fxrf.errors.FxrfError` is an fxrf bug and is marked so.

Models run one at a time in one worker process (torch.set_num_threads(1)); a model still running after --timeout
seconds is stopped, its remaining steps say "timeout", and the worker is restarted. The JSON (with library
versions) is rewritten after every model, so an interrupted run keeps what it measured, and --render turns a JSON
into the Markdown page (docs/coverage.md).

    python benchmarks/coverage.py --quick                      # a few models per family (minutes)
    python benchmarks/coverage.py --json out/coverage.json --md docs/coverage.md     # the full sweep
    python benchmarks/coverage.py --render out/coverage.json --md docs/coverage.md   # Markdown from a JSON
    python benchmarks/coverage.py --list                       # the model names
    python benchmarks/coverage.py --models timm:resnet18,hf:ResNet
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

S = 64  # the default input side


@dataclass
class Spec:
    family: str
    name: str  # unique key, "tv:resnet18"
    build: Callable  # () -> nn.Module
    shapes: list  # example input shapes (several: a model with several inputs)
    note: str = ""


# --------------------------------------------------------------------------------------------------- the models
def _tv(fn_name, **kw):
    def build():
        import torchvision.models as tvm
        return tvm.get_model(fn_name, weights=None, **kw)
    return build


TV_CLASSIFICATION = [  # the smallest variant of each torchvision architecture
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "inception_v3", "squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_16",
    "swin_t", "swin_v2_t", "maxvit_t",
]
TV_SIZE = {"inception_v3": 96, "googlenet": 64, "maxvit_t": 224}
TV_KW = {"googlenet": {"init_weights": False, "aux_logits": False},
         "inception_v3": {"init_weights": False, "aux_logits": False},
         "vit_b_16": {"image_size": S}}
TV_SEGMENTATION = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
TV_DETECTION = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn",
                "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"]
# run only with --all or --models: each spends the whole time limit in torch.export (data-dependent post-processing)
SLOW = {"tv:retinanet_resnet50_fpn", "tv:fcos_resnet50_fpn", "tv:maskrcnn_resnet50_fpn", "tv:keypointrcnn_resnet50_fpn"}
TV_VIDEO = {"r3d_18": (1, 3, 8, S, S), "mc3_18": (1, 3, 8, S, S), "r2plus1d_18": (1, 3, 8, S, S),
            "s3d": (1, 3, 16, 224, 224), "swin3d_t": (1, 3, 8, S, S), "mvit_v2_s": (1, 3, 16, 224, 224)}

TIMM = [
    "resnet18", "resnet26d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d",
    "res2net50_14w_8s", "gcresnext26ts", "bat_resnext26ts", "lambda_resnet26t", "botnet26t_256", "resnetv2_50x1_bit",
    "tresnet_m", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "tinynet_e", "mixnet_s",
    "mnasnet_050", "fbnetc_100", "hardcorenas_a", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "lcnet_050", "ghostnet_050", "ghostnetv2_100", "repghostnet_050", "rexnet_100",
    "regnetx_002", "regnety_002", "regnetz_b16", "convnext_atto", "convnextv2_atto", "inception_next_atto",
    "densenet121", "dla34", "dpn48b", "hrnet_w18_small", "cspresnet50", "cspdarknet53", "ese_vovnet19b_dw",
    "xception41", "nf_resnet26", "eca_nfnet_l0", "repvgg_a0", "repvit_m0_9", "gernet_s", "selecsls42b", "vgg11",
    "inception_v3", "hgnetv2_b0", "starnet_s050", "fastvit_t8", "mobilevit_xxs", "mobilevitv2_050",
    "efficientvit_b0", "edgenext_xx_small", "poolformer_s12", "efficientformer_l1", "levit_128s",
    "tiny_vit_5m_224", "coatnet_nano_rw_224",
]
TIMM_SIZE = {"inception_v3": 96, "efficientformer_l1": 224}
TIMM_IMG_SIZE_KW = {"levit_128s", "coatnet_nano_rw_224", "botnet26t_256", "bat_resnext26ts", "mobilevit_xxs"}  # built for S x S


def _raft():
    import torch.nn as nn
    import torchvision.models as tvm

    class Raft(nn.Module):  # raft_small's forward takes the number of updates and returns every flow
        def __init__(self):
            super().__init__()
            self.raft = tvm.optical_flow.raft_small(weights=None)

        def forward(self, image1, image2):
            return self.raft(image1, image2, num_flow_updates=2)[-1]

    return Raft()


def _timm(name):
    def build():
        import timm
        kw = {"img_size": S} if name in TIMM_IMG_SIZE_KW else {}
        return timm.create_model(name, pretrained=False, **kw)
    return build


def _hf(model_cls, config_cls, **cfg):
    def build():
        import transformers
        config = getattr(transformers, config_cls)(**cfg)
        return getattr(transformers, model_cls)(config)
    return build


_VIT = dict(image_size=S, patch_size=16, hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=192)
_SMALL4 = dict(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256])
HF = [  # (name, model class, config class, small-config kwargs)
    ("ResNet", "ResNetForImageClassification", "ResNetConfig", dict(depths=[1, 1, 1, 1])),
    ("ResNetBackbone", "ResNetBackbone", "ResNetConfig", dict(depths=[1, 1, 1, 1], out_features=["stage2", "stage4"])),
    ("RTDetrResNetBackbone", "RTDetrResNetBackbone", "RTDetrResNetConfig", dict(depths=[1, 1, 1, 1])),
    ("BiT", "BitForImageClassification", "BitConfig", dict(depths=[1, 1, 1, 1])),
    ("ConvNext", "ConvNextForImageClassification", "ConvNextConfig", dict(depths=[1, 1, 1, 1],
                                                                         hidden_sizes=[24, 48, 96, 192])),
    ("ConvNextV2", "ConvNextV2ForImageClassification", "ConvNextV2Config", dict(depths=[1, 1, 1, 1],
                                                                               hidden_sizes=[24, 48, 96, 192])),
    ("RegNet", "RegNetForImageClassification", "RegNetConfig", dict(depths=[1, 1, 1, 1])),
    ("MobileNetV1", "MobileNetV1ForImageClassification", "MobileNetV1Config", dict(depth_multiplier=0.25,
                                                                                  image_size=S)),
    ("MobileNetV2", "MobileNetV2ForImageClassification", "MobileNetV2Config", dict(depth_multiplier=0.35,
                                                                                  image_size=S)),
    ("MobileNetV2Seg", "MobileNetV2ForSemanticSegmentation", "MobileNetV2Config", dict(depth_multiplier=0.35,
                                                                                      image_size=S)),
    ("EfficientNet", "EfficientNetForImageClassification", "EfficientNetConfig", dict(image_size=S,
                                                                                     depth_coefficient=0.5)),
    ("HGNetV2", "HGNetV2ForImageClassification", "HGNetV2Config", {}),
    ("TextNet", "TextNetForImageClassification", "TextNetConfig", {}),
    ("PPLCNet", "PPLCNetForImageClassification", "PPLCNetConfig", {}),
    ("PoolFormer", "PoolFormerForImageClassification", "PoolFormerConfig", dict(depths=[1, 1, 1, 1])),
    ("MobileViT", "MobileViTForImageClassification", "MobileViTConfig", dict(image_size=S)),
    ("MobileViTV2", "MobileViTV2ForImageClassification", "MobileViTV2Config", dict(image_size=S)),
    ("MobileViTSeg", "MobileViTForSemanticSegmentation", "MobileViTConfig", dict(image_size=S)),
    ("CvT", "CvtForImageClassification", "CvtConfig", dict(depth=[1, 1, 1])),
    ("LeViT", "LevitForImageClassification", "LevitConfig", dict(image_size=S)),
    ("SwiftFormer", "SwiftFormerForImageClassification", "SwiftFormerConfig", dict(depths=[1, 1, 1, 1])),
    ("FocalNet", "FocalNetForImageClassification", "FocalNetConfig", dict(image_size=S, embed_dim=24,
                                                                         depths=[1, 1, 1, 1])),
    ("Swin", "SwinForImageClassification", "SwinConfig", dict(image_size=S, embed_dim=24, depths=[1, 1, 1, 1],
                                                               num_heads=[1, 2, 3, 4], window_size=2)),
    ("Swinv2", "Swinv2ForImageClassification", "Swinv2Config", dict(image_size=S, embed_dim=24,
                                                                    depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4],
                                                                    window_size=2)),
    ("ViT", "ViTForImageClassification", "ViTConfig", _VIT),
    ("DeiT", "DeiTForImageClassification", "DeiTConfig", _VIT),
    ("BEiT", "BeitForImageClassification", "BeitConfig", _VIT),
    ("Dinov2", "Dinov2ForImageClassification", "Dinov2Config", _VIT),
    ("Pvt", "PvtForImageClassification", "PvtConfig", dict(image_size=S, depths=[1, 1, 1, 1])),
    ("PvtV2", "PvtV2ForImageClassification", "PvtV2Config", dict(depths=[1, 1, 1, 1])),
    ("Hiera", "HieraForImageClassification", "HieraConfig", dict(image_size=[S, S], embed_dim=32,
                                                                 depths=[1, 1, 1, 1])),
    ("SegFormer", "SegformerForSemanticSegmentation", "SegformerConfig", dict(depths=[1, 1, 1, 1])),
    ("GLPN", "GLPNForDepthEstimation", "GLPNConfig", dict(depths=[1, 1, 1, 1])),
    ("DPT", "DPTForDepthEstimation", "DPTConfig", dict(_VIT, num_hidden_layers=4, backbone_out_indices=[0, 1, 2, 3])),
    ("Dinat", "DinatForImageClassification", "DinatConfig", dict(depths=[1, 1, 1, 1])),
]


def _upernet():
    import transformers
    backbone = transformers.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[24, 48, 96, 192],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(backbone_config=backbone,
                                                                                  hidden_size=64,
                                                                                  auxiliary_in_channels=96))


def specs() -> list:
    out = [Spec("torchvision classification", f"tv:{n}", _tv(n, **TV_KW.get(n, {})), [(1, 3, TV_SIZE.get(n, S),
                                                                                          TV_SIZE.get(n, S))])
           for n in TV_CLASSIFICATION]
    out += [Spec("torchvision segmentation", f"tv:{n}", _tv(n, weights_backbone=None, aux_loss=False),
                 [(1, 3, S, S)]) for n in TV_SEGMENTATION]
    out += [Spec("torchvision detection", f"tv:{n}", _tv(n, weights_backbone=None), [(1, 3, 128, 128)],
                 "the whole model (transform + backbone + heads + post-processing) given a 1x3x128x128 tensor")
            for n in TV_DETECTION]
    out += [Spec("torchvision video", f"tv:{n}", _tv(n), [shape]) for n, shape in TV_VIDEO.items()]
    out += [Spec("torchvision optical flow", "tv:raft_small", _raft, [(1, 3, 128, 128), (1, 3, 128, 128)],
                 "two frames; 2 flow updates, the last flow returned")]
    out += [Spec("timm", f"timm:{n}", _timm(n), [(1, 3, TIMM_SIZE.get(n, S), TIMM_SIZE.get(n, S))]) for n in TIMM]
    out += [Spec("Hugging Face", f"hf:{n}", _hf(m, c, **kw), [(1, 3, S, S)]) for n, m, c, kw in HF]
    out += [Spec("Hugging Face", "hf:UperNet", _upernet, [(1, 3, S, S)], "ConvNext backbone config")]
    return out


QUICK = ["tv:vgg11_bn", "tv:googlenet", "tv:lraspp_mobilenet_v3_large", "tv:mc3_18", "timm:resnest14d",
         "timm:mobilevit_xxs", "hf:RegNet", "hf:ResNetBackbone"]  # ~4 min on a busy core


# --------------------------------------------------------------------------------------------------- one model
def _reason(e: BaseException) -> str:
    text = str(e).strip()
    marker = " -- torch.export could not capture it either: "  # auto's message: the export part is the news
    if marker in text:
        text = text.split(marker, 1)[1]
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}"


def _is_fxrf_error(e: BaseException) -> bool:
    from fxrf.errors import FxrfError
    return isinstance(e, FxrfError)


def _unsupported(a) -> list:
    return [[name, target, reason[:200]] for name, target, reason in a.unsupported]


def _fields(a) -> dict:
    return {r.path: (r.rf, r.gain, r.kernel) for r in a.convs() if r.path is not None}


def _same(u, v) -> bool:
    (rf1, g1, k1), (rf2, g2, k2) = u, v
    if rf1 != rf2 or k1 != k2:
        return False
    if g1 is None or g2 is None:
        return g1 is g2
    return g1 == g2 or math.isclose(g1, g2, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(g1) and math.isnan(g2))


def agreement(a_fx, a_ex) -> dict:
    """Conv records of two analyses compared per module path: (receptive field, gain, kernel kind)."""
    f, e = _fields(a_fx), _fields(a_ex)
    paths = sorted(set(f) | set(e))
    agree = [p for p in paths if p in f and p in e and _same(f[p], e[p])]
    differ = [f"{p}: fx {f.get(p)} / export {e.get(p)}" for p in paths if p not in agree]
    return {"paths": len(paths), "agree": len(agree), "differ": differ[:5]}


def _run(xs, gm):
    import torch
    with torch.no_grad():
        gm(*xs)


def run_model(spec: Spec, send) -> None:
    """Run every step on one model, sending ("step", dict) after each and ("done", None) at the end."""
    import torch
    import fxrf
    torch.manual_seed(0)
    shape = spec.shapes[0] if len(spec.shapes) == 1 else list(spec.shapes)

    def step(name, fn):
        t = time.perf_counter()
        try:
            value = fn()
            send((name, {"ok": True, "s": round(time.perf_counter() - t, 2)}))
            return value
        except Exception as e:  # noqa: BLE001 -- the point is to record every failure
            send((name, {"ok": False, "s": round(time.perf_counter() - t, 2), "reason": _reason(e),
                         "fxrf_error": _is_fxrf_error(e), "where": _where(e)}))
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = step("build", lambda: spec.build().eval())
        if model is None:
            return send(("done", None))
        xs = [torch.randn(s) for s in spec.shapes]
        if step("eager", lambda: _run(xs, model) or True) is None:  # the model itself does not run on x
            return send(("done", None))
        a_fx = step("fx", lambda: fxrf.analyze(model, shape, capture="fx"))
        if a_fx is not None:
            send(("fx_unsupported", _unsupported(a_fx)))
        a = step("auto", lambda: fxrf.analyze(model, shape, capture="auto"))
        if a is not None:
            send(("capture", a.capture))
            send(("auto_unsupported", _unsupported(a)))
            send(("convs", len(a.convs())))
            if a.warnings:
                send(("warnings", len(a.warnings)))
        a_ex = a if a is not None and a.capture == "export" else None
        if a_fx is not None:
            a_ex = step("export", lambda: fxrf.analyze(model, shape, capture="export"))
            if a_ex is not None:
                send(("export_unsupported", _unsupported(a_ex)))
                send(("agree", agreement(a_fx, a_ex)))
        del a, a_fx, a_ex
        step("organizer", lambda: _run(xs, fxrf.organize_stages(model, shape).graph_module))
        step("decomposer", lambda: _run(xs, fxrf.decompose(model, shape, recipe="auto").graph_module))
    send(("done", None))


def _where(e: BaseException) -> str:
    """The innermost fxrf frame of a traceback (file:line function), to find a bug inside fxrf."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if f"{os.sep}fxrf{os.sep}" in f.filename or f"{os.sep}passes{os.sep}" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    parts = f.filename.split(os.sep)
    return f"{'/'.join(parts[-2:])}:{f.lineno} {f.name}"


def _worker(conn, log: str) -> None:
    # torch.export prints whole graphs on some failures: keep them out of the progress lines
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch
    torch.set_num_threads(1)
    by_name = {s.name: s for s in specs()}
    while True:
        name = conn.recv()
        if name is None:
            return
        run_model(by_name[name], conn.send)


# --------------------------------------------------------------------------------------------------- the sweep
STEPS = ["build", "eager", "fx", "auto", "export", "organizer", "decomposer"]


class Pool1:
    """One worker process; a model past its time limit kills it and a fresh one takes over."""

    def __init__(self, log: str):
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.log = log

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.log), daemon=True)
        self.proc.start()

    def run(self, spec: Spec, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        row = {"family": spec.family, "model": spec.name, "input": [list(s) for s in spec.shapes],
               "note": spec.note, "steps": {}}
        t0 = time.perf_counter()
        self.conn.send(spec.name)
        while True:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0 or not self.conn.poll(left):
                self.stop()
                row["timeout"] = True
                break
            try:
                key, value = self.conn.recv()
            except EOFError:  # the worker died (a segfault, out of memory)
                row["crashed"] = f"worker died (exit code {self.proc.exitcode})"
                self.proc = None
                break
            if key == "done":
                break
            if key in STEPS:
                row["steps"][key] = value
            else:
                row[key] = value
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row

    def stop(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc = None

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        self.stop()


def versions() -> dict:
    import torch
    import torchvision
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for mod in ("timm", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cpus"
    return out


def interleave(chosen: list) -> list:
    """Round-robin over families, so an interrupted run has covered every family a little."""
    groups = collections.OrderedDict()
    for s in chosen:
        groups.setdefault(s.family, []).append(s)
    out = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


def sweep(args) -> dict:
    every = specs()
    if args.models:
        wanted = args.models.split(",")
        chosen = [s for s in every if s.name in wanted or s.name.split(":", 1)[1] in wanted]
    elif args.quick:
        chosen = [s for s in every if s.name in QUICK]
    else:
        chosen = [s for s in every if args.all or s.name not in SLOW]
    result = {"versions": versions(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "timeout_s": args.timeout, "command": " ".join(["python", "benchmarks/coverage.py"]
                                                                            + sys.argv[1:]),
        "planned": [s.name for s in chosen], "rows": []}
    done = set()
    if args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        result["planned"] = old.get("planned", []) + [m for m in result["planned"] if m not in old.get("planned", [])]
        result["command"], result["started"] = old["command"], old["started"]
        result["resumed"] = old.get("resumed", []) + [" ".join(["python", "benchmarks/coverage.py"] + sys.argv[1:])]
        redo = set((args.redo or "").split(","))
        result["rows"] = [r for r in old["rows"] if r["model"] not in redo]
        done = {r["model"] for r in result["rows"]}
    pool = Pool1(args.json + ".worker.log")
    try:
        for spec in interleave([s for s in chosen if s.name not in done]):
            row = pool.run(spec, args.timeout)
            result["rows"].append(row)
            print(f"{row['seconds']:7.1f}s  {spec.name:45s} {summary(row)}", flush=True)
            result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            write_json(args.json, result)
    finally:
        pool.close()
    return result


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- the page
def ok(row, step) -> bool | None:
    """True / False when the step ran, None when it did not (skipped, or not reached before the timeout)."""
    s = row["steps"].get(step)
    return None if s is None else s["ok"]


def status(row, step) -> str:
    v = ok(row, step)
    if v is True:
        return "yes"
    if v is False:
        return "no"
    if row.get("timeout") and step == _running(row):
        return "timeout"
    if row.get("crashed") and step == _running(row):
        return "crashed"
    return "-"


def _running(row) -> str | None:
    """The step a model that timed out or crashed was in."""
    return next((st for st in STEPS if row["steps"].get(st) is None and _reached(row, st)), None)


def _reached(row, step) -> bool:
    """Whether the step would have run had the model not stopped (steps before it all ran)."""
    if step == "export" and ok(row, "fx") is not True:
        return False
    return ok(row, "build") is not False and ok(row, "eager") is not False


def summary(row) -> str:
    cap = row.get("capture", "-")
    agree = row.get("agree")
    ag = f" agree {agree['agree']}/{agree['paths']}" if agree else ""
    return (f"fx {status(row, 'fx')}, auto {status(row, 'auto')} ({cap}), org {status(row, 'organizer')}, "
            f"dec {status(row, 'decomposer')}{ag}" + (" TIMEOUT" if row.get("timeout") else ""))


def family_table(rows) -> list:
    fams = collections.OrderedDict()
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    lines = ["| family | models | eager runs | analysed, fx (before) | analysed, auto (after) | via export | "
             "organizer runs | decomposer runs | fields agree (fx = export) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = collections.Counter()

    def count(rs):
        both = [r for r in rs if r.get("agree")]
        c = collections.Counter(
            models=len(rs), eager=sum(ok(r, "eager") is True for r in rs),
            fx=sum(ok(r, "fx") is True for r in rs), auto=sum(ok(r, "auto") is True for r in rs),
            export=sum(ok(r, "auto") is True and r.get("capture") == "export" for r in rs),
            org=sum(ok(r, "organizer") is True for r in rs), dec=sum(ok(r, "decomposer") is True for r in rs),
            both=len(both), agree=sum(r["agree"]["agree"] == r["agree"]["paths"] for r in both))
        return c

    def line(name, c):
        return (f"| {name} | {c['models']} | {c['eager']} | {c['fx']}/{c['models']} | {c['auto']}/{c['models']} | "
                f"{c['export']} | {c['org']}/{c['models']} | {c['dec']}/{c['models']} | "
                f"{c['agree']}/{c['both']} |")

    for fam, rs in fams.items():
        c = count(rs)
        total.update(c)
        lines.append(line(fam, c))
    lines.append(line("**all**", total))
    return lines


def model_table(rows) -> list:
    lines = ["| family | model | input | fx | auto (capture) | unsupported nodes (auto) | organizer | decomposer | "
             "conv records agree | seconds |", "|---|---|---|---|---|---:|---|---|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"])):
        cap = r.get("capture")
        auto = status(r, "auto") + (f" ({cap})" if cap else "")
        ag = r.get("agree")
        agree = f"{ag['agree']}/{ag['paths']}" if ag else "-"
        uns = len(r["auto_unsupported"]) if "auto_unsupported" in r else "-"
        inp = " + ".join("x".join(str(d) for d in s) for s in r["input"])
        lines.append(f"| {r['family']} | {r['model']} | {inp} | {status(r, 'fx')} | {auto} | {uns} | "
                     f"{status(r, 'organizer')} | {status(r, 'decomposer')} | {agree} | {r['seconds']} |")
    return lines


def missing_ops(rows) -> tuple:
    """ATen ops listed as "no rule" ({op: (nodes, models)}) and rules that failed ({op: (nodes, models, reason)})
    across the export-captured analyses (auto, or the explicit export run where fx worked)."""
    nodes, models, failed, failed_models, why = (collections.Counter(), collections.defaultdict(set),
                                                 collections.Counter(), collections.defaultdict(set), {})
    for r in rows:
        uns = r.get("auto_unsupported") if r.get("capture") == "export" else r.get("export_unsupported")
        for name, target, reason in uns or []:
            op = target.split(" (")[0]
            if reason == "no rule":
                nodes[op] += 1
                models[op].add(r["model"])
            else:
                failed[op] += 1
                failed_models[op].add(r["model"])
                why.setdefault(op, reason)
    return ([(op, n, sorted(models[op])) for op, n in nodes.most_common()],
            [(op, n, sorted(failed_models[op]), why[op]) for op, n in failed.most_common()])


def fx_missing(rows) -> list:
    nodes, models = collections.Counter(), collections.defaultdict(set)
    for r in rows:
        for name, target, reason in r.get("fx_unsupported") or []:
            nodes[target] += 1
            models[target].add(r["model"])
    return [(op, n, sorted(models[op])) for op, n in nodes.most_common()]


def failures(rows) -> list:
    out = []
    for r in sorted(rows, key=lambda r: (r["family"], r["model"])):
        auto = r["steps"].get("auto") or {}
        for step in STEPS:
            s = r["steps"].get(step)
            if s is None or s["ok"] or (step == "fx" and "auto" in r["steps"]):
                continue  # an fx failure: listed apart (and in auto's line when export failed too)
            if step in ("organizer", "decomposer") and auto.get("ok") is False and _short(s["reason"]) == \
                    _short(auto["reason"]):
                continue  # the passes analyse first: the same failure as auto's
            bug = "" if s.get("fxrf_error") or step in ("build", "eager") else " **(not an FxrfError: an fxrf bug)**"
            where = f" [{s['where']}]" if s.get("where") and not s.get("fxrf_error") else ""
            what = "auto (fx, then export)" if step == "auto" else step
            out.append(f"- `{r['model']}` {what}: {_short(s['reason'], 240, types=True).replace('|', '/')}{bug}{where}")
        if r.get("timeout"):
            out.append(f"- `{r['model']}` timeout: still in step {_running(r)} after {r['seconds']} s")
        if r.get("crashed"):
            out.append(f"- `{r['model']}` {r['crashed']}")
        if r.get("agree") and r["agree"]["agree"] != r["agree"]["paths"]:
            out.append(f"- `{r['model']}` conv records differ between fx and export on "
                       f"{r['agree']['paths'] - r['agree']['agree']} of {r['agree']['paths']} paths, e.g. "
                       f"{(r['agree']['differ'] or ['?'])[0]}")
    return out


def render(result: dict) -> str:
    rows = result["rows"]
    v = result["versions"]
    done = {r["model"] for r in rows}
    missing = [m for m in result.get("planned", []) if m not in done]
    fx_reasons = collections.Counter()
    for r in rows:
        s = r["steps"].get("fx")
        if s is not None and not s["ok"]:
            fx_reasons[_short(s["reason"])] += 1
    aten, failed = missing_ops(rows)
    out = [
        "# Coverage: the models users bring",
        "",
        "Generated by `benchmarks/coverage.py` (do not edit by hand; regenerate with "
        "`python benchmarks/coverage.py --render COVERAGE.json --md docs/coverage.md`).",
        "",
        f"Run: `{result.get('command', '')}`, started {result.get('started')}, last model finished "
        f"{result.get('finished')}; per-model time limit {result.get('timeout_s')} s; "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Every model is built with random weights and nothing downloaded (torchvision `weights=None`, timm "
        "`pretrained=False`, Hugging Face models from their configs, reduced to one block per stage and small widths "
        "where the config allows, to keep the sweep short) and given a 64x64 input unless it needs more (the "
        "`input` column). *fx (before)*: `fxrf.analyze(model, x, capture=\"fx\")`, i.e. what fxrf could read before "
        "the torch.export front end. *auto (after)*: `capture=\"auto\"` (torch.fx, then torch.export non-strict), "
        "*via export* counts those auto read through torch.export. *organizer / decomposer runs*: "
        "`fxrf.organize_stages(model, x)` / `fxrf.decompose(model, x, recipe=\"auto\")` return a GraphModule that "
        "runs on the example input. *fields agree*: on the models both captures read, the models whose conv records "
        "(receptive field, gain, kernel kind, per module path) are equal between the fx and the export analysis. "
        "A model counts as analysed when `analyze` returns; nodes it treated conservatively are listed under "
        "*unsupported* (and counted in the per-model table).",
        "",
        "## Per family",
        "",
        *family_table(rows),
        "",
    ]
    if missing:
        out += [f"Not completed in this run ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    out += ["## ATen ops without a rule (export-captured graphs)", ""]
    if aten:
        out += ["| ATen op | nodes | models | e.g. |", "|---|---:|---:|---|"]
        out += [f"| `{op}` | {n} | {len(ms)} | {', '.join(ms[:4])} |" for op, n, ms in aten]
    else:
        out += ["None."]
    out += ["", "## Rules that failed on a node (conservative field, listed in `unsupported`)", ""]
    if failed:
        out += ["| op | nodes | models | first reason |", "|---|---:|---:|---|"]
        out += [f"| `{op}` | {n} | {len(ms)} | {why.replace('|', '/')[:160]} |" for op, n, ms, why in failed]
    else:
        out += ["None."]
    fxm = fx_missing(rows)
    if fxm:
        out += ["", "## Unsupported nodes in the fx-captured graphs", "",
                "| target | nodes | models |", "|---|---:|---|"]
        out += [f"| `{op}` | {n} | {', '.join(ms[:4])}{' ...' if len(ms) > 4 else ''} |" for op, n, ms in fxm[:25]]
    out += ["", "## Why symbolic_trace failed (the models export now reads)", "",
            "| reason | models |", "|---|---:|"]
    out += [f"| {reason.replace('|', '/')} | {n} |" for reason, n in fx_reasons.most_common()]
    out += ["", "## Failures", "",
            "One line per failed step (exception type and first line); an fx failure on a model that auto then read "
            "through export is not repeated here.", ""]
    out += failures(rows) or ["None."]
    out += ["", "## Per model", "", *model_table(rows), ""]
    return "\n".join(out)


def _short(reason: str, n: int = 140, types: bool = False) -> str:
    """A failure's reason without the model-specific prefix and after its first sentence (to group them);
    types: keep the exception types (the outer one and the one fxrf wrapped)."""
    outer = reason.split(": ", 1)[0] if types else ""
    text = re.sub(r"^(\w+Error: )+", "", reason)
    inner = re.match(r"^cannot (trace|capture) \S+( in submodule '[^']*' \([^)]*\))?( with torch.export "
                     r"\(strict=False\))?: (\w+: )?", text)
    if inner:
        text = text[inner.end():]
        outer += f": {inner.group(4)[:-2]}" if types and inner.group(4) else ""
    text = f"{outer}: {text}" if outer else text
    text = re.split(r"(?<=[a-z0-9)'])\. ", text)[0]
    return text[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few models per family")
    p.add_argument("--models", help="comma-separated names (tv:resnet18, timm:dla34, hf:ResNet, or without prefix)")
    p.add_argument("--all", action="store_true", help="also the slow detection models (SLOW)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    p.add_argument("--json", default="out/coverage.json")
    p.add_argument("--md", help="write the Markdown page here (e.g. docs/coverage.md)")
    p.add_argument("--render", metavar="JSON", help="only render JSON to --md (or stdout)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    p.add_argument("--redo", help="with --resume: run these models again (comma-separated full names)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for s in specs():
            print(f"{s.family:28s} {s.name}")
        return 0
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
    else:
        import torch
        torch.set_num_threads(1)
        result = sweep(args)
    page = render(result)
    if args.md:
        with open(args.md, "w") as f:
            f.write(page)
    elif args.render:
        print(page)
    print("\n".join(family_table(result["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
