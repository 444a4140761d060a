"""Focused checks of JVP rules that the OpInfo samples exercise thinly.

Everything runs in float64 on CPU and is compared with central finite
differences of the primal function (``torch.func.jvp`` lacks most of these
ops, or is wrong at the edge cases tested here).  Each aten-level case also
asserts that the op is served by an explicit rule, not by the fallback.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.registry import RULES

aten = torch.ops.aten
D = torch.float64


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())]


def finite_difference(f, primals, tangents, eps=1e-6, seed=None):
    def call(xs):
        if seed is not None:
            torch.manual_seed(seed)
        return _outputs(f(*xs))

    plus = call([p + eps * t for p, t in zip(primals, tangents)])
    minus = call([p - eps * t for p, t in zip(primals, tangents)])
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def assert_jvp_matches_fd(f, *primals, seed=None, tol=1e-6, gen_seed=0):
    """fwdgrad's JVP of ``f`` along a random direction against central differences."""
    gen = torch.Generator().manual_seed(gen_seed)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)

    def g(*xs):
        if seed is not None:
            torch.manual_seed(seed)
        return f(*xs)

    out, tan = fwdgrad.jvp(g, primals, tangents)
    if seed is not None:
        torch.manual_seed(seed)
    plain = f(*primals)
    for a, b in zip(_outputs(out), _outputs(plain)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ours = _outputs(tan)
    ref = finite_difference(f, primals, tangents, seed=seed)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m, i=i: f"output {i}: {m}")


def uses_rule(op):
    assert op in RULES, f"{op} has no explicit rule"


def rand(*shape, low=-1.0, high=1.0):
    return torch.rand(*shape, dtype=D) * (high - low) + low


# ---- ops that real models reach on CPU, called at the aten level -------------------


def test_addmm():
    uses_rule(aten.addmm.default)
    assert_jvp_matches_fd(lambda b, x, w: aten.addmm.default(b, x, w, beta=0.5, alpha=2.0),
                          rand(5), rand(3, 4), rand(4, 5))


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


def test_softmax_and_log_softmax():
    uses_rule(aten._softmax.default)
    uses_rule(aten._log_softmax.default)
    assert_jvp_matches_fd(lambda x: aten._softmax.default(x, 1, False), rand(3, 5, 2))
    assert_jvp_matches_fd(lambda x: aten._log_softmax.default(x, -1, False), rand(3, 5))


def test_embedding():
    uses_rule(aten.embedding.default)
    idx = torch.tensor([[0, 2, 2], [4, 1, 0]])
    assert_jvp_matches_fd(lambda w: aten.embedding.default(w, idx, 1), rand(5, 3))


@pytest.mark.parametrize("p,train", [(0.3, True), (0.3, False), (1.0, True)])
def test_native_dropout_uses_the_primal_mask(p, train):
    uses_rule(aten.native_dropout.default)
    assert_jvp_matches_fd(lambda x: aten.native_dropout.default(x, p, train), rand(20, 5), seed=3)


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


def test_softmax_tangent_reverse_over_forward():
    x, v, w = rand(4, 7), rand(4, 7), rand(4, 7)
    for f in (lambda x: x.softmax(-1), lambda x: x.softmax(0), lambda x: F.softmax(x.float(), -1).double()):
        _, ours = fwdgrad.jvp(f, (x,), (v,))
        torch.testing.assert_close(ours, torch.func.jvp(f, (x,), (v,))[1])
        xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
        gx, gv = torch.autograd.grad((w * fwdgrad.jvp(f, (xg,), (vg,))[1]).sum(), (xg, vg))
        rx, rv = torch.autograd.grad((w * torch.func.jvp(f, (xg,), (vg,))[1]).sum(), (xg, vg))
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-6)


def test_mul_tangent_in_place_and_recorded():
    x, y, tx, ty = rand(3, 4), rand(4), rand(3, 4), rand(4)
    expected = tx * y + x * ty
    torch.testing.assert_close(fwdgrad.jvp(torch.mul, (x, y), (tx, ty))[1], expected)
    leaves = [a.clone().requires_grad_() for a in (x, y, tx, ty)]
    t = fwdgrad.jvp(torch.mul, tuple(leaves[:2]), tuple(leaves[2:]))[1]
    grads = torch.autograd.grad(t.sum(), leaves)
    for g, ref in zip(grads, (ty.expand(3, 4), tx.sum(0), y.expand(3, 4), x.sum(0))):
        torch.testing.assert_close(g, ref)


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


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce(reduce):
    uses_rule(aten.segment_reduce.default)
    data = rand(7, 3)
    data[2, 1] = 0.0  # prod with a zero
    lengths = torch.tensor([2, 0, 3, 2])
    assert_jvp_matches_fd(lambda d: torch.segment_reduce(d, reduce, lengths=lengths, initial=0.5), data)
    # (no empty segment without an initial value: its max would be -inf, where
    # finite differences are NaN)
    assert_jvp_matches_fd(lambda d: torch.segment_reduce(d, reduce, offsets=torch.tensor([0, 2, 5, 7])), data)
    # along axis 1, with a different segmentation per row
    lengths2 = torch.tensor([[3, 0, 4], [1, 5, 1], [7, 0, 0]])
    assert_jvp_matches_fd(lambda d: torch.segment_reduce(d, reduce, lengths=lengths2, axis=1, initial=0.25),
                          data.mT.contiguous())


@pytest.mark.parametrize("reduce,include_self", list(itertools.product(["prod", "mean", "amax", "amin"], [True, False])))
def test_index_reduce_with_zeros_and_repeats(reduce, include_self):
    uses_rule(aten.index_reduce.default)
    x, src = rand(5, 4), rand(6, 4)
    x[1, 2] = src[0, 0] = src[2, 3] = src[4, 3] = 0.0  # one and two zeros per slot
    idx = torch.tensor([0, 1, 1, 3, 0, 1])
    assert_jvp_matches_fd(lambda a, b: a.index_reduce(0, idx, b, reduce, include_self=include_self), x, src)


@pytest.mark.parametrize("reduce,include_self", list(itertools.product(["prod", "sum", "mean", "amax", "amin"],
                                                                       [True, False])))
def test_scatter_reduce(reduce, include_self):
    x, src = rand(5, 4), rand(6, 4)
    x[1, 2] = src[0, 0] = src[2, 3] = 0.0
    idx = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(1))
    assert_jvp_matches_fd(lambda a, b: a.scatter_reduce(0, idx, b, reduce, include_self=include_self), x, src)


def test_products_are_exact_with_zeros():
    x = rand(4, 5)
    x[0, 1] = x[1, 1] = x[1, 3] = 0.0  # rows with no, one and two zeros
    for f in (lambda a: a.prod(1), lambda a: a.prod(0, keepdim=True), lambda a: a.prod(),
              lambda a: a[2:].prod(), lambda a: a.cumprod(1), lambda a: a.cumprod(0)):
        assert_jvp_matches_fd(f, x)


def test_reverse_mode_through_the_prod_tangent_at_zeros():
    x = rand(4, 5)
    x[0, 1] = x[1, 1] = x[1, 3] = 0.0
    t = rand(4, 5)
    grads = []
    for jvp in (fwdgrad.jvp, torch.func.jvp):
        xr = x.clone().requires_grad_()
        _, tan = jvp(lambda a: a.prod(1), (xr,), (t,))
        grads.append(torch.autograd.grad(tan.sum(), xr)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_logcumsumexp_over_a_wide_range():
    x = rand(3, 6)
    x[0, :2] = -1e3  # exp underflows; a shift by the maximum would give 0 * inf
    assert_jvp_matches_fd(lambda a: a.logcumsumexp(1), x)


@pytest.mark.parametrize("ord", [0, 1, 2, 3, 0.5, float("inf"), float("-inf")])
def test_vector_norm_with_zeros(ord):
    x = rand(3, 4)
    x[0] = 0.0
    x[1, 2] = 0.0  # (|x|^p has an infinite slope at 0 for p < 1; no finite difference there)
    smooth = x[1:] if ord >= 1 or ord == 0 else x[2:]
    assert_jvp_matches_fd(lambda a: torch.linalg.vector_norm(a, ord, dim=1), smooth)
    assert_jvp_matches_fd(lambda a: torch.linalg.vector_norm(a, ord), smooth)
    # the subgradient 0 at a zero row, like ATen
    _, t = fwdgrad.jvp(lambda a: torch.linalg.vector_norm(a, ord, dim=1), (x,), (torch.ones_like(x),))
    assert t[0] == 0 if ord != 0 else True


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


# ---- sampling, casts, affine scalar ops ----------------------------------------------------


def test_normal_uses_the_pathwise_derivative():
    assert_jvp_matches_fd(lambda m, s: torch.normal(m, s), rand(6), rand(6, low=0.5, high=2), seed=5)
    assert_jvp_matches_fd(lambda s: torch.normal(0.5, s), rand(6, low=0.5, high=2), seed=5)


@pytest.mark.parametrize("training", [True, False])
def test_rrelu_uses_the_sampled_slopes(training):
    assert_jvp_matches_fd(lambda x: F.rrelu(x, 0.1, 0.4, training=training), rand(30), seed=7)


def test_affine_scalar_ops_pass_the_tangent_through():
    x = rand(5, low=0.5, high=2)
    for f in (lambda a: a + 3.0, lambda a: a - 2.5, lambda a: torch.fmod(a, 0.7), lambda a: torch.remainder(a, 0.7),
              lambda a: torch.nextafter(a, torch.zeros_like(a)), lambda a: torch.special.ndtr(a)):
        assert_jvp_matches_fd(f, x)


def test_grid_sample_modes():
    x, g = rand(2, 3, 5, 6), rand(2, 4, 3, 2, low=-1.2, high=1.2)
    for mode, pad, corners in itertools.product(["bilinear", "nearest", "bicubic"],
                                                ["zeros", "border", "reflection"], [True, False]):
        assert_jvp_matches_fd(lambda a, b: F.grid_sample(a, b, mode=mode, padding_mode=pad, align_corners=corners),
                              x, g)


# ---- linear algebra -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_factorisation_outputs_used_by_backward(dtype):
    # The LU that solve and det return is what their backward uses; its tangent
    # makes forward over reverse right.
    a = torch.randn(3, 4, 4, dtype=dtype) + 3 * torch.eye(4, dtype=dtype)
    b = torch.randn(3, 4, 2, dtype=dtype)
    assert_jvp_matches_fd(lambda a, b: aten._linalg_solve_ex.default(a, b)[:2], a, b)
    assert_jvp_matches_fd(lambda a: aten._linalg_det.default(a)[:2], a)
    assert_jvp_matches_fd(lambda a: aten._linalg_det.default(a.mT)[:2], a)  # a column-major input
    assert_jvp_matches_fd(lambda a: aten._linalg_slogdet.default(a)[:3], a)


def test_det_of_singular_matrices():
    a = torch.randn(2, 4, 4, dtype=D)
    a[:, :, 0] = a[:, :, 1]  # rank n - 1
    assert_jvp_matches_fd(torch.linalg.det, a)
    a[:, :, 2] = a[:, :, 1]  # rank n - 2: the adjugate is zero
    assert_jvp_matches_fd(torch.linalg.det, a)


@pytest.mark.parametrize("upper", [True, False])
def test_triangular_and_cholesky_solves_read_one_triangle(upper):
    a = torch.randn(4, 4, dtype=D)
    tri = (a.triu() if upper else a.tril()) + 3 * torch.eye(4, dtype=D)
    b = torch.randn(4, 2, dtype=D)
    assert_jvp_matches_fd(lambda b, t: torch.triangular_solve(b, t, upper=upper)[0], b, tri)
    assert_jvp_matches_fd(lambda b, t: torch.linalg.solve_triangular(t, b, upper=upper, unitriangular=True), b, tri)
    chol = torch.linalg.cholesky(a @ a.mT + torch.eye(4, dtype=D), upper=upper)
    assert_jvp_matches_fd(lambda b, c: torch.cholesky_solve(b, c, upper=upper), b, chol)
    assert_jvp_matches_fd(lambda c: torch.cholesky_inverse(c, upper=upper), chol)


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5)])
def test_svd_and_qr_match_torch_func(shape):
    for dtype in (torch.float64, torch.complex128):
        a = torch.randn(2, *shape, dtype=dtype)
        t = torch.randn_like(a)
        for f in (lambda m: torch.linalg.svd(m, full_matrices=False), torch.linalg.qr, torch.linalg.svdvals):
            _, ours = fwdgrad.jvp(f, (a,), (t,))
            _, ref = torch.func.jvp(f, (a,), (t,))
            for x, y in zip(_outputs(ours), _outputs(ref)):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


# ---- forward over reverse through ops whose backward ATen cannot differentiate ----------------


def assert_gradient_jvp_matches_fd(f, *primals):
    """The JVP of x -> grad f(x), taken by fwdgrad through autograd's backward ops."""

    def grad_f(*xs):
        xs = [x.requires_grad_() for x in xs]
        return torch.autograd.grad(f(*xs), xs, create_graph=True)

    gen = torch.Generator().manual_seed(0)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    _, ours = fwdgrad.jvp(grad_f, primals, tangents)
    eps = 1e-6
    plus = grad_f(*[(p + eps * t).detach() for p, t in zip(primals, tangents)])
    minus = grad_f(*[(p - eps * t).detach() for p, t in zip(primals, tangents)])
    for a, b, c in zip(ours, plus, minus):
        ref = (b - c) / (2 * eps)
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6 * max(1.0, ref.abs().max().item()))


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


# ---- activations and unary math: fused tangent kernels and in-place formulas ------
# (fwdgrad/rules/pointwise.py, FUSED and LEAN): forward mode against torch.func and
# finite differences, reverse over forward (the formulas), forward over forward.

_ACTIVATIONS = [
    ("sigmoid", aten.sigmoid.default, torch.sigmoid),
    ("gelu", aten.gelu.default, F.gelu),
    ("gelu tanh", aten.gelu.default, lambda x: F.gelu(x, approximate="tanh")),
    ("silu", aten.silu.default, F.silu),
    ("mish", aten.mish.default, F.mish),
    ("elu", aten.elu.default, lambda x: F.elu(x, alpha=0.7)),
    ("selu", aten.elu.default, F.selu),
    ("celu", aten.celu.default, lambda x: F.celu(x, alpha=1.5)),
    ("softplus", aten.softplus.default, lambda x: F.softplus(x, beta=2.0, threshold=1.5)),
    ("relu", aten.relu.default, torch.relu),
    ("threshold", aten.threshold.default, lambda x: F.threshold(x, 0.2, -3.0)),
    ("leaky_relu", aten.leaky_relu.default, lambda x: F.leaky_relu(x, 0.2)),
    ("hardtanh", aten.hardtanh.default, lambda x: F.hardtanh(x, -0.5, 0.7)),
    ("hardsigmoid", aten.hardsigmoid.default, F.hardsigmoid),
    ("hardswish", aten.hardswish.default, F.hardswish),
    ("hardshrink", aten.hardshrink.default, lambda x: F.hardshrink(x, 0.3)),
    ("softshrink", aten.softshrink.default, lambda x: F.softshrink(x, 0.3)),
    ("logsigmoid", aten.log_sigmoid_forward.default, F.logsigmoid),
]


def _away_from_kinks(n=40):
    """Points in [-4, 4] at least 0.05 away from every activation's kinks."""
    x = rand(n, low=-4.0, high=4.0)
    kinks = torch.tensor([-3.0, -1.0, -0.5, -0.3, 0.0, 0.2, 0.3, 0.7, 1.0, 3.0], dtype=D)
    near = (x.unsqueeze(-1) - kinks).abs().min(-1).values < 0.05
    return torch.where(near, x + 0.1, x).reshape(5, 8)


# Unary math with an in-place formula when nothing records the tangent (LEAN):
# positive inputs where the domain needs them.
_LEAN = [
    ("tanh", aten.tanh.default, torch.tanh, False),
    ("sin", aten.sin.default, torch.sin, False),
    ("cos", aten.cos.default, torch.cos, False),
    ("exp", aten.exp.default, torch.exp, False),
    ("log", aten.log.default, torch.log, True),
    ("sqrt", aten.sqrt.default, torch.sqrt, True),
    ("rsqrt", aten.rsqrt.default, torch.rsqrt, True),
    ("erf", aten.erf.default, torch.erf, False),
    ("pow 3", aten.pow.Tensor_Scalar, lambda x: x ** 3, False),
    ("pow 1", aten.pow.Tensor_Scalar, lambda x: torch.pow(x, 1), False),
    ("pow 0", aten.pow.Tensor_Scalar, lambda x: torch.pow(x, 0), False),
    ("pow -1.5", aten.pow.Tensor_Scalar, lambda x: x ** -1.5, True),
]
_UNARY = [(n, op, f) for n, op, f in _ACTIVATIONS] + [(n, op, (lambda x, f=f: f(x.abs() + 0.5)) if pos else f)
                                                       for n, op, f, pos in _LEAN]


@pytest.mark.parametrize("name,op,f", _UNARY, ids=[a[0] for a in _UNARY])
def test_activation_tangents_forward_and_reverse_over_forward(name, op, f):
    uses_rule(op)
    torch.manual_seed(0)
    x, v, w = _away_from_kinks(), torch.randn(5, 8, dtype=D), torch.randn(5, 8, dtype=D)
    assert_jvp_matches_fd(f, x)
    _, ours = fwdgrad.jvp(f, (x,), (v,))
    _, ref = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(ours, ref)
    # reverse over forward: the gradient of phi(x, v) = <w, J(x) v> with respect to
    # x and v, along a random direction against central differences of phi
    xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
    _, t = fwdgrad.jvp(f, (xg,), (vg,))
    if t.requires_grad:
        gx, gv = torch.autograd.grad((w * t).sum(), (xg, vg), allow_unused=True, materialize_grads=True)
    else:  # a zero tangent (x ** 0)
        gx, gv = torch.zeros_like(x), torch.zeros_like(v)
    ux, uv, eps = torch.randn(5, 8, dtype=D), torch.randn(5, 8, dtype=D), 1e-6

    def phi(s):
        return (w * torch.func.jvp(f, (x + s * ux,), (v + s * uv,))[1]).sum()

    fd = (phi(eps) - phi(-eps)) / (2 * eps)
    torch.testing.assert_close((gx * ux).sum() + (gv * uv).sum(), fd, rtol=1e-6, atol=1e-6)
    # forward over forward: a second-order directional derivative
    u = torch.randn(5, 8, dtype=D)
    inner = lambda x: fwdgrad.jvp(f, (x,), (v,))[1]  # noqa: E731
    ours = fwdgrad.jvp(inner, (x,), (u,))[1]
    eps = 1e-6
    fd = (inner(x + eps * u) - inner(x - eps * u)) / (2 * eps)
    torch.testing.assert_close(ours, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f", [torch.sigmoid, F.silu], ids=["sigmoid", "silu"])
def test_complex_activations_keep_the_formula(f):
    # The fused backward kernels conjugate the derivative for complex inputs.
    # (torch.func.jvp of a complex silu is wrong: compare with finite differences.)
    x = torch.randn(4, 6, dtype=torch.complex128) * 0.5
    assert_jvp_matches_fd(f, x)


def test_addmm_activation_tangents():
    # (on CPU the GELU variant is the exact GELU, not the tanh approximation)
    uses_rule(aten._addmm_activation.default)
    for use_gelu in (False, True):
        assert_jvp_matches_fd(lambda b, x, w: aten._addmm_activation.default(b, x, w, use_gelu=use_gelu),
                              rand(5), rand(3, 4), rand(4, 5))
