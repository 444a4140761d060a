"""Run the examples in fwdgrad's docstrings and in README.rst,
and require one for every public function.

These examples are what users copy first, so they must run and print what they
claim (``doctest`` compares the printed output).
"""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import fwdgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def fwdgrad_modules():
    names = ["fwdgrad"]
    for info in pkgutil.walk_packages(fwdgrad.__path__, prefix="fwdgrad."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", fwdgrad_modules())
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, module_name, globs={}):
        if test.examples:
            runner.run(test, out=lambda s: print(s, end=""))
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name}"


@pytest.mark.parametrize("name", fwdgrad.__all__)
def test_public_function_has_runnable_example(name):
    obj = getattr(fwdgrad, name)
    doc = obj.__doc__ or ""
    assert doc.strip(), f"fwdgrad.{name} has no docstring"
    assert ">>>" in doc, f"fwdgrad.{name}'s docstring has no runnable (>>>) example"


def test_readme_examples_run():
    results = doctest.testfile(str(ROOT / "README.rst"), module_relative=False, optionflags=FLAGS)
    assert results.attempted > 0, "README.rst has no examples"
    assert results.failed == 0, f"{results.failed} example(s) failed in README.rst"
