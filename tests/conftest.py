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


def pytest_collection_modifyitems(config, items):
    if config.getoption("--sweep"):
        return
    skip = pytest.mark.skip(reason="a long sweep: run with --sweep")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)
