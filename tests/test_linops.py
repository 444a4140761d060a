"""Curvature linear operators (torch and scipy), against dense float64 matrices.

The ``problem`` fixture (a small MLP, its dense Hessian and GGN by torch.func)
is shared with ``test_spectra.py``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import fwdgrad
import fwdgrad.linops as L

try:
    import scipy.sparse.linalg as sla
except ImportError:
    sla = None

needs_scipy = pytest.mark.skipif(sla is None, reason="scipy is not installed (optional extra)")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.detach().flatten() for p in params.values()])

    def out(f):
        return functional_call(model, dict(zip(names, (c.view(s) for c, s in zip(f.split(sizes), shapes)))), (x,))

    H = torch.func.hessian(lambda f: F.cross_entropy(out(f), y))(flat)
    J = torch.func.jacrev(out)(flat).reshape(-1, flat.numel())
    z = out(flat)
    HL = torch.func.hessian(lambda z: F.cross_entropy(z, y))(z).reshape(z.numel(), z.numel())
    return dict(model=model, x=x, y=y, params=params, flat=flat, H=H, G=J.T @ HL @ J,
                hess_op=L.hessian_operator(lambda: F.cross_entropy(model(x), y), params),
                ggn_op=L.ggn_operator(lambda: model(x), fwdgrad.cross_entropy_loss(y), params, chunk_size=7))


def test_flatten_roundtrip(problem):
    params = problem["params"]
    torch.testing.assert_close(L.flatten(params), problem["flat"])
    tree = L.unflatten(problem["flat"], params)
    assert list(tree) == list(params)
    for k in params:
        torch.testing.assert_close(tree[k], params[k].detach())
    batch = L.unflatten(torch.stack([problem["flat"], 2 * problem["flat"]]), params)
    assert all(batch[k].shape == (2, *params[k].shape) for k in params)
    with pytest.raises(ValueError, match="unflatten: vec must have a last dimension of"):
        L.unflatten(problem["flat"][:-1], params)


@pytest.mark.parametrize("which", ["hess", "ggn"])
def test_torch_operator(problem, which):
    op, M = problem[f"{which}_op"], problem["H" if which == "hess" else "G"]
    n = M.shape[0]
    assert op.shape == (n, n) and op.dtype == torch.float64 and op.T is op
    v = torch.randn(n, dtype=torch.float64)
    X = torch.randn(n, 16, dtype=torch.float64)
    torch.testing.assert_close(op @ v, M @ v)
    torch.testing.assert_close(op @ X, M @ X)
    torch.testing.assert_close(op.dense(), M)
    with pytest.raises(ValueError, match=rf"expected a tensor of shape \({n},\)"):
        op @ v[:-1]


@needs_scipy
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_scipy_operator(problem, dtype):
    import numpy as np

    for op, M in ((problem["hess_op"], problem["H"]), (problem["ggn_op"], problem["G"])):
        A = op.to_scipy(dtype)
        Md = M.numpy()
        n = Md.shape[0]
        rng = np.random.default_rng(0)
        x, X = rng.standard_normal(n).astype(dtype), rng.standard_normal((n, 5)).astype(dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
        assert isinstance(A, sla.LinearOperator) and A.shape == (n, n) and A.dtype == np.dtype(dtype)
        for got in (A.matvec(x), A @ x, A.dot(x), A.rmatvec(x), A.H.matvec(x), A.T.matvec(x), A.adjoint() @ x):
            assert got.dtype == np.dtype(dtype) and got.shape == (n,)
            np.testing.assert_allclose(got, Md @ x, **tol)
        np.testing.assert_allclose(A.matvec(x[:, None]), (Md @ x)[:, None], **tol)  # (n, 1) stays (n, 1)
        for got in (A.matmat(X), A @ X, A.rmatmat(X), A.H @ X):
            assert got.shape == (n, 5)
            np.testing.assert_allclose(got, Md @ X, **tol)
        # scipy's own consistency: sums and products of operators, and a solver.
        np.testing.assert_allclose((A + A) @ x, 2 * Md @ x, **tol)
        np.testing.assert_allclose((A * 3.0) @ x, 3 * Md @ x, **tol)
        if dtype == "float64":
            shifted = A + sla.aslinearoperator(np.eye(n))
            sol, info = sla.minres(shifted, x, rtol=1e-12)
            assert info == 0
            np.testing.assert_allclose(sol, np.linalg.solve(Md + np.eye(n), x), rtol=1e-6, atol=1e-8)



def test_imports_without_scipy():
    """scipy is optional: the package imports without it, and to_scipy says what is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['scipy'] = None\n"
        "import torch, fwdgrad, fwdgrad.linops as L, fwdgrad.spectra as S\n"
        "op = L.hessian_operator(lambda w: (w ** 4).sum(), torch.ones(3, dtype=torch.float64))\n"
        "print(float(S.eigenpairs(op, 1)[0][0]))\n"
        "try:\n    op.to_scipy()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "12.0", "hessian_operator.to_scipy needs scipy: pip install scipy (fwdgrad's 'curvature' extra)"
    ]
