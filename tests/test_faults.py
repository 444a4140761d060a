"""Odd inputs and situations a new user meets: each used to crash or give a wrong value.

``.tolist()`` inside ``f``, thousands of chained views, ``hvp`` inside a
standard ``torch.optim.LBFGS`` closure, and the traced mode's guards on the
Python values a recording baked in.
"""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fwdgrad


# ---- tolist ---------------------------------------------------------------------


def _scale_by_first(x):
    return x * x.tolist()[0]


def test_tolist_inside_f_reads_the_primal():
    x = torch.tensor([2.0, 3.0])
    out, t = fwdgrad.jvp(_scale_by_first, (x,), (torch.ones(2),))
    torch.testing.assert_close(out, x * 2.0)
    torch.testing.assert_close(t, torch.full((2,), 2.0))  # the list is a constant
    J = fwdgrad.jacfwd(_scale_by_first)(x)
    torch.testing.assert_close(J, torch.eye(2) * 2.0)


def test_tolist_in_a_traced_function_is_a_value_read():
    """The recording depends on the values read: it must not be replayed for others."""
    df = fwdgrad.forward_grad(_scale_by_first, trace=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df(torch.tensor([2.0, 3.0]), torch.ones(2))
    assert any("reads tensor values" in str(w.message) for w in caught)
    r, dr = df(torch.tensor([5.0, 3.0]), torch.ones(2))
    torch.testing.assert_close(r, torch.tensor([25.0, 15.0]))
    torch.testing.assert_close(dr, torch.full((2,), 5.0))


def test_tolist_of_nested_duals():
    x = torch.tensor([1.5, 2.0])
    H = fwdgrad.hessian(lambda x: (x ** 3).sum() * x.tolist()[1])(x)
    torch.testing.assert_close(H, torch.diag(6 * x * 2.0))


# ---- deep view chains -------------------------------------------------------


@pytest.mark.parametrize("n", [500, pytest.param(3000, marks=pytest.mark.sweep)])
def test_thousands_of_chained_views(n):
    """Views are followed iteratively: a chain longer than the stack allows works.

    (PyTorch's own view tracking on wrapper subclasses costs time quadratic in
    the chain's length, so the default case is short, under a low recursion
    limit.)"""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(min(limit, 300))
    try:
        _chains(n)
    finally:
        sys.setrecursionlimit(limit)


def _chains(n):
    def chain(x):
        for _ in range(n):
            x = x.view(-1)
        return x * 2

    x = torch.ones(4)
    _, t = fwdgrad.jvp(chain, (x,), (torch.arange(4.0),))
    torch.testing.assert_close(t, 2 * torch.arange(4.0))

    def chain_inplace(x):
        y = x.clone()
        v = y
        for _ in range(n):
            v = v.view(-1)
        v.mul_(3)  # writes through the whole chain into the base's tangent
        return y

    _, t = fwdgrad.jvp(chain_inplace, (x,), (torch.arange(4.0),))
    torch.testing.assert_close(t, 3 * torch.arange(4.0))


# ---- hvp inside an LBFGS closure -------------------------------------------------


def _lbfgs_problem():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    return m, X, y


def test_closure_hvp_inside_a_standard_lbfgs_closure():
    """LBFGS keeps the loss it got (and its graph) after backward: hvp must still work,
    be right, and leave LBFGS's later steps working."""
    m, X, y = _lbfgs_problem()
    names = [n for n, _ in m.named_parameters()]
    opt = torch.optim.LBFGS(m.parameters(), max_iter=4)
    loss_fn = lambda: F.mse_loss(m(X), y)  # noqa: E731
    hvps = []

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        v = [torch.ones_like(p) for p in m.parameters()]
        hv = fwdgrad.hvp(loss_fn, list(m.parameters()), v)
        params = tuple(p.detach().clone() for p in m.parameters())
        want = torch.autograd.functional.hvp(
            lambda *ps: F.mse_loss(torch.func.functional_call(m, dict(zip(names, ps)), (X,)), y), params, tuple(v)
        )[1]
        hvps.append((hv, want))
        return loss

    for _ in range(2):
        opt.step(closure)
    assert len(hvps) > 2
    for hv, want in hvps:
        torch.testing.assert_close(hv, list(want))
    assert all(type(p) is torch.nn.Parameter for p in m.parameters())
    # each closure call's loss.backward() ran after an hvp on the same gradient
    # accumulators: hvp's blocking hook did not outlive its call


def test_graph_used_during_the_swap_is_refused_clearly():
    """A backward through a graph built before hvp, run from inside the closure, would
    accumulate into the swapped parameters: a clear error, and they come back."""
    m, X, y = _lbfgs_problem()
    w = m[0].weight
    old = (w * 2).sum()  # saves nothing of w: only w's gradient accumulator holds it
    old.backward(retain_graph=True)

    def closure():
        old.backward(retain_graph=True)
        return F.mse_loss(m(X), y)

    with pytest.raises(RuntimeError, match="turned it into a dual"):
        fwdgrad.hvp(closure, list(m.parameters()), [torch.ones_like(p) for p in m.parameters()])
    assert all(type(p) is torch.nn.Parameter for p in m.parameters())
    w.grad = None
    old.backward()  # after the call the graph works again
    torch.testing.assert_close(w.grad, torch.full_like(w, 2.0))


def test_graph_that_saved_a_parameter_is_named():
    m, X, y = _lbfgs_problem()
    pending = F.mse_loss(m(X), y)  # saved the weights; backward not run
    with pytest.raises(RuntimeError, match=r"another reference to it is alive \(\d from C\+\+: an autograd graph"):
        fwdgrad.hvp(lambda: F.mse_loss(m(X), y), list(m.parameters()), [torch.ones_like(p) for p in m.parameters()])
    pending.backward()


# ---- traced mode guards ---------------------------------------------------------------

SCALE = 2.0


def _times_scale(x):
    return x * SCALE


def test_traced_replay_sees_a_changed_global():
    global SCALE
    df = fwdgrad.forward_grad(_times_scale, trace=True)
    x = torch.ones(2)
    try:
        torch.testing.assert_close(df(x, x)[1], 2 * x)
        SCALE = 3.0
        torch.testing.assert_close(df(x, x)[1], 3 * x)
        SCALE = float("nan")
        assert df(x, x)[1].isnan().all()
        assert df(x, x)[1].isnan().all()  # a NaN key matches itself: a cache hit
    finally:
        SCALE = 2.0
    torch.testing.assert_close(df(x, x)[1], 2 * x)


def test_traced_replay_sees_a_changed_closure_value_and_module_attribute():
    scale = 2.0

    def f(x):
        return x * scale

    df = fwdgrad.forward_grad(f, trace=True)
    x = torch.ones(2)
    torch.testing.assert_close(df(x, x)[1], 2 * x)
    scale = 5.0
    torch.testing.assert_close(df(x, x)[1], 5 * x)

    m = torch.nn.Dropout(0.0)
    dm = fwdgrad.forward_grad(m, trace=True)
    torch.testing.assert_close(dm(x, x)[1], x)
    m.p = 1.0  # a plain attribute the forward reads
    torch.testing.assert_close(dm(x, x)[1], torch.zeros(2))
