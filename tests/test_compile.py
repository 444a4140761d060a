"""fwdgrad under torch.compile: one graph, no recompiles, the same values as eager.

The default tests compile with ``backend="aot_eager"``: Dynamo and
AOTAutograd trace exactly as they do for inductor (the dual's
``__torch_dispatch__`` is traced into plain aten ops), without the C++
compile.  The inductor runs are marked ``compile`` (``pytest -m compile``).
"""

import pytest
import torch
from torch._dynamo.utils import counters

import fwdgrad
from fwdgrad.interpreter import Dual


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def chain(x):
    for _ in range(3):
        x = torch.cos(torch.sin(x) * 1.5) + torch.tanh(x).sum() * 0.1
    return x


def mlp(w1, w2, x):
    return torch.tanh(x @ w1) @ w2


def graphs():
    return counters["stats"]["unique_graphs"]


def close(a, b, atol=1e-6, rtol=1e-5):
    return all(torch.allclose(p, q, atol=atol, rtol=rtol) for p, q in zip(a, b))


def test_compiled_jvp_fullgraph_matches_eager_and_oracle_without_recompiling():
    c = torch.compile(lambda x, v: fwdgrad.jvp(chain, (x,), (v,)), fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    for _ in range(4):  # new values each call: one graph, no recompile (levels are depths)
        x, v = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        out = c(x, v)
        assert close(out, fwdgrad.jvp(chain, (x,), (v,)))
        assert close(out, torch.func.jvp(chain, (x,), (v,)))
    assert graphs() == 1
    assert not counters["recompiles"]


def test_compiled_jvp_of_an_mlp_with_respect_to_weights_and_a_nested_jvp():
    torch.manual_seed(0)
    w1, w2, x = torch.randn(4, 6), torch.randn(6, 3), torch.randn(5, 4)
    d1, d2 = torch.randn_like(w1), torch.randn_like(w2)

    def step(w1, w2, d1, d2):
        return fwdgrad.jvp(lambda a, b: mlp(a, b, x), (w1, w2), (d1, d2))

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(w1, w2, d1, d2)
    assert close(out, torch.func.jvp(lambda a, b: mlp(a, b, x), (w1, w2), (d1, d2)))

    # Second derivative along v (jvp of jvp): two levels inside one graph.
    def second(x, v):
        return fwdgrad.jvp(lambda y: fwdgrad.jvp(torch.sin, (y,), (v,))[1], (x,), (v,))[1]

    xs, v = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = torch.compile(second, fullgraph=True, backend="aot_eager")(xs, v)
    assert torch.allclose(got, -torch.sin(xs) * v * v)


def test_compiled_forward_grad_fullgraph():
    df = fwdgrad.forward_grad(lambda x, y: x * torch.exp(y))
    c = torch.compile(lambda x, dx, y: df(x, dx, y, None), fullgraph=True, backend="aot_eager")
    x, dx, y = torch.randn(5), torch.randn(5), torch.randn(5)
    r, dr = c(x, dx, y)
    assert torch.allclose(r, x * torch.exp(y)) and torch.allclose(dr, dx * torch.exp(y))


def test_jvp_of_a_compiled_function_leaves_its_plain_compiled_calls_alone():
    cf = torch.compile(chain, backend="aot_eager")
    x, v = torch.randn(8), torch.randn(8)
    cf(x)
    before = graphs()
    out = fwdgrad.jvp(cf, (x,), (v,))
    assert close(out, torch.func.jvp(chain, (x,), (v,)))
    with_duals = graphs()
    assert with_duals == before + 1  # one graph for dual inputs
    for i in range(3):  # neither plain calls nor further jvps compile again
        assert torch.allclose(cf(x + i), chain(x + i), atol=1e-6)
        fwdgrad.jvp(cf, (x + i,), (v,))
    assert graphs() == with_duals
    assert not counters["recompiles"]


def test_compiled_hvp_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    expected = torch.autograd.functional.hvp(
        lambda *ps: loss(dict(zip(params, ps))), tuple(params.values()), tuple(v.values())
    )[1]
    step = lambda p, v: fwdgrad.hvp(loss, p, v)  # noqa: E731
    # Default Dynamo config: autograd.grad is not traced, so hvp runs eagerly behind one break.
    got = torch.compile(step, backend="aot_eager")(params, v)
    assert all(torch.allclose(got[k], e, atol=1e-5) for k, e in zip(params, expected))
    # Dynamo tracing autograd.grad: the whole forward-over-reverse pass is one graph.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(params, v)
    assert all(torch.allclose(got[k], e, atol=1e-5) for k, e in zip(params, expected))


def test_dual_flattens_to_its_primal_and_tangent():
    p, t = torch.randn(3), torch.randn(3)
    d = Dual(p, t, 1)
    attrs, depth = d.__tensor_flatten__()
    assert attrs == ["_primal", "_tangent"] and depth == 1
    assert Dual(p, None, 1).__tensor_flatten__() == (["_primal"], 1)
    back = Dual.__tensor_unflatten__({"_primal": p, "_tangent": t}, 1, p.shape, p.stride())
    assert back._primal is p and back._tangent is t


@pytest.mark.compile
def test_inductor_compiled_jvp_matches_eager():
    c = torch.compile(lambda x, v: fwdgrad.jvp(chain, (x,), (v,)), fullgraph=True)
    torch.manual_seed(0)
    x, v = torch.randn(64), torch.randn(64)
    # float32, and inductor fuses the sums in another order: float32 tolerances.
    assert close(c(x, v), torch.func.jvp(chain, (x,), (v,)), atol=1e-4, rtol=1e-4)
    assert close(c(x + 1, v), torch.func.jvp(chain, (x + 1,), (v,)), atol=1e-4, rtol=1e-4)
    assert graphs() == 1


def test_traced_mode_compile_option():
    x, v = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    df = fwdgrad.forward_grad(chain, trace=True, compile={"backend": "aot_eager"})
    for i in range(3):  # the first call records, the second compiles, the third replays
        assert close(df(x + i, v), torch.func.jvp(chain, (x + i,), (v,)))
    assert graphs() == 1
    assert "cos" in df.code
    out = fwdgrad.jvp(chain, (x,), (v,), trace=True, compile={"backend": "aot_eager"})
    out = fwdgrad.jvp(chain, (x,), (v,), trace=True, compile={"backend": "aot_eager"})
    assert close(out, torch.func.jvp(chain, (x,), (v,)))
    with pytest.raises(ValueError, match="trace=True"):
        fwdgrad.jvp(chain, (x,), (v,), compile=True)
    with pytest.raises(TypeError, match="compile must be"):
        fwdgrad.forward_grad(chain, trace=True, compile="yes")


def test_a_graph_break_inside_the_function_keeps_values_right():
    def f(x):
        y = torch.sin(x) * 2
        torch._dynamo.graph_break()
        return torch.cos(y) + y.exp()

    c = torch.compile(lambda x, v: fwdgrad.jvp(f, (x,), (v,)), backend="aot_eager")
    x, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for i in range(3):
        assert close(c(x + i, v), torch.func.jvp(f, (x + i,), (v,)))
    assert not counters["recompiles"]
