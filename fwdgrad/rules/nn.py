"""Neural-network ops: convolution, normalisation, pooling, attention, embeddings, losses.

The primal always comes from PyTorch's fused kernel; the tangent uses the
cheapest expression we know (for attention, an SDPA call for the ``P dV``
part and the saved log-sum-exp to rebuild ``P`` for the rest).
"""

import torch

from ..registry import def_linear, defrule
from ..slicing import in_place_ok

aten = torch.ops.aten


# ---- convolution --------------------------------------------------------------


def _bias_shape(bias, out):
    return bias.reshape([1, -1] + [1] * (out.dim() - 2))


@defrule(aten.convolution.default)
def _conv_jvp(t, ans, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    out = None
    if t[0] is not None:
        out = aten.convolution.default(t[0], w, None, stride, padding, dilation, transposed, output_padding, groups)
    if t[1] is not None:
        c = aten.convolution.default(x, t[1], None, stride, padding, dilation, transposed, output_padding, groups)
        out = c if out is None else out + c
    if len(t) > 2 and t[2] is not None:
        c = _bias_shape(t[2], ans)
        out = c if out is None else out + c
    return out


# ---- normalisation ------------------------------------------------------------


def _visible_stats(x, mean, rstd, dims, eps):
    """``mean`` and ``rstd`` as reverse mode must see them.

    PyTorch marks a normalisation kernel's mean and rstd outputs as not
    differentiable, so a tangent built from them would be treated by autograd
    as if the statistics did not depend on ``x``.  When reverse mode will
    differentiate the tangent (``x`` requires grad), recompute them with
    differentiable ops.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return mean, rstd
    m = x.mean(dims, keepdim=True)
    r = (x.var(dims, correction=0, keepdim=True) + eps).rsqrt()
    return m.reshape(mean.shape), r.reshape(rstd.shape)


def _normalized_tangent(x, tx, mean, rstd, dims):
    """Tangents of ``xhat = (x - mean) * rstd`` and of ``rstd`` for statistics over ``dims``."""
    xhat = (x - mean) * rstd
    dmean = tx.mean(dims, keepdim=True)
    c = (xhat * tx).mean(dims, keepdim=True)
    dxhat = rstd * (tx - dmean - xhat * c)
    drstd = -rstd * rstd * c
    return xhat, dxhat, dmean, drstd


def _affine_tangent(xhat, dxhat, w, tw, tb, shape):
    out = None
    if dxhat is not None:
        out = dxhat if w is None else dxhat * w.reshape(shape)
    if tw is not None:
        c = xhat * tw.reshape(shape)
        out = c if out is None else out + c
    if tb is not None:
        c = tb.reshape(shape)
        out = c if out is None else out + c
    return out


@defrule(aten.native_layer_norm.default)
def _layer_norm_jvp(t, ans, x, normalized_shape, w, b, eps):
    out, mean, rstd = ans
    axis = x.dim() - len(normalized_shape)
    dims = list(range(axis, x.dim()))
    mean, rstd = _visible_stats(x, mean, rstd, dims, eps)
    tx = t[0]
    if tx is not None:
        xhat, dxhat, dmean, drstd = _normalized_tangent(x, tx, mean, rstd, dims)
    else:
        xhat, dxhat, dmean, drstd = (x - mean) * rstd, None, None, None
    shape = list(normalized_shape)
    dout = _affine_tangent(xhat, dxhat, w, t[2], t[3], shape)
    return dout, dmean, drstd


def _channel_shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


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


def _times(a, b):
    return None if a is None or b is None else a * b


def _plus(a, b):
    return a if b is None else (b if a is None else a + b)


def channel_sums(g, x, mu, rho):
    """Per channel ``(sum(g * (x - mu) * rho), sum(g))``: the weight and bias gradients
    of the batch-norm backward kernel, so no temporary the size of ``x``.  Under
    reverse mode (the kernel's own derivative does not cover this use) plain ops."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in (g, x, mu, rho)):
        shape = _channel_shape(x)
        dims = [0] + list(range(2, x.dim()))
        return (g * (x - mu.reshape(shape)) * rho.reshape(shape)).sum(dims), g.sum(dims)
    _, gw, gb = aten.native_batch_norm_backward.default(
        g, x, None, None, None, mu, rho, True, 0.0, [False, True, True]
    )
    return gw, gb


def _batch_norm_train(t, x, w, b, mean_out, invstd_out, tx, tw, tb):
    # With batch statistics mu, rho (per channel) and xhat = (x - mu) rho:
    # dxhat = rho (dx - m1 - xhat m2), m1 = mean(dx), m2 = mean(xhat dx), and
    # dout = w dxhat + xhat dw + db: per-channel coefficients on dx and x - mu.
    shape = _channel_shape(x)
    mu, rho = mean_out, invstd_out
    wv = w if w is not None else torch.ones_like(rho)
    c_x = _times(rho, tw)
    c_1 = tb
    c_dx = dmean = drstd = None
    if tx is not None:
        count = x.numel() // x.shape[1]
        sum_xhat_dx, sum_dx = channel_sums(tx, x, mu, rho)
        m1, m2 = sum_dx / count, sum_xhat_dx / count
        dmean, drstd = m1, -rho * rho * m2
        c_dx = wv * rho
        c_x = _plus(c_x, -wv * rho * rho * m2)
        c_1 = _plus(c_1, -wv * rho * m1)
    dout = per_channel_sum(shape, [(tx, c_dx)], (x, mu, c_x), c_1)
    return dout, dmean, drstd


def _batch_norm_eval(x, w, rm, rv, eps, tx, tw, tb, trm, trv):
    # out = (x - rm) rho w + b with rho = (rv + eps)^-1/2 fixed per channel.
    shape = _channel_shape(x)
    rho = (rv + eps).rsqrt()
    wv = w if w is not None else torch.ones_like(rho)
    drho = None if trv is None else -0.5 * rho ** 3 * trv
    d_rho_w = _plus(_times(rho, tw), _times(wv, drho))  # tangent of rho * w
    c_1 = tb
    if trm is not None:
        c_1 = _plus(c_1, -wv * rho * trm)
    c_dx = None if tx is None else wv * rho
    return per_channel_sum(shape, [(tx, c_dx)], (x, rm, d_rho_w), c_1)


def _batch_norm(t, ans, x, w, b, rm, rv, training, eps, trm=None, trv=None):
    out, save_mean, save_invstd = ans[0], ans[1], ans[2]
    if training:
        dims = [0] + list(range(2, x.dim()))
        save_mean, save_invstd = _visible_stats(x, save_mean, save_invstd, dims, eps)
        dout, dmean, drstd = _batch_norm_train(t, x, w, b, save_mean, save_invstd, t[0], t[1], t[2])
        return dout, dmean, drstd
    return _batch_norm_eval(x, w, rm, rv, eps, t[0], t[1], t[2], trm, trv), None, None


@defrule(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def _native_batch_norm_jvp(t, ans, x, w, b, rm, rv, training, momentum, eps):
    return _batch_norm(t, ans, x, w, b, rm, rv, training or rm is None, eps, t[3], t[4])


@defrule(aten._native_batch_norm_legit.no_stats)
def _batch_norm_no_stats_jvp(t, ans, x, w, b, training, momentum, eps):
    return _batch_norm(t, ans, x, w, b, None, None, True, eps)


@defrule(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_no_training_jvp(t, ans, x, w, b, rm, rv, momentum, eps):
    return _batch_norm(t, ans, x, w, b, rm, rv, False, eps, t[3], t[4])


@defrule(aten._native_batch_norm_legit_functional.default)
def _batch_norm_functional_jvp(t, ans, x, w, b, rm, rv, training, momentum, eps):
    d = _batch_norm(t, ans, x, w, b, rm, rv, training, eps, t[3], t[4])
    return d + (None, None)


@defrule(aten._batch_norm_with_update.default)
def _batch_norm_with_update_jvp(t, ans, x, w, b, rm, rv, momentum, eps):
    return _batch_norm(t, ans, x, w, b, rm, rv, True, eps) + (None,)


@defrule(aten._batch_norm_no_update.default)
def _batch_norm_no_update_jvp(t, ans, x, w, b, rm, rv, momentum, eps):
    return _batch_norm(t, ans, x, w, b, rm, rv, False, eps, t[3], t[4]) + (None,)


@defrule(aten.native_group_norm.default)
def _group_norm_jvp(t, ans, x, w, b, N, C, HxW, group, eps):
    out, mean, rstd = ans
    shape = _channel_shape(x)
    xg = x.reshape(N, group, -1)
    m, r = _visible_stats(xg, mean.reshape(N, group, 1), rstd.reshape(N, group, 1), [2], eps)
    if t[0] is not None:
        xhat, dxhat, dmean, drstd = _normalized_tangent(xg, t[0].reshape(N, group, -1), m, r, [2])
        dxhat = dxhat.reshape(x.shape)
        dmean, drstd = dmean.reshape(N, group), drstd.reshape(N, group)
    else:
        xhat, dxhat, dmean, drstd = (xg - m) * r, None, None, None
    xhat = xhat.reshape(x.shape)
    return _affine_tangent(xhat, dxhat, w, t[1], t[2], shape), dmean, drstd


# ---- pooling and resampling ---------------------------------------------------


def _gather_spatial(tx, indices, nd):
    """Pick ``tx`` at pooling ``indices``, which index each flattened spatial plane."""
    flat_t = tx.flatten(-nd)
    flat_i = indices.flatten(-nd)
    return flat_t.gather(-1, flat_i).reshape(indices.shape)


def _pool_with_indices(nd):
    def rule(t, ans, x, *args):
        out, indices = ans
        return _gather_spatial(t[0], indices, nd), None

    return rule


defrule(
    aten.max_pool2d_with_indices.default,
    aten.adaptive_max_pool2d.default,
    aten.fractional_max_pool2d.default,
)(_pool_with_indices(2))
defrule(
    aten.max_pool3d_with_indices.default,
    aten.adaptive_max_pool3d.default,
    aten.fractional_max_pool3d.default,
)(_pool_with_indices(3))
defrule(aten.max_pool1d_with_indices.default, aten.adaptive_max_pool1d.default)(_pool_with_indices(1))


@defrule(aten.max_pool2d.default)
def _max_pool2d_jvp(t, ans, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    _, indices = aten.max_pool2d_with_indices.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _gather_spatial(t[0], indices, 2)


@defrule(aten.max_pool3d.default)
def _max_pool3d_jvp(t, ans, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    _, indices = aten.max_pool3d_with_indices.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _gather_spatial(t[0], indices, 3)


for _op in (
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
    aten.adaptive_avg_pool1d.default,
    aten.upsample_nearest1d.default,
    aten.upsample_nearest2d.default,
    aten.upsample_nearest3d.default,
    aten.upsample_nearest1d.vec,
    aten.upsample_nearest2d.vec,
    aten.upsample_nearest3d.vec,
    aten._upsample_nearest_exact1d.default,
    aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact3d.default,
    aten._upsample_nearest_exact1d.vec,
    aten._upsample_nearest_exact2d.vec,
    aten._upsample_nearest_exact3d.vec,
    aten.upsample_linear1d.default,
    aten.upsample_bilinear2d.default,
    aten.upsample_trilinear3d.default,
    aten.upsample_bicubic2d.default,
    aten.upsample_linear1d.vec,
    aten.upsample_bilinear2d.vec,
    aten.upsample_trilinear3d.vec,
    aten.upsample_bicubic2d.vec,
    aten._upsample_bilinear2d_aa.default,
    aten._upsample_bicubic2d_aa.default,
    aten._upsample_bilinear2d_aa.vec,
    aten._upsample_bicubic2d_aa.vec,
    aten.max_unpool2d.default,
    aten.max_unpool3d.default,
):
    def_linear(_op)


# ---- attention ----------------------------------------------------------------


def _attention_probs(q, k, lse, attn_mask, is_causal, scale):
    s = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if lse is None:  # differentiable in q and k for reverse mode (the kernel's lse is not)
        p = s.softmax(-1)
    else:
        p = (s - lse.unsqueeze(-1)).exp()
    return p.nan_to_num(0.0)


@defrule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_cpu_jvp(t, ans, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    out, lse = ans
    if dropout_p:
        raise NotImplementedError(
            "fwdgrad: the JVP of scaled_dot_product_attention with dropout_p > 0 needs the "
            "dropout mask, which the fused CPU kernel does not return; use dropout_p=0 "
            "(e.g. model.eval()) inside the transform"
        )
    tq, tk, tv = t[0], t[1], t[2]
    tmask = t.kw.get("attn_mask")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dout = None
    if tv is not None:
        # P dV with the fused kernel: the same attention weights, new values.
        dout = aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, tv, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
    dlse = None
    if tq is not None or tk is not None or tmask is not None:
        visible = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad for a in (q, k, attn_mask)
        )
        p = _attention_probs(q, k, None if visible else lse, attn_mask, is_causal, scale)
        ds = None
        if tq is not None:
            ds = (tq @ k.transpose(-2, -1)) * scale
        if tk is not None:
            c = (q @ tk.transpose(-2, -1)) * scale
            ds = c if ds is None else ds + c
        if tmask is not None:
            ds = tmask if ds is None else ds + tmask
        pds = p * ds
        r = pds.sum(-1, keepdim=True)
        c = pds @ v - r * out
        dout = c if dout is None else dout + c
        dlse = r.squeeze(-1)
    return dout, dlse


# ---- embeddings ---------------------------------------------------------------


@defrule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def _embedding_bag_jvp(t, ans, weight, indices, offsets, scale_grad_by_freq=False, mode=0,
                       sparse=False, per_sample_weights=None, include_last_offset=False,
                       padding_idx=-1):
    out, offset2bag, bag_size, max_indices = ans
    tw = t[0]
    tpsw = t[6] if len(t) > 6 else None
    dout = None
    if mode == 2:  # max
        if tw is not None:
            cols = torch.arange(weight.shape[1], device=weight.device).expand_as(max_indices)
            valid = max_indices >= 0
            dout = torch.where(valid, tw[max_indices.clamp_min(0), cols], 0.0).to(tw.dtype)
        return dout, None, None, None
    if tw is not None:
        dout = aten._embedding_bag.default(
            tw, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
            include_last_offset, padding_idx,
        )[0]
    if tpsw is not None:
        c = aten._embedding_bag.default(
            weight, indices, offsets, scale_grad_by_freq, mode, sparse, tpsw,
            include_last_offset, padding_idx,
        )[0]
        dout = c if dout is None else dout + c
    return dout, None, None, None


# ---- losses -------------------------------------------------------------------


def _reduce(x, reduction):
    if reduction == 1:
        return x.mean()
    if reduction == 2:
        return x.sum()
    return x


@defrule(aten.mse_loss.default)
def _mse_jvp(t, ans, x, y, reduction=1):
    d = None
    if t[0] is not None:
        d = t[0]
    if t[1] is not None:
        d = -t[1] if d is None else d - t[1]
    return _reduce(2 * (x - y) * d, reduction)


@defrule(aten.nll_loss_forward.default)
def _nll_jvp(t, ans, x, target, weight, reduction, ignore_index):
    return aten.nll_loss_forward.default(t[0], target, weight, reduction, ignore_index)[0], None


@defrule(aten.nll_loss2d_forward.default)
def _nll2d_jvp(t, ans, x, target, weight, reduction, ignore_index):
    return aten.nll_loss2d_forward.default(t[0], target, weight, reduction, ignore_index)[0], None


@defrule(aten.binary_cross_entropy.default)
def _bce_jvp(t, ans, x, y, weight=None, reduction=1):
    d = 0
    if t[0] is not None:
        d = t[0] * (x - y) / (x * (1 - x)).clamp_min(1e-12)
    if t[1] is not None:
        d = d + t[1] * ((1 - x).log().clamp_min(-100) - x.log().clamp_min(-100))
    if weight is not None:
        d = d * weight
    return _reduce(d, reduction)
