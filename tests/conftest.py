import os
import sys

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo: the whole model zoo of tests/test_zoo.py (run with -m zoo)")
    config.addinivalue_line("markers", "zoo_quick: the zoo's quick subset, part of the default suite")


def pytest_collection_modifyitems(config, items):
    """The zoo runs only when asked for (``-m zoo``); its quick subset always runs."""
    if "zoo" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the full model zoo runs with -m zoo")
    for item in items:
        if item.get_closest_marker("zoo") and not item.get_closest_marker("zoo_quick"):
            item.add_marker(skip)
