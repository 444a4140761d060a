"""Spectra of curvature operators: top eigenpairs, Hutchinson traces, spectral densities.

Everything here needs only products ``A @ X`` with a symmetric ``n x n``
operator: a :class:`fwdgrad.linops.CurvatureOperator` (whose ``matmat`` is
one batched product) or a dense symmetric torch tensor.

- ``eigenpairs``: Lanczos with full reorthogonalisation (Golub & Van Loan,
  ch. 10), extended step by step until the Ritz pairs asked for have
  converged (residual estimate ``beta_m |s_mi|``, checked every few steps), or
  scipy's ``eigsh`` (ARPACK) on ``to_scipy()``.
- ``hutchinson_trace``: ``E[z^T A z]`` over Rademacher probes ``z``
  (Hutchinson 1989), the probes pushed as columns of one ``matmat``.
- ``spectral_density``: stochastic Lanczos quadrature (Lin, Saad & Yang
  2016; Ghorbani, Krishnan & Xiao 2019): one Lanczos run per probe, all
  probes advanced together by ``matmat``; the Ritz values weighted by the
  squared first components of their eigenvectors, smoothed by a Gaussian.
"""

import math

import numpy as np
import torch

from .errors import ArgumentTypeError, ArgumentValueError

try:
    from scipy.sparse.linalg import eigsh as _eigsh
except ImportError:  # scipy is an optional extra
    _eigsh = None


def _size(A, name):
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ArgumentTypeError(f"{name}: A must be a square operator (a CurvatureOperator or an n x n tensor), got {type(A).__name__}")
    return shape[0]


def _dtype_device(A):
    return getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))


def _matmat(A, X):
    """``A @ X`` in float64 (the operator computes in its own dtype)."""
    dtype, _ = _dtype_device(A)
    return (A @ X.to(dtype)).to(torch.float64)


def _generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _lanczos(A, Q0, steps):
    """Lanczos on the columns of ``Q0`` (``n x p``, unit norm), all probes at once, full reorthogonalisation.

    Returns ``(alphas, betas, Q)``: ``alphas`` ``(p, m)``, ``betas`` ``(p, m - 1)``
    and the bases ``Q`` ``(p, m, n)``.  A column whose Krylov space is exhausted
    (``beta`` ~ 0) continues with ``beta = 0``, which decouples the rest of
    its tridiagonal matrix; its ``m`` is cut where that first happened.
    """
    n, p = Q0.shape
    device = Q0.device
    Q = torch.zeros(p, steps, n, dtype=torch.float64, device=device)
    alphas = torch.zeros(p, steps, dtype=torch.float64, device=device)
    betas = torch.zeros(p, max(steps - 1, 0), dtype=torch.float64, device=device)
    q = Q0.T.to(torch.float64)
    alive = torch.ones(p, dtype=torch.bool, device=device)
    lengths = torch.full((p,), steps, dtype=torch.long)
    for j in range(steps):
        Q[:, j] = q
        w = _matmat(A, q.T.to(device)).T  # (p, n)
        alphas[:, j] = (w * q).sum(1)
        basis = Q[:, : j + 1]
        for _ in range(2):  # Gram-Schmidt twice: the basis stays orthogonal to rounding
            w = w - torch.einsum("pj,pjn->pn", torch.einsum("pjn,pn->pj", basis, w), basis)
        if j == steps - 1:
            break
        beta = w.norm(dim=1)
        tiny = beta <= 1e-10 * alphas[:, : j + 1].abs().amax(1).clamp_min(1.0)
        for i in torch.nonzero(tiny & alive).flatten().tolist():
            lengths[i] = j + 1
        alive &= ~tiny
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        betas[:, j] = beta
        q = torch.where(alive[:, None], w / beta.clamp_min(1e-300)[:, None], torch.zeros_like(w))
    return alphas, betas, Q, lengths


def _tridiagonal(alphas, betas, m):
    T = torch.diag(alphas[:m])
    if m > 1 and betas is not None:
        T = T + torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
    return T


def _select(values, k, which):
    if which == "largest":
        order = torch.argsort(values, descending=True)
    elif which == "smallest":
        order = torch.argsort(values)
    else:
        order = torch.argsort(values.abs(), descending=True)
    return order[:k]


def eigenpairs(A, k=5, *, which="largest", method="lanczos", tol=1e-6, max_steps=None, seed=0):
    """The ``k`` eigenvalues of a symmetric ``A`` at one end of the spectrum, and their eigenvectors.

    ``which``: ``"largest"`` (algebraic), ``"smallest"`` or ``"magnitude"``.
    ``method="lanczos"`` runs fwdgrad's own Lanczos (one matvec per step) until
    every wanted Ritz pair has a residual ``||A y - theta y||`` (estimated by
    ``beta_m |s_mi|``) below
    ``tol * max|theta|`` or ``max_steps`` (default ``n``) steps are done;
    ``method="scipy"`` calls ``scipy.sparse.linalg.eigsh``.  Returns
    ``(values, vectors)``: ``values`` ``(k,)`` in the order asked for, and
    ``vectors`` ``(n, k)``, both float64 torch tensors.

    >>> import torch, fwdgrad.spectra as S
    >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
    >>> S.eigenpairs(A, 2)[0].round(decimals=10)
    tensor([3., 2.], dtype=torch.float64)
    >>> S.eigenpairs(A, 1, which="magnitude")[0].round(decimals=10)
    tensor([-5.], dtype=torch.float64)
    """
    name = "eigenpairs"
    n = _size(A, name)
    if which not in ("largest", "smallest", "magnitude"):
        raise ArgumentValueError(f"{name}: which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ArgumentValueError(f"{name}: k must be an int between 1 and n = {n}, got {k!r}")
    if method == "scipy":
        return _scipy_eigenpairs(A, k, which, tol, seed)
    if method != "lanczos":
        raise ArgumentValueError(f"{name}: method must be 'lanczos' or 'scipy', got {method!r}")
    _, device = _dtype_device(A)
    steps = n if max_steps is None else min(max_steps, n)
    q = torch.randn(n, generator=_generator(seed), dtype=torch.float64)
    basis, alphas, betas = [q / q.norm()], [], []
    check = max(k, 10)  # steps between convergence checks (each costs one small eigh)
    for j in range(steps):
        q = basis[j]
        w = _matmat(A, q[:, None].to(device))[:, 0].cpu()
        alphas.append(torch.dot(w, q))
        Q = torch.stack(basis)
        for _ in range(2):  # Gram-Schmidt twice: the basis stays orthogonal to rounding
            w = w - Q.T @ (Q @ w)
        beta = w.norm()
        m = j + 1
        closed = bool(beta <= 1e-10 * max(max(abs(a) for a in alphas).item(), 1.0))
        if m >= k and (closed or m == steps or m % check == 0):
            theta, S = torch.linalg.eigh(_tridiagonal(torch.stack(alphas), torch.stack(betas) if betas else None, m))
            idx = _select(theta, k, which)
            # The residual of Ritz pair i is beta * |last component of its eigenvector| (exact
            # arithmetic; full reorthogonalisation keeps it honest).
            residual = beta * S[-1, idx].abs()
            if closed or m == steps or bool((residual <= tol * theta.abs().max().clamp_min(1e-300)).all()):
                return theta[idx], Q.T @ S[:, idx]
        if closed:
            raise RuntimeError(
                f"{name}: the Krylov space of the starting vector has dimension {m} < k = {k} "
                f"(A has fewer distinct eigenvalues along it); try another seed or a smaller k"
            )
        betas.append(beta)
        basis.append(w / beta)
    raise AssertionError("unreachable: the loop returns at m == steps")


def _scipy_eigenpairs(A, k, which, tol, seed):
    if _eigsh is None:
        raise ImportError("eigenpairs(method='scipy') needs scipy: pip install scipy (fwdgrad's 'curvature' extra)")
    n = A.shape[0]
    op = A.to_scipy() if hasattr(A, "to_scipy") else A.detach().cpu().double().numpy()
    v0 = np.random.default_rng(seed).standard_normal(n)
    values, vectors = _eigsh(op, k=k, which={"largest": "LA", "smallest": "SA", "magnitude": "LM"}[which],
                             tol=tol, v0=v0)
    values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    idx = _select(values, k, which)
    return values[idx], vectors[:, idx]


def _rademacher(n, p, seed):
    return (torch.randint(0, 2, (n, p), generator=_generator(seed)) * 2 - 1).to(torch.float64)


def hutchinson_trace(A, samples=100, *, batch=20, seed=0):
    """Hutchinson's estimate of ``trace(A)`` from ``samples`` Rademacher probes.

    Returns ``(estimate, standard_error)`` as floats.  The probes go through
    ``A`` ``batch`` at a time as the columns of one ``A @ Z``.

    >>> import torch, fwdgrad.spectra as S
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> S.hutchinson_trace(A, 10)[0]   # exact for a diagonal A
    6.0
    """
    name = "hutchinson_trace"
    n = _size(A, name)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ArgumentValueError(f"{name}: samples must be a positive int, got {samples!r}")
    _, device = _dtype_device(A)
    Z = _rademacher(n, samples, seed)
    values = []
    for start in range(0, samples, batch):
        block = Z[:, start:start + batch].to(device)
        values.append((block * _matmat(A, block)).sum(0).cpu())
    values = torch.cat(values)
    stderr = values.std().item() / math.sqrt(samples) if samples > 1 else float("nan")
    return values.mean().item(), stderr


def slq_quadrature(A, probes=10, steps=50, *, seed=0):
    """The stochastic Lanczos quadrature nodes and weights: ``(nodes, weights)``, each ``(probes, m)``.

    For probe ``v`` (Rademacher, normalised) and any smooth ``f``,
    ``sum_i weights[p, i] * f(nodes[p, i])`` approximates ``v^T f(A) v``;
    averaged over probes, ``trace(f(A)) / n``.  Weights of each probe sum to 1.
    """
    name = "slq_quadrature"
    n = _size(A, name)
    steps = min(steps, n)
    _, device = _dtype_device(A)
    V = _rademacher(n, probes, seed)
    V = (V / V.norm(dim=0)).to(device)
    alphas, betas, _, lengths = _lanczos(A, V, steps)
    nodes = torch.zeros(probes, steps, dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    for p in range(probes):
        m = int(lengths[p])
        theta, S = torch.linalg.eigh(_tridiagonal(alphas[p].cpu(), betas[p].cpu(), m))
        nodes[p, :m], weights[p, :m] = theta, S[0] ** 2
    return nodes, weights


def spectral_density(A, probes=10, steps=50, *, grid=None, points=400, sigma=None, seed=0):
    """The spectral density of ``A`` by stochastic Lanczos quadrature: ``(grid, density)``.

    ``density`` integrates to 1 over the real line (multiply by ``n`` for an
    eigenvalue count per unit); it is the average of ``probes`` quadratures of
    ``steps`` Lanczos steps, each node a Gaussian of width ``sigma`` (default:
    1% of the spectrum's span).  ``grid`` defaults to ``points`` values
    spanning the Ritz values, padded by ``5 sigma``.

    >>> import torch, fwdgrad.spectra as S
    >>> A = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    >>> t, d = S.spectral_density(A, probes=2, steps=2, sigma=0.1)
    >>> round(float(torch.trapezoid(d, t)), 4)
    1.0
    """
    nodes, weights = slq_quadrature(A, probes, steps, seed=seed)
    used = weights > 0
    lo, hi = nodes[used].min().item(), nodes[used].max().item()
    if sigma is None:
        sigma = max(hi - lo, 1e-12) * 0.01
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights.reshape(1, -1)).sum(1) / nodes.shape[0]
    return grid, density


__all__ = ["eigenpairs", "hutchinson_trace", "slq_quadrature", "spectral_density"]
