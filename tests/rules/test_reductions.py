"""Focused checks of the JVP rules for softmax, products, cumulative ops, norms and segment reductions (fwdgrad/rules/reductions.py).

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


def test_softmax_and_log_softmax():
    uses_rule(aten._softmax.default)
    uses_rule(aten._log_softmax.default)
    assert_jvp_matches_fd(lambda x: aten._softmax.default(x, 1, False), rand(3, 5, 2))
    assert_jvp_matches_fd(lambda x: aten._log_softmax.default(x, -1, False), rand(3, 5))


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
