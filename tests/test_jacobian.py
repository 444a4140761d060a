"""jacfwd, batched jvp, linearize and hessian against torch.func (float64, CPU)."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import fwdgrad

D = torch.float64


def assert_close(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, f"structure {sa} != {sb}"
    for x, y in zip(la, lb):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} != {tuple(y.shape)}"
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3), nn.Tanh()).to(D)


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12, 4),
    ).to(D)


def pytree_fn(inputs, scale):
    """A dict input and a tuple output, with a non-tensor argument."""
    a, b = inputs["a"], inputs["b"]
    return (a.sin() * b.sum() * scale, {"c": (a[:2] * b[2:]).exp()})


def _pytree_args():
    torch.manual_seed(2)
    return {"a": torch.randn(3, dtype=D), "b": torch.randn(4, dtype=D)}, 1.5


@pytest.fixture
def cnn_eval():
    m = _cnn()
    m.train()
    m(torch.randn(4, 2, 6, 6, dtype=D))  # non-trivial running statistics
    return m.eval()


# --------------------------------------------------------------------------
# jacfwd


def test_jacfwd_mlp():
    m = _mlp()
    x = torch.randn(2, 5, dtype=D)
    assert_close(fwdgrad.jacfwd(m)(x), torch.func.jacfwd(m)(x))


def test_jacfwd_cnn_eval(cnn_eval):
    x = torch.randn(2, 2, 6, 6, dtype=D)
    assert_close(fwdgrad.jacfwd(cnn_eval)(x), torch.func.jacfwd(cnn_eval)(x))


def test_jacfwd_cnn_train_updates_running_stats_once():
    # BatchNorm in training mode mutates its buffers and ReLU(inplace) its input:
    # the recording is functionalized; torch.func.jacfwd cannot run this at all.
    m = _cnn()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    J = fwdgrad.jacfwd(m)(x)
    after = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    expected = torch.autograd.functional.jacobian(lambda x: m(x), x)
    m.load_state_dict(state)
    m(x)  # one plain forward: the running statistics fwdgrad must match
    assert_close(J, expected)
    assert_close(after, dict(m.state_dict()))


def test_jacfwd_pytree_inputs_and_outputs():
    inputs, scale = _pytree_args()
    assert_close(fwdgrad.jacfwd(pytree_fn)(inputs, scale), torch.func.jacfwd(pytree_fn)(inputs, scale))


@pytest.mark.parametrize("argnums", [1, -2, (0, 2), (2, 0)])
def test_jacfwd_argnums(argnums):
    # torch.func.jacfwd(f, -2) returns zeros here (torch 2.13), so the oracle gets 2.
    oracle = 2 if argnums == -2 else argnums

    def f(x, y, z, flag):
        return (x * y.sum() + z.cos()) if flag else x

    args = (torch.randn(3, dtype=D), torch.randn(2, dtype=D), torch.randn(3, dtype=D), True)
    assert_close(fwdgrad.jacfwd(f, argnums)(*args), torch.func.jacfwd(f, oracle)(*args))


def test_jacfwd_same_tensor_twice_and_captured():
    x = torch.randn(3, dtype=D)
    f = lambda a, b: a.sin() * b.exp() * x  # noqa: E731
    assert_close(fwdgrad.jacfwd(f, (0, 1))(x, x), torch.func.jacfwd(f, (0, 1))(x, x))


def test_jacfwd_has_aux():
    def f(x, n=None):
        y = x.sin()
        return y * 2, ({"y": y} if n is None else {"y": y, "n": n})

    x = torch.randn(4, dtype=D)
    J, aux = fwdgrad.jacfwd(f, has_aux=True)(x)
    J0, aux0 = torch.func.jacfwd(f, has_aux=True)(x)
    assert_close(J, J0)
    assert_close(aux, aux0)
    # a non-tensor aux is refused, as torch.func refuses it (RuntimeError and TypeError both)
    with pytest.raises(RuntimeError, match=r"aux must be a tensor or a pytree of tensors, but aux\['n'\] is a int"):
        fwdgrad.jacfwd(f, has_aux=True)(x, 3)
    with pytest.raises(TypeError):
        fwdgrad.jacfwd(f, has_aux=True)(x, 3)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_jacfwd_chunk_size(chunk_size):
    inputs, scale = _pytree_args()
    expected = torch.func.jacfwd(pytree_fn)(inputs, scale)
    assert_close(fwdgrad.jacfwd(pytree_fn, chunk_size=chunk_size)(inputs, scale), expected)


def test_jacfwd_scalar_input_and_output():
    f = lambda x: (x * 3).sin()  # noqa: E731
    x = torch.tensor(0.3, dtype=D)
    assert_close(fwdgrad.jacfwd(f)(x), torch.func.jacfwd(f)(x))


def test_jacfwd_data_dependent_control_flow_takes_the_branch_at_the_point():
    def f(x):
        if x.sum() > 0:  # a value read on the primal side: fine at the traced point
            return x.sin() * x[x > 0].sum()
        return x.cos()

    jf = fwdgrad.jacfwd(f)
    for x in (torch.tensor([1.0, 2.0, -0.5], dtype=D), torch.tensor([-1.0, -2.0, 0.5], dtype=D)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_close(jf(x), torch.func.jacfwd(f)(x))


def test_jacfwd_writes_into_a_buffer():
    def f(x):
        y = torch.zeros_like(x)
        y[0] = x[1] * 2
        y[1:] = x[:-1].sin()
        return y

    x = torch.randn(4, dtype=D)
    assert_close(fwdgrad.jacfwd(f)(x), torch.func.jacfwd(f)(x))


def test_jacfwd_in_place_update_of_a_value_the_tangent_reads():
    def f(x):
        a = x.exp()
        c = a * x  # its tangent reads a ...
        a.mul_(2)  # ... which changes afterwards
        return c + a

    x = torch.randn(3, dtype=D)
    assert_close(fwdgrad.jacfwd(f)(x), torch.func.jacfwd(f)(x))
    out, jvp_fn = fwdgrad.linearize(f, x)
    v = torch.randn(3, dtype=D)
    assert_close(jvp_fn(v), torch.func.jvp(f, (x,), (v,))[1])


def test_jacfwd_randomness_matches_returned_output():
    # Dropout's mask in the Jacobian is the one behind the returned output, also
    # when in-place ops send the recording through functionalization.
    def f(x):
        y = torch.nn.functional.dropout(x, 0.5, training=True)
        z = torch.zeros_like(y)
        z[:] = y
        return z, z

    torch.manual_seed(3)
    x = torch.rand(50, dtype=D) + 1
    J, out = fwdgrad.jacfwd(f, has_aux=True)(x)
    assert_close(J, torch.diag((out != 0).to(D) * 2))


def test_reverse_over_jacfwd():
    x = torch.randn(3, dtype=D, requires_grad=True)
    f = lambda x: x.sin() * x.exp().sum()  # noqa: E731
    (g,) = torch.autograd.grad(fwdgrad.jacfwd(f)(x).square().sum(), x)
    x0 = x.detach()
    expected = torch.func.grad(lambda x: torch.func.jacfwd(f)(x).square().sum())(x0)
    assert_close(g, expected)


def test_jacfwd_of_jacrev_and_of_jacfwd():
    f = lambda x: (x.sin() ** 2).sum() * x.exp().sum()  # noqa: E731
    x = torch.randn(3, dtype=D)
    assert_close(fwdgrad.jacfwd(torch.func.jacrev(f))(x), torch.func.hessian(f)(x))
    assert_close(fwdgrad.jacfwd(fwdgrad.jacfwd(f))(x), torch.func.hessian(f)(x))


@torch.library.custom_op("fwdgrad_jacobian_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@fwdgrad.register_jvp(torch.ops.fwdgrad_jacobian_test.double.default)
def _double_jvp(tangents, ans, x):
    # A rule that reads a tangent value into Python: the tangent program cannot
    # be replayed for other directions.
    return tangents[0] * 2 if tangents[0].abs().sum().item() >= 0 else None


def test_tangent_value_read_falls_back_with_a_warning():
    f = lambda x: torch.ops.fwdgrad_jacobian_test.double(x.sin())  # noqa: E731
    x = torch.randn(3, dtype=D)
    with pytest.warns(UserWarning, match="reads tensor values"):
        J = fwdgrad.jacfwd(f)(x)
    assert_close(J, torch.diag(2 * x.cos()))


# --------------------------------------------------------------------------
# hessian


def test_hessian():
    f = lambda x: (x.sin() ** 2).sum() * x.exp().sum() + nn.functional.softplus(x).pow(3).sum()  # noqa: E731
    x = torch.randn(4, dtype=D)
    assert_close(fwdgrad.hessian(f)(x), torch.func.hessian(f)(x))


@pytest.mark.parametrize("argnums", [(0, 1), (1,), 1])
def test_hessian_argnums(argnums):
    f = lambda x, y: (x.sin()[:, None] * y.exp()[None]).sum() * y.sum()  # noqa: E731
    x, y = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    assert_close(fwdgrad.hessian(f, argnums)(x, y), torch.func.hessian(f, argnums)(x, y))


def test_hessian_mlp_loss():
    m = _mlp()
    x = torch.randn(4, 5, dtype=D)
    loss = lambda x: m(x).square().mean()  # noqa: E731
    assert_close(fwdgrad.hessian(loss)(x), torch.func.hessian(loss)(x))


# --------------------------------------------------------------------------
# batched jvp


def _vmapped_jvp(f, primals, tangents):
    in_dims = (0,) * len(tangents)
    return torch.vmap(lambda *t: torch.func.jvp(f, primals, t)[1], in_dims=in_dims)(*tangents)


def test_batched_jvp_mlp():
    m = _mlp()
    x = torch.randn(2, 5, dtype=D)
    v = torch.randn(6, 2, 5, dtype=D)
    out, t = fwdgrad.jvp(m, (x,), (v,), batched=True)
    assert_close(out, m(x))
    assert_close(t, _vmapped_jvp(m, (x,), (v,)))


def test_batched_jvp_cnn(cnn_eval):
    x = torch.randn(2, 2, 6, 6, dtype=D)
    v = torch.randn(3, 2, 2, 6, 6, dtype=D)
    out, t = fwdgrad.jvp(cnn_eval, (x,), (v,), batched=True)
    assert_close(t, _vmapped_jvp(cnn_eval, (x,), (v,)))


def test_batched_jvp_pytree_and_aux():
    inputs, scale = _pytree_args()
    tangents = {"a": torch.randn(5, 3, dtype=D), "b": torch.randn(5, 4, dtype=D)}

    def f(inputs):
        out = pytree_fn(inputs, scale)
        return out, out[0].sum()

    out, t, aux = fwdgrad.jvp(f, (inputs,), (tangents,), batched=True, has_aux=True)
    expected = torch.vmap(lambda t: torch.func.jvp(lambda i: f(i)[0], (inputs,), (t,))[1])(tangents)
    assert_close(t, expected)
    assert_close(out, f(inputs)[0])
    assert_close(aux, f(inputs)[1])


def test_batched_jvp_none_tangent_and_shared_primal():
    calls = []

    def f(x, y):
        calls.append(1)
        return x * y.exp()

    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    v = torch.randn(4, 3, dtype=D)
    _, t = fwdgrad.jvp(f, (x, y), (v, None), batched=True)
    assert_close(t, v * y.exp())
    assert len(calls) == 1  # recorded once; the 4 directions replay the tangent program


# --------------------------------------------------------------------------
# linearize


def test_linearize_mlp_and_reuse():
    m = _mlp()
    x = torch.randn(2, 5, dtype=D)
    out, jvp_fn = fwdgrad.linearize(m, x)
    out0, jvp_fn0 = torch.func.linearize(m, x)
    assert_close(out, out0)
    for _ in range(2):
        v = torch.randn_like(x)
        assert_close(jvp_fn(v), jvp_fn0(v))


def test_linearize_skips_heavy_tangent_ops_while_recording():
    # mv with a 2^20-element matrix: recorded from its meta shape, not run.
    torch.manual_seed(4)
    W = torch.randn(1024, 1024, dtype=D) / 32
    f = lambda x: torch.tanh(W @ x).sin()  # noqa: E731
    x, v = torch.randn(1024, dtype=D), torch.randn(1024, dtype=D)
    out, jvp_fn = fwdgrad.linearize(f, x)
    assert_close(out, f(x))
    assert_close(jvp_fn(v), torch.func.jvp(f, (x,), (v,))[1])


def test_linearize_tangent_with_other_strides():
    f = lambda x: (x * 2).view(-1).sin()  # noqa: E731  (recorded with a contiguous tangent)
    x = torch.randn(3, 4, dtype=D)
    v = torch.randn(4, 3, dtype=D).t()
    _, jvp_fn = fwdgrad.linearize(f, x)
    assert_close(jvp_fn(v), torch.func.jvp(f, (x,), (v.contiguous(),))[1])


def test_linearize_cnn(cnn_eval):
    x = torch.randn(2, 2, 6, 6, dtype=D)
    v = torch.randn_like(x)
    out, jvp_fn = fwdgrad.linearize(cnn_eval, x)
    assert_close(jvp_fn(v), torch.func.jvp(cnn_eval, (x,), (v,))[1])


def test_linearize_pytree_runs_func_once():
    inputs, scale = _pytree_args()
    calls = []

    def f(inputs):
        calls.append(1)
        return pytree_fn(inputs, scale)

    out, jvp_fn = fwdgrad.linearize(f, inputs)
    for _ in range(3):
        v = {k: torch.randn_like(t) for k, t in inputs.items()}
        assert_close(jvp_fn(v), torch.func.jvp(f, (inputs,), (v,))[1])
    assert_close(out, pytree_fn(inputs, scale))
    assert len(calls) == 1 + 3  # our recording, then only the oracle's calls


# --------------------------------------------------------------------------
# errors


def test_errors():
    f = lambda x, y: x * y  # noqa: E731
    x = torch.randn(3, dtype=D)
    with pytest.raises(ValueError, match="argnums 2 is out of range"):
        fwdgrad.jacfwd(f, argnums=2)(x, x)
    with pytest.raises(ValueError, match="duplicates"):
        fwdgrad.jacfwd(f, argnums=(0, 0))(x, x)
    with pytest.raises(TypeError, match=r"argument 1 \(y\) is a float"):
        fwdgrad.jacfwd(f, argnums=1)(x, 2.0)
    with pytest.raises(TypeError, match=r"argument 0 \(x\) has dtype torch.int64"):
        fwdgrad.jacfwd(f)(torch.arange(3), x)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        fwdgrad.jacfwd(f, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be None or an int"):
        fwdgrad.jacfwd(f, chunk_size=2.0)
    with pytest.raises(TypeError, match=r"argnums must be int or Tuple\[int, ...\]"):
        fwdgrad.jacfwd(f, argnums=[0])
    with pytest.raises(TypeError, match="has dtype torch.int64"):
        fwdgrad.linearize(torch.sin, torch.arange(3))
    with pytest.raises(ValueError, match="same leading batch size"):
        fwdgrad.jvp(f, (x, x), (torch.ones(2, 3, dtype=D), torch.ones(3, 3, dtype=D)), batched=True)
    with pytest.raises(ValueError, match="shape"):
        fwdgrad.jvp(f, (x, x), (torch.ones(2, 4, dtype=D), None), batched=True)
    with pytest.raises(ValueError, match="at least one tangent"):
        fwdgrad.jvp(f, (x, x), (None, None), batched=True)
    _, jvp_fn = fwdgrad.linearize(torch.sin, x)
    with pytest.raises(ValueError, match="shape"):
        jvp_fn(torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="expected 1 tangent"):
        jvp_fn(x, x)


def test_jacfwd_replays_a_kept_recording_at_new_points():
    """A second call with the same signature runs the recorded primal program at
    its own inputs instead of recording again; values stay right."""
    from fwdgrad import jacobian, trace

    w = torch.randn(6, 3, dtype=torch.float64)

    def f(x):
        return torch.tanh(w @ x).sin()

    records = []
    real_record = trace.record

    def counting(*a, **k):
        records.append(1)
        return real_record(*a, **k)

    trace.record = counting
    try:
        for _ in range(3):
            x = torch.randn(3, dtype=torch.float64)
            assert torch.allclose(fwdgrad.jacfwd(f)(x), torch.func.jacfwd(f)(x))
        assert len(records) == 1
        v = torch.randn(5, 3, dtype=torch.float64)
        out, t = fwdgrad.jvp(f, (x,), (v,), batched=True)
        out2, t2 = fwdgrad.jvp(f, (x + 1,), (v,), batched=True)
        assert torch.allclose(t2, torch.func.vmap(lambda u: torch.func.jvp(f, (x + 1,), (u,))[1])(v))
        assert torch.allclose(out2, f(x + 1))
        assert len(records) == 1  # jacfwd and batched jvp share the kept recording per signature
        w.data = torch.randn(6, 3, dtype=torch.float64)  # the same object, new values: seen by reference
        assert torch.allclose(fwdgrad.jacfwd(f)(x), torch.func.jacfwd(f)(x))
    finally:
        trace.record = real_record
    assert jacobian._programs_for(f, False).entries


def test_jacfwd_does_not_replay_value_dependent_or_mutating_functions():
    def branchy(x):
        return x.sin() if x.sum() > 0 else x.cos()

    for x in (torch.ones(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)):
        assert torch.allclose(fwdgrad.jacfwd(branchy)(x), torch.func.jacfwd(branchy)(x))

    bn = torch.nn.BatchNorm1d(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fwdgrad.jacfwd(bn)(x)
    fwdgrad.jacfwd(bn)(x)
    assert int(bn.num_batches_tracked) == 2  # the running statistics move once per call
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_hessian_of_vector_and_pytree_outputs(argnums):
    # torch.func.hessian takes any output: output.shape + input.shape + input.shape
    f = lambda x, y: {"a": x.outer(y).sin(), "b": (x ** 2).sum() * y.exp(), "c": (x * y.sum()).tanh()[1]}  # noqa: E731
    x, y = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    ours, ref = fwdgrad.hessian(f, argnums)(x, y), torch.func.hessian(f, argnums)(x, y)
    assert pytree.tree_structure(ours) == pytree.tree_structure(ref)
    for a, b in zip(pytree.tree_leaves(ours), pytree.tree_leaves(ref)):
        assert_close(a, b)


def test_hessian_of_a_constant_output_is_zero_and_of_a_model_output():
    x = torch.randn(3, dtype=D)
    assert_close(fwdgrad.hessian(lambda x: torch.ones(2, dtype=D))(x), torch.zeros(2, 3, 3, dtype=D))
    m = _mlp()
    xs = torch.randn(2, 5, dtype=D)
    assert_close(fwdgrad.hessian(m)(xs), torch.func.hessian(m)(xs))


def test_hessian_refuses_complex_inputs_like_torch_func():
    with pytest.raises(RuntimeError, match="hessian: Expected all inputs to be real, but argument 0 .* is complex"):
        fwdgrad.hessian(lambda z: z.abs().sum())(torch.randn(2, dtype=torch.complex128))


def test_jacfwd_of_a_function_capturing_an_outer_dual_is_never_replayed():
    """The closure holds a dual of the enclosing jvp: a kept program would see only
    its primal (and keep the dual alive), so each call records."""
    y0 = torch.randn(3, dtype=torch.float64)

    def outer(x):
        return fwdgrad.jacfwd(lambda y: torch.sin(x * y))(y0).sum()

    def expected(x):
        return torch.func.jacfwd(lambda y: torch.sin(x * y))(y0).sum()

    for _ in range(2):
        x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        _, t = fwdgrad.jvp(outer, (x,), (v,))
        assert torch.allclose(t, torch.func.jvp(expected, (x,), (v,))[1])
