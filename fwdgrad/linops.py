"""Curvature matrices as linear operators over flat parameter vectors.

Solvers and eigensolvers want ``x -> A x`` on one flat vector of length
``n`` (the number of parameters); fwdgrad's products work on parameter
pytrees.  ``flatten``/``unflatten`` convert between the two, and
``CurvatureOperator`` wraps a product as an ``n x n`` operator with ``@``
(torch), ``matvec`` and ``matmat``; ``matmat`` goes through the batched
product (one primal pass for all columns, ``chunk_size`` columns at a time).
``to_scipy`` gives a ``scipy.sparse.linalg.LinearOperator`` over float64 or
float32 numpy vectors.  scipy is optional: only ``to_scipy`` needs it.
"""

import functools

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .curvature import fisher_vp, ggnvp, hvp
from .errors import ArgumentTypeError, ArgumentValueError
from .reverse import _flatten_params

try:
    from scipy.sparse.linalg import LinearOperator as _ScipyLinearOperator
except ImportError:  # scipy is an optional extra
    _ScipyLinearOperator = None


def flatten(tree):
    """The leaves of a tensor pytree (tensor, list/tuple, dict) concatenated into one 1-D tensor.

    Leaves come in the order fwdgrad's products use (a dict in insertion
    order, as ``dict(model.named_parameters())`` gives it) and are promoted
    to a common dtype.

    >>> import torch, fwdgrad.linops as L
    >>> L.flatten({"w": torch.ones(2, 2), "b": torch.zeros(1)})
    tensor([1., 1., 1., 1., 0.])
    """
    leaves = _leaves(tree)
    return torch.cat([t.reshape(-1) for t in leaves]) if leaves else torch.zeros(0)


def unflatten(vec, like):
    """``vec`` (length ``n``, or ``(..., n)``) cut into tensors shaped like the leaves of ``like``.

    Leading dimensions of ``vec`` are kept on every leaf (a batch of
    directions); each piece takes its leaf's dtype.

    >>> import torch, fwdgrad.linops as L
    >>> L.unflatten(torch.arange(5.0), {"w": torch.ones(2, 2), "b": torch.zeros(1)})
    {'w': tensor([[0., 1.],
            [2., 3.]]), 'b': tensor([4.])}
    """
    leaves = _leaves(like)
    n = sum(t.numel() for t in leaves)
    if not isinstance(vec, torch.Tensor) or vec.dim() == 0 or vec.shape[-1] != n:
        got = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
        raise ArgumentValueError(f"unflatten: vec must have a last dimension of {n} (the number of parameters), got {got}")
    lead = vec.shape[:-1]
    pieces = vec.split([t.numel() for t in leaves], -1)
    out = [p.reshape(*lead, *t.shape).to(t.dtype) for p, t in zip(pieces, leaves)]
    return _rebuild(like, out)


def _leaves(tree):
    """Leaves in the order fwdgrad's products use (a dict in insertion order)."""
    if isinstance(tree, dict):
        return list(tree.values())
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return list(tree)
    return pytree.tree_leaves(tree)


def _rebuild(like, leaves):
    if isinstance(like, dict):
        return dict(zip(like, leaves))
    if isinstance(like, torch.Tensor):
        return leaves[0]
    if isinstance(like, (list, tuple)):
        return type(like)(leaves)
    return pytree.tree_unflatten(leaves, pytree.tree_structure(like))


class CurvatureOperator:
    """A symmetric ``n x n`` matrix known through its products with parameter pytrees.

    ``product(v, batched)`` takes a direction (or, with ``batched``, a batch
    of directions with a leading dimension) in the structure of ``params``.
    ``A @ x`` takes a vector ``(n,)`` or a matrix ``(n, k)``.  ``A.T`` and
    ``A.H`` are ``A`` (every curvature matrix here is symmetric).
    """

    def __init__(self, product, params, chunk_size=None, name="CurvatureOperator"):
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ArgumentValueError(f"{name}: chunk_size must be None or a positive int, got {chunk_size!r}")
        leaves = _leaves(params)
        _flatten_params(params, params, name)  # the same checks as the products
        self.product, self.params, self.chunk_size, self.name = product, params, chunk_size, name
        n = sum(t.numel() for t in leaves)
        self.shape = (n, n)
        self.dtype = functools.reduce(torch.promote_types, [t.dtype for t in leaves])
        self.device = leaves[0].device

    @property
    def T(self):
        return self

    H = T

    def _check(self, x, ndim):
        n = self.shape[0]
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"{self.name}: expected a torch tensor, got {type(x).__name__} (use to_scipy() for numpy)")
        if x.dim() != ndim or x.shape[0] != n:
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise ArgumentValueError(f"{self.name}: expected a tensor of shape {want}, got {tuple(x.shape)}")

    def matvec(self, x):
        """``A x`` for a flat vector ``x`` of shape ``(n,)``."""
        self._check(x, 1)
        out = self.product(unflatten(x.to(self.device), self.params), False)
        return flatten(out).to(self.dtype)

    def matmat(self, X):
        """``A X`` for ``X`` of shape ``(n, k)``: batched products, ``chunk_size`` columns at a time."""
        self._check(X, 2)
        k = X.shape[1]
        step = k if self.chunk_size is None else self.chunk_size
        cols = []
        for start in range(0, k, max(step, 1)):
            block = X[:, start:start + step].T.to(self.device)
            out = self.product(unflatten(block, self.params), True)
            cols.append(torch.cat([t.reshape(t.shape[0], -1) for t in _leaves(out)], 1).to(self.dtype))
        return torch.cat(cols).T if cols else X.new_zeros((self.shape[0], 0), dtype=self.dtype)

    def __matmul__(self, x):
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x)
        return self.matvec(x)

    def dense(self):
        """The full ``n x n`` matrix (``A @ I``); only for small ``n``."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def to_scipy(self, dtype=np.float64):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` over numpy vectors of ``dtype``."""
        if _ScipyLinearOperator is None:
            raise ImportError(f"{self.name}.to_scipy needs scipy: pip install scipy (fwdgrad's 'curvature' extra)")
        return _scipy_operator(self, np.dtype(dtype))

    def __repr__(self):
        return f"<{self.name} {self.shape[0]}x{self.shape[1]} {self.dtype}>"


def _scipy_operator(op, dtype):
    if dtype not in (np.float64, np.float32):
        raise ArgumentValueError(f"{op.name}.to_scipy: dtype must be float64 or float32, got {dtype}")

    def to_torch(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=op.device, dtype=op.dtype)

    def to_numpy(t):
        return t.detach().cpu().numpy().astype(dtype, copy=False)

    class _Operator(_ScipyLinearOperator):
        def __init__(self):
            super().__init__(dtype=dtype, shape=op.shape)

        def _matvec(self, x):
            return to_numpy(op.matvec(to_torch(x).reshape(-1)))

        def _matmat(self, X):
            return to_numpy(op.matmat(to_torch(X)))

        _rmatvec = _matvec
        _rmatmat = _matmat

        def _adjoint(self):
            return self

        _transpose = _adjoint

    return _Operator()


def hessian_operator(loss, params, *, chunk_size=None):
    """The Hessian of ``loss`` as a :class:`CurvatureOperator` (products by :func:`fwdgrad.hvp`).

    ``loss`` and ``params`` as for :func:`fwdgrad.hvp` (pure or closure form).

    >>> import torch, fwdgrad.linops as L
    >>> A = L.hessian_operator(lambda w: (w ** 3).sum(), torch.tensor([1.0, 2.0]))
    >>> A @ torch.ones(2), A.dense()
    (tensor([ 6., 12.]), tensor([[ 6.,  0.],
            [ 0., 12.]]))
    """
    return CurvatureOperator(lambda v, b: hvp(loss, params, v, batched=b), params, chunk_size, "hessian_operator")


def ggn_operator(model_fn, loss_fn, params, *, chunk_size=None):
    """The generalised Gauss-Newton matrix as a :class:`CurvatureOperator` (products by :func:`fwdgrad.ggnvp`).

    >>> import torch, fwdgrad, fwdgrad.linops as L
    >>> x = torch.tensor([1.0, 2.0])
    >>> G = L.ggn_operator(lambda w: x * w, fwdgrad.mse_loss(torch.zeros(2), "sum"), torch.ones(2))
    >>> G.dense()
    tensor([[2., 0.],
            [0., 8.]])
    """
    return CurvatureOperator(
        lambda v, b: ggnvp(model_fn, loss_fn, params, v, batched=b), params, chunk_size, "ggn_operator"
    )


def fisher_operator(model_fn, loss_fn, params, *, kind="true", chunk_size=None):
    """The Fisher matrix (``kind`` "true" or "empirical") as a :class:`CurvatureOperator` (:func:`fwdgrad.fisher_vp`).

    >>> import torch, fwdgrad, fwdgrad.linops as L
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> F = L.fisher_operator(lambda w: x @ w, fwdgrad.mse_loss(torch.zeros(2), "sum"), torch.ones(2), kind="empirical")
    >>> F.dense()
    tensor([[4., 0.],
            [0., 4.]])
    """
    if kind not in ("true", "empirical"):
        raise ArgumentValueError(f"fisher_operator: kind must be 'true' or 'empirical', got {kind!r}")
    return CurvatureOperator(
        lambda v, b: fisher_vp(model_fn, loss_fn, params, v, kind=kind, batched=b), params, chunk_size,
        "fisher_operator",
    )


__all__ = [
    "flatten", "unflatten", "CurvatureOperator", "hessian_operator", "ggn_operator", "fisher_operator",
]
