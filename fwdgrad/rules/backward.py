"""The backward ops that autograd runs: rules that make forward over reverse cheap.

When ``torch.autograd.grad`` runs inside a transform (``hvp``, ``jvp(grad(f))``)
every backward op reaches the interpreter.  Without a rule they would go
through the fallback chain (a decomposition, or linearizing the op's own
double backward), which is correct but slow and keeps extra graphs alive.

Nearly every backward op is linear in its incoming gradient ``go``: the
tangent is the op applied to ``dgo`` plus, for ops whose saved values enter
nonlinearly, ``go`` times the derivative of the local Jacobian (a second
derivative of the forward function).  Saved values that act only through a
mask, an index or a shape (``relu``'s input, max-pool indices) contribute
nothing almost everywhere.  The elementwise parts are evaluated in slices
(``fwdgrad/slicing.py``) so that their temporaries do not set the peak memory
of ``hvp``.  Names: ``go`` the incoming gradient, ``d*`` a
tangent, ``t`` the tangents of the op's arguments, ``ans`` its outputs.
"""

import math

import torch

from ..fallback import rule_for
from ..ops import aten_ops
from ..registry import defrule, tmul, tsub, tsum
from ..slicing import accumulate, fresh_ok, in_place_ok, in_row_slices
from .nn import (
    CTCLattice, _attention_probs, _channel_shape, ctc_beta, kv_groups, repeat_kv, sum_kv, weight_norm_dims,
)

aten = torch.ops.aten


# ---- linear in the incoming gradient -----------------------------------------


def _linear_in_grad(op):
    """Register ``op`` as linear in its gradient argument; other arguments act only
    through masks, indices or shapes, so their tangents contribute nothing."""

    def rule(t, ans, go, *args, **kwargs):
        return None if t[0] is None else op(t[0], *args, **kwargs)

    defrule(op)(rule)


for _op in aten_ops(
    "threshold_backward",
    "leaky_relu_backward",
    "hardtanh_backward",
    "hardshrink_backward",
    "softshrink_backward",
    "hardsigmoid_backward",
    "rrelu_with_noise_backward",
    "native_dropout_backward",
    "max_pool2d_with_indices_backward",
    "max_pool3d_with_indices_backward",
    "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d_backward",
    "avg_pool2d_backward",
    "avg_pool3d_backward",
    "_adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward",
    "embedding_dense_backward",
    "select_backward",
    "slice_backward",
    "diagonal_backward",
    "unfold_backward",
    "reflection_pad1d_backward",
    "reflection_pad2d_backward",
    "reflection_pad3d_backward",
    "replication_pad1d_backward",
    "replication_pad2d_backward",
    "replication_pad3d_backward",
    "upsample_nearest1d_backward",
    "upsample_nearest2d_backward",
    "upsample_nearest3d_backward",
    "_upsample_nearest_exact1d_backward",
    "_upsample_nearest_exact2d_backward",
    "_upsample_nearest_exact3d_backward",
    "upsample_linear1d_backward",
    "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward",
    "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward",
):
    _linear_in_grad(_op)


def _linear_in_grad_unless(op, *weights):
    """``op`` is linear in its gradient; arguments ``weights`` enter its value, so when
    they carry a tangent (rare: a differentiated class weight) use the fallback."""
    fallback = rule_for(op)

    def rule(t, ans, go, *args, **kwargs):
        if any(i < len(t) and t[i] is not None for i in weights):
            return fallback(t, ans, go, *args, **kwargs)
        return None if t[0] is None else op(t[0], *args, **kwargs)

    defrule(op)(rule)


_linear_in_grad_unless(aten.nll_loss_backward.default, 3, 6)
_linear_in_grad_unless(aten.nll_loss2d_backward.default, 3, 6)


# The embedding-bag backward ops (bilinear in the gradient and the per-sample
# weights) have their rules in nn.py.


def _activation(op, second, saved_arg=1):
    """``op(go, *args)`` computes ``go * f'(saved)``; ``second(go, *args)`` is ``go``
    times the derivative of ``f'`` with respect to the saved tensor ``args[saved_arg - 1]``.
    The tangent is ``op(dgo, *args) + second(go, *args) * dsaved``."""
    i = saved_arg - 1

    def rule(t, ans, go, *args, **kwargs):
        out = None if t[0] is None else op(t[0], *args, **kwargs)
        ds = t[saved_arg]
        if ds is None:
            return out
        saved = args[i]

        def term(go_, saved_, ds_):
            a = list(args)
            a[i] = saved_
            r = second(go_, *a, **kwargs)
            if r.shape == ds_.shape and r.dtype == ds_.dtype and fresh_ok(r, ds_):
                return r.mul_(ds_)  # r is this rule's own temporary
            return r * ds_

        return accumulate(out, term, saved, go, saved, ds)

    defrule(op)(rule)


def _tanh_second(go, y):
    # tanh' = 1 - y^2 in terms of the output y, so d/dy = -2 y.
    return (go * y).mul_(-2) if fresh_ok(go, y) else -2 * go * y


def _sigmoid_second(go, y):
    # sigmoid' = y (1 - y), d/dy = 1 - 2 y.
    return (y * -2).add_(1).mul_(go) if fresh_ok(go, y) else go * (1 - 2 * y)


_activation(aten.tanh_backward.default, _tanh_second)
_activation(aten.sigmoid_backward.default, _sigmoid_second)


def _gelu_second(go, x, approximate="none"):
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        c = 0.044715
        u = k * (x + c * x * x * x)
        th = u.tanh()
        du = k * (1 + 3 * c * x * x)
        sech2 = 1 - th * th
        return go * sech2 * (du + 0.5 * x * (6 * k * c * x - 2 * th * du * du))
    if fresh_ok(go, x):  # two temporaries, updated in place
        x2 = x * x
        pdf = (x2 * -0.5).exp_()
        return pdf.mul_(x2.neg_().add_(2)).mul_(go).mul_(1 / math.sqrt(2 * math.pi))
    pdf = (-0.5 * x * x).exp() * (1 / math.sqrt(2 * math.pi))
    return go * pdf * (2 - x * x)


_activation(aten.gelu_backward.default, _gelu_second)


def _silu_second(go, x):
    s = x.sigmoid()
    return go * s * (1 - s) * (2 + x * (1 - 2 * s))


_activation(aten.silu_backward.default, _silu_second)


def _mish_second(go, x):
    s = x.sigmoid()
    tsp = torch.nn.functional.softplus(x).tanh()
    return go * (1 - tsp * tsp) * s * (2 + x * (1 - s - 2 * tsp * s))


_activation(aten.mish_backward.default, _mish_second)


def _hardswish_second(go, x):
    return go.where((x > -3) & (x < 3), 0) / 3


_activation(aten.hardswish_backward.default, _hardswish_second)


def _softplus_second(go, x, beta, threshold):
    s = (x * beta).sigmoid()
    return go * torch.where(x * beta > threshold, 0.0, beta * s * (1 - s)).to(go.dtype)


_activation(aten.softplus_backward.default, _softplus_second)


def _log_sigmoid_second(go, x, buffer):
    s = x.sigmoid()
    return -go * s * (1 - s)


_activation(aten.log_sigmoid_backward.default, _log_sigmoid_second)


def _logit_second(go, x, eps=None):
    d = go * (2 * x - 1) / (x * (1 - x)).square()
    if eps is not None:
        d = torch.where((x < eps) | (x > 1 - eps), 0.0, d).to(go.dtype)
    return d


_activation(aten.logit_backward.default, _logit_second)


def _elu_second(go, alpha, scale, input_scale, is_result, s):
    # For s <= 0 the gradient is go * input_scale * (s + alpha * scale) when s is
    # the result, and go * input_scale * alpha * scale * exp(s * input_scale) when
    # it is the input; for s > 0 it is go * scale, whose derivative is zero.
    if is_result:
        d = go * input_scale
    else:
        d = go * (input_scale * input_scale * alpha * scale) * (s * input_scale).exp()
    return torch.where(s > 0, 0.0, d).to(go.dtype)


_activation(aten.elu_backward.default, _elu_second, saved_arg=5)


@defrule(aten.glu_backward.default)
def _glu_backward_jvp(t, ans, go, x, dim):
    # glu(x) = a * sigmoid(b) with x = [a, b]: grad_a = go * s, grad_b = go * a * s (1 - s).
    a, b = x.chunk(2, dim)
    s = b.sigmoid()
    ds1 = s * (1 - s)
    dgo, dx = t[0], t[1]
    da, db = (None, None) if dx is None else dx.chunk(2, dim)
    d_ga = tsum(tmul(dgo, s), None if dx is None else go * ds1 * db)
    d_gb = tsum(None if dgo is None else dgo * (a * ds1),
                None if dx is None else go * ds1 * (da + a * (1 - 2 * s) * db))
    # each half is zero exactly when both dgo and dx are
    return None if d_ga is None else torch.cat([d_ga, d_gb], dim)


# ---- softmax ------------------------------------------------------------------


@defrule(aten._softmax_backward_data.default)
def _softmax_backward_jvp(t, ans, go, y, dim, input_dtype):
    # gi = y * (go - sum(go * y))
    dgo, dy = t[0], t[1]
    out = None if dgo is None else aten._softmax_backward_data.default(dgo, y, dim, input_dtype)
    if dy is not None:
        s = (go * y).sum(dim, keepdim=True)
        out = tsum(out, dy * (go - s) - y * (go * dy).sum(dim, keepdim=True))
    return out


@defrule(aten._log_softmax_backward_data.default)
def _log_softmax_backward_jvp(t, ans, go, out, dim, input_dtype):
    # gi = go - exp(out) * sum(go)
    dgo, dout = t[0], t[1]
    res = None if dgo is None else aten._log_softmax_backward_data.default(dgo, out, dim, input_dtype)
    return tsum(res, None if dout is None else -(out.exp() * dout) * go.sum(dim, keepdim=True))


# ---- losses ---------------------------------------------------------------------


def _difference(dx, dy, x):
    """The tangent of ``x - y``, shaped like ``x`` also where only ``dy`` is nonzero."""
    return -dy.expand_as(x) if dx is None and dy is not None else tsub(dx, dy)


@defrule(aten.mse_loss_backward.default)
def _mse_backward_jvp(t, ans, go, x, y, reduction):
    # gi = c * go * (x - y): linear in go and in (x - y).
    out = None if t[0] is None else aten.mse_loss_backward.default(t[0], x, y, reduction)
    dd = _difference(t[1], t[2], x)
    return tsum(out, None if dd is None else go * dd * (2 * _mean_scale(x, reduction)))


def _mean_scale(x, reduction):
    """The factor a loss's reduction puts on each element's gradient (1/N for 'mean')."""
    return 1.0 / x.numel() if reduction == 1 else 1.0


@defrule(aten.binary_cross_entropy_backward.default)
def _bce_backward_jvp(t, ans, go, x, y, weight=None, reduction=1):
    # gi = c * go * w * (x - y) / max(x (1 - x), 1e-12), c = 1/N for 'mean'.
    if len(t) > 3 and t[3] is not None:
        return _bce_backward_fallback(t, ans, go, x, y, weight, reduction)
    out = None if t[0] is None else aten.binary_cross_entropy_backward.default(t[0], x, y, weight, reduction)
    dx, dy = t[1], t[2]
    if dx is None and dy is None:
        return out
    q = x * (1 - x)
    clamped = q < 1e-12
    q = q.clamp_min(1e-12)
    scale = go * _mean_scale(x, reduction)
    if weight is not None:
        scale = scale * weight
    term = None
    if dx is not None:
        # d/dx (x - y) / q = (q - (x - y)(1 - 2x)) / q^2 where q = x (1 - x) is not clamped.
        dq = torch.where(clamped, 0.0, (1 - 2 * x) / q).to(x.dtype)
        term = (1 - (x - y) * dq) / q * dx
    return tsum(out, scale * tsum(term, None if dy is None else -dy / q))


_bce_backward_fallback = rule_for(aten.binary_cross_entropy_backward.default)


@defrule(aten.smooth_l1_loss_backward.default)
def _smooth_l1_backward_jvp(t, ans, go, x, y, reduction, beta):
    out = None if t[0] is None else aten.smooth_l1_loss_backward.default(t[0], x, y, reduction, beta)
    dd = _difference(t[1], t[2], x)
    if dd is not None:
        quadratic = ((x - y).abs() < beta).to(go.dtype)
        out = tsum(out, go * quadratic * dd * (_mean_scale(x, reduction) / beta))
    return out


@defrule(aten.huber_loss_backward.default)
def _huber_backward_jvp(t, ans, go, x, y, reduction, delta):
    out = None if t[0] is None else aten.huber_loss_backward.default(t[0], x, y, reduction, delta)
    dd = _difference(t[1], t[2], x)
    if dd is not None:
        quadratic = ((x - y).abs() <= delta).to(go.dtype)
        out = tsum(out, go * quadratic * dd * _mean_scale(x, reduction))
    return out


# ---- convolution ------------------------------------------------------------------


@defrule(aten.convolution_backward.default)
def _convolution_backward_jvp(t, ans, go, x, w, bias_sizes, stride, padding, dilation,
                              transposed, output_padding, groups, output_mask):
    # grad_input is bilinear in (go, w), grad_weight in (go, x), grad_bias linear in go.
    def conv_bwd(g, inp, weight, mask):
        return aten.convolution_backward.default(
            g, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
            groups, mask,
        )

    dgo, dx, dw = t[0], t[1], t[2]
    di = dgw = dgb = None
    if dgo is not None:
        di, dgw, dgb = conv_bwd(dgo, x, w, output_mask)
        if not output_mask[0]:
            di = None
        if not output_mask[1]:
            dgw = None
        if not output_mask[2]:
            dgb = None
    if dw is not None and output_mask[0]:
        di = tsum(di, conv_bwd(go, x, dw, [True, False, False])[0])
    if dx is not None and output_mask[1]:
        dgw = tsum(dgw, conv_bwd(go, dx, w, [False, True, False])[1])
    return di, dgw, dgb


# ---- normalisation ------------------------------------------------------------------


def _mean(x, dims):
    return x.mean(dims, keepdim=True)


def _normalized_grad_tangent(G, dG, xhat, dxhat, rstd, drstd, dims):
    """Tangent of ``gi = rstd * (G - mean(G) - xhat * mean(G * xhat))`` (means over ``dims``).

    This is the input gradient of a normalisation whose statistics are taken
    over ``dims``; ``G`` is the incoming gradient times the affine weight.
    """
    dh = tsum(None if dG is None else dG - _mean(dG, dims) - xhat * _mean(dG * xhat, dims),
              None if dxhat is None else -dxhat * _mean(G * xhat, dims) - xhat * _mean(G * dxhat, dims))
    return tsum(tmul(rstd, dh),
                None if drstd is None else drstd * (G - _mean(G, dims) - xhat * _mean(G * xhat, dims)))


def _normalized_input_tangent(x, dx, mean, dmean, rstd, drstd):
    """``xhat = (x - mean) * rstd`` and its tangent (``None`` if zero)."""
    xc = x - mean
    dxhat = tsum(tmul(_difference(dx, dmean, x), rstd), tmul(xc, drstd))
    return xc * rstd, dxhat


def _param_grad_tangents(go, dgo, xhat, dxhat, dims, output_mask):
    """Tangents of ``grad_weight = sum(go * xhat)`` and ``grad_bias = sum(go)`` over ``dims``."""
    dgw = dgb = None
    if output_mask[1]:
        dgw = tsum(tmul(dgo, xhat), tmul(go, dxhat))
        if dgw is not None:
            dgw = dgw.sum(dims)
    if output_mask[2] and dgo is not None:
        dgb = dgo.sum(dims)
    return dgw, dgb


def _weighted(go, dgo, w, dw):
    """``G = go * w`` and its tangent (``w`` broadcasts; ``None`` means 1)."""
    if w is None:
        return go, dgo
    dG = tsum(tmul(dgo, w), tmul(go, dw))
    return go * w, dG


def _reshaped(a, *shape):
    """``a.reshape(*shape)``, where ``None`` (a zero tangent, an absent weight) stays ``None``."""
    return None if a is None else a.reshape(*shape)


@defrule(aten.native_layer_norm_backward.default)
def _layer_norm_backward_jvp(t, ans, go, x, normalized_shape, mean, rstd, w, b, output_mask):
    dgo, dx, dmean, drstd, dw = t[0], t[1], t[3], t[4], t[5]
    features = 1
    for n in normalized_shape:
        features *= n
    rows = x.numel() // max(1, features)

    def as_rows(a, width):
        return _reshaped(a, rows, width)

    wf, dwf = _reshaped(w, features), _reshaped(dw, features)

    def piece(go, dgo, x, dx, mean, dmean, rstd, drstd):
        xhat, dxhat = _normalized_input_tangent(x, dx, mean, dmean, rstd, drstd)
        di = None
        if output_mask[0]:
            G, dG = _weighted(go, dgo, wf, dwf)
            di = _normalized_grad_tangent(G, dG, xhat, dxhat, rstd, drstd, [1])
        return (di, *_param_grad_tangents(go, dgo, xhat, dxhat, [0], output_mask))

    di, dgw, dgb = in_row_slices(piece, rows, features, [
        as_rows(go, features), as_rows(dgo, features), as_rows(x, features), as_rows(dx, features),
        as_rows(mean, 1), as_rows(dmean, 1), as_rows(rstd, 1), as_rows(drstd, 1),
    ])
    shape = list(normalized_shape)
    return _reshaped(di, x.shape), _reshaped(dgw, shape), _reshaped(dgb, shape)


@defrule(aten.native_group_norm_backward.default)
def _group_norm_backward_jvp(t, ans, go, x, mean, rstd, w, N, C, HxW, group, output_mask):
    dgo, dx, dmean, drstd, dw = t[0], t[1], t[2], t[3], t[4]
    per_group = C // group
    # Layout (N, group, channels per group, HxW): statistics over dims (2, 3),
    # affine parameters per (group, channel), parameter sums over dims (0, 3).
    wg, dwg = _reshaped(w, group, per_group, 1), _reshaped(dw, group, per_group, 1)

    def layout(a):
        return _reshaped(a, N, group, per_group, -1)

    def stats(a):
        return _reshaped(a, N, group, 1, 1)

    def piece(go, dgo, x, dx, mean, dmean, rstd, drstd):
        xhat, dxhat = _normalized_input_tangent(x, dx, mean, dmean, rstd, drstd)
        di = None
        if output_mask[0]:
            G, dG = _weighted(go, dgo, wg, dwg)
            di = _normalized_grad_tangent(G, dG, xhat, dxhat, rstd, drstd, [2, 3])
        return (di, *_param_grad_tangents(go, dgo, xhat, dxhat, [0, 3], output_mask))

    di, dgw, dgb = in_row_slices(piece, N, x.numel() // max(1, N), [
        layout(go), layout(dgo), layout(x), layout(dx), stats(mean), stats(dmean), stats(rstd), stats(drstd),
    ])
    return _reshaped(di, x.shape), _reshaped(dgw, C), _reshaped(dgb, C)


def per_channel_sum(shape, terms, centered=None, const=None):
    """``sum(full * coef) [+ (x - mu) * c] [+ const]`` with per-channel coefficients
    (reshaped to ``shape``), built in place in one tensor: batch-norm tangents
    need no other temporary the size of the input.  ``centered = (x, mu, c)``
    keeps ``x - mu`` together, so a large mean does not cancel."""
    inplace = in_place_ok()
    out = None
    if centered is not None and centered[2] is not None:
        x, mu, c = centered
        out = x - mu.reshape(shape)
        out = out.mul_(c.reshape(shape)) if inplace else out * c.reshape(shape)
    for full, coef in terms:
        if full is None or coef is None:
            continue
        coef = coef.reshape(shape)
        if out is None:
            out = full * coef
        else:
            out = out.addcmul_(full, coef) if inplace else torch.addcmul(out, full, coef)
    if const is not None:
        const = const.reshape(shape)
        out = const if out is None else (out.add_(const) if inplace else out + const)
    return out


def channel_sums(g, x, mu, rho):
    """Per channel ``(sum(g * (x - mu) * rho), sum(g))``: the weight and bias gradients
    of the batch-norm backward kernel, so no temporary the size of ``x``.  Under
    reverse mode (the kernel's own derivative does not cover this use) plain ops."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in (g, x, mu, rho)):
        shape = _channel_shape(x)
        dims = [0] + list(range(2, x.dim()))
        return (g * (x - mu.reshape(shape)) * rho.reshape(shape)).sum(dims), g.sum(dims)
    # An explicit unit weight: with none, vmap's batching rule of the kernel
    # (a recorded program replayed for many tangents) returns no weight gradient.
    ones = x.new_ones(x.shape[1] if x.dim() > 1 else 1)
    _, gw, gb = aten.native_batch_norm_backward.default(
        g, x, ones, None, None, mu, rho, True, 0.0, [False, True, True]
    )
    return gw, gb


def _batch_norm_backward(t, go, x, w, rm, rv, save_mean, save_invstd, train, eps, output_mask):
    """Shared by the batch-norm backward overloads; ``t`` indexed as in native_batch_norm_backward.

    With ``mu``/``rho`` the mean and inverse standard deviation used (batch
    statistics in training, running ones otherwise), ``xhat = (x - mu) rho``,
    ``w`` the weight, ``a = mean(go)`` and ``b = mean(go xhat)``:

    * training: ``gi = rho w (go - a - xhat b)``;  evaluation: ``gi = rho w go``;
    * ``grad_weight = sum(go xhat)``, ``grad_bias = sum(go)``.

    Every term of the tangent of ``gi`` is a full-size tensor (``dgo``, ``go``,
    ``dx``, ``x - mu``) times a per-channel coefficient, and the channel sums
    come from the kernel, so the tangent is built in place in one tensor.
    """
    dgo, dx, dw, drm, drv, dsm, dsi = t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    shape = _channel_shape(x)
    count = x.numel() // x.shape[1]
    if train:
        mu, rho, dmu, drho = save_mean, save_invstd, dsm, dsi
    else:
        mu, rho, dmu = rm, (rv + eps).rsqrt(), drm
        drho = None if drv is None else -0.5 * rho ** 3 * drv
    wv = w if w is not None else torch.ones_like(rho)
    d_rho_w = tsum(tmul(drho, wv), tmul(rho, dw))  # tangent of rho * w
    sum_go_xhat, sum_go = channel_sums(go, x, mu, rho)
    # S1 = sum(dgo xhat), S2 = sum(dgo); m3 = sum(go dxhat), dxhat = (dx - dmu) rho + (x - mu) drho.
    s1, s2 = (None, None) if dgo is None else channel_sums(dgo, x, mu, rho)
    m3 = tsum(None if dx is None else rho * channel_sums(go, dx, torch.zeros_like(mu), torch.ones_like(rho))[0],
              None if dmu is None else -rho * dmu * sum_go,
              None if drho is None else drho * sum_go_xhat / rho)
    dgw = tsum(s1, m3) if output_mask[1] else None
    dgb = s2 if output_mask[2] else None
    di = None
    if output_mask[0]:
        rw = rho * wv
        c_dx = c_x = c_1 = None
        if train:
            a, b = sum_go / count, sum_go_xhat / count
            # d(rho w) (go - a - xhat b) + rho w (dgo - mean(dgo) - xhat mean(dgo xhat))
            #   - rho w (b dxhat + xhat mean(go dxhat)), with the mean's terms cancelled.
            c_x = tsum(None if d_rho_w is None else -d_rho_w * rho * b,
                       None if dgo is None else -rw * rho * s1 / count,
                       None if drho is None else -rw * b * drho,
                       None if m3 is None else -rw * rho * m3 / count)
            c_1 = tsum(None if d_rho_w is None else -d_rho_w * a,
                       None if dgo is None else -rw * s2 / count,
                       None if dmu is None else rw * rho * b * dmu)
            c_dx = None if dx is None else -rw * rho * b
        # (per_channel_sum skips the terms whose full-size tensor is zero)
        di = per_channel_sum(shape, [(dgo, rw), (go, d_rho_w), (dx, c_dx)], (x, mu, c_x), c_1)
    return di, dgw, dgb


@defrule(aten.native_batch_norm_backward.default)
def _native_batch_norm_backward_jvp(t, ans, go, x, w, rm, rv, save_mean, save_invstd, train, eps, output_mask):
    return _batch_norm_backward(t, go, x, w, rm, rv, save_mean, save_invstd, train, eps, output_mask)


@defrule(aten.batch_norm_backward.default)
def _batch_norm_backward_jvp(t, ans, go, x, w, rm, rv, save_mean, save_var, update, eps, output_mask, reserve):
    # The first seven arguments sit where native_batch_norm_backward has them.
    return _batch_norm_backward(t, go, x, w, rm, rv, save_mean, save_var, update, eps, output_mask)


@defrule(aten._weight_norm_interface_backward.default)
def _weight_norm_backward_jvp(t, ans, gw, v, g, n, dim):
    # With r = <gw, v> (summed over all dimensions but ``dim``), the kernel returns
    #   gg = r / n  and  gv = (g / n) (gw - v gg / n),
    # with n the saved norm (an input of its own, so its tangent enters too).
    dgw, dv, dg, dn = t[0], t[1], t[2], t[3]
    dims = weight_norm_dims(v, dim)
    gv, gg = ans
    dr = tsum(None if dgw is None else (dgw * v).sum(dims, keepdim=True),
              None if dv is None else (gw * dv).sum(dims, keepdim=True))
    dgg = tsub(None if dr is None else dr / n, None if dn is None else gg * dn / n)  # d(r / n)
    scale = g / n
    dscale = tsub(None if dg is None else dg / n, None if dn is None else scale * dn / n)
    ratio = gg / n
    dratio = tsub(None if dgg is None else dgg / n, None if dn is None else ratio * dn / n)
    dgv = tsum(None if dscale is None else dscale * (gw - v * ratio),
               None if dgw is None and dv is None and dratio is None else
               scale * tsub(dgw, tsum(tmul(dv, ratio), tmul(v, dratio))))
    return dgv, dgg


@defrule(aten._ctc_loss_backward.default, aten._ctc_loss_backward.Tensor)
def _ctc_loss_backward_jvp(t, ans, gr, lp, targets, input_lengths, target_lengths, nll, log_alpha, blank,
                           zero_infinity=False):
    # On the frames in use the kernel returns gr (exp(lp) - E), with E = exp(lcab + nll - lp)
    # and lcab[t, c] = log sum over the lattice positions labelled c of alpha beta.
    # Its tangent needs those of log_alpha (an input), of log_beta (recomputed here
    # with its tangent) and of lcab: the posterior-weighted sum of d(alpha + beta).
    if lp.dim() != 3:
        raise NotImplementedError("fwdgrad: forward over reverse through ctc_loss needs batched log_probs (T, N, C)")
    dgr, dlp, dnll, dla = t[0], t[1], t[5], t[6]
    T, N, C = lp.shape
    lattice = CTCLattice(lp, targets, input_lengths, target_lengths, blank)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    dlp_or0 = zero.expand(lp.shape) if dlp is None else dlp
    lb, dlb = ctc_beta(lattice, lattice.gather(lp), lattice.gather(dlp_or0))
    la = log_alpha.masked_fill(~lattice.valid, float("-inf"))
    ab = la + lb  # (N, T, S)
    index = lattice.ext.unsqueeze(1).expand(N, T, -1)
    one_hot = torch.zeros(N, T, C, lattice.shape[2], dtype=torch.bool, device=lp.device)
    one_hot.scatter_(2, index.unsqueeze(2), True)
    lcab = torch.logsumexp(ab.unsqueeze(2).masked_fill(~one_hot, float("-inf")), 3)  # (N, T, C)
    posterior = torch.where(ab.isinf(), 0.0, (ab - lcab.gather(2, index)).exp())
    dab = tsum(dla, dlb)
    dab = zero.expand(ab.shape) if dab is None else dab.masked_fill(~lattice.valid, 0.0)
    dlcab = torch.zeros(N, T, C, dtype=lp.dtype, device=lp.device).scatter_add(2, index, posterior * dab)
    lcab, dlcab = lcab.transpose(0, 1), dlcab.transpose(0, 1)  # (T, N, C)
    E = torch.where(lcab.isinf(), 0.0, (lcab + nll.view(1, N, 1) - lp).exp())
    frames = torch.arange(T, device=lp.device)
    in_use = (frames.unsqueeze(1) < lattice.in_len).unsqueeze(2)
    if zero_infinity:
        in_use = in_use & ~nll.isinf().view(1, N, 1)
    g = gr.view(1, N, 1) if gr.dim() else gr
    dE = E * tsub(tsum(dlcab, None if dnll is None else dnll.view(1, N, 1)), dlp)
    d = tsum(None if dgr is None else (dgr.view(1, N, 1) if dgr.dim() else dgr) * (lp.exp() - E),
             g * tsub(None if dlp is None else lp.exp() * dlp, dE))
    return d.masked_fill(~in_use, 0.0)


# ---- attention ----------------------------------------------------------------------


@defrule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _sdpa_cpu_backward_jvp(t, ans, go, q, k, v, out, lse, dropout_p, is_causal, *,
                           attn_mask=None, scale=None):
    # With S = scale q k^T (+ mask), P = exp(S - lse), D = rowsum(go * out):
    #   gv = P^T go,  dS = P * (go v^T - D),  gq = scale dS k,  gk = scale dS^T q.
    if dropout_p:
        raise NotImplementedError(
            "fwdgrad: forward over reverse through scaled_dot_product_attention with "
            "dropout_p > 0 needs the dropout mask, which the fused CPU kernel does not "
            "return; use dropout_p=0 (e.g. model.eval()) inside the transform"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dgo, dq, dk, dv, dout, dlse = t[0], t[1], t[2], t[3], t[4], t[5]
    dmask = t.kw.get("attn_mask")
    if dgo is not None:
        # Every term linear in go, from the fused kernel itself.
        dgq, dgk, dgv = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            dgo, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
    else:
        dgq = dgk = dgv = None
    if all(a is None for a in (dq, dk, dv, dout, dlse, dmask)):
        return dgq, dgk, dgv
    # Grouped-query attention: work with one key/value head per query head, and
    # sum the key and value gradients' tangents back onto the shared heads.
    groups = kv_groups(q, k)
    k, v, dk, dv = (repeat_kv(a, groups) for a in (k, v, dk, dv))
    p = _attention_probs(q, k, lse, attn_mask, is_causal, scale)
    # Tangent of P = exp(S - lse).
    ds_in = tsum(None if dq is None else (dq @ k.transpose(-2, -1)) * scale,
                 None if dk is None else (q @ dk.transpose(-2, -1)) * scale,
                 dmask,
                 None if dlse is None else -dlse.unsqueeze(-1))
    dp = tmul(p, ds_in)
    dP = go @ v.transpose(-2, -1)
    D = (go * out).sum(-1, keepdim=True)
    # Tangent of dS = P * (dP - D), the dgo terms excluded (they came from the kernel).
    inner = tsum(None if dv is None else go @ dv.transpose(-2, -1),
                 None if dout is None else -(go * dout).sum(-1, keepdim=True))
    d_dS = tsum(None if dp is None else dp * (dP - D), tmul(p, inner))
    cv = None if dp is None else dp.transpose(-2, -1) @ go
    dS = p * (dP - D)
    ck = None
    if d_dS is not None:
        dgq = tsum(dgq, (d_dS @ k) * scale)
        ck = (d_dS.transpose(-2, -1) @ q) * scale
    dgq = tsum(dgq, None if dk is None else (dS @ dk) * scale)
    ck = tsum(ck, None if dq is None else (dS.transpose(-2, -1) @ dq) * scale)
    return dgq, tsum(dgk, sum_kv(ck, groups)), tsum(dgv, sum_kv(cv, groups))
