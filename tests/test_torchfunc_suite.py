"""PyTorch's own tests of torch.func's jvp, jacfwd, hessian and linearize, run on fwdgrad.

A transcription of the TestJvp, TestJac (its jacfwd half), TestHessian and
TestLinearize cases of ``test/functorch/test_eager_transforms.py`` (PyTorch
2.x), with only the imports of the four transforms switched to fwdgrad.  The
test harness is adapted to pytest: ``device`` is "cpu", ``self.assertEqual``
is ``assert_equal`` below (PyTorch's comparison: sequences of any kind match
element by element, dtype-based tolerances), ``assertRaisesRegex`` is
``pytest.raises(..., match=...)``.  The helpers these tests use besides the
four transforms (``vmap``, ``grad``, ``jacrev``) stay torch.func's.

Tests that fwdgrad does not pass yet are listed, with the reason, in
``tests/expected_failures.py`` (``TORCHFUNC_SUITE``); they run as strict
xfails, so one that starts to pass must leave the list.
"""

from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacrev, vmap
from torch.testing import make_tensor

from fwdgrad import hessian, jacfwd, jvp, linearize  # the only switched imports

from expected_failures import TORCHFUNC_SUITE

device = "cpu"


def assert_equal(actual, expected):
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for k in expected:
            assert_equal(actual[k], expected[k])
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            assert_equal(a, e)
    else:
        if not isinstance(expected, torch.Tensor):
            expected = torch.tensor(expected)
        assert isinstance(actual, torch.Tensor), type(actual)
        torch.testing.assert_close(actual, expected.to(actual.dtype) if expected.dtype != actual.dtype else expected)


@pytest.fixture(autouse=True)
def _known_failures(request):
    reason = TORCHFUNC_SUITE.get(request.node.name)
    if reason is not None:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))


# ---------------------------------------------------------------- TestJac (jacfwd)


def test_jac_simple():
    x = torch.randn(3, device=device)
    y = jacfwd(torch.sin)(x)
    assert torch.allclose(y, torch.diagflat(x.cos()))


def test_jac_simple_not_flat():
    x = torch.randn(2, 3, device=device)
    y = jacfwd(torch.sin)(x)
    assert torch.allclose(y, torch.diagflat(x.view(-1).cos()).view(2, 3, 2, 3))


def test_jac_take():
    x = torch.rand(5)

    def func(x):
        y = torch.ones(3, dtype=torch.long)
        return torch.take(x, y)

    assert_equal(jacfwd(func)(x), torch.autograd.functional.jacobian(func, x))


def test_jac_diff_numel():
    x = torch.randn(2, 4, device=device)

    def f(x):
        return x[0, 1:].unsqueeze(-1)

    y = jacfwd(f)(x)
    assert y.shape == (3, 1, 2, 4)
    expected = x.new_zeros(3, 1, 2, 4)
    expected[0, 0, 0, 1] = 1
    expected[1, 0, 0, 2] = 1
    expected[2, 0, 0, 3] = 1
    assert_equal(y, expected)


def test_jac_vmap_on_jac_simple():
    x = torch.randn(2, 3, device=device)
    y = vmap(jacfwd(torch.sin))(x)
    assert torch.allclose(y, torch.stack([torch.diagflat(x[i].cos()) for i in range(2)]))


def test_jac_nested_jac_simple():
    def foo(x):
        return x.sin().sum()

    x = torch.randn(3, device=device)
    assert torch.allclose(jacfwd(jacfwd(foo))(x), torch.diagflat(-x.sin()))


def test_jac_multiple_args():
    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    assert torch.allclose(jacfwd(torch.multiply, argnums=1)(x, y), torch.diagflat(x))


def test_jac_multiple_outputs_multiple_argnums():
    def f(x, y):
        return 2 * x + 3 * y, 4 * x + 5 * y

    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    z = jacfwd(f, argnums=(0, 1))(x, y)
    assert isinstance(z, tuple) and len(z) == 2
    assert isinstance(z[0], tuple) and len(z[0]) == 2
    assert_equal(z[0][0], torch.diagflat(torch.full_like(x, 2)))
    assert_equal(z[0][1], torch.diagflat(torch.full_like(y, 3)))
    assert_equal(z[1][0], torch.diagflat(torch.full_like(x, 4)))
    assert_equal(z[1][1], torch.diagflat(torch.full_like(y, 5)))


def test_jac_multiple_outputs_single_argnums():
    def f(x, y):
        return 2 * x + 3 * y, 4 * x + 5 * y

    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    e0, e1 = torch.diagflat(torch.full_like(x, 2)), torch.diagflat(torch.full_like(x, 4))
    z = jacfwd(f, argnums=0)(x, y)
    assert isinstance(z, tuple) and len(z) == 2
    assert_equal(z, (e0, e1))
    z = jacfwd(f, argnums=(0,))(x, y)
    assert isinstance(z, tuple) and len(z) == 2 and isinstance(z[0], tuple)
    assert_equal(z, ((e0,), (e1,)))


def test_jac_multiple_outputs_pytree():
    def f(x, y):
        return {"left": 2 * x + 3 * y, "right": 4 * x + 5 * y}

    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    z = jacfwd(f, argnums=(0, 1))(x, y)
    expected = {
        "left": (torch.diagflat(torch.full_like(x, 2)), torch.diagflat(torch.full_like(y, 3))),
        "right": (torch.diagflat(torch.full_like(x, 4)), torch.diagflat(torch.full_like(y, 5))),
    }
    assert isinstance(z, dict) and isinstance(z["left"], tuple) and isinstance(z["right"], tuple)
    assert_equal(z, expected)


def test_jac_multiple_inputs_pytree():
    def f(a, b, c):
        a0, a1 = a
        return a0 + a1 * 2 + b * 3 + c * 4

    x = torch.randn([], device=device)
    args = ((x, x), x, x)
    one = lambda v: torch.tensor(v, device=device)  # noqa: E731
    assert_equal(jacfwd(f, argnums=(0, 1, 2))(*args), ((one(1.0), one(2.0)), one(3.0), one(4.0)))
    assert_equal(jacfwd(f, argnums=(0,))(*args), ((one(1.0), one(2.0)),))
    assert_equal(jacfwd(f)(*args), (one(1.0), one(2.0)))


def test_jac_dimensionality():
    def f(x):
        return x

    x = torch.randn([], device=device)
    result = jacfwd(f)(x)
    assert result.dim() == 0
    assert_equal(result, torch.ones_like(x))
    x = torch.randn([1], device=device)
    result = jacfwd(f)(x)
    assert result.dim() == 2
    assert_equal(result, x.new_ones(1, 1))


def test_jac_aux_tensor():
    def f(x):
        y = x.clone()
        return y, y.cos()

    x = torch.randn(3, device=device)
    result, aux = jacfwd(f, has_aux=True)(x)
    assert_equal(result, torch.eye(3, 3, device=device))
    assert_equal(aux, x.cos())


def test_jac_aux_pytree():
    def f(x):
        y = x.clone()
        return y, {"a": y.cos(), "b": [y.tan()]}

    x = torch.randn(3, device=device)
    result, aux = jacfwd(f, has_aux=True)(x)
    assert_equal(result, torch.eye(3, 3, device=device))
    assert_equal(aux, f(x)[1])
    for aux in [1, 1.0, "abc"]:
        with pytest.raises(RuntimeError, match=r"Expected tensors, got unsupported type"):
            jacfwd(lambda x: (x, aux), has_aux=True)(x)
        with pytest.raises(RuntimeError, match=r"Expected tensors, got unsupported type"):
            jacfwd(lambda x: (x, [x, aux]), has_aux=True)(x)


def test_jac_outputs_can_any_pytree():
    x = torch.randn(2, 3, device=device)
    for output in [None, ()]:
        with pytest.raises(RuntimeError, match=r"(vjp|jvp).+: Expected f to be a function that has non-empty output"):
            jacfwd(lambda _: output)(x)
    for output in [1, True, 12.2, "abc"]:
        with pytest.raises(RuntimeError, match=r"(vjp|jvp).+: expected f\(\*primals\) to return only tensors"):
            jacfwd(lambda _: output)(x)
    out = jacfwd(lambda x: [x, x.sum()])(x)
    assert isinstance(out, list) and len(out) == 2
    out = jacfwd(lambda x: {"x": x, "xsum": x.sum()})(x)
    assert isinstance(out, dict) and len(out) == 2 and "xsum" in out

    def composite_output(x):
        out = x.sum()
        return [(out, {"a": x, "out": [x, out]})]

    out = jacfwd(composite_output)(x)
    assert isinstance(out, list)
    assert isinstance(out[0], tuple) and isinstance(out[0][1], dict)


def test_jac_multiple_inputs_outputs_pytree():
    def f(a, b, c):
        a0, a1 = a
        return a0 + a1 * 2, {"foo": b * 3 + c * 4}

    x = torch.randn([], device=device)
    zero = torch.zeros([], device=device)
    args = ((x, x), x, x)
    t = lambda v: torch.tensor(v, device=device)  # noqa: E731
    assert_equal(jacfwd(f)(*args), ((t(1.0), t(2.0)), {"foo": (zero, zero)}))
    assert_equal(jacfwd(f, argnums=(0,))(*args), (((t(1.0), t(2.0)),), {"foo": ((zero, zero),)}))
    assert_equal(
        jacfwd(f, argnums=(0, 1))(*args),
        (((t(1.0), t(2.0)), zero), {"foo": ((zero, zero), t(3.0))}),
    )


def test_jac_multiple_inputs_outputs_pytree_multidim():
    def f(dct):
        return {"c": dct["a"].sin(), "d": dct["b"].cos()}

    x = torch.randn(3, device=device)
    expected = {
        "c": {"a": x.cos().diagflat(), "b": x.new_zeros(3, 3)},
        "d": {"a": x.new_zeros(3, 3), "b": -x.sin().diagflat()},
    }
    assert_equal(jacfwd(f)({"a": x, "b": x}), expected)


def test_jac_unrelated_input():
    def f(x, y):
        return x

    x, y = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    result = jacfwd(f, argnums=(0, 1))(x, y)
    assert isinstance(result, tuple)
    assert_equal(result, (torch.eye(6, 6, device=device).view(2, 3, 2, 3), y.new_zeros(2, 3, 2, 3)))


def test_jac_unrelated_output():
    y = torch.randn(2, 3, device=device)

    def f(x):
        return y

    x = torch.randn(2, 3, device=device)
    assert_equal(jacfwd(f)(x), x.new_zeros(2, 3, 2, 3))


def test_jac_empty_output():
    x, y = torch.randn(3, device=device), torch.randn(3, device=device)

    def f(x, y):
        return ()

    with pytest.raises(RuntimeError, match="xpected"):
        jacfwd(f)(x, y)


def test_jac_argnums_tuple():
    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    z = jacfwd(torch.multiply, argnums=(0, 1))(x, y)
    assert len(z) == 2
    assert torch.allclose(z[0], torch.diagflat(y))
    assert torch.allclose(z[1], torch.diagflat(x))


def test_jac_argnums_effect_on_return():
    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    z = jacfwd(torch.multiply, argnums=(0,))(x, y)
    assert isinstance(z, tuple) and len(z) == 1
    assert torch.allclose(z[0], torch.diagflat(y))
    z = jacfwd(torch.multiply, argnums=0)(x, y)
    assert isinstance(z, torch.Tensor)
    assert torch.allclose(z, torch.diagflat(y))


def test_jac_argnums_defaults_to_zero():
    def f(x, y):
        return x * 2 + y * 3

    x, y = torch.randn(3, device=device), torch.randn(3, device=device)
    assert_equal(jacfwd(f)(x, y), torch.diagflat(torch.full_like(x, 2)))


def test_jac_empty_argnums():
    x = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="must be non-empty"):
        jacfwd(torch.sin, argnums=())(x)


def test_jac_out_of_bounds_argnums():
    x = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="only 1 positional inputs"):
        jacfwd(torch.sin, argnums=2)(x)


def test_jac_negative_argnums():
    x = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="only 1 positional inputs"):
        jacfwd(torch.sin, argnums=-2)(x)


def test_jac_repeated_argnums():
    x = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="must be unique"):
        jacfwd(torch.sin, argnums=(0, 0))(x)


def test_jac_float_argnums():
    x = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="must be int or Tuple"):
        jacfwd(torch.sin, argnums=0.0)(x)
    with pytest.raises(RuntimeError, match="must be int"):
        jacfwd(torch.multiply, argnums=(1, 0.0))(x, x)


def test_jac_hessian_simple():
    def f(x):
        return x.sin()

    hessian(f)(torch.randn(3, device=device))


def _jac_against_reference(f, inputs):
    def foo(inputs):
        return f(*inputs)

    assert_equal(jacfwd(foo)(inputs), torch.autograd.functional.jacobian(f, inputs))


def test_jac_against_reference_simple():
    _jac_against_reference(lambda x: 3 * x ** 2, (torch.randn(2, 3, 5, device=device),))


def test_jac_against_reference_multi_input():
    def f(x, y):
        return (x.cos() * x) @ y.sin()

    _jac_against_reference(f, (torch.randn(2, 3, device=device), torch.randn(3, 5, device=device)))


def test_jac_against_reference_multi_input_multi_output():
    def f(x, y):
        return (x * x) @ y, x @ (x.sum(1) * y), y.sum()

    _jac_against_reference(f, (torch.randn(5, 3, device=device), torch.randn(3, 5, device=device)))


def test_jac_against_reference_unrelated_outputs():
    def f(x, y):
        return x, y, x, y

    _jac_against_reference(f, (torch.randn(2, device=device), torch.randn(3, device=device)))


def test_jac_against_reference_zero_dim():
    def f(x, y):
        return x.sum(), y.sum(), x * y

    _jac_against_reference(f, (torch.randn(3, device=device), torch.randn(3, device=device)))

    def g(x):
        return torch.stack([x, x, x])

    _jac_against_reference(g, (torch.randn([], device=device),))

    def h(x, y):
        return y.sum(), x * y

    _jac_against_reference(h, (torch.randn([], device=device), torch.randn(1, device=device)))


def test_jac_against_reference_correctness_different_devices():
    def f(x, y):
        return x * y, (x * y).to(device=device)

    _jac_against_reference(f, (torch.randn(3), torch.randn(3)))


def test_jac_against_reference_default_arg():
    def f(x, y, z=3.0):
        return x * y * z

    _jac_against_reference(f, (torch.randn(3, device=device), torch.randn(3, device=device)))


def test_jac_inplace():
    def f(x, y):
        y.copy_(x)
        return y

    out = jacfwd(f, argnums=0)
    x, y = torch.randn(2, device=device), torch.randn(2, device=device)
    assert_equal(out(x, y), torch.eye(y.shape[0]))

    def g(x, y, z):
        x[:2] = y
        return torch.vstack([(x ** 2).sum(), (z ** 3).sum()])

    out = jacfwd(g, argnums=(1, 2))
    x, y, z = torch.randn(3, device=device), torch.randn(2, device=device), torch.randn(2, device=device)
    expected = (torch.zeros(2, 1, 2, device=device), torch.zeros(2, 1, 2, device=device))
    expected[0][0][0] = 2 * y
    expected[1][1][0] = 3 * (z ** 2)
    assert_equal(out(x, y, z), expected)


def test_jac_complex_error():
    def fn(x):
        return x.conj()

    with pytest.raises(RuntimeError, match="jacfwd: Expected all inputs"):
        jacfwd(fn)(torch.randn(1, device=device, dtype=torch.cfloat))

    def fn2(x):
        return torch.conj(x * 0.5j)

    with pytest.raises(RuntimeError, match="jacfwd: Expected all outputs"):
        jacfwd(fn2)(torch.randn(1, device=device, dtype=torch.float))


def test_jac_with_non_tensor_args():
    def f(t, int_x):
        return t + int_x

    t = torch.randn(3, 3, device=device)
    assert_equal(jacfwd(f)(t, 3), torch.autograd.functional.jacobian(partial(f, int_x=3), t))


# ---------------------------------------------------------------- TestHessian


def _hessian_against_reference(f, inputs):
    def foo(inputs):
        return f(*inputs)

    assert_equal(hessian(foo)(inputs), torch.autograd.functional.hessian(f, inputs))


def test_hessian_vectorize_correctness_simple():
    _hessian_against_reference(lambda x: (3 * x ** 2).sum(), (torch.randn(2, 3, 5, device=device),))


def test_hessian_vectorize_correctness_multi_input():
    def f(x, y, z):
        return ((x.relu() * x) @ y.sin() @ z).sum()

    inputs = (torch.randn(2, 3, device=device), torch.randn(3, 5, device=device), torch.randn(5, 5, device=device))
    _hessian_against_reference(f, inputs)


def test_hessian_vectorize_correctness_unrelated_outputs():
    _hessian_against_reference(lambda x, y: (x ** 2).sum(), (torch.randn(2), torch.randn(3)))
    _hessian_against_reference(lambda x, y: torch.ones([]), (torch.randn(2), torch.randn(3)))


def test_hessian_jacfwd_different_levels():
    b, n, d = 8, 100, 2
    x1 = torch.randn(b, n, d, device=device)
    x2 = x1
    A = 0.1 * torch.randn(b, d, d, device=device)

    def loss(A, x1, x2):
        x2_hat = (A @ (x1.T)).T
        res = x2 - x2_hat
        return (res ** 2).sum()

    hess1 = vmap(jacrev(jacrev(loss)))(A, x1, x2)
    hess2 = vmap(hessian(loss))(A, x1, x2)
    assert_equal(hess2, hess1)


# ---------------------------------------------------------------- TestJvp


def test_jvp_inplace_on_captures():
    x = torch.tensor([1.0, 2.0, 3.0], device=device)
    captured = torch.randn(3, device=device)

    def foo(x):
        captured.copy_(x)
        return (x * captured).sum()

    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        grad(foo)(x)


def test_jvp_simple():
    x, t = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    result = jvp(torch.sin, (x,), (t,))
    assert isinstance(result, tuple)
    assert_equal(result, (x.sin(), x.cos() * t))


def test_jvp_multiple_inputs():
    x, y, tx, ty = (torch.randn(2, 3, device=device) for _ in range(4))
    result = jvp(lambda x, y: x * y, (x, y), (tx, ty))
    assert isinstance(result, tuple)
    assert_equal(result, (x * y, y * tx + x * ty))


def test_jvp_pytree_inputs():
    def f(x, y, z):
        a, b = x
        return a + 2 * b + 3 * y + 4 * z

    one = torch.tensor(1.0, device=device)
    primal_outs, tangent_outs = jvp(f, ((one, one), one, one), ((one, one), one, one))
    assert_equal(primal_outs, one * 10)
    assert_equal(tangent_outs, one * 10)


def test_jvp_pytree_inputs_error_cases():
    def f(x):
        return x

    one = torch.tensor(1.0, device=device)
    with pytest.raises(RuntimeError, match="Expected primals to be a tuple"):
        jvp(f, one, one)
    with pytest.raises(RuntimeError, match="same python structure"):
        jvp(f, ((one, one), one), (one, one))
    with pytest.raises(RuntimeError, match="only contain Tensors"):
        jvp(f, ((one, one), 1), ((one, one), one))
    with pytest.raises(RuntimeError, match="only contain Tensors"):
        jvp(f, ((one, one), 1), ((1, one), one))
    with pytest.raises(RuntimeError, match="at least one Tensor"):
        jvp(f, ((),), ((),))


def test_jvp_unrelated_input():
    x, y, tx, ty = (torch.randn(2, 3, device=device) for _ in range(4))
    result = jvp(lambda x, y: x, (x, y), (tx, ty))
    assert isinstance(result, tuple)
    assert_equal(result, (x, tx))


def test_jvp_unrelated_output():
    y = torch.randn(2, 3, device=device)
    x, tx = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    result = jvp(lambda x: y, (x,), (tx,))
    assert isinstance(result, tuple)
    assert_equal(result, (y, torch.zeros_like(y)))


def test_jvp_strict_mode():
    y = torch.randn(2, 3, device=device)
    x, tx = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match="strict"):
        jvp(lambda x: (x, y), (x,), (tx,), strict=True)


def test_jvp_multiple_outputs():
    x, t = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)

    def f(x):
        return torch.sin(x), torch.cos(x)

    result = jvp(f, (x,), (t,))
    assert isinstance(result, tuple)
    assert_equal(result, (f(x), (x.cos() * t, -x.sin() * t)))


def test_jvp_multiple_inputs_outputs():
    x, y, tx, ty = (torch.randn(2, 3, device=device) for _ in range(4))

    def f(x, y):
        return 2 * x + 3 * y, 4 * x + 5 * y

    result = jvp(f, (x, y), (tx, ty))
    assert isinstance(result, tuple)
    assert_equal(result, (f(x, y), f(tx, ty)))


def test_jvp_new_tensor():
    def f(x):
        return x + x.new_tensor(0.5)

    x = torch.rand(10, 10)
    assert_equal(jvp(f, (x,), (torch.zeros_like(x),)), (f(x), torch.zeros_like(x)))


def test_jvp_primals_tangents_length_mismatch():
    x, t = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match="same python structure"):
        jvp(torch.sin, (x,), (t, t))
    with pytest.raises(RuntimeError, match="same python structure"):
        jvp(torch.sin, (x, x), (t, t, t))


def test_jvp_nonempty_primals_and_tangents():
    with pytest.raises(RuntimeError, match="at least one Tensor"):
        jvp(torch.sin, (), ())


def test_jvp_inputs_are_tuples_of_tensors():
    x, t = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match="be a tuple"):
        jvp(torch.sin, x, (t,))
    with pytest.raises(RuntimeError, match="same python structure"):
        jvp(torch.sin, (x,), t)
    with pytest.raises(RuntimeError, match="same python structure"):
        jvp(torch.sin, (x,), [t])
    with pytest.raises(RuntimeError, match="only contain Tensors"):
        jvp(torch.sin, (1.0,), (t,))
    with pytest.raises(RuntimeError, match="only contain Tensors"):
        jvp(torch.sin, (x,), (1.0,))


def test_jvp_outputs_can_any_pytree():
    x, t = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    for output in [None, ()]:
        with pytest.raises(
            RuntimeError, match=r"jvp\(f, primals, tangents\): Expected f to be a function that has non-empty output"
        ):
            jvp(lambda _: output, (x,), (t,))
    for output in [1, True, 12.2, "abc"]:
        with pytest.raises(RuntimeError, match=r"jvp\(f, primals, tangents\): expected f\(\*primals\) to return only tensors"):
            jvp(lambda _: output, (x,), (t,))
    out = jvp(lambda x: [x, x.sum()], (x,), (t,))
    for i in range(2):
        assert isinstance(out[i], list) and len(out[i]) == 2
    out = jvp(lambda x: {"x": x, "xsum": x.sum()}, (x,), (t,))
    for i in range(2):
        assert isinstance(out[i], dict) and len(out[i]) == 2 and "xsum" in out[i]

    def composite_output(x):
        out = x.sum()
        return [(out, {"a": x, "out": [x, out]})]

    out = jvp(composite_output, (x,), (t,))
    for i in range(2):
        assert isinstance(out[i], list)
        assert isinstance(out[i][0], tuple) and isinstance(out[i][0][1], dict)


def test_jvp_aux_tensor():
    x, t = torch.randn(3, device=device), torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match=r"jvp\(f, primals, tangents\): output of function f should be a tuple"):
        jvp(lambda t: [t, t], (x,), (t,), has_aux=True)
    with pytest.raises(RuntimeError, match=r"jvp\(f, primals, tangents\): output of function f should be a tuple"):
        jvp(lambda t: (t, t + 2, t + 3), (x,), (t,), has_aux=True)

    def f(z):
        return z.sin(), z.cos()

    out, jvp_out, aux = jvp(f, (x,), (t,), has_aux=True)
    assert_equal(aux, x.cos())
    assert_equal(out, x.sin())
    assert_equal(jvp_out, t * x.cos())


def test_jvp_aux_pytree():
    def f(x):
        return x.sin(), {"a": x.cos(), "b": [x.tan()]}

    x, t = torch.randn(3, device=device), torch.randn(3, device=device)
    out, jvp_out, aux = jvp(f, (x,), (t,), has_aux=True)
    expected_out, expected_aux = f(x)
    assert_equal(out, expected_out)
    assert_equal(aux, expected_aux)
    assert_equal(jvp_out, t * x.cos())
    for aux in [1, 1.0, "abc"]:
        with pytest.raises(RuntimeError, match=r"Expected tensors, got unsupported type"):
            jvp(lambda x: (x, aux), (x,), (t,), has_aux=True)
        with pytest.raises(RuntimeError, match=r"Expected tensors, got unsupported type"):
            jvp(lambda x: (x, [x, aux]), (x,), (t,), has_aux=True)


def test_jvp_autograd_function_disables_fwd_grad():
    class MySquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            assert not fwAD._is_fwd_grad_enabled()
            return x * x

        @staticmethod
        def backward(ctx, gx):
            return gx

    MySquare.apply(torch.randn(3, requires_grad=True))


def test_jvp_disable_fwd_grad_outside():
    x = torch.randn([], device=device)
    t = torch.ones_like(x)
    with fwAD._set_fwd_grad_enabled(False):
        _, y = jvp(torch.sin, (x,), (t,))
    assert_equal(y, x.cos())


def test_jvp_disable_fwd_grad_inside():
    def f(x):
        with fwAD._set_fwd_grad_enabled(False):
            shift = x ** 2
        return x ** 2 - shift

    x = torch.randn([], device=device)
    t = torch.ones_like(x)
    _, y = jvp(f, (x,), (t,))
    assert_equal(y, 2 * x)
    _, y = jvp(lambda x: jvp(f, (x,), (t,))[1], (x,), (t,))
    assert_equal(y, 2)


def test_jvp_disable_fwd_grad_mixed():
    def f(x):
        with fwAD._set_fwd_grad_enabled(False):
            shift = x ** 2
        return x ** 2 - shift

    x = torch.randn([], device=device)
    t = torch.ones_like(x)
    with fwAD._set_fwd_grad_enabled(True):
        _, y = jvp(f, (x,), (t,))
    assert_equal(y, 2 * x)


def test_jvp_inside_autograd_function():
    class MySin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            t = torch.ones_like(x)
            _, neg_sin_x = jvp(torch.cos, (x,), (t,))
            ctx.save_for_backward(x)
            return -neg_sin_x

        @staticmethod
        def backward(ctx, gx):
            (x,) = ctx.saved_tensors
            t = torch.ones_like(x)
            _, cos_x = jvp(torch.sin, (x,), (t,))
            return gx * cos_x

    x = torch.randn([], device=device, requires_grad=True)
    y = MySin.apply(x)
    assert_equal(y, x.sin())
    (gx,) = torch.autograd.grad(y, x)
    assert_equal(gx, x.cos())


def test_jvp_zerotensor_vmapjvp_interaction():
    dummy = torch.ones(4, 1)
    x = torch.randn(4, 2)
    x_tangent = torch.randn(2)

    def push_jvp(dummy, x):
        return jvp(torch.cov, (x,), (x_tangent,))

    vmap(vmap(push_jvp, (0, None)))(dummy, x)  # should not error


# ---------------------------------------------------------------- TestLinearize


def test_linearize_basic():
    x_p = make_tensor((3, 1), device=device, dtype=torch.float)
    x_t = make_tensor((3, 1), device=device, dtype=torch.float)

    def fn(x):
        return x.cos()

    actual_output, jvp_fn = linearize(fn, x_p)
    expected_output, expected_jvp = jvp(fn, (x_p,), (x_t,))
    assert_equal(actual_output, expected_output)
    assert_equal(jvp_fn(x_t), expected_jvp)


def test_linearize_return():
    x_p = make_tensor((3, 1), device=device, dtype=torch.float)
    x_t = make_tensor((3, 1), device=device, dtype=torch.float)

    def fn(x):
        return (x.cos(), x.sum())

    actual_output, jvp_fn = linearize(fn, x_p)
    expected_output, expected_jvp = jvp(fn, (x_p,), (x_t,))
    assert_equal(actual_output, expected_output)
    assert_equal(jvp_fn(x_t), expected_jvp)


def test_linearize_composition_vmap():
    x_p = make_tensor((3, 1), device=device, dtype=torch.float)
    x_t = make_tensor((3, 3, 1), device=device, dtype=torch.float)

    def fn(x):
        return (x.cos(), x.sum())

    _, jvp_fn = linearize(fn, x_p)
    actual = vmap(jvp_fn)(x_t)
    expected = vmap(lambda x_t: jvp(fn, (x_p,), (x_t,))[1])(x_t)
    assert_equal(actual, expected)


def test_linearize_composition_grad():
    x_p = make_tensor((3,), device=device, dtype=torch.float)
    x_t = make_tensor((3,), device=device, dtype=torch.float)

    def fn(x):
        z = torch.ones(3, device=device, dtype=torch.float)
        return grad(lambda x: z @ x)(x)

    _, jvp_fn = linearize(fn, x_p)
    assert_equal(jvp_fn(x_t), jvp(fn, (x_p,), (x_t,))[1])


def test_linearize_nested_input_nested_output():
    mk = lambda: make_tensor((3, 1), device=device, dtype=torch.float)  # noqa: E731
    x_p, x_t, y_p, y_t, z_p, z_t = (mk() for _ in range(6))

    def fn(arg):
        x, y, z = arg["x"], arg["yz"][0], arg["yz"][1]
        return {"a": x.sum(), "b": {"c": y + z, "d": (x * z, y.exp())}}

    inp_p = {"x": x_p, "yz": (y_p, z_p)}
    inp_t = {"x": x_t, "yz": (y_t, z_t)}
    actual_output, jvp_fn = linearize(fn, inp_p)
    expected_output, expected_jvp = jvp(fn, (inp_p,), (inp_t,))
    assert_equal(actual_output, expected_output)
    assert_equal(jvp_fn(inp_t), expected_jvp)


def test_linearize_errors():
    # (PyTorch runs this one only where CUDA is; the device case is left out.)
    x_p = make_tensor((3, 1), device="cpu", dtype=torch.float)
    x_t = make_tensor((3, 1), device="cpu", dtype=torch.float)
    _, jvp_fn = linearize(lambda x: x.sin(), x_p)
    with pytest.raises(RuntimeError, match="to have the same argspec as the primals"):
        jvp_fn((x_t, x_t))
    with pytest.raises(RuntimeError, match="in flattened pytree doesn't match the shape"):
        jvp_fn(x_t.unsqueeze(0))
    with pytest.raises(RuntimeError, match="in flattened pytree doesn't match the dtype"):
        jvp_fn(x_t.to(torch.double))
