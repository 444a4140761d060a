"""The curvlinops / hessian-eigenthings interop example skips cleanly when they are absent.

(Where they are installed, ``tests/test_examples.py`` runs the example in full,
which checks fwdgrad-backed operators against the libraries' own.)
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_interop_example_without_the_libraries():
    code = (
        "import sys, runpy\n"
        "sys.modules['curvlinops'] = None\n"
        "sys.modules['hessian_eigenthings'] = None\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'curvature_interop.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "curvlinops is not installed: skipping" in out.stdout
    assert "hessian-eigenthings is not installed: skipping" in out.stdout
