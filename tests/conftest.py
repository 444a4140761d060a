import os
import sys

import pytest

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# Opt-in tests: each runs when its marker is named in -m, when
# FWDGRAD_TEST_<NAME>=1, or with --<name> where that option exists.
OPT_IN = {
    "sweep": "a long fault-injection sweep",
    "deep": "a three-deep torch.func composition beyond the default sample",
    "compile": "runs inductor (a C++ compile)",
    "heavy": "4-process distributed runs",
    "zoo": "the whole model zoo of tests/test_zoo.py",
}
# A test marked "<name>_quick" as well is part of the default suite (the zoo's quick subset).


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true", help="also run the long fault-injection sweeps")
    parser.addoption("--deep", action="store_true", help="also run every three-deep torch.func composition")


def pytest_configure(config):
    for name, what in OPT_IN.items():
        config.addinivalue_line("markers", f"{name}: {what}; run with -m {name} or FWDGRAD_TEST_{name.upper()}=1")
        config.addinivalue_line("markers", f"{name}_quick: a {name} test that the default suite runs too")


def _opted_in(config, name):
    return (os.environ.get(f"FWDGRAD_TEST_{name.upper()}") == "1" or name in (config.option.markexpr or "")
            or config.getoption(f"--{name}", default=False))


def pytest_collection_modifyitems(config, items):
    for name in OPT_IN:
        if _opted_in(config, name):
            continue
        skip = pytest.mark.skip(reason=f"opt-in: run with -m {name} or FWDGRAD_TEST_{name.upper()}=1")
        for item in items:
            if item.get_closest_marker(name) and not item.get_closest_marker(f"{name}_quick"):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_level_left_behind(request):
    """Every fwdgrad call leaves this thread's level stack as it found it: a test that
    leaves a level behind errors here (named), instead of a later test failing."""
    from fwdgrad.interpreter import _stack, drop_stale_levels, leave_to

    before = list(_stack())
    yield
    drop_stale_levels()  # what the next transform does: levels an interrupt left behind go
    after = list(_stack())
    if after != before:
        leave_to(len(before))
        pytest.fail(f"{request.node.nodeid} left fwdgrad's level stack at {after} (it was {before})")
