"""fwdgrad's JVP on every OpInfo op that supports autograd (float64, CPU).

Each op is compared with torch.func.jvp where PyTorch supports it and with
central finite differences otherwise.  Ops that do not pass are listed, with
their reasons, in ``expected_failures.py``; an op on that list that starts to
pass fails the test, so the list stays honest.
"""

import pytest

import opinfo_util as u
from expected_failures import EXPECTED_FAILURES

_OPS = u.autograd_ops()


@pytest.mark.parametrize("op", _OPS, ids=[u.op_id(op) for op in _OPS])
def test_opinfo_jvp(op):
    name = u.op_id(op)
    result = u.check_op(op)
    if name in EXPECTED_FAILURES:
        assert result.status != "pass", (
            f"{name} now passes; remove it from tests/expected_failures.py"
        )
        pytest.xfail(EXPECTED_FAILURES[name])
    assert result.status in ("pass", "nosample"), f"{name}: {result.status}: {result.detail}"
