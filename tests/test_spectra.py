"""Spectra (Lanczos eigenpairs, Hutchinson traces, SLQ densities) against dense float64 eigendecompositions."""

import math

import pytest
import torch

import fwdgrad.spectra as S
from test_linops import needs_scipy, problem  # noqa: F401  (the shared fixture)


def _dense_top(M, k, which="largest"):
    ev = torch.linalg.eigvalsh(M)
    if which == "largest":
        return ev.flip(0)[:k]
    if which == "smallest":
        return ev[:k]
    return ev[ev.abs().argsort(descending=True)][:k]


@pytest.mark.parametrize("method", ["lanczos", pytest.param("scipy", marks=needs_scipy)])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenpairs_hessian(problem, method, which):
    op, H = problem["hess_op"], problem["H"]
    values, vectors = S.eigenpairs(op, 4, which=which, method=method, tol=1e-10)
    torch.testing.assert_close(values, _dense_top(H, 4, which), rtol=1e-7, atol=1e-9)
    # Eigenvectors: A y = theta y, unit norm.
    torch.testing.assert_close(H @ vectors, vectors * values, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(vectors.norm(dim=0), torch.ones(4, dtype=torch.float64))


def test_eigenpairs_ggn(problem):
    values, _ = S.eigenpairs(problem["ggn_op"], 3, tol=1e-10)
    torch.testing.assert_close(values, _dense_top(problem["G"], 3), rtol=1e-7, atol=1e-9)


def test_hutchinson(problem):
    H = problem["H"]
    est, se = S.hutchinson_trace(problem["hess_op"], 300, batch=100)
    # An unbiased estimate: within 4 standard errors (and the error bar is informative).
    exact = H.trace().item()
    assert abs(est - exact) < 4 * se
    assert 0 < se < 0.5 * abs(H).sum().item()
    # Rademacher probes give the exact trace for a diagonal matrix.
    D = torch.diag(torch.diagonal(H))
    assert S.hutchinson_trace(D, 5)[0] == pytest.approx(exact, rel=1e-12)


def test_slq_moments_exact(problem):
    """SLQ's quadrature with m steps integrates polynomials of degree < 2m exactly: v^T H^j v."""
    H = problem["H"]
    nodes, weights = S.slq_quadrature(problem["hess_op"], probes=3, steps=6, seed=3)
    n = H.shape[0]
    V = (torch.randint(0, 2, (n, 3), generator=torch.Generator().manual_seed(3)) * 2 - 1).double()
    V = V / V.norm(dim=0)
    for j in range(0, 8):
        exact = (V * (torch.linalg.matrix_power(H, j) @ V)).sum(0)
        torch.testing.assert_close((weights * nodes ** j).sum(1), exact, rtol=1e-8, atol=1e-10)


def test_spectral_density_matches_dense(problem):
    H = problem["H"]
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    sigma = 0.05 * (ev[-1] - ev[0]).item()
    grid = torch.linspace(ev[0].item() - 3 * sigma, ev[-1].item() + 3 * sigma, 200, dtype=torch.float64)
    t, d = S.spectral_density(problem["hess_op"], probes=n, steps=n, grid=grid, sigma=sigma)
    exact = (torch.exp(-0.5 * ((grid[:, None] - ev[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))).mean(1)
    assert torch.trapezoid(d, t).item() == pytest.approx(1.0, abs=1e-3)
    # Hutchinson noise only (each probe's quadrature is exact at steps = n).
    assert (d - exact).abs().max() < 0.25 * exact.max()
    # A density with all eigenvalues counted: n times it integrates to n.
    assert (n * torch.trapezoid(d, t)).item() == pytest.approx(n, rel=1e-3)


def test_errors(problem):
    with pytest.raises(ValueError, match="eigenpairs: which must be"):
        S.eigenpairs(problem["H"], 2, which="top")
    with pytest.raises(ValueError, match="eigenpairs: k must be an int between 1 and n"):
        S.eigenpairs(problem["H"], 0)
    with pytest.raises(TypeError, match="eigenpairs: A must be a square operator"):
        S.eigenpairs(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="hutchinson_trace: samples must be a positive int"):
        S.hutchinson_trace(problem["H"], 0)
