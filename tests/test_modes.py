"""Every public transform under the caller's modes: no_grad, enable_grad, inference_mode, autocast.

A transform computes the same values whatever grad or inference mode it is
called in (it needs grad mode inside, and leaves inference mode for its own
work, as torch.func does); the oracle is the same call in the default mode.
Under autocast, tangents follow the dtypes of the primal kernels that ran:
each rule family is checked against torch.func.jvp under the same autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdgrad

MODES = {
    "no_grad": torch.no_grad,
    "enable_grad": torch.enable_grad,
    "inference_mode": torch.inference_mode,
}


def _cube(w):
    return (w ** 3).sum()


def _calls():
    """name -> function of (x, v, model) giving the transform's results."""
    x = [1.0, 2.0, -0.5]

    def pure(params):
        w, b = params
        return (torch.tanh(w.squeeze(1) * b) ** 2).sum()

    return {
        "jvp": lambda x, v, m: fwdgrad.jvp(torch.sin, (x,), (v,)),
        "jvp_batched": lambda x, v, m: fwdgrad.jvp(torch.sin, (x,), (torch.stack([v, 2 * v]),), batched=True),
        "jvp_traced": lambda x, v, m: fwdgrad.jvp(torch.sin, (x,), (v,), trace=True),
        "forward_grad": lambda x, v, m: fwdgrad.forward_grad(torch.sin)(x, v),
        "forward_grad_traced": lambda x, v, m: fwdgrad.forward_grad(torch.tanh, trace=True)(x, v),
        "jacfwd": lambda x, v, m: fwdgrad.jacfwd(torch.sin)(x),
        "linearize": lambda x, v, m: fwdgrad.linearize(torch.sin, x)[1](v),
        "hessian": lambda x, v, m: fwdgrad.hessian(_cube)(x),
        "grad": lambda x, v, m: fwdgrad.grad(_cube)(x),
        "value_and_grad": lambda x, v, m: fwdgrad.value_and_grad(_cube)(x),
        "hvp": lambda x, v, m: fwdgrad.hvp(_cube, x, v),
        "value_grad_and_hvp": lambda x, v, m: fwdgrad.value_grad_and_hvp(_cube, x, v),
        "hvp_sequence": lambda x, v, m: fwdgrad.hvp(lambda w, b: pure((w, b)), [x.view(3, 1), x], [v.view(3, 1), v]),
        "hvp_closure": lambda x, v, m: fwdgrad.hvp(
            lambda: m(x).pow(2).sum(), list(m.parameters()), [torch.ones_like(p) for p in m.parameters()]
        ),
        "jacfwd_of_model": lambda x, v, m: fwdgrad.jacfwd(m)(x),
    }, x


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(_calls()[0]))
def test_transforms_under_outer_modes(name, mode):
    calls, data = _calls()
    run = calls[name]
    m = _model()
    x = torch.tensor(data, dtype=torch.float64)
    v = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    want = run(x, v, m)
    params = [(p, p.detach().clone()) for p in m.parameters()]
    with MODES[mode]():
        # inputs made inside the mode (inference tensors under inference_mode)
        x2, v2 = x.clone(), v.clone()
        if mode == "inference_mode" and name == "hvp_closure":
            # an inference tensor the closure captures cannot enter autograd: PyTorch's clear error
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                run(x2, v2, m)
            got = run(x, v, m)
        else:
            got = run(x2, v2, m)
    torch.testing.assert_close(got, want)
    for (p, value), now in zip(params, m.parameters()):
        assert now is p and type(now) is torch.nn.Parameter and torch.equal(now.detach(), value)


def test_hvp_closure_on_a_model_made_in_inference_mode():
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.inference_mode():
        m = _model()  # inference-tensor parameters
        v = [torch.ones_like(p) for p in m.parameters()]
        hv = fwdgrad.hvp(lambda: m(x).pow(2).sum(), list(m.parameters()), v)
    ref = _model()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), m.parameters()):
            p.copy_(q)
    names = [n for n, _ in ref.named_parameters()]
    want = torch.autograd.functional.hvp(
        lambda *ps: torch.func.functional_call(ref, dict(zip(names, ps)), (x.clone(),)).pow(2).sum(),
        tuple(p.detach() for p in ref.parameters()),
        tuple(torch.ones_like(p) for p in ref.parameters()),
    )[1]
    torch.testing.assert_close(hv, list(want))
    assert all(type(p) is torch.nn.Parameter for p in m.parameters())


# ---- autocast ------------------------------------------------------------------

torch.manual_seed(0)
_lin = torch.nn.Linear(8, 8)
_conv = torch.nn.Conv1d(4, 4, 3, padding=1)
_ln = torch.nn.LayerNorm(8)
_w = torch.randn(8, 8)


def _sdpa(q):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, q.tanh(), q)


FAMILIES = {
    "linear": lambda q: _lin(q),
    "matmul": lambda q: q @ _w,
    "bmm": lambda q: torch.bmm(q.flatten(0, 1), q.flatten(0, 1).transpose(1, 2)),
    "baddbmm": lambda q: torch.baddbmm(q.flatten(0, 1)[:, :, :4], q.flatten(0, 1), q.flatten(0, 1).transpose(1, 2)[:, :, :4]),
    "conv1d": lambda q: _conv(q.flatten(0, 1)[:, :4]),
    "softmax": lambda q: (q @ _w).softmax(-1),
    "log_softmax": lambda q: F.log_softmax(_lin(q), -1),
    "layer_norm": lambda q: _ln(_lin(q)),
    "pointwise": lambda q: torch.tanh(_lin(q)).exp() * q.sigmoid(),
    "reductions": lambda q: _lin(q).sum(-1) + _lin(q).amax(-1) + _lin(q).pow(2).mean(),
    "sdpa_math": _sdpa,
    "losses": lambda q: F.mse_loss(_lin(q), q) + F.cross_entropy(_lin(q).flatten(0, 2), torch.zeros(8, dtype=torch.long)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_autocast_rule_families_follow_the_primal_kernels(family, dtype):
    f = FAMILIES[family]
    torch.manual_seed(1)
    q = torch.randn(1, 2, 4, 8)
    t = torch.randn_like(q)
    with torch.autocast("cpu", dtype):
        plain = f(q)
        want_out, want_t = torch.func.jvp(f, (q,), (t,))
        out, got_t = fwdgrad.jvp(f, (q,), (t,))
    # tangents take the primal's dtype (torch.func's may not: layer_norm's is float32)
    assert out.dtype == plain.dtype == want_out.dtype == got_t.dtype
    # the primal is the plain call's, bit for bit (torch.func's may differ in the last bit)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    tol = 2e-2 if dtype is torch.bfloat16 else 2e-3
    scale = want_t.float().abs().max().clamp_min(1)
    torch.testing.assert_close(got_t.float() / scale, want_t.float() / scale, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_transform_under_autocast(dtype):
    f = FAMILIES["layer_norm"]
    torch.manual_seed(2)
    q = torch.randn(1, 2, 4, 8)
    t = torch.randn_like(q)
    with torch.autocast("cpu", dtype):
        want = torch.func.jvp(f, (q,), (t,))[1]
        results = {
            "jvp": fwdgrad.jvp(f, (q,), (t,))[1],
            "forward_grad": fwdgrad.forward_grad(f)(q, t)[1],
            "traced": fwdgrad.jvp(f, (q,), (t,), trace=True)[1],
            "batched": fwdgrad.jvp(f, (q,), (t[None],), batched=True)[1][0],
            "linearize": fwdgrad.linearize(f, q)[1](t),
            "jacfwd": torch.einsum("...ijkl,ijkl->...", fwdgrad.jacfwd(f)(q).float(), t),
        }
        # (a weighted loss: the plain sum of squares of a layer norm is constant)
        c = torch.linspace(-1, 2, 8)
        loss = lambda q: (f(q).float() * c).pow(2).sum()  # noqa: E731
        g = fwdgrad.grad(loss)(q)
        g_want = torch.func.grad(loss)(q)
        hv = fwdgrad.hvp(loss, q, t)
        hv_want = torch.func.jvp(torch.func.grad(loss), (q,), (t,))[1]
    tol = dict(atol=5e-2, rtol=5e-2)
    for name, got in results.items():
        assert got.dtype == results["jvp"].dtype, name
        torch.testing.assert_close(got.float(), results["jvp"].float(), **tol, msg=name)
    torch.testing.assert_close(results["jvp"].float(), want.float(), **tol)
    # low precision inside: compare relative to the largest entry
    for got, ref in ((g, g_want), (hv, hv_want)):
        scale = ref.abs().max()
        torch.testing.assert_close(got / scale, ref / scale, atol=5e-2, rtol=0)


def test_autocast_reverse_over_forward():
    """Tangents computed under autocast stay differentiable (the rules run with autograd)."""
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    t = torch.randn_like(q)
    with torch.autocast("cpu", torch.bfloat16):
        _, dt = fwdgrad.jvp(FAMILIES["pointwise"], (q,), (t,))
        (g,) = torch.autograd.grad(dt.float().sum(), q)
        _, dt_ref = torch.func.jvp(FAMILIES["pointwise"], (q,), (t,))
        (g_ref,) = torch.autograd.grad(dt_ref.float().sum(), q)
    torch.testing.assert_close(g, g_ref, atol=5e-2, rtol=5e-2)


