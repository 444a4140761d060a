"""Reductions and scans: sums, extremes, moments, norms, softmax, cumulative ops.

Linear reductions (sum, mean, cumsum, trace) apply themselves to the
tangent; ops that pick elements by value (sort, topk, max.dim, median)
gather the input tangent at the chosen indices.  Products and extremes
handle zeros and ties exactly (no division by zero, ties share the tangent
equally as in PyTorch).
"""

import torch

from ..registry import curvature_term, def_linear, defrule, tsub, tsum

aten = torch.ops.aten

for _op in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.cumsum.default,
            aten.trace.default):
    def_linear(_op)


def _reduced_dims(x, dim):
    """The dims a reduction over ``dim`` reduces, as a list (``None`` or empty: all)."""
    if dim is None:
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return list(range(x.dim()))
    return sorted(d % x.dim() for d in dims) if x.dim() else []


def _keep(r, x, dims, keepdim):
    """Unsqueeze a reduced result at ``dims`` so that it broadcasts against ``x``."""
    if keepdim or x.dim() == 0:
        return r
    for d in dims:
        r = r.unsqueeze(d)
    return r


def _sum(v, dims, keepdim):
    return v.sum(dims, keepdim=keepdim) if dims else v


def _real_inner(x, g):
    """Re(conj(x) g): the derivative of |x|^2 / 2 along g (x g for real tensors)."""
    return (x.conj() * g).real if x.is_complex() else x * g


# ---- extremes -----------------------------------------------------------------


def _extreme_jvp(g, x, ans, dims, keepdim):
    """Average of the tangent over the elements that attain the extreme ``ans``.

    A NaN extreme is attained by the NaNs."""
    if x.dim() == 0:
        return g
    a = _keep(ans, x, dims, keepdim)
    mask = (x == a) | (x.isnan() & a.isnan())
    return _sum(g.where(mask, 0), dims, keepdim) / _sum(mask, dims, keepdim)


@defrule(aten.amax.default, aten.amin.default)
def _amax_jvp(t, ans, x, dim=(), keepdim=False):
    return _extreme_jvp(t[0], x, ans, _reduced_dims(x, dim), keepdim)


@defrule(aten.max.default, aten.min.default)
def _max_all_jvp(t, ans, x):
    return _extreme_jvp(t[0], x, ans, _reduced_dims(x, None), False)


@defrule(aten.aminmax.default)
def _aminmax_jvp(t, ans, x, *, dim=None, keepdim=False):
    dims = _reduced_dims(x, dim)
    lo, hi = ans
    return _extreme_jvp(t[0], x, lo, dims, keepdim), _extreme_jvp(t[0], x, hi, dims, keepdim)


# ---- moments ------------------------------------------------------------------


def _var_tangent(g, x, dim, correction, keepdim):
    dims = _reduced_dims(x, dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    centered = x - x.mean(dims, keepdim=True) if dims else x - x
    dof = max(n - (1 if correction is None else correction), 0)
    # dof == 0 makes the primal inf or NaN; the tangent follows (a tensor division).
    return 2 * _sum(_real_inner(centered, g), dims, keepdim) / dof


def _std_from_var(dvar, std):
    return torch.where(std == 0, 0.0, dvar / (2 * std))


@defrule(aten.var.correction)
def _var_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    return _var_tangent(t[0], x, dim, correction, keepdim)


@defrule(aten.std.correction)
def _std_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    return _std_from_var(_var_tangent(t[0], x, dim, correction, keepdim), ans)


def _mean_tangent(g, x, dim, keepdim):
    dims = _reduced_dims(x, dim)
    return g.mean(dims, keepdim=keepdim) if dims else g


@defrule(aten.var_mean.correction)
def _var_mean_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    return _var_tangent(t[0], x, dim, correction, keepdim), _mean_tangent(t[0], x, dim, keepdim)


@defrule(aten.std_mean.correction)
def _std_mean_jvp(t, ans, x, dim=None, *, correction=None, keepdim=False):
    dvar = _var_tangent(t[0], x, dim, correction, keepdim)
    return _std_from_var(dvar, ans[0]), _mean_tangent(t[0], x, dim, keepdim)


# ---- exponential sums -----------------------------------------------------------


@defrule(aten.logsumexp.default)
def _logsumexp_jvp(t, ans, x, dim, keepdim=False):
    dims = _reduced_dims(x, dim)
    a = _keep(ans, x, dims, keepdim)
    # softmax weights; an all -inf slice (ans = -inf) has weight 0, not NaN
    w = (x - torch.where(a.isinf(), 0, a)).exp()
    return _sum(t[0] * w, dims, keepdim)


@defrule(aten.logcumsumexp.default)
def _logcumsumexp_jvp(t, ans, x, dim):
    """tangent_i = sum_{j<=i} g_j exp(x_j - ans_i), computed in log space.

    A real tangent is split by sign, so each part is a logcumsumexp of
    ``x + log|g|`` and nothing under- or overflows; a complex one uses the
    complex logarithm.
    """
    g = t[0]
    if x.dim() == 0:
        return g
    if g.is_complex() or x.is_complex():
        return (torch.logcumsumexp(x + g.log(), dim) - ans).exp()
    pos = torch.logcumsumexp(x + g.clamp_min(0).log(), dim)
    neg = torch.logcumsumexp(x + (-g).clamp_min(0).log(), dim)
    return (pos - ans).exp() - (neg - ans).exp()


@defrule(aten._softmax.default)
def _softmax_jvp(t, ans, x, dim, half_to_float):
    g = t[0]
    if half_to_float:
        g = g.to(ans.dtype)
    if ans.is_complex():
        return ans * (g - (ans * g).sum(dim, keepdim=True))
    # The Jacobian diag(y) - y y^T is symmetric, so the JVP is the backward
    # kernel's VJP: one fused pass (differentiable, with a rule in backward.py).
    return aten._softmax_backward_data.default(g, ans, dim, ans.dtype)


@defrule(aten._log_softmax.default)
def _log_softmax_jvp(t, ans, x, dim, half_to_float):
    g = t[0]
    if half_to_float:
        g = g.to(ans.dtype)
    return g - (ans.exp() * g).sum(dim, keepdim=True)


@defrule(aten._safe_softmax.default)
def _safe_softmax_jvp(t, ans, x, dim, dtype=None):
    # rows that are all -inf give 0 and, like softmax's formula with ans = 0, a zero tangent
    return _softmax_jvp(t, ans, x, dim, dtype is not None and dtype != x.dtype)


@defrule(aten.nansum.default)
def _nansum_jvp(t, ans, x, dim=None, keepdim=False, *, dtype=None):
    g = t[0].masked_fill(x.isnan(), 0)
    dims = _reduced_dims(x, dim)
    return g.sum(dims, keepdim=keepdim, dtype=dtype) if dims else g


# ---- products -------------------------------------------------------------------


def _prod_tangent(g, x, dim, keepdim):
    """sum_k g_k prod_{j != k} x_j along ``dim``, the product of the others being
    the product of the elements before and after k: exact with zeros, no
    division, and a polynomial (so reverse mode through the tangent is right at
    zeros too)."""
    if x.shape[dim] == 0:
        return g.sum(dim, keepdim=keepdim)  # an empty product is the constant 1
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    before = torch.cat([ones, x.narrow(dim, 0, x.shape[dim] - 1)], dim).cumprod(dim)
    after = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), ones], dim).flip(dim).cumprod(dim).flip(dim)
    return (g * before * after).sum(dim, keepdim=keepdim)


@defrule(aten.prod.default)
def _prod_jvp(t, ans, x, *, dtype=None):
    g = t[0]
    if dtype is not None:
        g, x = g.to(dtype), x.to(dtype)
    if x.dim() == 0:
        return g
    return _prod_tangent(g.reshape(-1), x.reshape(-1), 0, False)


@defrule(aten.prod.dim_int)
def _prod_dim_jvp(t, ans, x, dim, keepdim=False, *, dtype=None):
    g = t[0]
    if dtype is not None:
        g, x = g.to(dtype), x.to(dtype)
    if x.dim() == 0:
        return g
    return _prod_tangent(g, x, dim, keepdim)


@defrule(aten.cumprod.default)
def _cumprod_jvp(t, ans, x, dim, *, dtype=None):
    """Exact with zeros, like ``_prod_tangent``, prefix by prefix."""
    g = t[0]
    if dtype is not None:
        g, x = g.to(dtype), x.to(dtype)
    if x.dim() == 0:
        return g
    zero = x == 0
    safe = torch.where(zero, 1, x)
    n_zero = zero.cumsum(dim)
    others = safe.cumprod(dim)
    no_zero = (g / safe).cumsum(dim)
    at_zero = (g * zero).cumsum(dim)
    return others * torch.where(n_zero == 0, no_zero, torch.where(n_zero == 1, at_zero, 0))


# ---- norms ----------------------------------------------------------------------


@defrule(aten.linalg_vector_norm.default)
def _vector_norm_jvp(t, ans, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    g = t[0]
    if dtype is not None:
        g, x = g.to(dtype), x.to(dtype)
    dims = _reduced_dims(x, dim)
    a = _keep(ans, x, dims, keepdim)
    xg = _real_inner(x, g)  # |x| d|x|
    absx = x.abs()
    if ord == 0:
        return None  # counts nonzeros: piecewise constant
    if ord == 2:
        return torch.where(ans == 0, 0.0, _sum(xg, dims, keepdim) / ans)
    # d|x| = xg / |x|, taken as 0 where x is 0 (the subgradient PyTorch uses)
    dabs = torch.where(absx == 0, 0.0, xg / absx)
    if ord == 1:
        return _sum(dabs, dims, keepdim)
    if ord in (float("inf"), float("-inf")):
        mask = absx == a
        return _sum(dabs.where(mask, 0), dims, keepdim) / _sum(mask, dims, keepdim)
    # general p: sum |x|^(p-1) d|x| / ans^(p-1)
    w = torch.where(absx == 0, 0.0, absx.pow(ord - 1))
    return torch.where(ans == 0, 0.0, _sum(w * dabs, dims, keepdim) / ans.pow(ord - 1))


@defrule(aten.norm.Scalar)
def _norm_jvp(t, ans, x, p=2):
    return _vector_norm_jvp(t, ans, x, 2 if p is None else p)


@defrule(aten.norm.ScalarOpt_dim)
def _norm_dim_jvp(t, ans, x, p, dim, keepdim=False):
    return _vector_norm_jvp(t, ans, x, 2 if p is None else p, dim, keepdim)


@defrule(aten.norm.ScalarOpt_dim_dtype)
def _norm_dim_dtype_jvp(t, ans, x, p, dim, keepdim, *, dtype):
    return _vector_norm_jvp(t, ans, x, 2 if p is None else p, dim, keepdim, dtype=dtype)


@defrule(aten.norm.ScalarOpt_dtype)
def _norm_dtype_jvp(t, ans, x, p, *, dtype):
    return _vector_norm_jvp(t, ans, x, 2 if p is None else p, dtype=dtype)


@defrule(aten.dist.default)
def _dist_jvp(t, ans, x, y, p=2):
    return _vector_norm_jvp((tsub(t[0], t[1]),), ans, x - y, p)


@defrule(aten.renorm.default)
def _renorm_jvp(t, ans, x, p, dim, maxnorm):
    """Each slice along ``dim`` whose p-norm exceeds maxnorm is scaled by
    maxnorm / (norm + 1e-7) (ATen's constant)."""
    g = t[0]
    dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    norm = torch.linalg.vector_norm(x, p, dims, keepdim=True)
    over = norm > maxnorm
    scale = torch.where(over, maxnorm / (norm + 1e-7), 1.0)
    dnorm = _vector_norm_jvp((g,), norm, x, p, dims, True)
    dscale = torch.where(over, -maxnorm / (norm + 1e-7).square() * dnorm, 0.0)
    return g * scale + x * dscale


# ---- segment reductions -----------------------------------------------------------


def _segment_ids(data, lengths, axis):
    """For each position of ``data`` along ``axis``, the segment it belongs to,
    as an index that ``gather`` can use on the reduced output."""
    ends = lengths.cumsum(-1)
    n = data.shape[axis]
    pos = torch.arange(n, device=data.device).expand(*lengths.shape[:-1], n)
    ids = torch.searchsorted(ends, pos.contiguous(), right=True).clamp_max(lengths.shape[-1] - 1)
    return ids.reshape(ids.shape + (1,) * (data.dim() - axis - 1)).expand(data.shape)


@defrule(aten.segment_reduce.default)
def _segment_reduce_jvp(t, ans, data, reduce, *, lengths=None, indices=None, offsets=None,
                        axis=0, unsafe=False, initial=None):
    g = t[0]
    axis = axis % data.dim()
    if lengths is None:
        lengths = offsets.diff(dim=-1)

    def segsum(v, initial=0):
        return aten.segment_reduce.default(v, "sum", lengths=lengths, axis=axis, unsafe=True, initial=initial)

    if reduce in ("sum", "mean"):
        # affine in data with constant weights: the same reduction of g, with initial
        # 0 (an empty segment's mean stays NaN without one, as in the primal)
        return aten.segment_reduce.default(g, reduce, lengths=lengths, axis=axis, unsafe=True,
                                           initial=None if initial is None else 0)
    if reduce in ("max", "min"):
        picked = data == ans.gather(axis, _segment_ids(data, lengths, axis))
        count = segsum(picked.to(g.dtype))
        return torch.where(count > 0, segsum(g * picked) / count.clamp_min(1), 0.0)
    if reduce == "prod":
        zero = data == 0
        safe = torch.where(zero, 1, data)
        n_zero = segsum(zero.to(g.dtype))
        others = aten.segment_reduce.default(safe, "prod", lengths=lengths, axis=axis, unsafe=True,
                                             initial=initial)
        return others * torch.where(n_zero == 0, segsum(g / safe), torch.where(n_zero == 1, segsum(g * zero), 0))
    raise NotImplementedError(f"fwdgrad: segment_reduce with reduce={reduce!r} has no JVP rule")


@defrule(aten._segment_reduce_backward.default)
def _segment_reduce_backward_jvp(t, ans, g, output, data, reduce, *, lengths=None, offsets=None, axis=0,
                                 initial=None):
    """Linear in the gradient; for sum, mean, max and min the data enter only
    through a mask (constant almost everywhere), for prod through the product
    of the others (its curvature; the zero-exact form of the prod rule is not
    smooth at a zero, so data with zeros are refused rather than got wrong)."""
    kw = dict(lengths=lengths, offsets=offsets, axis=axis, initial=initial)
    out = None if t[0] is None else aten._segment_reduce_backward.default(t[0], output, data, reduce, **kw)
    if reduce == "prod" and t[2] is not None:
        if bool((data == 0).any()):
            raise NotImplementedError(
                "fwdgrad: forward over reverse through segment_reduce(reduce='prod') with zeros in "
                "the data is not supported")

        def forward(d):
            return aten.segment_reduce.default(d, "prod", lengths=lengths, offsets=offsets, axis=axis,
                                               initial=initial)

        def rule(tt, a, d):
            return _segment_reduce_jvp(tt, a, d, "prod", lengths=lengths, offsets=offsets, axis=axis,
                                       initial=initial)

        out = tsum(out, curvature_term(forward, rule, g, (data,), (t[2],))[0])
    return out


# ---- picking elements by value --------------------------------------------


@defrule(aten.sort.default)
def _sort_jvp(t, ans, x, dim=-1, descending=False):
    return (t[0] if x.dim() == 0 else t[0].gather(dim, ans[1])), None


@defrule(aten.sort.stable)
def _sort_stable_jvp(t, ans, x, *, stable=None, dim=-1, descending=False):
    return _sort_jvp(t, ans, x, dim)


@defrule(aten.topk.default)
def _topk_jvp(t, ans, x, k, dim=-1, largest=True, sorted=True):
    return _sort_jvp(t, ans, x, dim)


@defrule(aten.max.dim, aten.min.dim, aten.median.dim, aten.nanmedian.dim, aten.mode.default)
def _select_along_jvp(t, ans, x, dim=-1, keepdim=False):
    """Ops that pick one element per slice and return its index: gather the tangent there."""
    if x.dim() == 0:
        return t[0], None
    indices = ans[1] if keepdim else ans[1].unsqueeze(dim)
    picked = t[0].gather(dim, indices)
    return (picked if keepdim else picked.squeeze(dim)), None


@defrule(aten.kthvalue.default)
def _kthvalue_jvp(t, ans, x, k, dim=-1, keepdim=False):
    return _select_along_jvp(t, ans, x, dim, keepdim)


@defrule(aten.cummax.default, aten.cummin.default)
def _cum_extreme_jvp(t, ans, x, dim):
    if x.dim() == 0:
        return t[0], None
    return t[0].gather(dim, ans[1]), None


@defrule(aten.median.default, aten.nanmedian.default)
def _median_all_jvp(t, ans, x):
    # The tangent averaged over the elements equal to the median (ATen's convention).
    return _extreme_jvp(t[0], x, ans, list(range(x.dim())), False)
