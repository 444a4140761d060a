"""Reductions and scans: sums, extremes, moments, norms, softmax, cumulative ops.

Linear reductions (sum, mean, cumsum) are registered with the views module's
linear list; this module holds the ones whose tangent depends on the values.
"""

import torch

from ..fallback import linearized
from ..registry import def_linear, defrule

aten = torch.ops.aten


def _keep(t, x, dim, keepdim):
    """Unsqueeze a reduced result back to broadcast against ``x``."""
    if keepdim or x.dim() == 0:
        return t
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return t.reshape([1] * x.dim())
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = sorted(d % x.dim() for d in dims)
    for d in dims:
        t = t.unsqueeze(d)
    return t


def _dims(dim):
    if dim is None:
        return None
    return [dim] if isinstance(dim, int) else list(dim)


def _extreme_jvp(g, x, ans, dim, keepdim):
    # Average the tangent over the elements that attain the extreme.
    a = _keep(ans, x, dim, keepdim)
    mask = (x == a).to(g.dtype)
    dims = _dims(dim)
    if dims is None or len(dims) == 0:
        return (g * mask).sum() / mask.sum() if ans.dim() == 0 else ((g * mask) / mask.sum()).sum(dims or None, keepdim=keepdim)
    return (g * mask).sum(dims, keepdim=keepdim) / mask.sum(dims, keepdim=keepdim)


@defrule(aten.amax.default, aten.amin.default)
def _amax_jvp(t, ans, x, dim=(), keepdim=False):
    if x.dim() == 0:
        return t[0]
    dim = list(dim) if len(dim) else list(range(x.dim()))
    return _extreme_jvp(t[0], x, ans, dim, keepdim)


@defrule(aten.max.default, aten.min.default)
def _max_all_jvp(t, ans, x):
    if x.dim() == 0:
        return t[0]
    return _extreme_jvp(t[0], x, ans, list(range(x.dim())), False)


def _var_tangent(t0, x, dim, correction, keepdim):
    dims = _dims(dim) if dim is not None else list(range(x.dim()))
    if dims is not None and len(dims) == 0:
        dims = list(range(x.dim()))
    n = 1
    for d in dims:
        n *= x.shape[d] if x.dim() else 1
    mean = x.mean(dims, keepdim=True) if x.dim() else x
    centered = x - mean
    if x.is_complex():
        s = (centered.conj() * t0).real
    else:
        s = centered * t0
    denom = max(n - (1 if correction is None else correction), 0)
    return 2 * s.sum(dims, keepdim=keepdim) / denom if x.dim() else (2 * s / denom if denom else s * float("nan"))


@defrule(aten.var.correction)
def _var_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    return _var_tangent(t[0], x, dim, correction, keepdim)


@defrule(aten.var.dim)
def _var_dim_jvp(t, ans, x, dim=None, unbiased=True, keepdim=False):
    return _var_tangent(t[0], x, dim, 1 if unbiased else 0, keepdim)


@defrule(aten.var_mean.correction)
def _var_mean_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    dims = _dims(dim)
    mean_t = t[0].mean(dims if dims else list(range(x.dim())), keepdim=keepdim) if x.dim() else t[0]
    return _var_tangent(t[0], x, dim, correction, keepdim), mean_t


@defrule(aten.std.correction)
def _std_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    return _std_from_var(_var_tangent(t[0], x, dim, correction, keepdim), ans)


def _std_from_var(var_t, std):
    """d std = d var / (2 std), and 0 where std is 0 (PyTorch's convention; e.g. one element)."""
    return (var_t / (2 * std)).masked_fill(std == 0, 0)


@defrule(aten.std_mean.correction)
def _std_mean_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    v, m = _var_mean_jvp(t, ans, x, dim, correction=correction, keepdim=keepdim)
    return _std_from_var(v, ans[0]), m


@defrule(aten.logsumexp.default)
def _logsumexp_jvp(t, ans, x, dim, keepdim=False):
    if x.dim() == 0:
        return t[0]
    w = (x - _keep(ans, x, dim, keepdim)).exp()
    w = torch.where(_keep(ans, x, dim, keepdim).isinf() & x.isinf(), 0.0, w).to(w.dtype) if x.is_floating_point() else w
    return (t[0] * w).sum(_dims(dim), keepdim=keepdim)


@defrule(aten.nansum.default)
def _nansum_jvp(t, ans, x, dim=None, keepdim=False, *, dtype=None):
    g = torch.where(x.isnan(), 0.0, t[0]).to(t[0].dtype)
    return g.sum(_dims(dim) or None, keepdim=keepdim, dtype=dtype) if dim is not None else g.sum(dtype=dtype)


@defrule(aten.prod.default, aten.prod.dim_int)
def _prod_jvp(t, ans, x, *args, **kwargs):
    if bool((x == 0).any()):
        return _prod_linearized(t, ans, x, *args, **kwargs)
    if not args or isinstance(args[0], torch.dtype) or args[0] is None:
        return (t[0] / x).sum(dtype=kwargs.get("dtype")) * ans
    dim = args[0]
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if x.dim() == 0:
        return t[0]
    return (t[0] / x).sum(dim, keepdim=keepdim) * ans


_prod_linearized_cache = {}


def _prod_linearized(t, ans, x, *args, **kwargs):
    op = aten.prod.default if (not args or isinstance(args[0], torch.dtype) or args[0] is None) else aten.prod.dim_int
    f = _prod_linearized_cache.get(op)
    if f is None:
        f = _prod_linearized_cache[op] = linearized(op)
    return f(t, ans, x, *args, **kwargs)


@defrule(aten.cumprod.default)
def _cumprod_jvp(t, ans, x, dim, dtype=None):
    if bool((x == 0).any()):
        return _cumprod_linearized(t, ans, x, dim, dtype=dtype) if dtype is not None else _cumprod_linearized(t, ans, x, dim)
    if x.dim() == 0:
        return t[0]
    return (t[0] / x).cumsum(dim) * ans


_cumprod_linearized = linearized(aten.cumprod.default)


@defrule(aten.logcumsumexp.default)
def _logcumsumexp_jvp(t, ans, x, dim):
    if x.dim() == 0:
        return t[0]
    # d/dt log sum_{j<=i} exp(x_j) = sum_{j<=i} t_j exp(x_j - ans_i)
    m = x.detach().amax(dim, keepdim=True) if False else None  # noqa: F841
    shift = torch.where(x.isinf(), torch.zeros_like(x), x).amax(dim, keepdim=True)
    return (t[0] * (x - shift).exp()).cumsum(dim) * (shift - ans).exp()


@defrule(aten._softmax.default)
def _softmax_jvp(t, ans, x, dim, half_to_float):
    g = t[0]
    if half_to_float:
        g = g.to(ans.dtype)
    return ans * (g - (ans * g).sum(dim, keepdim=True))


@defrule(aten._log_softmax.default)
def _log_softmax_jvp(t, ans, x, dim, half_to_float):
    g = t[0]
    if half_to_float:
        g = g.to(ans.dtype)
    return g - (ans.exp() * g).sum(dim, keepdim=True)


@defrule(aten.linalg_vector_norm.default)
def _vector_norm_jvp(t, ans, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    g = t[0]
    if dtype is not None:
        g = g.to(dtype)
        x = x.to(dtype)
    dims = _dims(dim) if dim is not None else None
    if dims is not None and len(dims) == 0:
        dims = None
    a = _keep(ans, x, dims, keepdim) if dims is not None else (ans.reshape([1] * x.dim()) if not keepdim else ans)
    if x.is_complex():
        inner = lambda w: (x.conj() * g).real * w  # noqa: E731
        absx = x.abs()
    else:
        inner = lambda w: x * g * w  # noqa: E731
        absx = x.abs()
    red = (lambda v: v.sum(dims, keepdim=keepdim)) if dims is not None else (lambda v: v.sum() if not keepdim else v.sum(list(range(x.dim())), keepdim=True))
    if ord == 0:
        return torch.zeros_like(ans)
    if ord == 2:
        return red(inner(torch.where(a == 0, 0.0, 1 / a).to(absx.dtype)))
    if ord in (float("inf"), float("-inf")):
        mask = (absx == a).to(absx.dtype)
        sgn_g = (x.conj() * g).real / torch.where(absx == 0, 1, absx) if x.is_complex() else x.sign() * g
        return red(sgn_g * mask) / red(mask)
    if ord == 1:
        sgn_g = (x.sgn().conj() * g).real if x.is_complex() else x.sign() * g
        return red(sgn_g)
    # general p: |x|^(p-2) x g / ans^(p-1)
    w = absx.pow(ord - 2)
    w = torch.where(absx == 0, 0.0, w).to(absx.dtype) if ord < 2 else w
    return red(inner(w)) / torch.where(a == 0, 1, a).pow(ord - 1) * (a != 0)


def_linear(aten.cumsum.default)
