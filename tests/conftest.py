import os
import sys

import pytest

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: runs inductor (a C++ compile); run with -m compile or FWDGRAD_TEST_COMPILE=1"
    )


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FWDGRAD_TEST_COMPILE") or "compile" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="inductor compile: run with -m compile or FWDGRAD_TEST_COMPILE=1")
    for item in items:
        if "compile" in item.keywords and item.get_closest_marker("compile"):
            item.add_marker(skip)
