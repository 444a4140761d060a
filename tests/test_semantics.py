"""The semantics of ``jvp`` and ``forward_grad`` (issue 2, point 5), each checked
against torch.func.jvp and float64 central finite differences."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hvp as autograd_hvp

import fwdgrad
from oracles import finite_difference

DT = torch.float64


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=DT, generator=g)


def check_against_oracles(f, x, v, seed=None, torch_func=True):
    """fwdgrad's jvp of ``f`` equals torch.func.jvp's (where PyTorch supports
    ``f``) and finite differences; the primal output is bitwise the plain call's."""
    if seed is not None:
        torch.manual_seed(seed)
    plain = f(x)
    if seed is not None:
        torch.manual_seed(seed)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert type(out) is torch.Tensor and type(t) is torch.Tensor
    assert torch.equal(out, plain)
    if torch_func:
        if seed is not None:
            torch.manual_seed(seed)
        ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(t, ref_t)
    torch.testing.assert_close(t, finite_difference(f, (x,), (v,), seed=seed)[0], rtol=1e-6, atol=1e-7)
    return out, t


# ---- views and in-place ops inside f -------------------------------------------------


def _inplace_on_view_with_tangent(x):
    y = x.clone()
    y[1:4].mul_(y[0:3].sin())  # reads and writes overlapping views of y
    return y


def _inplace_on_view_of_zero_tangent(x):
    buf = torch.zeros_like(x)  # a zero tangent, materialised only at the write
    buf[1:] = x[:-1] * 2
    return buf


def _setitem_with_index_tensor(x):
    y = x.clone()
    y[torch.tensor([0, 2])] = x[:2] ** 2
    y.index_put_((torch.tensor([4, 4]),), x[0:2] * 5, accumulate=True)
    return y


def _chain_of_views(x):
    y = x.clone()
    z = y.view(2, 3).t()[1:].unsqueeze(0)  # a view of y, taken before the write
    y.view(2, 3)[:, 1:].transpose(0, 1).diagonal().mul_(x[:2].exp())
    return y, z


def _inplace_on_base_then_read_view(x):
    y = x.clone()
    w = y[1:]
    d = y.view(2, 3).diagonal()
    y.mul_(3).add_(x.cos())
    return w * 1, d + 0


def _inplace_on_input_view_chain(x):
    y = x * 1  # its tangent aliases the input's; the write must not reach it
    y.unsqueeze(0).squeeze(0)[::2].copy_(x[1::2].tanh())
    return y


def _inplace_view_ops(x):
    y = x.clone().view(2, 3)
    y.t_()
    y.unsqueeze_(0)
    y[0, 1].add_(x[:2])
    return y


def _out_argument(x):
    buf = torch.empty_like(x)
    torch.sin(x, out=buf)
    return buf


@pytest.mark.parametrize(
    "f",
    [
        _inplace_on_view_with_tangent,
        _inplace_on_view_of_zero_tangent,
        _setitem_with_index_tensor,
        _chain_of_views,
        _inplace_on_base_then_read_view,
        _inplace_on_input_view_chain,
        _inplace_view_ops,
        _out_argument,
    ],
)
def test_views_and_inplace(f):
    x, v = _x(6), _x(6, seed=1)
    if f in (_chain_of_views, _inplace_on_base_then_read_view):
        # pytree outputs: compare each leaf
        out, t = fwdgrad.jvp(f, (x,), (v,))
        ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(t, ref_t)
        fd = [finite_difference(lambda x: f(x)[i], (x,), (v,))[0] for i in range(len(out))]
        torch.testing.assert_close(list(t), fd, rtol=1e-6, atol=1e-7)
    else:
        # PyTorch's forward AD has no out= support
        check_against_oracles(f, x, v, torch_func=f is not _out_argument)


def test_inplace_on_view_updates_the_base_outside_any_copy():
    """The view's write reaches the base's tangent, and the input's tangent is untouched."""
    x, v = _x(6), _x(6, seed=1)
    v_before = v.clone()

    def f(x):
        y = x * 1  # y's tangent may alias v; the write must not reach v
        y[2:].mul_(2)
        return y

    out, t = fwdgrad.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, torch.cat([v[:2], 2 * v[2:]]))
    assert torch.equal(v, v_before)


# ---- detach, .data and no_grad ---------------------------------------------------------


@pytest.mark.parametrize(
    "f, expected",
    [
        (lambda x: x.detach() * x, lambda x, v: x * v),
        (lambda x: torch.detach(x) * x, lambda x, v: x * v),
        (lambda x: x.data * x, lambda x, v: x * v),
        (lambda x: x.sin().detach().exp() + x, lambda x, v: v),
    ],
    ids=["Tensor.detach", "torch.detach", ".data", "detach mid-chain"],
)
def test_detach_stops_the_tangent(f, expected):
    """Finite differences see through detach, so the oracles are torch.func and
    the analytic answer with the detached value held constant."""
    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    assert torch.equal(out, f(x))
    torch.testing.assert_close(t, ref_t)
    torch.testing.assert_close(t, expected(x, v))


def test_detach_alone_gives_zero_tangent():
    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(lambda x: x.detach(), (x,), (v,))
    assert torch.equal(t, torch.zeros_like(x))


def test_no_grad_does_not_stop_the_tangent():
    def f(x):
        with torch.no_grad():
            return x.sin() * x

    x, v = _x(5), _x(5, seed=1)
    check_against_oracles(f, x, v)


def test_tangent_flows_under_inference_mode():
    """fwdgrad treats ``torch.inference_mode`` like ``no_grad``: the tangent flows.

    This is a deliberate difference from PyTorch, whose forward AD is switched
    off under inference mode (torch.func.jvp returns a zero tangent there).
    """

    def f(x):
        with torch.inference_mode():
            return x.exp()

    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, finite_difference(f, (x,), (v,))[0], rtol=1e-6, atol=1e-7)
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    assert not ref_t.any()  # the documented PyTorch behaviour we differ from


# ---- integer and bool outputs ----------------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [
        lambda x: x > 0,
        lambda x: x.argmax(),
        lambda x: torch.sort(x).indices,
        lambda x: (x * 10).long(),
        lambda x: x.topk(2),
    ],
    ids=["bool", "argmax", "sort indices", "long cast", "topk values and indices"],
)
def test_integer_and_bool_outputs_carry_no_tangent(f):
    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    for o, ti, ro, rt in zip(*(torch.utils._pytree.tree_leaves(z) for z in (out, t, ref_out, ref_t))):
        assert torch.equal(o, ro)
        assert ti.dtype == rt.dtype and ti.shape == rt.shape
        torch.testing.assert_close(ti, rt)
        if not (o.is_floating_point() or o.is_complex()):
            assert not ti.any()  # zeros, in the output's own dtype, like torch.func


def test_integer_intermediate_blocks_the_tangent():
    """Rounding through an integer dtype and back has a zero tangent."""
    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(lambda x: (x * 10).long().double() + x, (x,), (v,))
    torch.testing.assert_close(t, v)


def test_integer_primal_with_none_tangent():
    idx = torch.tensor([2, 0])
    x, v = _x(5), _x(5, seed=1)
    out, t = fwdgrad.jvp(lambda x, i: x[i] * 2, (x, idx), (v, None))
    torch.testing.assert_close(t, 2 * v[idx])


# ---- random ops --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [
        lambda x: F.dropout(x, 0.4, training=True),
        lambda x: F.dropout(x.view(2, 3, 1), 0.5, training=True).view(-1) * x,
        lambda x: F.alpha_dropout(x, 0.3, training=True),
        lambda x: F.rrelu(x, training=True),
        lambda x: F.rrelu(x.clone(), training=True, inplace=True) * 2,
        lambda x: x * torch.rand_like(x),
        lambda x: torch.bernoulli(x.sigmoid()) * x,
        lambda x: torch.normal(x, 0.5),
        lambda x: torch.normal(x.sin(), x.exp()),
        lambda x: x.clone().normal_() * x,
        lambda x: x.clone().bernoulli_(0.5) * x,
    ],
    ids=[
        "dropout",
        "dropout chained",
        "alpha_dropout",
        "rrelu",
        "rrelu_",
        "rand_like",
        "bernoulli",
        "normal(mean)",
        "normal(mean, std)",
        "normal_",
        "bernoulli_",
    ],
)
def test_random_ops_use_the_primals_draw(f):
    """The tangent uses the same mask/noise as the primal, the primal is bitwise
    the plain call's under the same seed, and the generator advances as it would."""
    x, v = _x(6), _x(6, seed=1)
    torch.manual_seed(7)
    plain = f(x)
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    after_jvp = torch.rand(3)
    assert torch.equal(out, plain)
    assert torch.equal(after_jvp, after_plain), "the transform consumed extra random numbers"
    # The pathwise derivative, with the same draw: finite differences under one seed.
    torch.testing.assert_close(t, finite_difference(f, (x,), (v,), seed=7)[0], rtol=1e-6, atol=1e-7)


def test_dropout_matches_torch_func():
    x, v = _x(6), _x(6, seed=1)
    check_against_oracles(lambda x: F.dropout(x, 0.4, training=True), x, v, seed=3)


def test_standard_gamma_uses_pytorchs_implicit_reparameterization():
    """_standard_gamma's derivative is PyTorch's (implicit reparameterization),
    checked against reverse mode under the same seed."""
    x, v = _x(4), _x(4, seed=1)
    f = lambda x: torch._standard_gamma(x.exp())  # noqa: E731
    torch.manual_seed(0)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    xr = x.clone().requires_grad_()
    torch.manual_seed(0)
    o = f(xr)
    assert torch.equal(out, o.detach())
    jac = torch.stack([torch.autograd.grad(o[i], xr, retain_graph=True)[0] for i in range(4)])
    torch.testing.assert_close(t, jac @ v)


def test_random_op_without_rule_is_refused():
    """No silent re-draw: binomial has no derivative and no rule."""
    x, v = _x(4), _x(4, seed=1)
    with pytest.raises(NotImplementedError, match="binomial.*random"):
        fwdgrad.jvp(lambda p: torch.binomial(torch.full_like(p, 5.0), p.sigmoid()), (x,), (v,))


# ---- the primal output is the plain call's -------------------------------------------------


def test_primal_output_is_bitwise_the_plain_call():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3)
    ).double()
    x, v = _x(4, 6), _x(4, 6, seed=1)

    def f(x):
        h = layer(x)
        return h.softmax(-1) @ h.t() + h.logsumexp(0).sum()

    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert torch.equal(out, f(x))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(t, ref_t)
    torch.testing.assert_close(t, finite_difference(f, (x,), (v,))[0], rtol=1e-6, atol=1e-7)


# ---- autograd's internal detach of saved outputs keeps tangents ------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        lambda x: x.tanh().sum(),
        lambda x: x.sigmoid().pow(2).sum(),
        lambda x: x.exp().mul(x).sum(),
        lambda x: x.softmax(-1).mul(torch.arange(6.0, dtype=DT)).sum(),
        lambda x: F.log_softmax(x, -1)[2] + x.relu().sqrt().sum(),
        lambda x: x.tanh().sigmoid().exp().softmax(0).sum(),
    ],
    ids=["tanh", "sigmoid", "exp", "softmax", "log_softmax+sqrt", "chain"],
)
def test_forward_over_reverse_keeps_saved_output_tangents(loss):
    """These backward formulas reuse the saved *output*, which autograd stores
    through an internal detach; dropping its tangent would give a wrong Hv."""
    x, v = _x(6).abs() + 0.1, _x(6, seed=1)

    def grad_of_loss(x):
        with torch.enable_grad():
            x = x.requires_grad_() if not x.requires_grad else x
            (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
        return g

    g, hv = fwdgrad.jvp(grad_of_loss, (x,), (v,))
    ref_g, ref_hv = autograd_hvp(loss, x, v)
    torch.testing.assert_close(hv, ref_hv)
    torch.testing.assert_close(hv, finite_difference(grad_of_loss, (x,), (v,))[0], rtol=1e-5, atol=1e-6)


# ---- reverse over forward: the tangent has a grad_fn ------------------------------------------


def test_tangent_is_differentiable_by_autograd():
    x = _x(5).requires_grad_()
    w = _x(5, seed=2).requires_grad_()  # a captured parameter
    v = _x(5, seed=1)
    f = lambda x: (x.sin() * w).exp()  # noqa: E731
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert t.grad_fn is not None
    gx, gw = torch.autograd.grad(t.sum(), (x, w))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    rgx, rgw = torch.autograd.grad(ref_t.sum(), (x, w))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


# ---- forward_grad: None tangents and keyword arguments ----------------------------------------


def test_forward_grad_none_tangent_is_zero_and_kwargs_pass_through():
    def f(x, y, scale, *, power=2, offset=None):
        return (x * y) ** power * scale + offset

    x, y = _x(4), _x(4, seed=1)
    dx = _x(4, seed=2)
    off = _x(4, seed=3)
    df = fwdgrad.forward_grad(f)
    r, dr = df(x, dx, y, None, 3.0, None, power=3, offset=off)
    assert torch.equal(r, f(x, y, 3.0, power=3, offset=off))
    ref_r, ref_dr = torch.func.jvp(lambda x: f(x, y, 3.0, power=3, offset=off), (x,), (dx,))
    torch.testing.assert_close(dr, ref_dr)
    # All tangents None: a zero tangent, and the keyword tensor is a constant.
    r2, dr2 = df(x, None, y, None, 3.0, None, offset=off)
    assert torch.equal(dr2, torch.zeros_like(x))


def test_forward_grad_all_pairs_and_pytree_values():
    def f(params, x):
        return torch.tanh(x @ params["w"] + params["b"])

    params = {"w": _x(3, 2), "b": _x(2, seed=1)}
    dparams = {"w": _x(3, 2, seed=2), "b": None}
    x, dx = _x(4, 3, seed=3), _x(4, 3, seed=4)
    r, dr = fwdgrad.forward_grad(f)(params, dparams, x, dx)
    zeros_b = torch.zeros_like(params["b"])
    ref_r, ref_dr = torch.func.jvp(f, (params, x), ({"w": dparams["w"], "b": zeros_b}, dx))
    assert torch.equal(r, ref_r)
    torch.testing.assert_close(dr, ref_dr)


# ---- pytrees on both sides, and has_aux ---------------------------------------------------------


def test_pytrees_on_both_sides():
    def f(inputs, scale):
        a, (b, c) = inputs["a"], inputs["pair"]
        return {"sum": a + b.sum() * scale, "list": [a * c, (c.exp(), b.t())]}

    primals = ({"a": _x(3), "pair": (_x(2, 3, seed=1), _x(3, seed=2))}, _x((), seed=3))
    tangents = ({"a": _x(3, seed=4), "pair": (_x(2, 3, seed=5), _x(3, seed=6))}, _x((), seed=7))
    out, t = fwdgrad.jvp(f, primals, tangents)
    ref_out, ref_t = torch.func.jvp(f, primals, tangents)
    assert torch.utils._pytree.tree_structure(t) == torch.utils._pytree.tree_structure(ref_t)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(t, ref_t)


def test_output_is_an_input_or_a_constant():
    x, v = _x(3), _x(3, seed=1)
    c = _x(3, seed=2)
    out, t = fwdgrad.jvp(lambda x: (x, c, x[1:]), (x,), (v,))
    ref_out, ref_t = torch.func.jvp(lambda x: (x, c, x[1:]), (x,), (v,))
    torch.testing.assert_close(t, ref_t)
    assert all(type(o) is torch.Tensor for o in out + t)


def test_has_aux():
    def f(x):
        y = x.sin()
        return y * 2, {"hidden": y, "count": torch.tensor(3)}

    x, v = _x(4), _x(4, seed=1)
    out, t, aux = fwdgrad.jvp(f, (x,), (v,), has_aux=True)
    ref_out, ref_t, ref_aux = torch.func.jvp(f, (x,), (v,), has_aux=True)
    torch.testing.assert_close(t, ref_t)
    assert type(aux["hidden"]) is torch.Tensor
    assert torch.equal(aux["hidden"], ref_aux["hidden"])
    assert torch.equal(aux["count"], ref_aux["count"])

    r, dr, aux2 = fwdgrad.forward_grad(f, has_aux=True)(x, v)
    torch.testing.assert_close(dr, ref_t)
    assert type(aux2["hidden"]) is torch.Tensor


# ---- regressions found by tests/test_fuzz.py ------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [
        lambda x: torch.ops.aten.add.Scalar(x, 1.5),
        lambda x: torch.ops.aten.sub.Scalar(x, 1.5, 2),
        lambda x: torch.ops.aten.fmod.Scalar(x * 3, 1.5),
        lambda x: torch.ops.aten.remainder.Scalar(x * 3, 1.5),
    ],
    ids=["add.Scalar", "sub.Scalar", "fmod.Scalar", "remainder.Scalar"],
)
def test_scalar_overloads_are_affine_not_linear(f):
    """``x + c`` has tangent ``t``, not ``t + c`` (autograd's silu double backward
    reaches ``add.Scalar``)."""
    x, v = _x(5), _x(5, seed=1)
    check_against_oracles(f, x, v)


def test_std_of_a_single_element_has_zero_tangent():
    """std's tangent is var's / (2 std): 0/0 where std is 0, which PyTorch defines as 0."""
    x, v = _x(3, 4), _x(3, 4, seed=1)
    check_against_oracles(lambda x: x.unsqueeze(0).std(0, correction=0), x, v)
    check_against_oracles(lambda x: torch.std_mean(x.unsqueeze(0), 0, correction=0)[0], x, v)


def test_cat_of_constant_and_dual():
    """A list argument of a linear op with some zero tangents (prod's double backward)."""
    x, v = _x(3, 4), _x(3, 4, seed=1)
    c = _x(3, 4, seed=2)
    check_against_oracles(lambda x: torch.cat([c, x.sin()]), x, v)
    check_against_oracles(lambda x: torch.stack([torch.ones_like(x), x]), x, v)


@pytest.mark.parametrize("form", ["pure", "closure"])
def test_hvp_along_the_parameters_themselves(form):
    """``hvp(loss, params, params)`` (H @ w): in the closure form the direction
    objects are the very parameters that get swapped into duals."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x = _x(4, 3)
    params = dict(model.named_parameters())

    def pure(p):
        return torch.func.functional_call(model, p, (x,)).tanh().pow(2).sum()

    detached = {k: p.detach() for k, p in params.items()}
    expected = torch.autograd.functional.hvp(
        lambda w, b: pure({"weight": w, "bias": b}), tuple(detached.values()), tuple(detached.values())
    )[1]
    if form == "pure":
        hv = fwdgrad.hvp(pure, params, params)
    else:
        hv = fwdgrad.hvp(lambda: model(x).tanh().pow(2).sum(), params, params)
    torch.testing.assert_close(tuple(hv.values()), expected)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_a_dual_kept_past_its_transform_is_refused_not_mistaken():
    """Levels are depths in the stack of running transforms; a dual that escaped a
    finished transform must not pass for one of a new transform at the same depth."""
    kept = []

    def f(x):
        kept.append(x * 2)
        return x.sin()

    x = torch.randn(3)
    fwdgrad.jvp(f, (x,), (torch.ones(3),))
    with pytest.raises(RuntimeError, match="has finished"):
        fwdgrad.jvp(lambda y: y * kept[0], (x,), (torch.ones(3),))


def test_nested_levels_are_depths_and_leave_nothing_behind():
    from fwdgrad.interpreter import _stack

    def inner_uses_outer(x):
        return fwdgrad.jvp(lambda y: x * y, (x,), (torch.ones_like(x),))[1]

    x = torch.randn(3, dtype=torch.float64)
    _, t = fwdgrad.jvp(inner_uses_outer, (x,), (torch.ones(3, dtype=torch.float64),))
    assert torch.allclose(t, torch.ones(3, dtype=torch.float64))  # d/dx of x (outer tangent of x*1)
    with pytest.raises(ZeroDivisionError):
        fwdgrad.jvp(lambda y: 1 / 0, (x,), (x,))
    assert _stack() == []
