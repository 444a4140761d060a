"""The rules for backward ops (fwdgrad/rules/backward.py), end to end.

Each case is a scalar function ``f(x, w)`` whose gradient passes through one
backward op.  ``jvp(grad(f))`` (forward over reverse, through the rule) must
equal the Hessian-vector product from PyTorch's double backward
(``torch.autograd.functional.hvp``), in float64; a spy checks that the rule
itself ran rather than the fallback.
"""

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad import slicing

from oracles import gradient_differences, spy_rule

aten = torch.ops.aten
D = torch.float64


def _randn(*shape):
    return torch.randn(*shape, dtype=D)


def _loss(y):
    """A nonlinear read-out, so that every op's incoming gradient carries a tangent."""
    return (y * y.sin()).sum()


CASES = {
    # name: (backward op, f(x, w), x shape, w shape)
    "relu": (aten.threshold_backward.default, lambda x, w: _loss(torch.relu(x * w)), (3, 4), (4,)),
    "leaky_relu": (aten.leaky_relu_backward.default, lambda x, w: _loss(F.leaky_relu(x * w, 0.1)), (3, 4), (4,)),
    "hardtanh": (aten.hardtanh_backward.default, lambda x, w: _loss(F.hardtanh(x * w, -0.5, 0.5)), (3, 4), (4,)),
    "relu6": (aten.hardtanh_backward.default, lambda x, w: _loss(F.relu6(3 * x * w)), (3, 4), (4,)),
    "hardshrink": (aten.hardshrink_backward.default, lambda x, w: _loss(F.hardshrink(x * w, 0.3)), (3, 4), (4,)),
    "softshrink": (aten.softshrink_backward.default, lambda x, w: _loss(F.softshrink(x * w, 0.3)), (3, 4), (4,)),
    "hardsigmoid": (aten.hardsigmoid_backward.default, lambda x, w: _loss(F.hardsigmoid(3 * x * w)), (3, 4), (4,)),
    "tanh": (aten.tanh_backward.default, lambda x, w: _loss(torch.tanh(x * w)), (3, 4), (4,)),
    "sigmoid": (aten.sigmoid_backward.default, lambda x, w: _loss(torch.sigmoid(x * w)), (3, 4), (4,)),
    "gelu": (aten.gelu_backward.default, lambda x, w: _loss(F.gelu(x * w)), (3, 4), (4,)),
    "gelu_tanh": (aten.gelu_backward.default, lambda x, w: _loss(F.gelu(x * w, approximate="tanh")), (3, 4), (4,)),
    "silu": (aten.silu_backward.default, lambda x, w: _loss(F.silu(x * w)), (3, 4), (4,)),
    "mish": (aten.mish_backward.default, lambda x, w: _loss(F.mish(x * w)), (3, 4), (4,)),
    "hardswish": (aten.hardswish_backward.default, lambda x, w: _loss(F.hardswish(3 * x * w)), (3, 4), (4,)),
    "elu": (aten.elu_backward.default, lambda x, w: _loss(F.elu(x * w, 0.7)), (3, 4), (4,)),
    "selu": (aten.elu_backward.default, lambda x, w: _loss(F.selu(x * w)), (3, 4), (4,)),
    "celu": (aten.elu_backward.default, lambda x, w: _loss(F.celu(x * w, 1.3)), (3, 4), (4,)),
    "elu_inplace": (aten.elu_backward.default, lambda x, w: _loss(F.elu(x * w, 0.7, inplace=True)), (3, 4), (4,)),
    "softplus": (aten.softplus_backward.default, lambda x, w: _loss(F.softplus(x * w, beta=2.0, threshold=1.0)), (3, 4), (4,)),
    "logsigmoid": (aten.log_sigmoid_backward.default, lambda x, w: _loss(F.logsigmoid(x * w)), (3, 4), (4,)),
    "logit": (aten.logit_backward.default, lambda x, w: _loss(torch.logit(torch.sigmoid(x * w), eps=0.3)), (3, 4), (4,)),
    "glu": (aten.glu_backward.default, lambda x, w: _loss(F.glu(x * w, -1)), (3, 4), (4,)),
    "softmax": (aten._softmax_backward_data.default, lambda x, w: _loss(torch.softmax(x * w, -1)), (3, 4), (4,)),
    "log_softmax": (aten._log_softmax_backward_data.default, lambda x, w: _loss(torch.log_softmax(x * w, 0)), (3, 4), (4,)),
    "cross_entropy": (aten.nll_loss_backward.default, lambda x, w: F.cross_entropy(x * w, torch.tensor([0, 3, 1])), (3, 4), (4,)),
    "nll_weighted": (aten.nll_loss_backward.default, lambda x, w: F.nll_loss(torch.log_softmax(x * w, 1), torch.tensor([0, 3, 1]), weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=D)), (3, 4), (4,)),
    "cross_entropy_2d": (aten.nll_loss2d_backward.default, lambda x, w: F.cross_entropy(x * w.view(1, 3, 1, 1), torch.tensor([[[0, 2], [1, 1]]])), (1, 3, 2, 2), (3,)),
    "bce": (aten.binary_cross_entropy_backward.default, lambda x, w: F.binary_cross_entropy(torch.sigmoid(x * w), torch.sigmoid(x.cos())), (3, 4), (4,)),
    "bce_weighted_sum": (aten.binary_cross_entropy_backward.default, lambda x, w: F.binary_cross_entropy(torch.sigmoid(x * w), torch.sigmoid(x.sin()), weight=torch.linspace(0.5, 2, 4, dtype=D), reduction="sum"), (3, 4), (4,)),
    "embedding_bag": (aten._embedding_bag_backward.default, lambda x, w: _loss(F.embedding_bag(torch.tensor([0, 2, 1, 2]), x, torch.tensor([0, 1]), per_sample_weights=w, mode="sum")), (3, 4), (4,)),
    "embedding_bag_mean": (aten._embedding_bag_backward.default, lambda x, w: _loss(F.embedding_bag(torch.tensor([0, 2, 1, 2]), x * w, torch.tensor([0, 1]), mode="mean")), (3, 4), (4,)),
    "mse": (aten.mse_loss_backward.default, lambda x, w: F.mse_loss((x * w).sin(), x.cos()), (3, 4), (4,)),
    "mse_sum": (aten.mse_loss_backward.default, lambda x, w: F.mse_loss((x * w).sin(), w.expand(3, 4), reduction="sum"), (3, 4), (4,)),
    "smooth_l1": (aten.smooth_l1_loss_backward.default, lambda x, w: F.smooth_l1_loss((x * w).sin(), x.cos(), beta=0.5), (3, 4), (4,)),
    "huber": (aten.huber_loss_backward.default, lambda x, w: F.huber_loss((x * w).sin(), x.cos(), delta=0.4, reduction="sum"), (3, 4), (4,)),
    "conv2d": (aten.convolution_backward.default, lambda x, w: _loss(F.conv2d(x, w, torch.ones(4, dtype=D), padding=1)), (2, 3, 5, 5), (4, 3, 3, 3)),
    "conv2d_strided_groups": (aten.convolution_backward.default, lambda x, w: _loss(F.conv2d(x, w, stride=2, groups=2)), (2, 4, 6, 6), (4, 2, 3, 3)),
    "conv_transpose2d": (aten.convolution_backward.default, lambda x, w: _loss(F.conv_transpose2d(x, w, stride=2)), (2, 3, 3, 3), (3, 2, 3, 3)),
    "conv1d": (aten.convolution_backward.default, lambda x, w: _loss(F.conv1d(x, w, dilation=2)), (2, 3, 9), (4, 3, 3)),
    "layer_norm": (aten.native_layer_norm_backward.default, lambda x, w: _loss(F.layer_norm(x, (4,), w, w.cos())), (3, 4), (4,)),
    "layer_norm_2d_no_affine": (aten.native_layer_norm_backward.default, lambda x, w: _loss(F.layer_norm(x * w, (3, 4))), (2, 3, 4), (4,)),
    "batch_norm_train": (aten.native_batch_norm_backward.default, lambda x, w: _loss(F.batch_norm(x, None, None, w, w.sin(), training=True)), (4, 3, 2, 2), (3,)),
    "batch_norm_eval": (aten.native_batch_norm_backward.default, lambda x, w: _loss(F.batch_norm(x, torch.linspace(-1, 1, 3, dtype=D), torch.linspace(0.5, 2, 3, dtype=D), w, w.sin(), training=False)), (4, 3, 2, 2), (3,)),
    "group_norm": (aten.native_group_norm_backward.default, lambda x, w: _loss(F.group_norm(x, 2, w, w.sin())), (2, 4, 3, 3), (4,)),
    "group_norm_no_affine": (aten.native_group_norm_backward.default, lambda x, w: _loss(F.group_norm(x * w.view(1, 4, 1, 1), 2)), (2, 4, 3, 3), (4,)),
    "max_pool2d": (aten.max_pool2d_with_indices_backward.default, lambda x, w: _loss(F.max_pool2d(x * w, 2)), (2, 3, 4, 4), (4,)),
    "max_pool3d": (aten.max_pool3d_with_indices_backward.default, lambda x, w: _loss(F.max_pool3d(x * w, 2)), (1, 2, 4, 4, 4), (4,)),
    "avg_pool2d": (aten.avg_pool2d_backward.default, lambda x, w: _loss(F.avg_pool2d(x * w, 2, padding=1)), (2, 3, 4, 4), (4,)),
    "adaptive_avg_pool2d": (aten._adaptive_avg_pool2d_backward.default, lambda x, w: _loss(F.adaptive_avg_pool2d(x * w, (3, 2))), (2, 3, 4, 4), (4,)),
    "adaptive_max_pool2d": (aten.adaptive_max_pool2d_backward.default, lambda x, w: _loss(F.adaptive_max_pool2d(x * w, (3, 2))), (2, 3, 4, 4), (4,)),
    "embedding": (aten.embedding_dense_backward.default, lambda x, w: _loss(F.embedding(torch.tensor([[0, 2], [2, 1]]), x) * w), (3, 4), (4,)),
    "select": (aten.select_backward.default, lambda x, w: _loss((x * w)[:, 1]), (3, 4), (4,)),
    "slice": (aten.slice_backward.default, lambda x, w: _loss((x * w)[1:, ::2]), (3, 4), (4,)),
    "diagonal": (aten.diagonal_backward.default, lambda x, w: _loss((x * w).diagonal()), (4, 4), (4,)),
    "unfold": (aten.unfold_backward.default, lambda x, w: _loss((x * w).unfold(1, 2, 1)), (3, 4), (4,)),
    "reflection_pad": (aten.reflection_pad2d_backward.default, lambda x, w: _loss(F.pad(x * w, (1, 1, 2, 0), mode="reflect")), (1, 2, 3, 4), (4,)),
    "replication_pad": (aten.replication_pad2d_backward.default, lambda x, w: _loss(F.pad(x * w, (1, 1, 2, 0), mode="replicate")), (1, 2, 3, 4), (4,)),
    "upsample_nearest": (aten.upsample_nearest2d_backward.default, lambda x, w: _loss(F.interpolate(x * w, scale_factor=2)), (1, 2, 3, 4), (4,)),
    "upsample_bilinear": (aten.upsample_bilinear2d_backward.default, lambda x, w: _loss(F.interpolate(x * w, size=(5, 7), mode="bilinear")), (1, 2, 3, 4), (4,)),
}


# PyTorch has no double backward for these: central differences of the gradient instead.
FINITE_DIFFERENCES = {"hardsigmoid", "embedding_bag", "embedding_bag_mean"}


@pytest.fixture(params=["whole", "sliced"])
def slice_mode(request, monkeypatch):
    """Large tensors are processed in slices; tiny slices exercise that path on small cases."""
    if request.param == "sliced":
        monkeypatch.setattr(slicing, "SLICE", 5)
    return request.param


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_rule_matches_double_backward(name, slice_mode):
    op, f, xs, ws = CASES[name]
    torch.manual_seed(0)
    x, w = _randn(*xs), _randn(*ws)
    if name == "logit":
        x = x * 0.3
    vx, vw = _randn(*xs), _randn(*ws)
    if name in FINITE_DIFFERENCES:
        expected = gradient_differences(f, (x, w), (vx, vw))
    else:
        _, expected = torch.autograd.functional.hvp(f, (x, w), (vx, vw))
    with spy_rule(op) as calls:
        _, ours = fwdgrad.jvp(fwdgrad.grad(f, argnums=(0, 1)), (x, w), (vx, vw))
    assert calls, f"the rule for {op} did not run"
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_dropout_backward_rule(slice_mode):
    # F.dropout on CPU is a multiplication by a mask; the fused op has its own backward.
    f = lambda x, w: _loss(aten.native_dropout.default(x * w, 0.4, True)[0])  # noqa: E731
    x, w, vx, vw = _randn(5, 4), _randn(4), _randn(5, 4), _randn(4)
    torch.manual_seed(1)
    _, expected = torch.autograd.functional.hvp(f, (x, w), (vx, vw))
    torch.manual_seed(1)
    with spy_rule(aten.native_dropout_backward.default) as calls:
        _, ours = fwdgrad.jvp(fwdgrad.grad(f, argnums=(0, 1)), (x, w), (vx, vw))
    assert calls
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_batch_norm_backward_with_running_statistics_tangents(slice_mode):
    # Running statistics cannot require grad, but they can carry a tangent.
    def f(x, w, rm, rv):
        return _loss(F.batch_norm(x, rm, rv, w, w.sin(), training=False))

    def gradient(x, w, rm, rv):
        return fwdgrad.grad(f, argnums=(0, 1))(x, w, rm, rv)

    torch.manual_seed(0)
    args = (_randn(4, 3, 2, 2), _randn(3), _randn(3), torch.rand(3, dtype=D) + 0.5)
    tangents = tuple(torch.randn_like(a) for a in args)
    with spy_rule(aten.native_batch_norm_backward.default) as calls:
        _, ours = fwdgrad.jvp(gradient, args, tangents)
    assert calls
    eps = 1e-6

    def plain_gradient(sign):
        x, w, rm, rv = (a + sign * eps * t for a, t in zip(args, tangents))
        x.requires_grad_()
        w.requires_grad_()
        return torch.autograd.grad(f(x, w, rm, rv), (x, w))

    expected = [(p - m) / (2 * eps) for p, m in zip(plain_gradient(1), plain_gradient(-1))]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["causal", "float", "bool", "none"])
def test_attention_backward_rule(mask, slice_mode):
    # The fused CPU kernel has no double backward: the oracle uses PyTorch's math backend.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    bias = _randn(5, 5)
    keep = torch.rand(5, 5) > 0.3
    keep[:, 0] = True  # no fully masked row

    def f(q, w):
        k, v = (q * w).cos(), (q + w).sin()
        kwargs = {
            "causal": {"is_causal": True},
            "float": {"attn_mask": bias},
            "bool": {"attn_mask": keep},
            "none": {},
        }[mask]
        return _loss(F.scaled_dot_product_attention(q, k, v, **kwargs))

    q, w, vq, vw = _randn(2, 2, 5, 4), _randn(4), _randn(2, 2, 5, 4), _randn(4)
    with sdpa_kernel([SDPBackend.MATH]):
        _, expected = torch.autograd.functional.hvp(f, (q, w), (vq, vw))
    with spy_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default) as calls:
        _, ours = fwdgrad.jvp(fwdgrad.grad(f, argnums=(0, 1)), (q, w), (vq, vw))
    assert calls
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


# ---- CTC: PyTorch has no double backward for _ctc_loss_backward ------------------------


def _ctc_case(concatenated, impossible):
    gen = torch.Generator().manual_seed(0)
    T, N, C = 7, 3, 5
    x = torch.randn(T, N, C, dtype=torch.float64, generator=gen)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0], [4, 0, 0]])
    in_lens, tg_lens = torch.tensor([7, 6, 5]), torch.tensor([3, 2, 1])
    if impossible:  # 1 2 2 needs 4 frames: give it 3, so its loss is infinite
        in_lens = torch.tensor([3, 6, 5])
    if concatenated:
        targets = torch.cat([targets[i, :n] for i, n in enumerate(tg_lens)])
    return x, targets, in_lens, tg_lens, torch.randn(T, N, C, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("concatenated", [False, True])
@pytest.mark.parametrize("impossible", [False, True])
def test_ctc_loss_hvp(reduction, concatenated, impossible):
    x, targets, in_lens, tg_lens, v = _ctc_case(concatenated, impossible)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def loss(x):
        out = F.ctc_loss(x.log_softmax(-1), targets, in_lens, tg_lens, reduction=reduction,
                         zero_infinity=impossible)
        return (out * weights).sum() if reduction == "none" else out

    def grad_at(h):
        xx = (x + h * v).requires_grad_()
        return torch.autograd.grad(loss(xx), xx)[0]

    with spy_rule(aten._ctc_loss_backward.Tensor) as calls:
        hv = fwdgrad.hvp(loss, x, v)
    assert calls
    torch.testing.assert_close(hv, (grad_at(1e-6) - grad_at(-1e-6)) / 2e-6, rtol=1e-6, atol=1e-8)


def test_ctc_loss_backward_rule_in_every_argument():
    # Each argument perturbed on its own (the saved loss and log_alpha included),
    # against central differences of the kernel itself.
    x, targets, in_lens, tg_lens, _ = _ctc_case(False, False)
    lp = x.log_softmax(-1)
    nll, la = aten._ctc_loss.Tensor(lp, targets, in_lens, tg_lens, 0, False)
    from fwdgrad.rules.nn import CTCLattice

    valid = CTCLattice(lp, targets, in_lens, tg_lens, 0).valid & ~la.isinf()
    la = la.masked_fill(~valid, float("-inf"))  # (the kernel leaves the rest uninitialised)
    gen = torch.Generator().manual_seed(1)
    gr = torch.randn(3, dtype=torch.float64, generator=gen)
    primals = (gr, lp, nll, la)
    tangents = [torch.randn(a.shape, dtype=torch.float64, generator=gen) for a in primals]
    tangents[3] = tangents[3].masked_fill(~valid, 0.0)

    def op(gr, lp, nll, la):
        return aten._ctc_loss_backward.Tensor(gr, lp, targets, in_lens, tg_lens, nll, la, 0, False)

    _, ours = fwdgrad.jvp(op, primals, tuple(tangents))
    plus = op(*[a + 1e-6 * t for a, t in zip(primals, tangents)])
    minus = op(*[a - 1e-6 * t for a, t in zip(primals, tangents)])
    torch.testing.assert_close(ours, (plus - minus) / 2e-6, rtol=1e-6, atol=1e-8)
