"""fwdgrad inside and around torch.func transforms: the composition table of
docs/composition.rst, every cell in both orders and nested three deep,
checked in float64 against the same composition written with torch.func only.

Each transform is written as a map from a function of one tensor ``x`` to a
function of a tensor of the same shape (``vmap`` stacks ``x`` and ``2 x``,
so its input is derived from ``x`` and outer transforms differentiate
through the batching).  Every fwdgrad transform has a torch.func oracle
(``linearize`` and ``forward_grad`` are ``jvp``s, ``hvp`` is ``jvp`` of
``grad``), so a cell ``outer(inner(f))`` is compared with the composition
in which each fwdgrad transform is replaced by its oracle.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import func as tf

import fwdgrad
from fwdgrad.interpreter import functorch_stacks

D = torch.float64


def _dir(x):
    """A fixed direction shaped like ``x`` (made inside the transforms, so unbatched)."""
    return torch.linspace(0.5, 1.5, x.numel(), dtype=x.dtype).reshape(x.shape)


def _scalar(y):
    return y.sin().sum()


def f(x):
    return torch.sin(x) * x.sum() + x ** 2 / (1 + x.square().sum())


# fwdgrad transforms and their torch.func oracles: name -> (fwdgrad, torch.func)
FWD = {
    "jvp": (
        lambda h: lambda x: fwdgrad.jvp(h, (x,), (_dir(x),))[1],
        lambda h: lambda x: tf.jvp(h, (x,), (_dir(x),))[1],
    ),
    "forward_grad": (
        lambda h: lambda x: fwdgrad.forward_grad(h)(x, _dir(x))[1],
        lambda h: lambda x: tf.jvp(h, (x,), (_dir(x),))[1],
    ),
    "linearize": (
        lambda h: lambda x: fwdgrad.linearize(h, x)[1](_dir(x)),
        lambda h: lambda x: tf.jvp(h, (x,), (_dir(x),))[1],
    ),
    "jacfwd": (lambda h: fwdgrad.jacfwd(h), lambda h: tf.jacfwd(h)),
    "hessian": (
        lambda h: fwdgrad.hessian(lambda y: _scalar(h(y))),
        lambda h: tf.hessian(lambda y: _scalar(h(y))),
    ),
    "hvp": (
        lambda h: lambda x: fwdgrad.hvp(lambda y: _scalar(h(y)), x, _dir(x)),
        lambda h: lambda x: tf.jvp(tf.grad(lambda y: _scalar(h(y))), (x,), (_dir(x),))[1],
    ),
    "grad": (
        lambda h: fwdgrad.grad(lambda y: _scalar(h(y))),
        lambda h: tf.grad(lambda y: _scalar(h(y))),
    ),
}


def _vjp(h):
    def g(x):
        out, pull = tf.vjp(h, x)
        return pull(out.cos())[0]

    return g


TORCH = {
    "vmap": lambda h: lambda x: tf.vmap(h)(torch.stack([x, 2 * x])),
    "vmap_dims": lambda h: lambda x: tf.vmap(h, in_dims=1, out_dims=1)(torch.stack([x, 2 * x], 1)),
    "vmap_chunked": lambda h: lambda x: tf.vmap(h, chunk_size=1)(torch.stack([x, 2 * x, -x])),
    "grad": lambda h: tf.grad(lambda y: _scalar(h(y))),
    "jvp": lambda h: lambda x: tf.jvp(h, (x,), (_dir(x),))[1],
    "jacrev": lambda h: tf.jacrev(h),
    "vjp": _vjp,
    "jacfwd": lambda h: tf.jacfwd(h),
    "hessian": lambda h: tf.hessian(lambda y: _scalar(h(y))),
}


def _x():
    return torch.tensor([0.3, -0.7, 1.1], dtype=D)


def _check(ours, ref):
    x = _x()
    expected = ref(x)
    got = ours(x)
    assert type(got) is torch.Tensor, f"got {type(got)}"
    torch.testing.assert_close(got, expected)
    assert not functorch_stacks, "a level's functorch layers outlived its transform"


@pytest.mark.parametrize("t", list(TORCH))
@pytest.mark.parametrize("fw", list(FWD))
def test_fwdgrad_inside_torch_func(fw, t):
    ours, oracle = FWD[fw]
    _check(TORCH[t](ours(f)), TORCH[t](oracle(f)))


@pytest.mark.parametrize("t", list(TORCH))
@pytest.mark.parametrize("fw", list(FWD))
def test_torch_func_inside_fwdgrad(fw, t):
    ours, oracle = FWD[fw]
    _check(ours(TORCH[t](f)), oracle(TORCH[t](f)))


# Three deep: torch.func around fwdgrad around torch.func, and fwdgrad around
# torch.func around fwdgrad, one inner/outer pairing per cell (rotated so
# that every transform appears in every position).
_T = list(TORCH)
_F = list(FWD)
THREE = [(t, fw, _T[(i + j + 1) % len(_T)]) for i, t in enumerate(_T) for j, fw in enumerate(_F)]
THREE_F = [(fw, t, _F[(i + j + 1) % len(_F)]) for i, fw in enumerate(_F) for j, t in enumerate(_T)]


def _sampled(cells):
    """Every cell; by default one in four runs (every transform still appears in
    every position), the rest with ``--deep``."""
    return [c if k % 4 == 0 else pytest.param(*c, marks=pytest.mark.deep) for k, c in enumerate(cells)]


@pytest.mark.parametrize("outer, middle, inner", _sampled(THREE))
def test_three_deep_torch_fwdgrad_torch(outer, middle, inner):
    ours, oracle = FWD[middle]
    _check(TORCH[outer](ours(TORCH[inner](f))), TORCH[outer](oracle(TORCH[inner](f))))


@pytest.mark.parametrize("outer, middle, inner", _sampled(THREE_F))
def test_three_deep_fwdgrad_torch_fwdgrad(outer, middle, inner):
    (o_ours, o_ref), (i_ours, i_ref) = FWD[outer], FWD[inner]
    _check(o_ours(TORCH[middle](i_ours(f))), o_ref(TORCH[middle](i_ref(f))))


# ---- perturbation confusion across the two level systems -----------------------


def test_captured_batched_tensor_is_not_batched_twice():
    # c is batched by vmap and captured by the jvp'd function: the dual of x
    # must meet it as a batched value, not as a constant of vmap's physical shape.
    X, C, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D), torch.randn(3, dtype=D)
    ours = tf.vmap(lambda x, c: fwdgrad.jvp(lambda y: (y * c).sin(), (x,), (v,))[1])(X, C)
    ref = tf.vmap(lambda x, c: tf.jvp(lambda y: (y * c).sin(), (x,), (v,))[1])(X, C)
    torch.testing.assert_close(ours, ref)


def test_captured_grad_input_is_differentiated():
    # grad w.r.t. c, which only the jvp'd function captures.
    x, c, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    g = lambda c: fwdgrad.jvp(lambda y: (y * c).sin(), (x,), (v,))[1].sum()  # noqa: E731
    r = lambda c: tf.jvp(lambda y: (y * c).sin(), (x,), (v,))[1].sum()  # noqa: E731
    torch.testing.assert_close(tf.grad(g)(c), tf.grad(r)(c))


def test_nested_fwdgrad_levels_inside_vmap_do_not_confuse():
    # d/dx [x * d/dy (x * y)] = 2x for every batch element; the inner jvp captures
    # both the outer dual and a batched tensor.
    X, C = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    one = torch.ones(3, dtype=D)

    def outer(x, c):
        inner = lambda x: x * fwdgrad.jvp(lambda y: x * y * c, (x,), (one,))[1]  # noqa: E731
        return fwdgrad.jvp(inner, (x,), (one,))[1]

    def ref(x, c):
        inner = lambda x: x * tf.jvp(lambda y: x * y * c, (x,), (one,))[1]  # noqa: E731
        return tf.jvp(inner, (x,), (one,))[1]

    torch.testing.assert_close(tf.vmap(outer)(X, C), tf.vmap(ref)(X, C))


def test_fwdgrad_jvp_and_torch_func_jvp_tangents_stay_apart():
    # A fwdgrad jvp inside a torch.func jvp and the other way round, both
    # perturbing the same x: the mixed second derivative, not either one twice.
    x = torch.randn(3, dtype=D)
    u, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    ours = tf.jvp(lambda x: fwdgrad.jvp(lambda y: (x * y).sin(), (x,), (u,))[1], (x,), (w,))[1]
    ours2 = fwdgrad.jvp(lambda x: tf.jvp(lambda y: (x * y).sin(), (x,), (u,))[1], (x,), (w,))[1]
    ref = tf.jvp(lambda x: tf.jvp(lambda y: (x * y).sin(), (x,), (u,))[1], (x,), (w,))[1]
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours2, ref)


# ---- the cases users write ----------------------------------------------------


def _lj_energy(pos):
    """Lennard-Jones energy of one configuration of points (n, 3)."""
    diff = pos[:, None, :] - pos[None, :, :]
    n = pos.shape[0]
    iu = torch.triu_indices(n, n, 1)
    r2 = diff.square().sum(-1)[iu[0], iu[1]]
    inv6 = r2.reciprocal() ** 3
    return (4 * (inv6 ** 2 - inv6)).sum()


def test_vmap_jacfwd_lennard_jones_forces():
    torch.manual_seed(0)
    base = torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 1.2, 0.0], [0.0, 0.0, 1.3]], dtype=D)
    confs = base + 0.05 * torch.randn(5, 4, 3, dtype=D)
    forces = lambda p: -fwdgrad.jacfwd(_lj_energy)(p)  # noqa: E731
    ref = tf.vmap(lambda p: -tf.jacfwd(_lj_energy)(p))(confs)
    torch.testing.assert_close(tf.vmap(forces)(confs), ref)
    # and the force Jacobian (the Hessian), per configuration
    torch.testing.assert_close(
        tf.vmap(fwdgrad.jacfwd(forces))(confs), tf.vmap(tf.jacfwd(lambda p: -tf.jacfwd(_lj_energy)(p)))(confs)
    )


def test_vmap_hvp_matches_vmap_jvp_grad():
    torch.manual_seed(0)
    w = torch.randn(6, dtype=D)
    X, y = torch.randn(8, 6, dtype=D), torch.randn(8, dtype=D)
    loss = lambda w: F.softplus(X @ w - y).square().mean() + w.pow(4).sum()  # noqa: E731
    V = torch.randn(5, 6, dtype=D)
    ref = tf.vmap(lambda v: tf.jvp(tf.grad(loss), (w,), (v,))[1])(V)
    torch.testing.assert_close(tf.vmap(lambda v: fwdgrad.hvp(loss, w, v))(V), ref)
    torch.testing.assert_close(tf.vmap(lambda v: fwdgrad.value_grad_and_hvp(loss, w, v)[2])(V), ref)


def test_vmap_hvp_closure_form_on_a_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=D)
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    V = {k: torch.randn(2, *p.shape, dtype=D) for k, p in params.items()}
    closure = lambda: model(x).square().mean()  # noqa: E731
    ours = tf.vmap(lambda v: fwdgrad.hvp(closure, params, v))(V)
    pure = lambda ps: tf.functional_call(model, ps, (x,)).square().mean()  # noqa: E731
    detached = {k: p.detach() for k, p in params.items()}
    ref = tf.vmap(lambda v: tf.jvp(tf.grad(pure), (detached,), (v,))[1])(V)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k])
        assert type(model.get_parameter(k)) is torch.nn.Parameter
        torch.testing.assert_close(params[k].detach(), before[k])


def test_jacfwd_of_vmap():
    X = torch.randn(4, 3, dtype=D)
    g = tf.vmap(lambda r: r.sin() * r.sum())
    torch.testing.assert_close(fwdgrad.jacfwd(g)(X), tf.jacfwd(g)(X))


def test_vmap_randomness_same_and_different():
    X = torch.randn(4, 3, dtype=D)
    v = torch.ones(3, dtype=D)
    h = lambda x: fwdgrad.jvp(lambda y: y * torch.rand_like(y), (x,), (v,))[1]  # noqa: E731
    same = tf.vmap(h, randomness="same")(X)
    torch.testing.assert_close(same, same[:1].expand_as(same))
    different = tf.vmap(h, randomness="different")(X)
    assert not torch.allclose(different[0], different[1])
    # the tangent is the draw itself: the same draw as torch.func's at the same seed
    torch.manual_seed(3)
    ours = tf.vmap(h, randomness="different")(X)
    torch.manual_seed(3)
    ref = tf.vmap(lambda x: tf.jvp(lambda y: y * torch.rand_like(y), (x,), (v,))[1], randomness="different")(X)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(RuntimeError, match="randomness"):
        tf.vmap(h)(X)


def test_vmap_of_jvp_with_batched_tangents_and_aux():
    X, V = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)

    def g(x, v):
        out, t, aux = fwdgrad.jvp(lambda y: (y.sin(), y.sum()), (x,), (v,), has_aux=True)
        return t, aux

    t, aux = tf.vmap(g)(X, V)
    torch.testing.assert_close(t, X.cos() * V)
    torch.testing.assert_close(aux, X.sum(1))


def test_state_is_clean_after_an_error_inside_vmap():
    X = torch.randn(2, 3, dtype=D)
    with pytest.raises(ZeroDivisionError):
        tf.vmap(lambda x: fwdgrad.jvp(lambda y: y / 0 if (1 / 0) else y, (x,), (x,)))(X)
    assert not functorch_stacks
    assert torch._C._functorch.maybe_current_level() is None
    torch.testing.assert_close(fwdgrad.jvp(torch.sin, (X,), (X,))[1], X.cos() * X)


def test_traced_and_batched_jvp_inside_torch_func():
    # trace=True and batched=True run eagerly inside torch.func (no recording of
    # functorch's wrappers), with the same values
    X, v = torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)
    g = lambda y: y.sin() * y.sum()  # noqa: E731
    ref = tf.vmap(lambda x: tf.jvp(g, (x,), (v,))[1])(X)
    torch.testing.assert_close(tf.vmap(lambda x: fwdgrad.jvp(g, (x,), (v,), trace=True)[1])(X), ref)
    df = fwdgrad.forward_grad(g, trace=True)
    torch.testing.assert_close(tf.vmap(lambda x: df(x, v)[1])(X), ref)
    torch.testing.assert_close(
        tf.grad(lambda x: df(x, v)[1].sum())(X[0]), tf.grad(lambda x: tf.jvp(g, (x,), (v,))[1].sum())(X[0])
    )
    both = tf.vmap(lambda x: fwdgrad.jvp(g, (x,), (torch.stack([v, 2 * v]),), batched=True)[1])(X)
    torch.testing.assert_close(both, torch.stack([ref, 2 * ref], 1))
