"""Behaviour fingerprints of the passes and reports: one sha256 per output, to show a refactor changed nothing.

    python benchmarks/fingerprints.py > before.txt   # ... refactor ...
    python benchmarks/fingerprints.py | diff before.txt -

Each line hashes what a user sees: the generated code of a pass's result, its JSON (`to_dict`), a report table,
Table 6's rows. Models are built on the meta device (no weights: the passes' decisions depend on shapes alone) or
seeded, so two runs on one machine print the same lines.
"""
from __future__ import annotations

import hashlib
import json

import torch

from fxrf.analysis import analyze
from fxrf.models import resnet50_cifar, vgg11_cifar, vgg16_cifar, vgg16_opt_table6
from fxrf.passes.decomposer import decompose
from fxrf.passes.organizer import organize_stages
from table6 import format_rpw, format_table6, table6_rows

SHAPE = (1, 3, 32, 32)
MODELS = {"vgg11": vgg11_cifar, "vgg16": vgg16_cifar, "vgg16_opt6": vgg16_opt_table6, "resnet50": resnet50_cifar}


def _h(*parts) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _doc(result) -> str:
    return json.dumps(result.to_dict(), sort_keys=True, default=str)


def _model(name):
    with torch.device("meta"):
        return MODELS[name]()


def main() -> None:
    for name in MODELS:
        for recipe in ("auto", "DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50"):
            r = decompose(_model(name), SHAPE, recipe=recipe)
            print(f"decompose {name} {recipe}: code {_h(r.graph_module.code, repr(r.graph_module))} doc {_h(_doc(r))}")
        for strategy in ("greedy", "paper"):
            r = organize_stages(_model(name), SHAPE, strategy=strategy)
            print(f"organize {name} {strategy}: code {_h(r.graph_module.code, repr(r.graph_module))} doc {_h(_doc(r))}")
        a = analyze(_model(name), SHAPE)
        print(f"report {name}: table {_h(a.table())} doc {_h(json.dumps(a.to_dict(), sort_keys=True, default=str))}")
    print(f"table6: rows {_h(json.dumps(table6_rows(), sort_keys=True, default=str))} "
          f"text {_h(format_table6())} rpw {_h(format_rpw())}")


if __name__ == "__main__":
    main()
