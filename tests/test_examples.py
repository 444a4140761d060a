"""Smoke test: every script in examples/ runs to the end and exits 0.

Each example asserts its own claim against an oracle (finite differences,
torch.autograd, torch.func), so a zero exit status means the claim held.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Small models run fastest on one thread, and pytest -n 2 already fills two cores.
    env["OMP_NUM_THREADS"] = "1"
    # Figures go to a temporary folder rather than docs/img/.
    env["FWDGRAD_EXAMPLE_OUTPUT"] = str(tmp_path)
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"examples/{script} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )


def test_expected_examples_exist():
    expected = {
        "quickstart.py",
        "newton_cg.py",
        "tall_jacobian.py",
        "forward_gradient_training.py",
        "jvp_in_loss.py",
        "hessian_spectrum.py",
        "custom_op.py",
        "distributed_newton_cg.py",
        "curvature_interop.py",
    }
    missing = expected - set(EXAMPLES)
    assert not missing, f"examples missing: {sorted(missing)}"
