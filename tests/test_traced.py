"""The traced mode: forward_grad(f, trace=True) and jvp(..., trace=True) (float64, CPU)."""

import ast
import warnings

import pytest
import torch
import torch.nn as nn

import fwdgrad

D = torch.float64


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Counted:
    """A function that counts how often its Python body runs."""

    def __init__(self, f):
        self.f = f
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.f(*args, **kwargs)


def chain(x):
    for _ in range(5):
        x = torch.tanh(x.sin() * 1.1 + 0.1)
    return x


def test_replay_equals_eager_and_skips_python():
    f = Counted(chain)
    df = fwdgrad.forward_grad(f, trace=True)
    x, v = torch.randn(16, dtype=D), torch.randn(16, dtype=D)
    expected = torch.func.jvp(chain, (x,), (v,))
    for _ in range(3):
        r, dr = df(x, v)
        assert_close(r, expected[0])
        assert_close(dr, expected[1])
    x2, v2 = torch.randn(16, dtype=D), torch.randn(16, dtype=D)
    r, dr = df(x2, v2)
    assert_close(dr, torch.func.jvp(chain, (x2,), (v2,))[1])
    assert f.calls == 1


def test_code_is_readable_python_with_the_tangent_program():
    df = fwdgrad.forward_grad(chain, trace=True)
    df(torch.randn(4, dtype=D), torch.randn(4, dtype=D))
    code = df.code
    ast.parse(code)
    assert "def forward(self, x, dx)" in code
    assert "dmul = torch.ops.aten.mul.Tensor(dx, cos)" in code
    assert "torch.ops.aten.tanh.default" in code


def test_jvp_trace_pytree_kwargs_and_constants():
    def f(inputs, scale, *, power):
        return {"out": (inputs["a"] * inputs["b"]).pow(power) * scale}

    inputs = {"a": torch.randn(3, dtype=D), "b": torch.randn(3, dtype=D)}
    tangents = {"a": torch.randn(3, dtype=D), "b": None}
    df = fwdgrad.forward_grad(f, trace=True)
    for scale in (2.0, 2.0, 3.0):  # a new constant is a guard miss
        r, dr = df(inputs, tangents, scale, None, power=2)
        expected = torch.func.jvp(
            lambda a: f({"a": a, "b": inputs["b"]}, scale, power=2), (inputs["a"],), (tangents["a"],)
        )
        assert_close(dr["out"], expected[1]["out"])
    assert len(df.traced.cache) == 2


def test_the_same_tensor_as_primal_tangent_and_capture():
    W = torch.randn(3, dtype=D)
    f = lambda x, y: (x * y).sin() * W  # noqa: E731
    df = fwdgrad.forward_grad(f, trace=True)
    df(W, W, W, None)  # recorded with one tensor in four roles
    x, y, v = (torch.randn(3, dtype=D) for _ in range(3))
    r, dr = df(x, v, y, None)
    assert_close(r, f(x, y))
    assert_close(dr, torch.func.jvp(lambda x: f(x, y), (x,), (v,))[1])


def test_jvp_trace_is_cached_per_function():
    f = Counted(lambda x, y: x * y.exp())
    x, y, v = (torch.randn(5, dtype=D) for _ in range(3))
    for _ in range(3):
        out, t = fwdgrad.jvp(f, (x, y), (v, None), trace=True)
        assert_close(t, v * y.exp())
    assert f.calls == 1
    out, t, aux = fwdgrad.jvp(lambda x: (x.sin(), x.cos()), (x,), (v,), has_aux=True, trace=True)
    assert_close(t, v * x.cos())
    assert_close(aux, x.cos())


def test_jvp_trace_warns_about_re_created_functions():
    x = torch.randn(3, dtype=D)
    with pytest.warns(UserWarning, match="4 function objects with the same code"):
        for _ in range(4):
            out, t = fwdgrad.jvp(lambda x: x.sin(), (x,), (x,), trace=True)
    assert_close(t, x * x.cos())


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "requires_grad", "strides", "none_tangent", "grad_mode"],
)
def test_guard_miss_records_again(change):
    f = Counted(lambda x, y: (x * y).sin())
    df = fwdgrad.forward_grad(f, trace=True)
    x, y = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    df(x, torch.ones_like(x), y, None)
    vy = None
    if change == "shape":
        x, y = torch.randn(2, 4, dtype=D), torch.randn(2, 4, dtype=D)
    elif change == "dtype":
        x, y = x.float(), y.float()
    elif change == "requires_grad":
        x = x.clone().requires_grad_()
    elif change == "strides":
        x, y = torch.randn(4, 3, dtype=D).t(), torch.randn(4, 3, dtype=D).t()
    elif change == "none_tangent":
        vy = torch.ones_like(y)
    with torch.set_grad_enabled(change != "grad_mode"):
        r, dr = df(x, torch.ones_like(x), y, vy)
    expected = torch.func.jvp(
        lambda x, y: (x * y).sin(), (x.detach(), y), (torch.ones_like(x), torch.zeros_like(y) if vy is None else vy)
    )
    assert_close(dr.detach(), expected[1])
    assert f.calls == 2
    assert len(df.traced.cache) == 2


def test_value_reads_run_eagerly_with_one_warning():
    def f(x):
        if x.sum() > 0:
            return x.sin()
        return x.cos()

    df = fwdgrad.forward_grad(f, trace=True)
    x, v = torch.randn(4, dtype=D).abs(), torch.randn(4, dtype=D)
    with pytest.warns(UserWarning, match=r"reads tensor values into Python.*_local_scalar_dense"):
        r, dr = df(x, v)
    assert_close(dr, v * x.cos())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, dr = df(-x, v)  # same signature: eager, so the other branch is taken; no second warning
    assert_close(dr, v * x.sin())


def test_reads_of_shape_only_values_are_replayed():
    def f(x):
        n = int(torch.arange(x.shape[0]).sum())  # depends on the shape only (guarded)
        if torch.ones(2).all():
            return x.sin() * n
        return x

    df = fwdgrad.forward_grad(Counted(f), trace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            x, v = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
            assert_close(df(x, v)[1], v * x.cos() * 6)
    assert df.traced.func.calls == 1


def test_read_of_a_buffer_written_with_data_runs_eagerly():
    def f(x):
        buf = torch.zeros(3, dtype=D)
        head = buf[:2]  # a view taken before the write
        buf.copy_(x.detach())
        return x * 2 if head.sum() > 0 else x * 3

    df = fwdgrad.forward_grad(f, trace=True)
    x, v = torch.ones(3, dtype=D), torch.ones(3, dtype=D)
    with pytest.warns(UserWarning, match="reads tensor values"):
        assert_close(df(x, v)[1], 2 * v)
    assert_close(df(-x, v)[1], 3 * v)


def test_captured_weights_are_not_stale():
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=D)

    def f(x):
        return torch.tanh(W @ x)

    df = fwdgrad.forward_grad(f, trace=True)
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    df(x, v)
    with torch.no_grad():
        W.mul_(2)  # in place: the graph holds W itself
    assert_close(df(x, v)[0], torch.tanh(W @ x))
    W = torch.randn(4, 3, dtype=D)  # a new tensor: a guard miss
    assert_close(df(x, v)[1], torch.func.jvp(f, (x,), (v,))[1])
    assert len(df.traced.cache) == 2


def test_replaced_tensor_in_a_captured_list_is_a_guard_miss():
    weights = [torch.randn(3, 3, dtype=D), torch.randn(3, 3, dtype=D)]

    def f(x):
        for w in weights:
            x = torch.tanh(w @ x)
        return x

    df = fwdgrad.forward_grad(f, trace=True)
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    df(x, v)
    weights[1] = torch.randn(3, 3, dtype=D)
    assert_close(df(x, v)[1], torch.func.jvp(f, (x,), (v,))[1])
    assert len(df.traced.cache) == 2


def test_module_parameters_and_training_flag():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh()).to(D)
    df = fwdgrad.forward_grad(m, trace=True)
    x, v = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    df(x, v)
    m.eval()  # dropout disappears: a guard miss
    assert_close(df(x, v)[1], torch.func.jvp(m, (x,), (v,))[1])
    m[0].weight = nn.Parameter(torch.randn(4, 3, dtype=D))  # a replaced parameter: a guard miss
    assert_close(df(x, v)[1], torch.func.jvp(m, (x,), (v,))[1])
    with torch.no_grad():
        m[0].bias.add_(1.0)  # in place: seen by the replay
    r, dr = df(x, v)
    assert_close(r, m(x))
    assert len(df.traced.cache) == 3
    assert "p_0_weight" in df.code


def test_too_many_signatures_fall_back_to_eager():
    df = fwdgrad.forward_grad(torch.sin, trace=True)
    df.traced.max_traces = 2
    with pytest.warns(UserWarning, match="running new signatures eagerly"):
        for n in range(1, 5):
            x = torch.randn(n, dtype=D)
            assert_close(df(x, torch.ones_like(x))[1], x.cos())
    assert len(df.traced.cache) == 2


def test_reverse_over_traced_replay():
    df = fwdgrad.forward_grad(chain, trace=True)
    v = torch.randn(4, dtype=D)
    for _ in range(2):  # record, then replay
        x = torch.randn(4, dtype=D, requires_grad=True)
        (g,) = torch.autograd.grad(df(x, v)[1].sum(), x)
        expected = torch.func.grad(lambda x: torch.func.jvp(chain, (x,), (v,))[1].sum())(x.detach())
        assert_close(g, expected)


def test_inside_another_transform_runs_eagerly():
    df = fwdgrad.forward_grad(chain, trace=True)
    v = torch.randn(3, dtype=D)
    x = torch.randn(3, dtype=D)
    with pytest.warns(UserWarning, match="not a plain tensor"):
        J = fwdgrad.jacfwd(lambda x: df(x, v)[1])(x)
    expected = torch.func.jacfwd(lambda x: torch.func.jvp(chain, (x,), (v,))[1])(x)
    assert_close(J, expected)


def test_errors():
    df = fwdgrad.forward_grad(torch.sin, trace=True)
    x = torch.randn(3, dtype=D)
    with pytest.raises(RuntimeError, match="nothing has been traced yet"):
        df.code
    with pytest.raises(TypeError, match="pairs"):
        df(x)
    with pytest.raises(ValueError, match="shape"):
        df(x, torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="cannot be combined"):
        fwdgrad.jvp(torch.sin, (x,), (x,), batched=True, trace=True)


def test_traced_replay_repeats_in_place_updates_of_captured_buffers():
    """BatchNorm's ``num_batches_tracked.add_(1)`` is a write into a captured tensor:
    every replay must repeat it, as a plain call would."""
    bn = torch.nn.BatchNorm1d(3).double()
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    df = fwdgrad.forward_grad(bn, trace=True)
    for _ in range(3):
        df(x, v)
    assert int(bn.num_batches_tracked) == 3


def test_traced_function_capturing_an_outer_dual_runs_eagerly_and_right():
    y0 = torch.randn(3, dtype=torch.float64)

    def outer(x):
        df = fwdgrad.forward_grad(lambda y: torch.sin(x * y), trace=True)
        df(y0, torch.ones_like(y0))
        return df(y0, torch.ones_like(y0))[1].sum()  # the second call would replay

    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="tensor subclass"):
        _, t = fwdgrad.jvp(outer, (x,), (v,))
    expected = torch.func.jvp(lambda x: (torch.cos(x * y0) * x).sum(), (x,), (v,))[1]
    assert torch.allclose(t, expected)
