"""Parametrized modules and the closure form of hvp; the weight-norm rules.

``torch.nn.utils.parametrize`` (and ``parametrizations.weight_norm``,
``spectral_norm``, the older hook-based ``weight_norm``) computes a weight
from other parameters on every access.  The closure form of ``hvp`` swaps the
underlying parameters (``parametrizations.weight.original*``), and the
weight-norm kernel's backward gets a rule.  PyTorch's own double backward of
``_weight_norm_interface`` is wrong (it treats the saved norm as constant:
0.14 off on a 6x4x3 weight), so the oracles here are finite differences of
plain gradients, in float64.
"""

import warnings

import pytest
import torch
from torch import Tensor
from torch.nn.utils import parametrizations, parametrize

import fwdgrad

D = torch.float64
aten = torch.ops.aten


def _fd_hvp(loss, params, v, h=1e-6):
    names = list(params)

    def grads(shift):
        originals = [params[k].detach().clone() for k in names]
        with torch.no_grad():
            for k in names:
                params[k].add_(v[k], alpha=shift)
        try:
            return torch.autograd.grad(loss(), [params[k] for k in names])
        finally:
            with torch.no_grad():
                for k, o in zip(names, originals):
                    params[k].copy_(o)

    plus, minus = grads(h), grads(-h)
    return {k: (a - b) / (2 * h) for k, a, b in zip(names, plus, minus)}


def _snapshot(module):
    return {k: (t, t.detach().clone()) for k, t in module.state_dict(keep_vars=True).items()}


def _assert_intact(module, snapshot):
    now = module.state_dict(keep_vars=True)
    assert now.keys() == snapshot.keys()
    for k, (obj, value) in snapshot.items():
        assert now[k] is obj, f"{k} is a different object"
        assert type(obj) in (torch.Tensor, torch.nn.Parameter), f"{k} is a {type(obj).__name__}"
        assert torch.equal(obj, value), f"{k} changed"


@pytest.mark.parametrize("dim", [0, 2])  # (the fused kernel takes the first or last dim)
def test_weight_norm_interface_rules(dim):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(6, 4, 3, dtype=D, generator=gen)
    g = torch.randn([6 if dim == 0 else 1, 1, 3 if dim != 0 else 1], dtype=D, generator=gen)
    w, n = aten._weight_norm_interface(v, g, dim)
    gw = torch.randn_like(w)
    h = 1e-6
    for op, args in ((aten._weight_norm_interface.default, (v, g)),
                     (aten._weight_norm_interface_backward.default, (gw, v, g, n))):
        ts = tuple(torch.randn(a.shape, dtype=D, generator=gen) for a in args)
        _, tangent = fwdgrad.jvp(lambda *xs: op(*xs, dim), args, ts)
        plus = op(*[a + h * t for a, t in zip(args, ts)], dim)
        minus = op(*[a - h * t for a, t in zip(args, ts)], dim)
        for ours, p, m in zip(tangent, plus, minus):
            torch.testing.assert_close(ours, (p - m) / (2 * h), rtol=1e-6, atol=1e-8)


def _weight_normed():
    conv = torch.nn.Conv1d(4, 6, 3).to(D)
    return parametrizations.weight_norm(conv, dim=2)


def _spectral_normed():
    lin = torch.nn.Linear(5, 4).to(D)
    parametrizations.spectral_norm(lin)
    lin.eval()  # no power iteration: a plain call leaves the buffers as they are
    return lin


def _old_weight_norm():
    conv = torch.nn.Conv1d(4, 6, 3).to(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return torch.nn.utils.weight_norm(conv)


class _Symmetric(torch.nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).mT


def _custom():
    lin = torch.nn.Linear(4, 4).to(D)
    parametrize.register_parametrization(lin, "weight", _Symmetric())
    return lin


MODULES = {"weight_norm": (_weight_normed, (2, 4, 7)), "spectral_norm": (_spectral_normed, (3, 5)),
           "custom": (_custom, (3, 4))}


@pytest.mark.parametrize("name", MODULES)
def test_closure_hvp_with_parametrizations(name):
    torch.manual_seed(0)
    make, shape = MODULES[name]
    module = make()
    x = torch.randn(*shape, dtype=D)

    def loss():
        return (module(x).sin() ** 2).sum()

    params = dict(module.named_parameters())
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, dtype=D, generator=gen) for k, p in params.items()}
    before = _snapshot(module)
    hv = fwdgrad.hvp(loss, params, v)
    _assert_intact(module, before)
    expected = _fd_hvp(loss, params, v)
    for k in params:
        torch.testing.assert_close(hv[k], expected[k], rtol=1e-6, atol=1e-7)
    loss().backward()  # the module still works with plain autograd
    assert all(p.grad is not None for p in module.parameters())


def test_hook_weight_norm_is_refused_clearly():
    # The deprecated hook-based weight_norm keeps the last computed weight (and its
    # graph, which holds weight_g and weight_v) on the module: the closure form
    # cannot swap those parameters, and says so before touching anything.
    module = _old_weight_norm()
    x = torch.randn(2, 4, 7, dtype=D)
    params = dict(module.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    before = _snapshot(module)
    with pytest.raises(RuntimeError, match="another reference to it is alive"):
        fwdgrad.hvp(lambda: module(x).sum(), params, v)
    _assert_intact(module, before)


# A custom op whose backward has no rule and no double backward: inside hvp the
# missing rule must surface as itself, and the model must come back intact.


@torch.library.custom_op("fwdgrad_tests::cube", mutates_args=())
def _cube(x: Tensor) -> Tensor:
    return x ** 3


@torch.library.custom_op("fwdgrad_tests::cube_backward", mutates_args=())
def _cube_backward(g: Tensor, x: Tensor) -> Tensor:
    return 3 * g * x ** 2


_cube.register_autograd(lambda ctx, g: _cube_backward(g, ctx.saved_tensors[0]),
                        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))
fwdgrad.register_jvp(torch.ops.fwdgrad_tests.cube.default,
                     lambda t, ans, x: None if t[0] is None else 3 * x ** 2 * t[0])


class _Cube(torch.nn.Module):
    def forward(self, w):
        return _cube(w)


def test_missing_backward_rule_surfaces_and_leaves_the_model_intact():
    torch.manual_seed(0)
    module = _weight_normed()
    parametrize.register_parametrization(module, "bias", _Cube())
    x = torch.randn(2, 4, 7, dtype=D)
    params = dict(module.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    before = _snapshot(module)
    with pytest.raises(NotImplementedError, match="cube_backward"):
        fwdgrad.hvp(lambda: module(x).sin().sum(), params, v)
    _assert_intact(module, before)
    module(x).sum().backward()
    assert all(p.grad is not None for p in module.parameters())
