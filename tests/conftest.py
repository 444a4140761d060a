import os
import sys

import pytest

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true", help="also run the long fault-injection sweeps")
    parser.addoption("--deep", action="store_true", help="also run every three-deep torch.func composition")


def pytest_configure(config):
    config.addinivalue_line("markers", "sweep: a long fault-injection sweep, run with --sweep")
    config.addinivalue_line("markers", "deep: a three-deep torch.func composition beyond the default sample, run with --deep")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("sweep", "--sweep"), ("deep", "--deep")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"a long {marker} test: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
