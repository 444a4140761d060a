"""Module state and randomness under every transform, against plain calls.

One call of a transform must leave the module's buffers (BatchNorm's
running statistics, a running average, a call counter) and the random state
exactly as one plain call of ``f`` from the same seed does, however often the
transform evaluates ``f`` inside (nested ``jacfwd``, eager fallbacks); and
every direction must see the random draws of that plain call (the policy:
the same mask as a plain call, like torch.func's ``randomness='same'``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fwdgrad


class Stateful(torch.nn.Module):
    def __init__(self, momentum=0.1, p=0.3):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.bn = torch.nn.BatchNorm1d(3, momentum=momentum)
        self.p = p
        self.register_buffer("avg", torch.zeros(3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.bn(self.lin(x))
        self.avg.mul_(0.9).add_(0.1 * y.detach().mean(0))
        self.calls += 1
        return F.dropout(torch.tanh(y), self.p) * (1 + self.avg)


def _transforms(x, t):
    """name -> (run(m), plain calls of m it stands for)."""

    def traced(m):
        df = fwdgrad.forward_grad(m, trace=True)
        for _ in range(3):
            df(x, t)

    def traced_jvp(m):
        f = lambda x: m(x)  # noqa: E731
        for _ in range(3):
            fwdgrad.jvp(f, (x,), (t,), trace=True)

    ones = [lambda m: [torch.ones_like(p) for p in m.parameters()]]
    return {
        "jvp": (lambda m: fwdgrad.jvp(m, (x,), (t,)), 1),
        "forward_grad": (lambda m: fwdgrad.forward_grad(m)(x, t), 1),
        "jvp_batched": (lambda m: fwdgrad.jvp(m, (x,), (torch.stack([t, -t]),), batched=True), 1),
        "jacfwd": (lambda m: fwdgrad.jacfwd(m)(x), 1),
        "jacfwd_chunked": (lambda m: fwdgrad.jacfwd(m, chunk_size=2)(x), 1),
        "jacfwd_jacfwd": (lambda m: fwdgrad.jacfwd(fwdgrad.jacfwd(lambda x: m(x).sum()))(x), 1),
        "jvp_jacfwd": (lambda m: fwdgrad.jvp(fwdgrad.jacfwd(lambda x: m(x).sum()), (x,), (t,)), 1),
        "hessian": (lambda m: fwdgrad.hessian(lambda x: m(x).pow(2).sum())(x), 1),
        "linearize": (lambda m: fwdgrad.linearize(m, x)[1](t), 1),
        "linearize_twice": (lambda m: [fn(t) for fn in [fwdgrad.linearize(m, x)[1]] for _ in range(2)], 1),
        "grad": (lambda m: fwdgrad.grad(lambda x: m(x).sum())(x), 1),
        "hvp_closure": (lambda m: fwdgrad.hvp(lambda: m(x).pow(2).sum(), list(m.parameters()), ones[0](m)), 1),
        "hvp_pure": (
            lambda m: fwdgrad.hvp(
                lambda ps: torch.func.functional_call(m, ps, (x,)).pow(2).sum(),
                dict(m.named_parameters()),
                {k: torch.ones_like(p) for k, p in m.named_parameters()},
            ),
            1,
        ),
        "value_grad_and_hvp": (
            lambda m: fwdgrad.value_grad_and_hvp(lambda: m(x).pow(2).sum(), list(m.parameters()), ones[0](m)),
            1,
        ),
        "traced_x3": (traced, 3),
        "jvp_traced_x3": (traced_jvp, 3),
    }


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, torch.get_rng_state()


def _check(name, run, calls, template, x, seed):
    m, ref = copy.deepcopy(template), copy.deepcopy(template)
    torch.manual_seed(seed)
    for _ in range(calls):
        ref(x)
    want = _snapshot(ref)
    torch.manual_seed(seed)
    run(m)
    got = _snapshot(m)
    for k in want[0]:
        assert torch.equal(got[0][k], want[0][k]), f"{name}: {k} differs from {calls} plain call(s)"
    assert torch.equal(got[1], want[1]), f"{name}: the random state differs from {calls} plain call(s)"


_X = torch.randn(4, 3)
_T = torch.randn(4, 3)


@pytest.mark.parametrize("name", sorted(_transforms(_X, _T)))
def test_state_after_each_transform_equals_plain_calls(name):
    torch.manual_seed(0)
    template = Stateful()
    run, calls = _transforms(_X, _T)[name]
    _check(name, run, calls, template, _X, seed=1)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    momentum=st.sampled_from([None, 0.1, 0.5]),
    p=st.sampled_from([0.0, 0.3, 0.7]),
    name=st.sampled_from(["jacfwd", "jacfwd_jacfwd", "jvp_batched", "hessian", "hvp_closure", "traced_x3"]),
)
def test_state_property(seed, momentum, p, name):
    """Random modules (cumulative BatchNorm averages, dropout rates) and seeds."""
    torch.manual_seed(seed)
    template = Stateful(momentum, p)
    x = torch.randn(5, 3)
    run, calls = _transforms(x, torch.randn(5, 3))[name]
    _check(name, run, calls, template, x, seed + 1)


def _dropout_cube(x):
    return (F.dropout(x, 0.5) ** 3).sum()


def _plain_mask(seed, n):
    torch.manual_seed(seed)
    return (F.dropout(torch.ones(n), 0.5) != 0).to(torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_jacobians_use_the_mask_of_a_plain_call(seed):
    x = torch.ones(6, dtype=torch.float64)
    mask = _plain_mask(seed, 6)
    rng_after = torch.get_rng_state()
    # d2/dx2 sum((2 m x)^3) = 48 m x on the diagonal: one mask for every column.
    torch.manual_seed(seed)
    H = fwdgrad.jacfwd(fwdgrad.jacfwd(_dropout_cube))(x)
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(H, torch.diag(48 * mask))
    torch.manual_seed(seed)
    _, t = fwdgrad.jvp(fwdgrad.jacfwd(_dropout_cube), (x,), (torch.ones_like(x),))
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(t, 48 * mask)
    torch.manual_seed(seed)
    Hh = fwdgrad.hessian(_dropout_cube)(x)
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(Hh, torch.diag(48 * mask))


@pytest.mark.parametrize("seed", [0, 3])
def test_traced_dropout_replays_draw_like_plain_calls(seed):
    df = fwdgrad.forward_grad(lambda z: F.dropout(z, 0.5), trace=True)
    x = torch.ones(64)
    for _ in range(3):
        torch.manual_seed(seed)
        want = F.dropout(x, 0.5)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        r, dr = df(x, torch.ones(64))
        torch.testing.assert_close(r, want)
        torch.testing.assert_close(dr, want)  # the tangent of a linear op along ones
        assert torch.equal(torch.get_rng_state(), after)
        seed += 1


def test_eager_pushes_of_a_linearized_function_leave_later_state_alone():
    """``jvp_fn`` called later, after the model changed, neither reverts it nor advances the RNG."""
    m = Stateful()
    x = torch.randn(4, 3)
    _, jvp_fn = fwdgrad.linearize(fwdgrad.jacfwd(lambda x: m(x).sum()), x)
    m(x)  # the user moves on
    before = _snapshot(m)
    jvp_fn(torch.ones_like(x))
    after = _snapshot(m)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert torch.equal(before[1], after[1])
