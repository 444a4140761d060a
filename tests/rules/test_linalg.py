"""Focused checks of the JVP rules for matrix products, factorisations and solves (fwdgrad/rules/linalg.py).

Everything runs in float64 on CPU against central finite differences of the
primal function or torch.func; each aten-level case also asserts that the op
is served by an explicit rule, not by the fallback.
"""


import pytest
import torch

import fwdgrad

from oracles import float_outputs, assert_jvp_matches_fd, uses_rule, rand

aten = torch.ops.aten
D = torch.float64


# ---- ops that real models reach on CPU, called at the aten level -------------------


def test_addmm():
    uses_rule(aten.addmm.default)
    assert_jvp_matches_fd(lambda b, x, w: aten.addmm.default(b, x, w, beta=0.5, alpha=2.0),
                          rand(5), rand(3, 4), rand(4, 5))


# ---- linear algebra -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_factorisation_outputs_used_by_backward(dtype):
    # The LU that solve and det return is what their backward uses; its tangent
    # makes forward over reverse right.
    a = torch.randn(3, 4, 4, dtype=dtype) + 3 * torch.eye(4, dtype=dtype)
    b = torch.randn(3, 4, 2, dtype=dtype)
    assert_jvp_matches_fd(lambda a, b: aten._linalg_solve_ex.default(a, b)[:2], a, b)
    assert_jvp_matches_fd(lambda a: aten._linalg_det.default(a)[:2], a)
    assert_jvp_matches_fd(lambda a: aten._linalg_det.default(a.mT)[:2], a)  # a column-major input
    assert_jvp_matches_fd(lambda a: aten._linalg_slogdet.default(a)[:3], a)


def test_det_of_singular_matrices():
    a = torch.randn(2, 4, 4, dtype=D)
    a[:, :, 0] = a[:, :, 1]  # rank n - 1
    assert_jvp_matches_fd(torch.linalg.det, a)
    a[:, :, 2] = a[:, :, 1]  # rank n - 2: the adjugate is zero
    assert_jvp_matches_fd(torch.linalg.det, a)


@pytest.mark.parametrize("upper", [True, False])
def test_triangular_and_cholesky_solves_read_one_triangle(upper):
    a = torch.randn(4, 4, dtype=D)
    tri = (a.triu() if upper else a.tril()) + 3 * torch.eye(4, dtype=D)
    b = torch.randn(4, 2, dtype=D)
    assert_jvp_matches_fd(lambda b, t: torch.triangular_solve(b, t, upper=upper)[0], b, tri)
    assert_jvp_matches_fd(lambda b, t: torch.linalg.solve_triangular(t, b, upper=upper, unitriangular=True), b, tri)
    chol = torch.linalg.cholesky(a @ a.mT + torch.eye(4, dtype=D), upper=upper)
    assert_jvp_matches_fd(lambda b, c: torch.cholesky_solve(b, c, upper=upper), b, chol)
    assert_jvp_matches_fd(lambda c: torch.cholesky_inverse(c, upper=upper), chol)


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5)])
def test_svd_and_qr_match_torch_func(shape):
    for dtype in (torch.float64, torch.complex128):
        a = torch.randn(2, *shape, dtype=dtype)
        t = torch.randn_like(a)
        for f in (lambda m: torch.linalg.svd(m, full_matrices=False), torch.linalg.qr, torch.linalg.svdvals):
            _, ours = fwdgrad.jvp(f, (a,), (t,))
            _, ref = torch.func.jvp(f, (a,), (t,))
            for x, y in zip(float_outputs(ours), float_outputs(ref)):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_addmm_activation_tangents():
    # (on CPU the GELU variant is the exact GELU, not the tanh approximation)
    uses_rule(aten._addmm_activation.default)
    for use_gelu in (False, True):
        assert_jvp_matches_fd(lambda b, x, w: aten._addmm_activation.default(b, x, w, use_gelu=use_gelu),
                              rand(5), rand(3, 4), rand(4, 5))
