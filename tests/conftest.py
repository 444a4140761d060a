import os
import sys

import pytest

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true", help="also run the long fault-injection sweeps")


def pytest_configure(config):
    config.addinivalue_line("markers", "sweep: a long fault-injection sweep, run with --sweep")
    config.addinivalue_line("markers", "zoo: the whole model zoo of tests/test_zoo.py (run with -m zoo)")
    config.addinivalue_line("markers", "zoo_quick: the zoo's quick subset, part of the default suite")


def pytest_collection_modifyitems(config, items):
    """Long sweeps run with ``--sweep``; the zoo only when ``-m`` names it (its quick subset always)."""
    sweeps = config.getoption("--sweep")
    zoo = "zoo" in (config.getoption("-m") or "")
    skip_sweep = pytest.mark.skip(reason="a long sweep: run with --sweep")
    skip_zoo = pytest.mark.skip(reason="the full model zoo runs with -m zoo")
    for item in items:
        if not sweeps and "sweep" in item.keywords:
            item.add_marker(skip_sweep)
        if not zoo and item.get_closest_marker("zoo") and not item.get_closest_marker("zoo_quick"):
            item.add_marker(skip_zoo)
