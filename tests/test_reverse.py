"""grad and value_and_grad, and every composition of forward and reverse mode.

Oracles: torch.func (grad, jvp, hessian) and torch.autograd.functional in float64.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import fwdgrad
from fwdgrad.interpreter import Dual

D = torch.float64


def _randn(*shape):
    return torch.randn(*shape, dtype=D)


def f(x):
    return (x.sin() * x).sum() + (x * x).sum() ** 2 + x.exp().sum().log()


# ---- grad and value_and_grad -----------------------------------------------------------


def test_grad_matches_torch_func():
    x = _randn(4)
    g = fwdgrad.grad(f)(x)
    torch.testing.assert_close(g, torch.func.grad(f)(x))
    assert not g.requires_grad and type(g) is torch.Tensor
    assert not x.requires_grad


def test_grad_argnums_pytrees_and_kwargs():
    def h(a, params, b, *, scale):
        return scale * (a * params["w"]).sin().sum() + (params["b"] * b).sum()

    a, b = _randn(3), _randn(3)
    params = {"w": _randn(3), "b": _randn(3)}
    ours = fwdgrad.grad(h, argnums=(1, 0, -1))(a, params, b, scale=2.0)
    ref = torch.func.grad(h, argnums=(1, 0, 2))(a, params, b, scale=2.0)
    assert isinstance(ours, tuple) and len(ours) == 3 and set(ours[0]) == {"w", "b"}
    for o, r in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(ref)):
        torch.testing.assert_close(o, r)


def test_value_and_grad_and_has_aux():
    x = _randn(4)

    def h(x):
        y = x.exp()
        return y.sum(), {"y": y, "note": torch.tensor(1.0)}

    (value, aux), g = fwdgrad.value_and_grad(h, has_aux=True)(x)
    torch.testing.assert_close(value, x.exp().sum())
    torch.testing.assert_close(g, x.exp())
    torch.testing.assert_close(aux["y"], x.exp())
    assert aux["note"] == 1 and not aux["y"].requires_grad and not value.requires_grad
    with pytest.raises(fwdgrad.ArgumentTypeError, match=r"aux\['note'\] is a str"):
        fwdgrad.value_and_grad(lambda x: (x.sum(), {"note": "kept"}), has_aux=True)(x)
    g2, aux2 = fwdgrad.grad(h, has_aux=True)(x)
    torch.testing.assert_close(g2, x.exp())
    value, g3 = fwdgrad.value_and_grad(f)(x)
    torch.testing.assert_close(value, f(x))
    torch.testing.assert_close(g3, torch.func.grad(f)(x))


def test_grad_of_a_function_that_ignores_its_input_is_zero():
    x = _randn(3)
    assert torch.equal(fwdgrad.grad(lambda x: torch.ones((), dtype=D))(x), torch.zeros(3, dtype=D))
    y = _randn(3)
    g = fwdgrad.grad(lambda x, y: (y * 2).sum(), argnums=0)(x, y)
    assert torch.equal(g, torch.zeros(3, dtype=D))


def test_grad_ignores_an_outer_no_grad_and_respects_an_inner_one():
    x = _randn(3)
    with torch.no_grad():
        torch.testing.assert_close(fwdgrad.grad(f)(x), torch.func.grad(f)(x))

    def half_blocked(x):
        with torch.no_grad():
            c = x * x
        return (c * x).sum()

    torch.testing.assert_close(fwdgrad.grad(half_blocked)(x), x * x)


def test_grad_treats_captured_copies_of_the_input_as_constants():
    # d/dx [x * d/dy (x y)] at y = x: the inner gradient is x (a constant to the inner grad).
    x = torch.tensor(3.0, dtype=D)
    outer = fwdgrad.grad(lambda x: x * fwdgrad.grad(lambda y: x * y)(x))(x)
    torch.testing.assert_close(outer, 2 * x)


def test_grad_keeps_the_graph_for_captured_parameters():
    # The gradient is differentiable w.r.t. a parameter it closes over (create_graph).
    w = _randn(3).requires_grad_()
    x = _randn(3)
    g = fwdgrad.grad(lambda x: (w * x).sin().sum())(x)
    assert g.requires_grad
    (dw,) = torch.autograd.grad(g.sum(), w)
    ref = torch.func.grad(lambda w: torch.func.grad(lambda x: (w * x).sin().sum())(x).sum())(w.detach())
    torch.testing.assert_close(dw, ref)
    # ... and builds no graph when nothing outside needs one.
    assert not fwdgrad.grad(lambda x: (x.detach() * x).sin().sum())(x).requires_grad


def test_grad_errors():
    x = _randn(3)
    with pytest.raises(ValueError, match=r"must return a scalar \(0-dim\) tensor, got one of shape \(3,\)"):
        fwdgrad.grad(lambda x: x * 2)(x)
    with pytest.raises(TypeError, match="must return a scalar tensor, got tuple"):
        fwdgrad.grad(lambda x: (x.sum(), 1))(x)
    with pytest.raises(TypeError, match="with has_aux=True, func must return a pair"):
        fwdgrad.grad(lambda x: x.sum(), has_aux=True)(x)
    with pytest.raises(TypeError, match="argument 0 has dtype torch.int64"):
        fwdgrad.grad(lambda x: x.sum())(torch.arange(3))
    with pytest.raises(ValueError, match="out of range"):
        fwdgrad.grad(f, argnums=1)(x)
    with pytest.raises(ValueError, match="duplicates"):
        fwdgrad.grad(lambda a, b: a.sum(), argnums=(0, -2))(x, x)
    with pytest.raises(TypeError, match=r"argnums must be int or Tuple\[int, ...\]"):
        fwdgrad.grad(f, argnums=[0])(x)
    with pytest.raises(TypeError, match="func must be callable"):
        fwdgrad.grad(3)


# ---- forward over reverse, reverse over forward, reverse over reverse ---------------------


def test_jvp_of_grad_is_a_hessian_vector_product():
    x, v = _randn(4), _randn(4)
    _, hv = fwdgrad.jvp(fwdgrad.grad(f), (x,), (v,))
    torch.testing.assert_close(hv, torch.autograd.functional.hessian(f, x) @ v)
    value, dvalue = fwdgrad.jvp(lambda x: fwdgrad.value_and_grad(f)(x)[0], (x,), (v,))
    torch.testing.assert_close(dvalue, torch.func.grad(f)(x) @ v)


def test_grad_of_grad():
    x = _randn(4)
    ours = fwdgrad.grad(lambda x: fwdgrad.grad(f)(x).square().sum())(x)
    ref = torch.func.grad(lambda x: torch.func.grad(f)(x).square().sum())(x)
    torch.testing.assert_close(ours, ref)


def test_grad_of_a_jvp_based_function():
    x, v = _randn(4), _randn(4)

    def directional(x):
        return fwdgrad.jvp(f, (x,), (v,))[1]

    torch.testing.assert_close(fwdgrad.grad(directional)(x), torch.autograd.functional.hessian(f, x) @ v)


def test_jvp_of_jvp_gives_second_directional_derivatives():
    x, u, v = _randn(4), _randn(4), _randn(4)

    def df(x):
        return fwdgrad.jvp(f, (x,), (u,))[1]

    _, ours = fwdgrad.jvp(df, (x,), (v,))
    ref = torch.func.jvp(lambda x: torch.func.jvp(f, (x,), (u,))[1], (x,), (v,))[1]
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, u @ torch.autograd.functional.hessian(f, x) @ v)


def test_no_perturbation_confusion():
    # d/dx [x * d/dy (x * y)] = d/dx [x * x] = 2x, not x.
    def outer(x):
        _, inner = fwdgrad.jvp(lambda y: x * y, (torch.tensor(1.5, dtype=D),), (torch.tensor(1.0, dtype=D),))
        return x * inner

    x = torch.tensor(2.0, dtype=D)
    _, d = fwdgrad.jvp(outer, (x,), (torch.tensor(1.0, dtype=D),))
    torch.testing.assert_close(d, 2 * x)
    # The same with the inner derivative taken in reverse mode inside the forward one.
    _, d = fwdgrad.jvp(lambda x: x * fwdgrad.grad(lambda y: x * y)(torch.tensor(1.5, dtype=D)),
                       (x,), (torch.tensor(1.0, dtype=D),))
    torch.testing.assert_close(d, 2 * x)


def test_jacfwd_of_grad_is_the_hessian():
    x = _randn(4)
    H = torch.func.hessian(f)(x)
    torch.testing.assert_close(fwdgrad.jacfwd(fwdgrad.grad(f))(x), H)
    torch.testing.assert_close(fwdgrad.jacfwd(fwdgrad.grad(f), chunk_size=3)(x), H)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()  # parameters require grad

    def g(x):
        return model(x).sum()

    torch.testing.assert_close(fwdgrad.jacfwd(fwdgrad.grad(g))(x), torch.func.hessian(g)(x))


def test_third_order_jvp_of_hvp():
    x, u, v = _randn(3), _randn(3), _randn(3)

    def g(x):
        return (x.sin() * x.cos().sum()).sum()

    _, ours = fwdgrad.jvp(lambda x: fwdgrad.hvp(g, x, v), (x,), (u,))
    ref = torch.func.jvp(lambda x: torch.func.jvp(torch.func.grad(g), (x,), (v,))[1], (x,), (u,))[1]
    torch.testing.assert_close(ours, ref)


def _batch_norm_by_hand(x, w, b, eps=1e-5):
    dims = [0, 2, 3]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _layer_norm_by_hand(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, correction=0, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * w + b


class _ConvNet(nn.Module):
    """Convolution, batch norm (batch statistics), SiLU, max-pool, layer norm, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.ln = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x, by_hand=False):
        h = self.conv(x)
        h = _batch_norm_by_hand(h, self.bn.weight, self.bn.bias) if by_hand else self.bn(h)
        h = F.max_pool2d(F.silu(h), 2).flatten(1)
        h = _layer_norm_by_hand(h, self.ln.weight, self.ln.bias) if by_hand else self.ln(h)
        return self.fc(h)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_reverse_over_forward_into_module_parameters(name):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).double()
        x = _randn(5, 4)
        kwargs = {}
    else:
        model = _ConvNet().double()
        x = _randn(4, 2, 4, 4)
        # torch.func's reverse over forward through layer_norm and batch_norm is
        # wrong on torch 2.13 (see the finite-difference test below): its oracle
        # runs the same model with the normalisations written out by hand.
        kwargs = {"by_hand": True}
    v = torch.randn_like(x)
    params = dict(model.named_parameters())
    # Consistency-model style: a loss on the tangent, and .backward() into the parameters.
    out, tangent = fwdgrad.jvp(model, (x,), (v,))
    loss = tangent.square().mean() + out.sum()
    loss.backward()
    ours = {k: p.grad for k, p in params.items()}

    def ref_loss(ps):
        o, t = torch.func.jvp(lambda x: functional_call(model, ps, (x,), kwargs), (x,), (v,))
        return t.square().mean() + o.sum()

    ref = torch.func.grad(ref_loss)({k: p.detach() for k, p in params.items()})
    for k in params:
        assert ours[k] is not None, k
        torch.testing.assert_close(ours[k], ref[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm", "group_norm"])
def test_reverse_over_forward_through_normalisation_statistics(norm):
    # The kernels' mean and rstd outputs are constants to autograd; the tangent
    # still has to be differentiated through them.  Oracle: finite differences.
    g = {
        "layer_norm": lambda x: F.layer_norm(x, (4,)),
        "batch_norm": lambda x: F.batch_norm(x, None, None, training=True),
        "group_norm": lambda x: F.group_norm(x.view(1, 2, 4), 2).view(2, 4),
    }[norm]
    torch.manual_seed(0)
    x, v = _randn(2, 4), _randn(2, 4)
    xr = x.clone().requires_grad_()
    _, t = fwdgrad.jvp(g, (xr,), (v,))
    (ours,) = torch.autograd.grad(t.square().sum(), xr)

    def tangent_by_differences(x, eps=1e-5):
        return (g(x + eps * v) - g(x - eps * v)) / (2 * eps)

    expected = torch.zeros_like(x)
    eps = 1e-4
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        d = d.view_as(x)
        plus = tangent_by_differences(x + d).square().sum()
        minus = tangent_by_differences(x - d).square().sum()
        expected.view(-1)[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_reverse_over_forward_with_respect_to_primals_and_tangents():
    x = _randn(3).requires_grad_()
    v = _randn(3).requires_grad_()
    _, t = fwdgrad.jvp(lambda x: x.sin() * x, (x,), (v,))
    gx, gv = torch.autograd.grad(t.sum(), (x, v))
    torch.testing.assert_close(gx, (2 * x.cos() - x * x.sin()).detach() * v.detach())
    torch.testing.assert_close(gv, (x.sin() + x * x.cos()).detach())


class _Cube(torch.autograd.Function):
    """x ** 3 with a hand-written backward and no jvp staticmethod."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * grad * x * x


def test_custom_autograd_function_without_jvp():
    x, v = _randn(4), _randn(4)

    def g(x):
        return _Cube.apply(x.sin()).sum()

    # Forward mode runs through the Function's forward ops...
    _, t = fwdgrad.jvp(lambda x: _Cube.apply(x), (x,), (v,))
    torch.testing.assert_close(t, 3 * x * x * v)
    # ... and forward over reverse through its backward ops.
    torch.testing.assert_close(fwdgrad.hvp(g, x, v), torch.autograd.functional.hvp(g, x, v)[1])
    w = nn.Parameter(x.clone())
    torch.testing.assert_close(fwdgrad.hvp(lambda: g(w), [w], [v])[0], torch.autograd.functional.hvp(g, x, v)[1])
    # torch.func cannot do this without a jvp staticmethod.
    with pytest.raises(RuntimeError):
        torch.func.jvp(lambda x: _Cube.apply(x), (x,), (v,))


def test_backward_inside_jvp_accumulates_dual_gradients():
    # .backward() (not torch.autograd.grad) inside a transform: .grad carries the tangent.
    w = _randn(3)
    v = _randn(3)

    def grad_by_backward(w):
        leaf = fwdgrad.reverse.detach_keeping_tangents(w).requires_grad_()
        (leaf ** 3).sum().backward()
        return leaf.grad

    _, hv = fwdgrad.jvp(grad_by_backward, (w,), (v,))
    torch.testing.assert_close(hv, 6 * w * v)


# ---- composition with torch.func transforms (the table in docs/composition.rst) --------


def test_compose_jvp_over_torch_func_grad():
    x, v = _randn(4), _randn(4)
    _, hv = fwdgrad.jvp(torch.func.grad(f), (x,), (v,))
    torch.testing.assert_close(hv, torch.autograd.functional.hessian(f, x) @ v)


def test_compose_grad_over_torch_func_grad():
    x, v = _randn(4), _randn(4)
    ours = fwdgrad.grad(lambda x: torch.func.grad(f)(x) @ v)(x)
    torch.testing.assert_close(ours, torch.autograd.functional.hessian(f, x) @ v)


def test_compose_torch_func_grad_and_jacrev_over_fwdgrad_grad():
    x, v = _randn(4), _randn(4)
    H = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(torch.func.grad(lambda x: fwdgrad.grad(f)(x) @ v)(x), H @ v)
    torch.testing.assert_close(torch.func.jacrev(fwdgrad.grad(f))(x), H)


def test_compose_jvp_over_torch_func_jacrev_and_vmap():
    x, v = _randn(3), _randn(3)
    _, t = fwdgrad.jvp(torch.func.jacrev(torch.sin), (x,), (v,))
    torch.testing.assert_close(t, torch.diag(-x.sin() * v))
    X, V = _randn(4, 3), _randn(4, 3)
    _, t = fwdgrad.jvp(torch.func.vmap(lambda r: r.sin() * r.sum()), (X,), (V,))
    ref = torch.func.jvp(torch.func.vmap(lambda r: r.sin() * r.sum()), (X,), (V,))[1]
    torch.testing.assert_close(t, ref)


def test_compose_with_functional_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = _randn(5, 3)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(ps):
        return functional_call(model, ps, (x,)).square().sum()

    ref_t = torch.func.jvp(lambda ps: functional_call(model, ps, (x,)), (params,), (v,))[1]
    torch.testing.assert_close(fwdgrad.jvp(lambda ps: functional_call(model, ps, (x,)), (params,), (v,))[1], ref_t)
    ref_g = torch.func.grad(loss)(params)
    ref_hv = torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]
    ours_g = fwdgrad.grad(loss)(params)
    ours_hv = fwdgrad.hvp(loss, params, v)
    for k in params:
        torch.testing.assert_close(ours_g[k], ref_g[k])
        torch.testing.assert_close(ours_hv[k], ref_hv[k])


def test_duals_never_escape():
    x, v = _randn(3), _randn(3)
    out, t = fwdgrad.jvp(fwdgrad.grad(f), (x,), (v,))
    assert type(out) is torch.Tensor and type(t) is torch.Tensor
    g = fwdgrad.grad(lambda x: fwdgrad.jvp(f, (x,), (v,))[1])(x)
    assert type(g) is torch.Tensor
    assert not isinstance(fwdgrad.hvp(f, x, v), Dual)
