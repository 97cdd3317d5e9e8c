"""The examples in the public API's docstrings run and print what they say they print.

Each documented name below must carry at least one ``>>>`` example; its examples run as
doctests (with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``), so an example that goes stale
fails here, through the README's ``python -m pytest -q``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

#: The public API whose docstrings hold runnable examples: module -> names.
DOCUMENTED = {
    "wdstudy.regularizers": ["make_regularizer", "split_parameters", "L2Regularization", "L1Regularization",
                             "DecoupledWeightDecay", "IndependentWeightDecay", "DecoupledL1", "NoRegularization"],
    "wdstudy.train": ["train_run"],
    "wdstudy.results": ["load_results"],
    "wdstudy.tasks.user": ["UserTask"],
}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("module_name,name", [(m, n) for m, names in DOCUMENTED.items() for n in names],
                         ids=lambda v: v)
def test_the_docstring_examples_run(module_name, name):
    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    # the object's own docstring only (not its methods'): each name is checked for an example of its own
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"{module_name}.{name}", module=module,
                                                       globs=dict(vars(module)))
    examples = [t for t in tests if t.examples]
    assert examples, f"{module_name}.{name} has no >>> example in its docstring"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in examples:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
