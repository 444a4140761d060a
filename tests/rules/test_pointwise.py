"""Focused checks of the JVP rules for elementwise math, activations and random ops (fwdgrad/rules/pointwise.py).

Everything runs in float64 on CPU against central finite differences of the
primal function or torch.func; each aten-level case also asserts that the op
is served by an explicit rule, not by the fallback.
"""


import pytest
import torch
import torch.nn.functional as F

import fwdgrad

from oracles import assert_jvp_matches_fd, uses_rule, rand

aten = torch.ops.aten
D = torch.float64


@pytest.mark.parametrize("p,train", [(0.3, True), (0.3, False), (1.0, True)])
def test_native_dropout_uses_the_primal_mask(p, train):
    uses_rule(aten.native_dropout.default)
    assert_jvp_matches_fd(lambda x: aten.native_dropout.default(x, p, train), rand(20, 5), seed=3)


def test_mul_tangent_in_place_and_recorded():
    x, y, tx, ty = rand(3, 4), rand(4), rand(3, 4), rand(4)
    expected = tx * y + x * ty
    torch.testing.assert_close(fwdgrad.jvp(torch.mul, (x, y), (tx, ty))[1], expected)
    leaves = [a.clone().requires_grad_() for a in (x, y, tx, ty)]
    t = fwdgrad.jvp(torch.mul, tuple(leaves[:2]), tuple(leaves[2:]))[1]
    grads = torch.autograd.grad(t.sum(), leaves)
    for g, ref in zip(grads, (ty.expand(3, 4), tx.sum(0), y.expand(3, 4), x.sum(0))):
        torch.testing.assert_close(g, ref)


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
