"""Focused checks of the JVP rules for convolution, normalisation, pooling, attention, embeddings, distances and losses (fwdgrad/rules/nn.py).

Everything runs in float64 on CPU against central finite differences of the
primal function or torch.func; each aten-level case also asserts that the op
is served by an explicit rule, not by the fallback.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fwdgrad

from oracles import assert_jvp_matches_fd, uses_rule, rand, assert_gradient_jvp_matches_fd

aten = torch.ops.aten
D = torch.float64


@pytest.mark.parametrize("transposed,groups", [(False, 1), (False, 2), (True, 1)])
def test_convolution(transposed, groups):
    uses_rule(aten.convolution.default)
    x = rand(2, 4, 6, 5)
    w = rand(4, 4 // groups, 3, 2) if transposed else rand(6, 4 // groups, 3, 2)
    b = rand(w.shape[1] * groups if transposed else w.shape[0])
    assert_jvp_matches_fd(
        lambda x, w, b: aten.convolution.default(x, w, b, [2, 1], [1, 0], [1, 1], transposed, [0, 0], groups),
        x, w, b)


def test_native_layer_norm_with_mean_and_rstd():
    uses_rule(aten.native_layer_norm.default)
    assert_jvp_matches_fd(lambda x, w, b: aten.native_layer_norm.default(x, [3, 4], w, b, 1e-5),
                          rand(2, 5, 3, 4), rand(3, 4), rand(3, 4))
    assert_jvp_matches_fd(lambda x: aten.native_layer_norm.default(x, [4], None, None, 1e-5), rand(3, 4))


def test_native_group_norm():
    uses_rule(aten.native_group_norm.default)
    assert_jvp_matches_fd(lambda x, w, b: aten.native_group_norm.default(x, w, b, 2, 6, 5, 3, 1e-5),
                          rand(2, 6, 5), rand(6), rand(6))


def _stats():
    return rand(3, low=-0.5, high=0.5), rand(3, low=0.5, high=1.5)


def _fresh(f):
    """Call ``f`` with fresh running statistics, since training updates them in place."""
    mean, var = _stats()
    return lambda *xs: f(*xs, mean.clone(), var.clone())


@pytest.mark.parametrize("training", [True, False])
def test_native_batch_norm(training):
    uses_rule(aten.native_batch_norm.default)
    f = _fresh(lambda x, w, b, rm, rv: aten.native_batch_norm.default(x, w, b, rm, rv, training, 0.1, 1e-5))
    assert_jvp_matches_fd(f, rand(4, 3, 5), rand(3), rand(3))


@pytest.mark.parametrize("weight", [True, False])
def test_batch_norm_training_tangent_in_one_buffer_and_recorded(weight):
    # Without autograd the tangent is built from the kernel's channel sums in one
    # buffer; while autograd records it comes from the kernel's input gradient.
    # Both against finite differences, with reverse mode through the tangent.
    x, w = rand(4, 3, 5, 2), rand(3)

    def f(x, w):
        return aten._native_batch_norm_legit.no_stats(x, w if weight else None, None, True, 0.1, 1e-5)

    assert_jvp_matches_fd(f, x, w)
    gen = torch.Generator().manual_seed(5)
    v, u, wo = (torch.randn(x.shape, dtype=D, generator=gen) for _ in range(3))
    xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
    out = fwdgrad.jvp(lambda x: f(x, w), (xg,), (vg,))
    t_out, t_mean, t_rstd = out[1]
    torch.testing.assert_close(t_out, fwdgrad.jvp(lambda x: f(x, w), (x,), (v,))[1][0])
    gx, gv = torch.autograd.grad((wo * t_out).sum() + t_mean.sum() + t_rstd.sum(), (xg, vg))

    def phi(eps):
        to, tm, tr = fwdgrad.jvp(lambda x: f(x, w), (x + eps * u,), (v + eps * u,))[1]
        return (wo * to).sum() + tm.sum() + tr.sum()

    fd = (phi(1e-6) - phi(-1e-6)) / 2e-6
    torch.testing.assert_close((gx * u).sum() + (gv * u).sum(), fd, rtol=1e-6, atol=1e-6)


def test_batch_norm_eval_differentiates_the_running_statistics():
    mean, var = _stats()
    assert_jvp_matches_fd(
        lambda x, w, rm, rv: aten._native_batch_norm_legit_no_training.default(x, w, None, rm, rv, 0.1, 1e-5),
        rand(4, 3, 2), rand(3), mean, var)


def test_native_batch_norm_legit_variants():
    for op in (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
               aten._native_batch_norm_legit_no_training.default, aten._native_batch_norm_legit_functional.default,
               aten._batch_norm_with_update.default, aten._batch_norm_no_update.default):
        uses_rule(op)
    x, w, b = rand(4, 3, 2, 2), rand(3), rand(3)
    assert_jvp_matches_fd(_fresh(lambda x, w, b, rm, rv: aten._native_batch_norm_legit.default(
        x, w, b, rm, rv, True, 0.1, 1e-5)), x, w, b)
    assert_jvp_matches_fd(lambda x, w, b: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5), x, w, b)
    assert_jvp_matches_fd(_fresh(lambda x, w, b, rm, rv: aten._native_batch_norm_legit_functional.default(
        x, w, b, rm, rv, True, 0.1, 1e-5)[:3]), x, w, b)
    assert_jvp_matches_fd(_fresh(lambda x, w, b, rm, rv: aten._batch_norm_with_update.default(
        x, w, b, rm, rv, 0.1, 1e-5)[:3]), x, w, b)
    assert_jvp_matches_fd(_fresh(lambda x, w, b, rm, rv: aten._batch_norm_no_update.default(
        x, w, b, rm, rv, 0.1, 1e-5)[:1]), x, w, b)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_module(training):
    bn = torch.nn.BatchNorm2d(3, dtype=D).train(training)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in bn.state_dict().items()}

    def f(x, w, b):
        bn.load_state_dict(state)  # training updates the running statistics
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert_jvp_matches_fd(f, rand(4, 3, 2, 3), rand(3), rand(3))


def test_pooling():
    for op in (aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
               aten.avg_pool2d.default, aten.avg_pool3d.default, aten._adaptive_avg_pool2d.default,
               aten._adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default):
        uses_rule(op)
    x2, x3 = rand(2, 3, 7, 6), rand(2, 2, 5, 4, 6)
    assert_jvp_matches_fd(lambda x: aten.max_pool2d_with_indices.default(x, [3, 2], [2, 2], [1, 1], [1, 1], True), x2)
    assert_jvp_matches_fd(lambda x: aten.max_pool3d_with_indices.default(x, [2, 2, 3], [2, 1, 2]), x3)
    assert_jvp_matches_fd(lambda x: aten.avg_pool2d.default(x, [3, 3], [2, 2], [1, 1], False, False, None), x2)
    assert_jvp_matches_fd(lambda x: aten.avg_pool3d.default(x, [2, 2, 2], [1, 2, 2], [1, 0, 1], True, True, 3), x3)
    assert_jvp_matches_fd(lambda x: aten._adaptive_avg_pool2d.default(x, [4, 3]), x2)
    assert_jvp_matches_fd(lambda x: aten._adaptive_avg_pool3d.default(x, [2, 3, 4]), x3)
    assert_jvp_matches_fd(lambda x: aten.adaptive_max_pool2d.default(x, [3, 4]), x2)
    assert_jvp_matches_fd(lambda x: F.max_pool1d(x, 3, 2), rand(2, 3, 9))
    assert_jvp_matches_fd(lambda x: F.adaptive_avg_pool1d(x, 4), rand(2, 3, 9))


# ---- attention ------------------------------------------------------------------------


def _qkv(L=5, S=6, E=4, Ev=4):
    return rand(2, 3, L, E), rand(2, 3, S, E), rand(2, 3, S, Ev)


@pytest.mark.parametrize("mask,is_causal", [(False, False), (False, True), (True, False), (True, True)])
def test_sdpa_cpu_flash_kernel_with_lse(mask, is_causal):
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    uses_rule(op)
    q, k, v = _qkv()
    if mask:  # a float mask, itself differentiated
        assert_jvp_matches_fd(lambda q, k, v, m: op(q, k, v, 0.0, is_causal, attn_mask=m, scale=0.7),
                              q, k, v, rand(2, 3, 5, 6))
    else:
        assert_jvp_matches_fd(lambda q, k, v: op(q, k, v, 0.0, is_causal), q, k, v)


@pytest.mark.parametrize("mask,is_causal", [(None, True), ("bool", False), ("float", False)])
def test_scaled_dot_product_attention(mask, is_causal):
    q, k, v = _qkv()
    m = None if mask is None else (torch.rand(5, 6) > 0.3 if mask == "bool" else rand(5, 6))
    if mask == "bool":
        m[:, 0] = True
    assert_jvp_matches_fd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal),
                          q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v", "mask", "qk", "qkv"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_cpu_tangent_subsets_and_reverse_over_forward(which, is_causal):
    # Each subset of tangents takes its own branch of the rule (the in-place one
    # without autograd, the plain one while autograd records); both against
    # finite differences, and reverse mode through the tangent too.
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv()
    m = rand(2, 3, 5, 6)
    args = {"q": q, "k": k, "v": v, "mask": m}
    names = ["mask"] if which == "mask" else list(which)

    def f(*xs):
        a = dict(args, **dict(zip(names, xs)))
        return op(a["q"], a["k"], a["v"], 0.0, is_causal, attn_mask=a["mask"], scale=0.7)

    primals = tuple(args[n] for n in names)
    assert_jvp_matches_fd(f, *primals)
    tangents = tuple(torch.randn(p.shape, dtype=D, generator=gen) for p in primals)
    w = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=D, generator=gen)
    # (the kernel refuses a mask that requires grad: only its tangent does)
    leaves = [p.clone().requires_grad_(n != "mask") for n, p in zip(names + names, primals + tangents)]
    leaves[-1].requires_grad_()
    _, (t_out, _) = fwdgrad.jvp(f, tuple(leaves[:len(names)]), tuple(leaves[len(names):]))
    grads = torch.autograd.grad((w * t_out).sum(), [a for a in leaves if a.requires_grad],
                                allow_unused=True, materialize_grads=True)
    us = [torch.randn(p.shape, dtype=D, generator=gen) if p.requires_grad else torch.zeros_like(p)
          for p in leaves]

    def phi(eps):
        ps = [p + eps * u for p, u in zip(primals + tangents, us)]
        return (w * fwdgrad.jvp(f, tuple(ps[:len(names)]), tuple(ps[len(names):]))[1][0]).sum()

    fd = (phi(1e-6) - phi(-1e-6)) / 2e-6
    directional = sum((g * u).sum() for g, u in zip(grads, [u for a, u in zip(leaves, us) if a.requires_grad]))
    torch.testing.assert_close(directional, fd, rtol=1e-6, atol=1e-6)


def test_sdpa_with_dropout_uses_the_primal_mask():
    # On CPU dropout takes the math path, whose dropout op returns its mask.
    q, k, v = _qkv()
    assert_jvp_matches_fd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.4), q, k, v, seed=11)


# ---- embedding bags, distances, segment and index reductions ----------------------------------


@pytest.mark.parametrize("mode,psw,padding_idx,last", [
    ("sum", False, None, False), ("sum", True, None, True), ("mean", False, 2, False), ("max", False, None, False),
    ("max", False, 1, True),
])
def test_embedding_bag(mode, psw, padding_idx, last):
    uses_rule(aten._embedding_bag.default)
    idx = torch.tensor([1, 2, 4, 4, 3, 0, 2, 1])
    offsets = torch.tensor([0, 3, 3, 5] + ([8] if last else []))
    w = rand(6, 3)
    if psw:
        assert_jvp_matches_fd(lambda w, s: F.embedding_bag(idx, w, offsets, mode=mode, per_sample_weights=s,
                                                           include_last_offset=last), w, rand(8))
    else:
        assert_jvp_matches_fd(lambda w: F.embedding_bag(idx, w, offsets, mode=mode, padding_idx=padding_idx,
                                                        include_last_offset=last), w)


@pytest.mark.parametrize("p", [0.0, 1.0, 1.5, 2.0, 3.0, float("inf")])
def test_cdist_and_pdist(p):
    uses_rule(aten._cdist_forward.default)
    uses_rule(aten._pdist_forward.default)
    for rows in (4, 30):  # 30 rows take ATen's matrix-product path for p = 2
        assert_jvp_matches_fd(lambda a, b: torch.cdist(a, b, p=p), rand(2, rows, 3), rand(2, 5, 3))
    assert_jvp_matches_fd(lambda a, b: torch.cdist(a, b, p=p, compute_mode="use_mm_for_euclid_dist"),
                          rand(4, 3), rand(5, 3))
    assert_jvp_matches_fd(lambda a: F.pdist(a, p), rand(6, 3))


# ---- losses ------------------------------------------------------------------------------------


def test_ctc_loss_for_unnormalised_inputs():
    uses_rule(aten._ctc_loss.default)
    T, B, C = 8, 3, 5
    targets = torch.tensor([[1, 2, 2], [3, 1, 0], [4, 4, 4]])
    in_lens, tgt_lens = [8, 6, 7], [3, 2, 3]
    for reduction in ("none", "mean"):
        # raw scores, not log-probabilities: ATen's gradient assumes a log-softmax input
        assert_jvp_matches_fd(lambda lp: F.ctc_loss(lp, targets, in_lens, tgt_lens, reduction=reduction),
                              rand(T, B, C))
    assert_jvp_matches_fd(lambda lp: F.ctc_loss(lp.log_softmax(-1), targets, torch.tensor(in_lens),
                                                torch.tensor(tgt_lens), zero_infinity=True), rand(T, B, C))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_margin_losses(reduction):
    x = rand(4, 5)
    y = torch.tensor([1, 0, 4, 2])
    w = rand(5, low=0.5, high=1.5)
    for p in (1, 2):
        assert_jvp_matches_fd(lambda a: F.multi_margin_loss(a, y, p=p, margin=0.7, weight=w, reduction=reduction), x)
    ml = torch.tensor([[1, 3, -1, 0, 0], [0, 1, 2, 3, 4], [4, -1, 2, 2, 2], [-1, 0, 0, 0, 0]])
    assert_jvp_matches_fd(lambda a: F.multilabel_margin_loss(a, ml, reduction=reduction), x)
    assert_jvp_matches_fd(lambda a, b: F.soft_margin_loss(a, b, reduction=reduction), x, rand(4, 5))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_regression_and_logit_losses(reduction):
    x, y = rand(4, 5, low=-2, high=2), rand(4, 5, low=-2, high=2)
    assert_jvp_matches_fd(lambda a, b: F.huber_loss(a, b, reduction=reduction, delta=0.8), x, y)
    assert_jvp_matches_fd(lambda a, b: F.smooth_l1_loss(a, b, reduction=reduction, beta=0.5), x, y)
    assert_jvp_matches_fd(lambda a, b: F.mse_loss(a, b, reduction=reduction), x, y)
    p, w, pw = rand(4, 5, low=0.1, high=0.9), rand(4, 5, low=0.5, high=1.5), rand(5, low=0.5, high=2)
    assert_jvp_matches_fd(lambda a, b, c, d: F.binary_cross_entropy_with_logits(a, b, c, pos_weight=d,
                                                                                reduction=reduction), x, p, w, pw)
    assert_jvp_matches_fd(lambda a, b, c: F.binary_cross_entropy(a, b, c, reduction=reduction), p, p.flip(0), w)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy(reduction):
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    target = torch.tensor([0, 3, 2, -100, 1, 3, 0])
    weight = rand(4, low=0.5, high=1.5)
    assert_jvp_matches_fd(
        lambda x, w, b: F.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                                               ignore_index=-100, options=options),
        rand(7, 5), rand(4, 5), rand(4))


def test_grid_sample_modes():
    x, g = rand(2, 3, 5, 6), rand(2, 4, 3, 2, low=-1.2, high=1.2)
    for mode, pad, corners in itertools.product(["bilinear", "nearest", "bicubic"],
                                                ["zeros", "border", "reflection"], [True, False]):
        assert_jvp_matches_fd(lambda a, b: F.grid_sample(a, b, mode=mode, padding_mode=pad, align_corners=corners),
                              x, g)


def test_forward_over_reverse_through_distances_bags_and_segments():
    for op in (aten._cdist_backward.default, aten._pdist_backward.default, aten._embedding_bag_backward.default,
               aten._embedding_bag_per_sample_weights_backward.default, aten._segment_reduce_backward.default):
        uses_rule(op)
    for p, rows in ((1.5, 4), (2.0, 30), (3.0, 4)):
        assert_gradient_jvp_matches_fd(lambda a, b: torch.cdist(a, b, p=p).sin().sum(), rand(rows, 3), rand(5, 3))
    assert_gradient_jvp_matches_fd(lambda a: F.pdist(a, 1.5).sin().sum(), rand(5, 3))
    idx, offsets = torch.tensor([0, 2, 1, 3, 3]), torch.tensor([0, 2])
    assert_gradient_jvp_matches_fd(
        lambda w, s: F.embedding_bag(idx, w, offsets, mode="sum", per_sample_weights=s).sin().sum(),
        rand(5, 3), rand(5))
    assert_gradient_jvp_matches_fd(lambda w: F.embedding_bag(idx, w, offsets, mode="max").sin().sum(), rand(5, 3))
    lengths = torch.tensor([2, 3, 1])
    for reduce in ("prod", "max", "mean"):
        assert_gradient_jvp_matches_fd(
            lambda d: torch.segment_reduce(d, reduce, lengths=lengths).sin().sum(), rand(6, 2, low=0.5, high=1.5))
