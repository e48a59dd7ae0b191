"""The examples in fxrf.passes' docstrings, run by their real module names.

pytest's --doctest-modules collects fxrf/ (it imports fxrf.X as fxrf.X). It would import passes/ (the folder
pyproject maps to fxrf.passes) as a second top-level package `passes`, with classes of its own
(`passes.organizer.OrganizerResult is not fxrf.passes.organizer.OrganizerResult`), so the passes' examples run
here instead, from the modules users import.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fxrf.passes


def _modules() -> list[str]:
    return ["fxrf.passes"] + sorted(m.name for m in pkgutil.walk_packages(fxrf.passes.__path__, "fxrf.passes."))


def test_passes_is_one_package():
    """Nothing has imported the passes under a second name (the duplicate the doctest collector made)."""
    import sys
    assert "passes" not in sys.modules and "passes.organizer" not in sys.modules


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0, f"{name}: a docstring example failed (see the output above)"
