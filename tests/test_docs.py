"""The documentation site: it builds without a single warning, and every
``>>>`` example on its pages runs and prints what it claims.

The build runs Sphinx in a subprocess, as a user would
(``python -m sphinx -W -b html docs OUT``), so a broken page, a broken
cross-reference (``nitpicky`` is on), a docstring that autodoc cannot render or
a performance table that cannot be generated from the results JSON fails here.
The examples run with ``doctest``, one page at a time, like README.rst's in
tests/test_doctests.py.
"""

import doctest
import os
import pathlib
import re
import subprocess
import sys

import pytest

import fwdgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.rst"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Pages that have nothing to run: the others must have examples, so that a
# page whose examples stopped being doctest blocks is noticed.
NO_EXAMPLES = {"index.rst", "api.rst", "examples.rst", "performance.rst"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once; the tests below read the result."""
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, result


def test_site_builds_without_warnings(site):
    out, result = site
    assert result.returncode == 0, (
        f"sphinx -W failed with exit status {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
    assert not result.stderr.strip(), f"sphinx printed warnings:\n{result.stderr[-4000:]}"
    for page in PAGES:
        assert (out / page.replace(".rst", ".html")).is_file(), f"no HTML page for docs/{page}"


def test_performance_tables_are_generated(site):
    out, result = site
    assert result.returncode == 0
    html = (out / "performance.html").read_text()
    # One row of the generated table per method, and the targets table.
    for text in ("fwdgrad.hvp (closure)", "autograd.functional.jvp", "Targets", "missed by"):
        assert text in html, f"performance.html lacks {text!r}: the generated tables are missing"
    for image in ("perf_time.png", "perf_memory.png"):
        assert (out / "_images" / image).is_file()


def test_api_reference_documents_every_public_name(site):
    out, result = site
    assert result.returncode == 0
    source = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class):: fwdgrad\.(\w+)$", source, re.M))
    assert documented == set(fwdgrad.__all__), (
        f"docs/api.rst: missing {sorted(set(fwdgrad.__all__) - documented)}, "
        f"not public {sorted(documented - set(fwdgrad.__all__))}"
    )
    html = (out / "api.html").read_text()
    for name in fwdgrad.__all__:
        assert f'id="fwdgrad.{name}"' in html, f"api.html has no entry for fwdgrad.{name}"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    results = doctest.testfile(str(DOCS / page), module_relative=False, optionflags=FLAGS)
    assert results.failed == 0, f"{results.failed} example(s) failed in docs/{page}"
    if page not in NO_EXAMPLES:
        assert results.attempted > 0, f"docs/{page} has no runnable (>>>) examples"
