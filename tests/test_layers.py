"""The package's import structure, read from the source with `ast` (nothing is imported):

(a) no import cycle among fxrf's modules, at module level (what runs on import) nor through deferred imports in
    function bodies (a cycle hidden in a function is still two modules that each need the other);
(b) no upward import: a module imports only from its own layer and the layers below it (function-level imports
    included: a deferred import is still a dependency);
(c) no module imports the package root (`import fxrf`, `from fxrf import X`, `from . import X` in fxrf/*.py where X
    is not a submodule): the root only re-exports, so depending on it hides the real dependency and makes a cycle.

A new module must be given a layer in LAYERS below; that is where a reader learns what it may use.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fxrf": ROOT / "fxrf", "fxrf.passes": ROOT / "passes"}  # pyproject maps fxrf.passes to passes/

# Bottom up. A module may import from its own layer and from the layers below, never from one above. A subpackage
# (fxrf.rules, fxrf.passes) is named once and covers its modules.
LAYERS = (
    ("leaves", {"metric", "errors", "checks", "naming", "models", "training", "progress"}),  # no fxrf import but errors
    ("core", {"field", "shapes", "ops"}),  # the channel-set algebra, shape propagation, the op table's machinery
    ("rules", {"rules", "trace"}),  # the built-in ops; model -> GraphModule with shapes
    # the entry points (analysis), the walk, stages, in-place versions, the records; reports, costs, dynamo graphs
    ("analysis", {"analysis", "walk", "stages", "inplace", "records", "cost", "dynamo", "report", "optimize_report",
                  "plot", "graph"}),
    ("passes", {"passes"}),  # rewrites (fxrf.passes, the backend's graph passes among them) and their pipeline
    ("compile", {"compiler", "backend"}),  # torch.compile: the backend runs graph passes, fxrf.compile all passes
    ("sources", {"sources"}),  # what the command line names, loaded: MODEL, --weights, --calibrate
    ("cli", {"cli", "__main__"}),
)
LAYER = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _modules() -> dict:
    """{dotted name: path} of every module of the package (the root `fxrf` included)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg,) + rel)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: not fxrf)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.stmt) -> list[str]:
    """The fxrf modules an import statement in `module` executes."""
    if isinstance(node, ast.Import):
        return [t for a in node.names if (t := _known(a.name))]
    if node.level:  # relative: from the module's package, up level - 1
        base = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if _known(base) is None:
        return []
    out = []
    for a in node.names:  # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself
        out.append(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _known(base))
    return out


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a.b first (the root `fxrf` aside: (c) checks who names it)."""
    out = [name]
    while "." in name:
        name = name.rpartition(".")[0]
        if name != "fxrf":
            out.append(name)
    return out


def _imports(module: str) -> tuple[set, set]:
    """(modules imported when `module` is imported, modules imported anywhere in it)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    top, anywhere = set(), set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in _targets(module, child):
                    anywhere.add(t)
                    if not in_function:  # parents run first, except a package this module is inside: it has
                        top.add(t)       # started running already (only an explicit import of it can cycle)
                        top.update(p for p in _with_parents(t)[1:] if not module.startswith(p + "."))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, True)  # never runs
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top - {module}, anywhere - {module}


IMPORTS = {m: _imports(m) for m in MODULES}
CORE = sorted(m for m in MODULES if m != "fxrf")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1] if len(parts) > 1 else module)


def _cycle_through(module: str, deferred: bool = False) -> list | None:
    """A shortest import cycle through `module`, as a list of modules, or None. deferred: count the imports in
    function bodies too (and the parent packages they run)."""
    paths, seen = [[module]], {module}
    while paths:
        path = paths.pop(0)
        found = IMPORTS[path[-1]][1 if deferred else 0]
        if deferred:
            found = {p for t in found for p in _with_parents(t) if p != path[-1] and not path[-1].startswith(p + ".")}
        for t in sorted(found):
            if t == module:
                return path + [module]
            if t not in seen and t != "fxrf":
                seen.add(t)
                paths.append(path + [t])
    return None


# Violations expected to fail until fixed (strict: a fix makes the xfail fail, so the entry is removed with it).
KNOWN: dict = {}


def _params(check: str) -> list:
    return [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(check, m)]))
            if (check, m) in KNOWN else m for m in CORE]


def test_the_walk_sees_the_package():
    """The walk finds what a reader would: the modules, relative and absolute imports, both packages."""
    assert {"fxrf", "fxrf.analysis", "fxrf.rules", "fxrf.rules.conv", "fxrf.passes", "fxrf.passes.organizer",
            "fxrf.backend", "fxrf.compiler", "fxrf.dynamo", "fxrf.passes.graph_passes"} <= set(MODULES)
    assert {"fxrf.passes.organizer.greedy", "fxrf.passes.surgery"} <= set(MODULES)  # a sub-package's modules too
    assert _is_package("fxrf.passes.organizer")
    assert "fxrf.passes.surgery" in IMPORTS["fxrf.passes.organizer.units"][0]  # from ..surgery import ...
    assert "fxrf.analysis" in IMPORTS["fxrf.dynamo"][0]  # from .analysis import ...
    assert "fxrf.passes.graph_passes" in IMPORTS["fxrf.backend"][0]  # from .passes.graph_passes import ...
    assert "fxrf.dynamo" in IMPORTS["fxrf.passes.graph_passes"][0]  # from fxrf.dynamo import ...
    assert "fxrf.passes" in IMPORTS["fxrf.passes.graph_passes"][0]  # from . import <a name of fxrf.passes>
    lazy = IMPORTS["fxrf.compiler"]  # the pipeline is imported inside compile_model
    assert "fxrf.passes.pipeline" in lazy[1] - lazy[0]


def test_every_module_has_a_layer():
    missing = [m for m in CORE if _layer(m) is None]
    assert not missing, f"give these modules a layer in LAYERS (tests/test_layers.py): {missing}"


@pytest.mark.parametrize("module", _params("cycle"))
def test_no_import_cycle(module):
    cycle = _cycle_through(module)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", _params("deferred cycle"))
def test_no_import_cycle_through_deferred_imports(module):
    cycle = _cycle_through(module, deferred=True)
    assert cycle is None, "import cycle (function-level imports counted): " + " -> ".join(cycle)


@pytest.mark.parametrize("module", _params("upward"))
def test_no_upward_import(module):
    mine = _layer(module)
    assert mine is not None, f"{module} has no layer in LAYERS"
    up = sorted(t for t in IMPORTS[module][1] if t != "fxrf" and (_layer(t) or 0) > mine)
    assert not up, (f"{module} (layer {LAYERS[mine][0]}) imports from above: "
                    + ", ".join(f"{t} ({LAYERS[_layer(t)][0]})" for t in up))


@pytest.mark.parametrize("module", _params("root"))
def test_no_import_of_the_package_root(module):
    assert "fxrf" not in IMPORTS[module][1], (f"{module} imports the package root fxrf; import the module that "
                                              f"defines the name instead")
