"""Neural-network ops: convolution, normalisation, pooling, attention, embeddings, losses.

The primal always comes from PyTorch's fused kernel; the tangent uses the
cheapest expression we know (for attention, an SDPA call for the ``P dV``
part and the saved log-sum-exp to rebuild ``P`` for the rest).
"""

import torch
import torch.nn.functional as F

from ..registry import Tangents, curvature_term, def_linear, def_multilinear, defrule, tmul, tsub, tsum
from ..slicing import fresh_ok
from .reductions import _vector_norm_jvp

aten = torch.ops.aten


# ---- convolution --------------------------------------------------------------


def _bias_shape(bias, out):
    return bias.reshape([1, -1] + [1] * (out.dim() - 2))


@defrule(aten.convolution.default)
def _conv_jvp(t, ans, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    def conv(a, k):
        return aten.convolution.default(a, k, None, stride, padding, dilation, transposed, output_padding, groups)

    return tsum(None if t[0] is None else conv(t[0], w), None if t[1] is None else conv(x, t[1]),
                None if t[2] is None else _bias_shape(t[2], ans))


# ---- normalisation ------------------------------------------------------------


def _normalized_tangent(x, tx, mean, rstd, dims):
    """Tangents of ``xhat = (x - mean) * rstd`` and of ``rstd`` for statistics over ``dims``."""
    xhat = (x - mean) * rstd
    dmean = tx.mean(dims, keepdim=True)
    c = (xhat * tx).mean(dims, keepdim=True)
    dxhat = rstd * (tx - dmean - xhat * c)
    drstd = -rstd * rstd * c
    return xhat, dxhat, dmean, drstd


def _affine_tangent(dxhat, w, xhat, tw, tb, shape):
    """Tangent of ``xhat * w + b`` given ``dxhat``; ``xhat()`` is computed only if ``w`` has a tangent."""
    return tsum(
        dxhat if dxhat is None or w is None else dxhat * w.reshape(shape),
        None if tw is None else xhat() * tw.reshape(shape),
        None if tb is None else tb.reshape(shape),
    )


# The Jacobian of xhat = (x - mean) * rstd with respect to x, with the statistics
# taken over n elements, is rstd (I - 1 1^T / n - xhat xhat^T / n): symmetric.  So
# its JVP equals its VJP, and PyTorch's fused normalisation backward kernel
# computes it in one pass.  Autograd differentiates that kernel correctly (its
# double-backward formula), but it treats the forward kernel's mean and rstd
# outputs as constants; the few terms below that use them directly take
# differentiable statistics when reverse mode may differentiate them.


def _visible_stats(x, mean, rstd, dims, eps):
    """``mean`` and ``rstd`` as reverse mode must see them: recomputed with
    differentiable ops when ``x`` requires grad, else the kernel's outputs."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return mean, rstd
    m = x.mean(dims, keepdim=True)
    r = (x.var(dims, correction=0, keepdim=True) + eps).rsqrt()
    return m.reshape(mean.shape), r.reshape(rstd.shape)


@defrule(aten.native_layer_norm.default)
def _layer_norm_jvp(t, ans, x, normalized_shape, w, b, eps):
    out, mean, rstd = ans
    tx, tw, tb = t[0], t[2], t[3]
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    vmean, vrstd = _visible_stats(x, mean, rstd, dims, eps)
    dxhat = dmean = drstd = None
    if tx is not None:
        # A low-precision input with float32 weights (autocast) runs a mixed
        # kernel that computes in float32 (mean and rstd come out float32):
        # so does the tangent.
        xs, txs = (x, tx) if x.dtype == mean.dtype else (x.to(mean.dtype), tx.to(mean.dtype))
        dxhat = aten.native_layer_norm_backward.default(
            txs, xs, normalized_shape, mean, rstd, None, None, [True, False, False]
        )[0]
        dmean = tx.mean(dims, keepdim=True)
        # rstd = (var + eps)^(-1/2), d var = 2 mean((x - mean) tx)
        drstd = -(vrstd * vrstd * vrstd) * ((x - vmean) * tx).mean(dims, keepdim=True)
    dout = _affine_tangent(dxhat, w, lambda: (x - vmean) * vrstd, tw, tb, list(normalized_shape))
    return dout, dmean, drstd


def _channel_shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def _batch_norm_train(x, w, save_mean, save_invstd, eps, tx, tw, tb):
    shape = _channel_shape(x)
    dims = [0] + list(range(2, x.dim()))
    vmean, vrstd = _visible_stats(x, save_mean.reshape(shape), save_invstd.reshape(shape), dims, eps)
    dout = dmean = drstd = None
    if tx is not None:
        # The weight scales whole channels and the Jacobian acts within each
        # channel, so they commute: the kernel's input gradient with weight w is
        # w * dxhat, our tangent.  Its weight and bias gradients are sum(tx * xhat)
        # and sum(tx) per channel: the statistics' tangents come for free.  (Its
        # double-backward formula differentiates all three outputs, but only
        # with a weight: pass ones when there is none.)
        wk = w if w is not None else torch.ones_like(save_invstd)
        n = x.numel() // x.shape[1]
        lean = fresh_ok(x, tx, wk, save_mean, save_invstd)
        # The kernel's input gradient allocates a temporary the size of x; when
        # nothing records the tangent, take only its channel sums from it and
        # build w * dxhat = w rstd (tx - sum_t / n) - w rstd^2 (x - mean) sum_t_xhat / n
        # in one buffer.
        dout, sum_t_xhat, sum_t = aten.native_batch_norm_backward.default(
            tx, x, wk, None, None, save_mean, save_invstd, True, eps, [not lean, True, True]
        )
        if lean:
            scale = wk * save_invstd
            dout = (x - save_mean.reshape(shape)).mul_((-scale * save_invstd * sum_t_xhat / n).reshape(shape))
            dout = dout.addcmul_(tx, scale.reshape(shape)).sub_((scale * sum_t / n).reshape(shape))
        dmean = sum_t / n
        drstd = -vrstd.reshape(-1) * vrstd.reshape(-1) * sum_t_xhat / n

    # dout already holds the weight: pass w=None so it is not applied twice.
    dout = _affine_tangent(dout, None, lambda: (x - vmean) * vrstd, tw, tb, shape)
    return dout, dmean, drstd


def _batch_norm_eval(x, w, rm, rv, eps, tx, tw, tb, trm, trv):
    shape = _channel_shape(x)
    rstd = (rv + eps).rsqrt().reshape(shape)
    xc = x - rm.reshape(shape)
    dxhat = tsum(
        tmul(tx, rstd),
        None if trm is None else -trm.reshape(shape) * rstd,
        None if trv is None else -0.5 * xc * rstd * rstd * rstd * trv.reshape(shape),
    )
    return _affine_tangent(dxhat, w, lambda: xc * rstd, tw, tb, shape)


def _batch_norm(t, ans, x, w, b, rm, rv, training, eps, trm=None, trv=None):
    out, save_mean, save_invstd = ans[0], ans[1], ans[2]
    if training:
        dout, dmean, drstd = _batch_norm_train(x, w, save_mean, save_invstd, eps, t[0], t[1], t[2])
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
    m, r = mean.reshape(N, group, 1), rstd.reshape(N, group, 1)
    if t[0] is not None:
        xhat, dxhat, dmean, drstd = _normalized_tangent(xg, t[0].reshape(N, group, -1), m, r, [2])
        dxhat = dxhat.reshape(x.shape)
        dmean, drstd = dmean.reshape(N, group), drstd.reshape(N, group)
    else:
        xhat, dxhat, dmean, drstd = (xg - m) * r, None, None, None
    return _affine_tangent(dxhat, w, lambda: xhat.reshape(x.shape), t[1], t[2], shape), dmean, drstd


def weight_norm_dims(v, dim):
    """The dimensions ``_weight_norm_interface`` reduces: all but ``dim``."""
    dim = dim % v.dim() if v.dim() else 0
    return [d for d in range(v.dim()) if d != dim]


@defrule(aten._weight_norm_interface.default)
def _weight_norm_jvp(t, ans, v, g, dim=0):
    # w = g v / n with n = ||v|| over all dimensions but ``dim`` (kept as size 1):
    # dn = <v, dv> / n and dw = (dg v + g dv) / n - w dn / n.
    w, n = ans
    dv, dg = t[0], t[1]
    dn = None if dv is None else (v * dv).sum(weight_norm_dims(v, dim), keepdim=True) / n
    dw = tsub(tsum(tmul(dg, v), tmul(g, dv)), tmul(w, dn))
    return None if dw is None else dw / n, dn


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


for _op in (
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
    aten.upsample_nearest1d.default,
    aten.upsample_nearest2d.default,
    aten.upsample_nearest3d.default,
    aten._upsample_nearest_exact1d.default,
    aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact3d.default,
    aten.upsample_linear1d.default,
    aten.upsample_bilinear2d.default,
    aten.upsample_trilinear3d.default,
    aten.upsample_bicubic2d.default,
    aten._upsample_bilinear2d_aa.default,
    aten._upsample_bicubic2d_aa.default,
    aten.max_unpool2d.default,
    aten.max_unpool3d.default,
):
    def_linear(_op)


def _grid_sampler_jvp(backward):
    """Linear in the input; along the grid, each output point moves with its own
    sample location.  The derivative of every output channel with respect to its
    two (three) grid coordinates comes from ATen's grid-sampler backward with
    channels folded into the batch and a unit output gradient, so every padding
    and interpolation mode is handled as ATen handles it."""
    forward = {aten.grid_sampler_2d_backward.default: aten.grid_sampler_2d.default,
               aten.grid_sampler_3d_backward.default: aten.grid_sampler_3d.default}[backward]

    def rule(t, ans, x, grid, interpolation_mode, padding_mode, align_corners):
        out = None if t[0] is None else forward(t[0], grid, interpolation_mode, padding_mode, align_corners)
        if t[1] is None or interpolation_mode == 1:  # nearest: piecewise constant in the grid
            return out
        n, c = x.shape[:2]
        per_channel = x.reshape(n * c, 1, *x.shape[2:])
        grids = grid.repeat_interleave(c, 0)
        ones = torch.ones((n * c, 1) + ans.shape[2:], dtype=ans.dtype, device=ans.device)
        jac = backward(ones, per_channel, grids, interpolation_mode, padding_mode, align_corners, [False, True])[1]
        return tsum(out, (jac * t[1].repeat_interleave(c, 0)).sum(-1).reshape(ans.shape))

    return rule


defrule(aten.grid_sampler_2d.default)(_grid_sampler_jvp(aten.grid_sampler_2d_backward.default))
defrule(aten.grid_sampler_3d.default)(_grid_sampler_jvp(aten.grid_sampler_3d_backward.default))


# ---- attention ----------------------------------------------------------------


def _attention_probs(q, k, lse, attn_mask, is_causal, scale, in_place=False):
    """The attention weights P, from the kernel's log-sum-exp ``lse`` (or, when
    ``lse`` is None, a differentiable softmax).  ``in_place``: build them in one
    buffer (no reverse mode over them, no tracer)."""
    if in_place:
        s = (q * scale) @ k.transpose(-2, -1)
    else:
        s = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill_(~attn_mask, float("-inf")) if in_place else s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s.add_(attn_mask) if in_place else s + attn_mask
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill_(~causal, float("-inf")) if in_place else s.masked_fill(~causal, float("-inf"))
    if lse is None:  # differentiable in q and k for reverse mode (the kernel's lse is not)
        p = s.softmax(-1)
    elif in_place:
        return s.sub_(lse.unsqueeze(-1)).exp_().nan_to_num_(0.0)
    else:
        p = (s - lse.unsqueeze(-1)).exp()
    return p.nan_to_num(0.0)


def kv_groups(q, k):
    """How many query heads share each key/value head (grouped-query attention,
    ``enable_gqa``: the fused CPU kernel takes keys and values with fewer heads)."""
    if q.dim() < 3 or k.dim() < 3 or q.shape[-3] == k.shape[-3]:
        return 1
    return q.shape[-3] // k.shape[-3]


def repeat_kv(x, groups):
    """Keys or values (or their tangents) repeated to one head per query head, as
    ``enable_gqa`` pairs them: query head h reads key head h // groups."""
    if x is None or groups == 1:
        return x
    return x.repeat_interleave(groups, dim=-3)


def sum_kv(x, groups):
    """The adjoint of ``repeat_kv``: per-query-head terms summed back onto their key head."""
    if x is None or groups == 1:
        return x
    shape = x.shape[:-3] + (x.shape[-3] // groups, groups) + x.shape[-2:]
    return x.reshape(shape).sum(-3)


@defrule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_cpu_jvp(t, ans, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    out, lse = ans  # (the kernel itself rejects dropout_p > 0; F.sdpa then takes the math path)
    tq, tk, tv = t[0], t[1], t[2]
    tmask = t.kw.get("attn_mask")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if tq is None and tk is None and tmask is None:
        if tv is None:
            return None, None
        # P dV with the fused kernel: the same attention weights, new values.
        dout = aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, tv, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
        return dout, None
    groups = kv_groups(q, k)
    k, v, tk, tv = (repeat_kv(a, groups) for a in (k, v, tk, tv))
    # With S = scale q k^T + mask and P = softmax(S): dP = P * (dS - rowsum(P * dS)),
    # so d out = P dV + (P * dS) V - rowsum(P * dS) out, and d lse = rowsum(P * dS).
    visible = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (q, k, attn_mask))
    tensors = [a for a in (q, k, v, out, lse, attn_mask, tq, tk, tv, tmask) if a is not None]
    if not visible and fresh_ok(*tensors):
        return _sdpa_tangent_in_place(q, k, v, out, lse, attn_mask, is_causal, scale, tq, tk, tv, tmask)
    p = _attention_probs(q, k, None if visible else lse, attn_mask, is_causal, scale)
    dout = None if tv is None else p @ tv
    ds = tsum(None if tq is None else (tq @ k.transpose(-2, -1)) * scale,
              None if tk is None else (q @ tk.transpose(-2, -1)) * scale, tmask)
    pds = p * ds
    r = pds.sum(-1, keepdim=True)
    return tsum(dout, pds @ v - r * out), r.squeeze(-1)


def _sdpa_tangent_in_place(q, k, v, out, lse, attn_mask, is_causal, scale, tq, tk, tv, tmask):
    """The SDPA tangent with two L x S buffers (P and P * dS) instead of six."""
    p = _attention_probs(q, k, lse, attn_mask, is_causal, scale, in_place=True)
    dout = None if tv is None else p @ tv
    # dS = scale (dq k^T + q dk^T) as one product over the concatenated features
    if tq is not None and tk is not None:
        ds = torch.cat([tq, q], -1).mul_(scale) @ torch.cat([k, tk], -1).transpose(-2, -1)
    elif tq is not None:
        ds = (tq * scale) @ k.transpose(-2, -1)
    elif tk is not None:
        ds = (q * scale) @ tk.transpose(-2, -1)
    else:
        ds = tmask.expand(p.shape).clone()
        tmask = None
    if tmask is not None:
        ds = ds.add_(tmask)
    pds = ds.mul_(p)
    del p
    r = pds.sum(-1, keepdim=True)
    c = (pds @ v).addcmul_(r, out, value=-1)
    del pds
    dout = c if dout is None else dout.add_(c)
    return dout, r.squeeze(-1)


# ---- distances ----------------------------------------------------------------


def _cdist_uses_mm(x1, x2, p, compute_mode):
    """Whether ``_cdist_forward`` takes its matrix-product path (mirrors ATen's choice)."""
    if p != 2 or compute_mode == 2:
        return False
    return compute_mode == 1 or x1.shape[-2] > 25 or x2.shape[-2] > 25


@defrule(aten._cdist_forward.default)
def _cdist_jvp(t, ans, x1, x2, p, compute_mode):
    t1, t2 = t[0], t[1]
    if _cdist_uses_mm(x1, x2, p, compute_mode):
        # <x1_i - x2_j, t1_i - t2_j> / d_ij, expanded into matrix products like the primal
        num = tsum(None if t1 is None else (x1 * t1).sum(-1, keepdim=True) - t1 @ x2.mT,
                   None if t2 is None else (x2 * t2).sum(-1).unsqueeze(-2) - x1 @ t2.mT)
        return torch.where(ans == 0, 0.0, num / ans)
    # the norm of each pairwise difference, differentiated like linalg.vector_norm
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    tdiff = tsub(None if t1 is None else t1.unsqueeze(-2), None if t2 is None else t2.unsqueeze(-3))
    return _vector_norm_jvp(Tangents((tdiff,)), ans, diff, p, -1)


@defrule(aten._pdist_forward.default)
def _pdist_jvp(t, ans, x, p=2.0):
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return _vector_norm_jvp(Tangents((t[0][i] - t[0][j],)), ans, x[i] - x[j], p, -1)


# Their backward ops have no double backward in ATen; forward over reverse (hvp)
# needs these.  Each is linear in the incoming gradient ``g``; the rest is the
# curvature of the distance.


@defrule(aten._cdist_backward.default)
def _cdist_backward_jvp(t, ans, g, x1, x2, p, cdist):
    # (the tangent of the ``cdist`` argument is implied by those of x1 and x2)
    out = None if t[0] is None else aten._cdist_backward.default(t[0], x1, x2, p, cdist)
    if t[1] is not None or t[2] is not None:
        c = curvature_term(lambda a, b: aten._cdist_forward.default(a, b, p, None),
                           lambda tt, d, a, b: _cdist_jvp(tt, d, a, b, p, None), g, (x1, x2), (t[1], t[2]))[0]
        out = tsum(out, c)
    return out


@defrule(aten._pdist_backward.default)
def _pdist_backward_jvp(t, ans, g, x, p, pdist):
    out = None if t[0] is None else aten._pdist_backward.default(t[0], x, p, pdist)
    if t[1] is not None:
        c = curvature_term(lambda a: aten._pdist_forward.default(a, p),
                           lambda tt, d, a: _pdist_jvp(tt, d, a, p), g, (x,), (t[1],))[0]
        out = tsum(out, c)
    return out


# ---- embeddings ---------------------------------------------------------------


@defrule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def _embedding_bag_jvp(t, ans, weight, indices, offsets, scale_grad_by_freq=False, mode=0,
                       sparse=False, per_sample_weights=None, include_last_offset=False,
                       padding_idx=-1):
    out, offset2bag, bag_size, max_indices = ans
    tw = t[0]
    tpsw = t[6] if len(t) > 6 else None
    if mode == 2:  # max
        dout = None
        if tw is not None:
            # the tangent of the row that won each column; an empty bag is 0
            cols = torch.arange(weight.shape[1], device=weight.device).expand_as(max_indices)
            valid = (max_indices >= 0) & (bag_size > 0).unsqueeze(-1)
            dout = torch.where(valid, tw[max_indices.clamp_min(0), cols], 0.0)
        return dout, None, None, None

    def bag(w, psw):  # linear in each of the weight and the per-sample weights
        return aten._embedding_bag.default(w, indices, offsets, scale_grad_by_freq, mode, sparse, psw,
                                           include_last_offset, padding_idx)[0]

    return tsum(None if tw is None else bag(tw, per_sample_weights),
                None if tpsw is None else bag(weight, tpsw)), None, None, None


# The embedding-bag backward ops do not see the weights: they are linear in the
# gradient and in the per-sample weights separately.
def_multilinear(aten._embedding_bag_backward.default, 0, 10)
def_multilinear(aten._embedding_bag_dense_backward.default, 0, 8)
def_multilinear(aten._embedding_bag_per_sample_weights_backward.default, 0, 1)


# ---- losses -------------------------------------------------------------------


def _reduce(x, reduction):
    if reduction == 1:
        return x.mean()
    if reduction == 2:
        return x.sum()
    return x


@defrule(aten.mse_loss.default)
def _mse_jvp(t, ans, x, y, reduction=1):
    return _reduce(2 * (x - y) * tsub(t[0], t[1]), reduction)


@defrule(aten.huber_loss.default)
def _huber_jvp(t, ans, x, y, reduction=1, delta=1.0):
    return _reduce((x - y).clamp(-delta, delta) * tsub(t[0], t[1]), reduction)


@defrule(aten.smooth_l1_loss.default)
def _smooth_l1_jvp(t, ans, x, y, reduction=1, beta=1.0):
    r = x - y
    slope = r.sign() if beta == 0 else (r / beta).clamp(-1, 1)
    return _reduce(slope * tsub(t[0], t[1]), reduction)


@defrule(aten.soft_margin_loss.default)
def _soft_margin_jvp(t, ans, x, y, reduction=1):
    # loss = log(1 + exp(-y x)); d loss = -sigmoid(-y x) (y dx + x dy)
    return _reduce(-(-y * x).sigmoid() * tsum(tmul(y, t[0]), tmul(x, t[1])), reduction)


@defrule(aten.binary_cross_entropy_with_logits.default)
def _bce_logits_jvp(t, ans, x, y, weight=None, pos_weight=None, reduction=1):
    # loss = -w (pw y log s(x) + (1 - y) log s(-x)), s the sigmoid
    tx, ty, tw, tpw = (tuple(t) + (None, None))[:4]  # weight and pos_weight may be left out
    log_s, log_1ms = F.logsigmoid(x), F.logsigmoid(-x)
    pw, pw_y = (1, y) if pos_weight is None else (pos_weight, pos_weight * y)

    def dx(s):  # the derivative in x, from s = sigmoid(x)
        return (s - y) if pos_weight is None else (s * (1 - y + pw_y) - pw_y)

    d = tsum(None if tx is None else dx(x.sigmoid()) * tx,
             None if ty is None else -(pw * log_s - log_1ms) * ty,
             None if tpw is None else -y * log_s * tpw)
    if weight is not None:
        d = tmul(d, weight)
    d = tsum(d, None if tw is None else -(pw_y * log_s + (1 - y) * log_1ms) * tw)
    return None if d is None else _reduce(d, reduction)


@defrule(aten.binary_cross_entropy.default)
def _bce_jvp(t, ans, x, y, weight=None, reduction=1):
    # loss = -w (y log x + (1 - y) log(1 - x)), logs clamped at -100 like ATen
    tw = t[2] if len(t) > 2 else None  # the weight may be left out
    d = tsum(None if t[0] is None else t[0] * (x - y) / (x * (1 - x)).clamp_min(1e-12),
             None if t[1] is None else t[1] * ((1 - x).log().clamp_min(-100) - x.log().clamp_min(-100)))
    if weight is not None:
        d = tmul(d, weight)
    d = tsum(d, None if tw is None else
             -(y * x.log().clamp_min(-100) + (1 - y) * (1 - x).log().clamp_min(-100)) * tw)
    return None if d is None else _reduce(d, reduction)


@defrule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def _nll_jvp(t, ans, x, target, weight, reduction, ignore_index):
    # linear in the input (the class weights are not differentiable, as in ATen)
    if t[0] is None:
        return None, None
    return _nll_op(x)(t[0], target, weight, reduction, ignore_index)[0], None


def _nll_op(x):
    return aten.nll_loss_forward.default if x.dim() <= 2 else aten.nll_loss2d_forward.default


@defrule(aten.multi_margin_loss.default)
def _multi_margin_jvp(t, ans, x, target, p=1, margin=1, weight=None, reduction=1):
    # loss_n = sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C
    C = x.shape[-1] if x.dim() else 1
    x2, g2, y = x.reshape(-1, C), t[0].reshape(-1, C), target.reshape(-1, 1)
    h = margin - x2.gather(1, y) + x2
    active = (h > 0).scatter(1, y, False)
    coef = active * (p * h.pow(p - 1) if p != 1 else 1)
    d = ((coef * g2).sum(1) - coef.sum(1) * g2.gather(1, y).squeeze(1)) / C
    if weight is not None:
        d = d * weight[y.squeeze(1)]
    if x.dim() <= 1:
        d = d.reshape(())
    return _reduce(d, reduction)


@defrule(aten.multilabel_margin_loss_forward.default)
def _multilabel_margin_jvp(t, ans, x, target, reduction):
    # loss_n = sum_{j target, i not target} max(0, 1 - x_{y_j} + x_i) / C,
    # with the targets listed before the first -1
    g = t[0]
    C = x.shape[-1] if x.dim() else 1
    x2, g2 = x.reshape(-1, C), g.reshape(-1, C)
    tg = target.reshape(-1, C)
    is_target = ans[1].reshape(-1, C)
    listed = (tg >= 0).cumprod(1).bool()
    y = tg.clamp_min(0)
    h = 1 - x2.gather(1, y).unsqueeze(2) + x2.unsqueeze(1)  # [n, j, i]
    active = (h > 0) & listed.unsqueeze(2) & (is_target == 0).unsqueeze(1)
    d = ((active.sum(1) * g2).sum(1) - (active.sum(2) * g2.gather(1, y)).sum(1)) / C
    if x.dim() <= 1:
        d = d.reshape(())
    return _reduce(d, reduction), None


class CTCLattice:
    """The alignment lattice of a CTC batch, for the alpha and beta recursions' tangents.

    ``ext`` (N, S) holds each sequence's extended labels (blank, l1, blank, l2, ...,
    blank; S = 2 max_target_length + 1), ``valid`` (N, T, S) the lattice points in
    use (frame < input length, position < 2 target length + 1), ``skip`` (N, S)
    whether position s may be reached from s - 2 (a label differing from the one
    before it).  ``lp`` and ``dlp`` are log_probs and its tangent at each point.
    """

    def __init__(self, log_probs, targets, input_lengths, target_lengths, blank):
        T, N, _ = log_probs.shape
        dev = log_probs.device
        self.in_len = torch.as_tensor(input_lengths, device=dev).long()
        self.tg_len = torch.as_tensor(target_lengths, device=dev).long()
        L = int(self.tg_len.max()) if N else 0
        if targets.dim() == 1:  # concatenated targets
            starts = torch.cumsum(self.tg_len, 0) - self.tg_len
            pos = (starts.unsqueeze(1) + torch.arange(L, device=dev)).clamp_max(max(targets.numel() - 1, 0))
            labels = targets[pos] if targets.numel() else torch.zeros(N, L, dtype=torch.long, device=dev)
        else:
            labels = targets[:, :L]
        labels = labels.long().masked_fill(torch.arange(L, device=dev) >= self.tg_len.unsqueeze(1), blank)
        S = 2 * L + 1
        self.ext = torch.full((N, S), blank, dtype=torch.long, device=dev)
        self.ext[:, 1::2] = labels
        s = torch.arange(S, device=dev)
        self.S_len = 2 * self.tg_len + 1
        frames = torch.arange(T, device=dev)
        self.valid = (frames.view(1, T, 1) < self.in_len.view(N, 1, 1)) & (s.view(1, 1, S) < self.S_len.view(N, 1, 1))
        before = torch.cat([torch.full((N, 2), -1, dtype=torch.long, device=dev), self.ext[:, :-2]], 1)
        self.skip = (self.ext != blank) & (self.ext != before) & (s >= 2)
        self.shape = (N, T, S)

    def gather(self, x):
        """x (T, N, C) at each lattice point's label: (N, T, S)."""
        T, N, _ = x.shape
        return x.transpose(0, 1).gather(2, self.ext.unsqueeze(1).expand(N, T, -1))


def _shifted(x, k, fill):
    """x (N, S) moved k places along S (right for k > 0, left for k < 0), filled with ``fill``."""
    pad = torch.full(x.shape[:-1] + (abs(k),), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x[..., :-k]], -1) if k > 0 else torch.cat([x[..., -k:], pad], -1)


def _lse_step(candidates, dcandidates):
    """log-sum-exp of the stacked candidates and its tangent (zero where all are -inf)."""
    m = torch.logsumexp(candidates, 0)
    w = torch.where(m.isinf(), 0.0, (candidates - m).exp())
    return m, (w * dcandidates).sum(0)


def ctc_alpha_tangent(lattice, log_alpha, lp, dlp):
    """Tangent of the forward variables log_alpha (N, T, S) along log-probability tangents."""
    N, T, S = lattice.shape
    la = log_alpha.masked_fill(~lattice.valid, float("-inf"))
    inf = float("-inf")
    rows = [torch.where(torch.arange(S, device=la.device) < 2, dlp[:, 0], 0.0).masked_fill(~lattice.valid[:, 0], 0.0)]
    for t in range(1, T):
        prev, dprev = la[:, t - 1], rows[-1]
        c = torch.stack([prev, _shifted(prev, 1, inf), _shifted(prev, 2, inf).masked_fill(~lattice.skip, inf)])
        dc = torch.stack([dprev, _shifted(dprev, 1, 0.0), _shifted(dprev, 2, 0.0)])
        _, d = _lse_step(c, dc)
        rows.append((dlp[:, t] + d).masked_fill(~lattice.valid[:, t] | la[:, t].isinf(), 0.0))
    return torch.stack(rows, 1)


def ctc_beta(lattice, lp, dlp):
    """The backward variables log_beta (N, T, S) and their tangent."""
    N, T, S = lattice.shape
    inf = float("-inf")
    s = torch.arange(S, device=lp.device)
    last = lattice.in_len - 1
    ends = (s == (lattice.S_len - 1).unsqueeze(1)) | (s == (lattice.S_len - 2).unsqueeze(1))  # (N, S)
    skip_next = _shifted(lattice.skip, -2, False)  # s may reach s + 2
    nxt, dnxt = torch.full((N, S), inf, dtype=lp.dtype, device=lp.device), torch.zeros((N, S), dtype=lp.dtype, device=lp.device)
    betas, dbetas = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        c = torch.stack([nxt, _shifted(nxt, -1, inf), _shifted(nxt, -2, inf).masked_fill(~skip_next, inf)])
        dc = torch.stack([dnxt, _shifted(dnxt, -1, 0.0), _shifted(dnxt, -2, 0.0)])
        m, d = _lse_step(c, dc)
        at_end = (t == last).unsqueeze(1)
        before_end = (t < last).unsqueeze(1)
        cur = torch.where(at_end & ends, lp[:, t], torch.where(before_end, lp[:, t] + m, inf))
        dcur = torch.where(at_end & ends, dlp[:, t], torch.where(before_end, dlp[:, t] + d, 0.0))
        ok = lattice.valid[:, t] & ~cur.isinf()
        cur, dcur = cur.masked_fill(~ok, inf), dcur.masked_fill(~ok, 0.0)
        betas[t], dbetas[t] = cur, dcur
        nxt, dnxt = cur, dcur
    return torch.stack(betas, 1), torch.stack(dbetas, 1)


def _ctc_jvp(t, ans, log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
    """The loss of each sequence is a scalar, so its tangent is <dL/dlog_probs, t>: one
    backward pass (the alpha-beta recursion).  ATen's backward returns the gradient
    for log-softmax inputs, exp(log_probs) + dL/dlog_probs on the frames in use;
    the exp term is taken back out so that any input direction is right.  The
    forward variables log_alpha get their tangent from the alpha recursion when
    autograd records (the backward op reads them: forward over reverse needs it)."""
    nll, log_alpha = ans
    backward = aten._ctc_loss_backward.Tensor if isinstance(input_lengths, torch.Tensor) \
        else aten._ctc_loss_backward.default
    grad = backward(torch.ones_like(nll), log_probs, targets, input_lengths, target_lengths,
                    nll, log_alpha, blank, zero_infinity)
    lengths = torch.as_tensor(input_lengths, device=log_probs.device)
    frames = torch.arange(log_probs.shape[0], device=log_probs.device)
    in_use = (frames.unsqueeze(1) < lengths).reshape(log_probs.shape[0], -1, 1) \
        if log_probs.dim() == 3 else (frames < lengths).unsqueeze(1)
    grad = grad - log_probs.exp() * in_use
    d = (grad * t[0]).sum((0, -1)) if log_probs.dim() == 3 else (grad * t[0]).sum()
    dalpha = None
    if log_probs.dim() == 3 and torch.is_grad_enabled():  # (only a backward pass reads it)
        lattice = CTCLattice(log_probs, targets, input_lengths, target_lengths, blank)
        dalpha = ctc_alpha_tangent(lattice, log_alpha, lattice.gather(log_probs), lattice.gather(t[0]))
    # an impossible alignment has an infinite loss that no small change makes finite
    return torch.where(nll.isinf(), 0.0, d), dalpha


defrule(aten._ctc_loss.default, aten._ctc_loss.Tensor)(_ctc_jvp)


# ---- fused linear + cross-entropy (torch.nn.functional.linear_cross_entropy) ----


def _linear_ce_tangent(x, w, target, b, class_weight, ignore_index, chunk, tx, tw, tb):
    """Per-sample tangent of class_weight[y] * (logsumexp(z) - z_y), z = x w^T + b.

    Like the fused op it works through the batch in chunks, so the logits of
    only ``chunk`` rows exist at a time: dL = softmax(z) . dz - dz_y with
    dz = dx w^T + x dw^T + db.
    """
    parts = []
    for start in range(0, x.shape[0], max(chunk, 1)):
        rows = slice(start, start + chunk)
        z = x[rows] @ w.mT
        if b is not None:
            z = z + b
        dz = tsum(None if tx is None else tx[rows] @ w.mT, None if tw is None else x[rows] @ tw.mT, tb)
        dz = dz.expand_as(z)
        y = target[rows]
        valid = y != ignore_index
        y = torch.where(valid, y, 0)
        d = (z.softmax(-1) * dz).sum(-1) - dz.gather(1, y.unsqueeze(1)).squeeze(1)
        scale = valid if class_weight is None else class_weight[y] * valid
        parts.append(d * scale)
    return torch.cat(parts)


def _linear_ce_normaliser(target, class_weight, ignore_index):
    valid = target != ignore_index
    if class_weight is None:
        return valid.sum()
    return (class_weight[torch.where(valid, target, 0)] * valid).sum()


def _register_linear_cross_entropy():
    try:
        from torch.nn.modules import linear_cross_entropy  # noqa: F401  (registers the ops)
    except ImportError:  # pragma: no cover - older torch
        return
    ops = torch.ops.torch_nn

    @defrule(ops._linear_cross_entropy_batch_chunked.default)
    def _linear_ce_jvp(t, ans, x, w, target, b, class_weight, reduction, ignore_index,
                       label_smoothing, chunk, *options):
        if label_smoothing:
            raise NotImplementedError("fwdgrad: the fused linear_cross_entropy JVP needs label_smoothing=0")
        d = _linear_ce_tangent(x, w, target, b, class_weight, ignore_index, chunk, t[0], t[1], t[3])
        d = d.sum()
        if reduction == "mean":
            d = d / _linear_ce_normaliser(target, class_weight, ignore_index)
        # The other outputs are the gradients the op precomputes for its own
        # backward; they are not differentiable (ATen has no double backward).
        return d, None, None, None

    @defrule(ops._linear_cross_entropy_batch_chunked_no_reduction.default)
    def _linear_ce_none_jvp(t, ans, x, w, target, b, class_weight, ignore_index, chunk, *options):
        return _linear_ce_tangent(x, w, target, b, class_weight, ignore_index, chunk, t[0], t[1], t[3])


_register_linear_cross_entropy()
