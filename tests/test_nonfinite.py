"""NaN and infinity through the ops that select (clamps, relu-like ops, extremes, where, masks).

A selecting op passes some tangents on and drops the others.  A dropped
tangent may be infinite or NaN (``sqrt`` at 0 has an infinite derivative), and
the result must still be the selected tangent: ``where``, never a product
with a 0/1 mask (``0 * inf = nan``).  The oracle is torch.func.jvp, which
selects with ``where`` for these ops; for the two-argument extremes, whose
torch.func formulas multiply by masks, it is torch.func on the same choice
written with ``torch.where``.  Every case runs twice: on plain inputs (fused
backward kernels) and on inputs that require grad (the plain formulas, for
reverse over forward).
"""

import pytest
import torch
import torch.nn.functional as F

import fwdgrad

INF, NAN = float("inf"), float("nan")
VALUES = [-2.0, -0.5, 0.0, 0.5, 1.0, 3.5, INF, -INF, NAN]
TANGENTS = [1.0, -1.0, INF, -INF, NAN, 0.0]


def _grid():
    x = torch.tensor([v for v in VALUES for _ in TANGENTS], dtype=torch.float64)
    t = torch.tensor([u for _ in VALUES for u in TANGENTS], dtype=torch.float64)
    return x, t


ROWS = len(VALUES)

UNARY = {
    "clamp": lambda a: a.clamp(-1, 1),
    "clamp_min": lambda a: a.clamp(min=0.5),
    "clamp_max": lambda a: a.clamp(max=0.5),
    "clamp_tensor_bounds": lambda a: a.clamp(min=torch.zeros_like(a), max=torch.ones_like(a)),
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "threshold": lambda a: F.threshold(a, 0.5, 2.0),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "hardshrink": F.hardshrink,
    "softshrink": F.softshrink,
    "where": lambda a: torch.where(a > 0.7, a, 2 * a),
    "masked_fill": lambda a: a.masked_fill(a > 0.7, 3.0),
    "amax": lambda a: a.view(ROWS, -1).amax(1),
    "amin": lambda a: a.view(ROWS, -1).amin(1),
    "max_dim": lambda a: a.view(ROWS, -1).max(1).values,
    "sort": lambda a: a.sort().values,
    "cummax": lambda a: a.cummax(0).values,
    "max_pool1d": lambda a: F.max_pool1d(a.view(1, 1, -1), 2),
    # an infinite tangent where the op does not pass it on (the issue's examples)
    "sqrt_clamp_min": lambda a: a.abs().sqrt().clamp(min=0.5),
    "sqrt_amax": lambda a: a.view(ROWS, -1).abs().sqrt().amax(1),
    "sqrt_relu": lambda a: (a.abs().sqrt() - 0.5).relu(),
}


def _pick(takes_x):
    return lambda a, b: torch.where(a == b, (a + b) / 2, torch.where(takes_x(a, b), a, b))


BINARY = {  # op, the same choice written with where (the oracle)
    "maximum": (torch.maximum, _pick(lambda a, b: a > b)),
    "minimum": (torch.minimum, _pick(lambda a, b: a < b)),
    "fmax": (torch.fmax, _pick(lambda a, b: (a > b) | b.isnan())),
    "fmin": (torch.fmin, _pick(lambda a, b: (a < b) | b.isnan())),
    "where": (lambda a, b: torch.where(a > b, a, b), lambda a, b: torch.where(a > b, a, b)),
}


def _same(got, want):
    assert got.shape == want.shape
    bad = ~(torch.isclose(got, want, equal_nan=True) | (got == want))
    assert not bad.any(), f"{int(bad.sum())} elements differ, e.g. got {got[bad][:4]} want {want[bad][:4]}"


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_selecting_ops_match_torch_func(name, requires_grad):
    f = UNARY[name]
    x, t = _grid()
    want = torch.func.jvp(f, (x,), (t,))[1]
    got = fwdgrad.jvp(f, (x.clone().requires_grad_(requires_grad),), (t,))[1]
    _same(got.detach(), want)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", sorted(BINARY))
def test_two_argument_extremes_select_the_tangent(name, requires_grad):
    f, oracle = BINARY[name]
    x, t = _grid()
    y, u = x.roll(7).flip(0), t.roll(3)
    want = torch.func.jvp(oracle, (x, y), (t, u))[1]
    got = fwdgrad.jvp(f, (x.clone().requires_grad_(requires_grad), y), (t, u))[1].detach()
    # which tangent a NaN output carries is a convention (and the oracle does
    # not propagate NaN operands): compare where the values agree
    keep = f(x, y) == oracle(x, y)
    assert keep.sum() > len(x) // 2
    _same(got[keep], want[keep])


def test_the_issues_examples():
    _, t = fwdgrad.jvp(lambda x: x.sqrt().clamp(min=0.5), (torch.tensor([0.0]),), (torch.ones(1),))
    assert t.item() == 0.0
    _, t = fwdgrad.jvp(lambda x: x.sqrt().amax(), (torch.tensor([0.0, 4.0]),), (torch.ones(2),))
    assert t.item() == 0.25


def test_native_dropout_drops_infinite_tangents():
    """native_dropout's mask selects.  (``F.dropout`` on an input that needs no
    grad decomposes into a product with the mask, where ``0 * inf = nan`` as in
    torch.func: that is a multiplication, not a selection.)"""
    x = torch.tensor([0.0, 1.0, 4.0, 9.0] * 8)
    torch.manual_seed(0)
    _, mask = torch.ops.aten.native_dropout.default(x, 0.5, True)
    torch.manual_seed(0)
    _, t = fwdgrad.jvp(
        lambda x: torch.ops.aten.native_dropout.default(x.sqrt(), 0.5, True)[0], (x,), (torch.ones_like(x),)
    )
    _same(t, torch.where(mask, 2 * 0.5 / x.sqrt(), 0.0))


def test_hvp_through_selecting_ops_matches_torch_func():
    """Forward over reverse: the backward ops of the selecting ops select too."""
    w = torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=torch.float64)
    f = lambda w: (w.sqrt().clamp(min=1.5) ** 2).sum()  # noqa: E731
    hv = fwdgrad.hvp(f, w, torch.ones_like(w))
    want = torch.func.jvp(torch.func.grad(f), (w,), (torch.ones_like(w),))[1]
    _same(hv, want)
    assert torch.isfinite(hv[1:]).all()  # at 0 the gradient itself is 0 * inf
