"""The oracles the tests compare fwdgrad with, in one place.

Central finite differences in float64 (of a function, and of a gradient), a
check that an op is served by an explicit rule, and a spy on a rule.  The
OpInfo sweep keeps its own dtype-aware variant in ``opinfo_util``.
"""

import contextlib

import torch

import fwdgrad
from fwdgrad import registry
from fwdgrad.registry import RULES


def float_outputs(out):
    """The floating and complex tensors among ``out`` (a tensor or a sequence)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())]


def finite_difference(f, primals, tangents, eps=1e-6, seed=None):
    """Central differences of each floating output of ``f`` along ``tangents``;
    ``seed`` reseeds the RNG before both calls so random ops draw alike."""
    def call(xs):
        if seed is not None:
            torch.manual_seed(seed)
        return float_outputs(f(*xs))

    plus = call([p + eps * t for p, t in zip(primals, tangents)])
    minus = call([p - eps * t for p, t in zip(primals, tangents)])
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def assert_jvp_matches_fd(f, *primals, seed=None, tol=1e-6, gen_seed=0):
    """fwdgrad's JVP of ``f`` along a random direction against central differences."""
    gen = torch.Generator().manual_seed(gen_seed)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)

    def g(*xs):
        if seed is not None:
            torch.manual_seed(seed)
        return f(*xs)

    out, tan = fwdgrad.jvp(g, primals, tangents)
    if seed is not None:
        torch.manual_seed(seed)
    plain = f(*primals)
    for a, b in zip(float_outputs(out), float_outputs(plain)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ours = float_outputs(tan)
    ref = finite_difference(f, primals, tangents, seed=seed)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m, i=i: f"output {i}: {m}")


def uses_rule(op):
    """The op is served by an explicit rule, not by the fallback."""
    assert op in RULES, f"{op} has no explicit rule"


def rand(*shape, low=-1.0, high=1.0):
    """Uniform float64 values in [low, high)."""
    return torch.rand(*shape, dtype=torch.float64) * (high - low) + low


def assert_gradient_jvp_matches_fd(f, *primals):
    """The JVP of x -> grad f(x), taken by fwdgrad through autograd's backward ops."""

    def grad_f(*xs):
        xs = [x.requires_grad_() for x in xs]
        return torch.autograd.grad(f(*xs), xs, create_graph=True)

    gen = torch.Generator().manual_seed(0)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    _, ours = fwdgrad.jvp(grad_f, primals, tangents)
    eps = 1e-6
    plus = grad_f(*[(p + eps * t).detach() for p, t in zip(primals, tangents)])
    minus = grad_f(*[(p - eps * t).detach() for p, t in zip(primals, tangents)])
    for a, b, c in zip(ours, plus, minus):
        ref = (b - c) / (2 * eps)
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6 * max(1.0, ref.abs().max().item()))


@contextlib.contextmanager
def spy_rule(op):
    """Count the calls of ``op``'s registered rule."""
    original = registry.RULES[op]
    calls = []

    def spy(*args, **kwargs):
        calls.append(op)
        return original(*args, **kwargs)

    registry.register_jvp(op, spy)
    try:
        yield calls
    finally:
        registry.register_jvp(op, original)


def gradient_differences(f, args, tangents, eps=1e-6):
    """Central differences of the gradient of the scalar ``f``: the oracle where
    PyTorch has no double backward."""
    def gradient(sign):
        shifted = [(a + sign * eps * t).requires_grad_() for a, t in zip(args, tangents)]
        return torch.autograd.grad(f(*shifted), shifted)

    return tuple((p - m) / (2 * eps) for p, m in zip(gradient(1), gradient(-1)))
