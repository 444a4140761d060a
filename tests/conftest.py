import os
import sys

import pytest

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true", help="also run the tests marked heavy")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: slow cases (4-process runs), run with --heavy")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: run with --heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
