"""dtypes and devices.

* Floating tangents stay in their primal's dtype (float64, float32, bfloat16,
  float16), and match torch.func.jvp in that dtype and a float64 reference.
* Complex inputs work with torch.func's conventions: a complex primal takes a
  complex tangent, and the JVP is the real-linear map ``v -> J v`` (for a
  holomorphic ``f`` that is ``f'(z) * v``; for ``abs``, ``conj`` or ``real`` it is
  the derivative of ``f`` as a function of the real and imaginary parts).
  Checked against torch.func.jvp.
* CUDA tensors work when a GPU is present (these tests skip without one).
"""

import pytest
import torch
import torch.nn.functional as F

import fwdgrad

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Tolerances for comparing with a float64 reference, per dtype.
TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def _data(seed, *shape, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype=dtype, device=device)


def _weight(dtype):
    return (_data(50, 6, 6) * 0.5).to(dtype)


FUNCTIONS = {
    "elementwise": lambda x: (x.sin() * x.exp() + x.tanh()) / (1 + x * x),
    "matmul": lambda x: torch.tanh(x @ _weight(x.dtype)),
    "softmax": lambda x: F.softmax(x, -1) * F.log_softmax(x, 0),
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "reductions": lambda x: torch.stack([x.sum(), x.mean(), x.var(), x.amax(), x.norm()]),
    "views_inplace": lambda x: x.clone().t()[1:].mul_(x.t()[:-1].sigmoid()),
    "gelu_linear": lambda x: F.linear(F.gelu(x), _weight(x.dtype), _weight(x.dtype)[0]),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_float_tangents_stay_in_the_primals_dtype(dtype, name):
    f = FUNCTIONS[name]
    x64, v64 = _data(0, 4, 6), _data(1, 4, 6)
    x, v = x64.to(dtype), v64.to(dtype)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert out.dtype == dtype and t.dtype == dtype
    assert torch.equal(out, f(x))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    assert ref_t.dtype == dtype
    # Same dtype: as close as two orders of rounding allow.
    torch.testing.assert_close(t.double(), ref_t.double(), **TOL[dtype])
    # And close to the float64 answer.
    t64 = torch.func.jvp(f, (x64,), (v64,))[1]
    torch.testing.assert_close(t.double(), t64, **TOL[dtype])


@pytest.mark.parametrize(
    "source, target",
    [(torch.float16, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.bfloat16)],
    ids=str,
)
def test_casts_inside_f_move_the_tangent_to_the_new_dtype(source, target):
    x, v = _data(0, 5, dtype=source), _data(1, 5, dtype=source)
    f = lambda x: x.to(target).sin() * 2  # noqa: E731
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert out.dtype == target and t.dtype == target
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


def test_mixed_dtype_promotion():
    """A float16 input meets a float32 constant: the output, and its tangent, are float32."""
    x, v = _data(0, 5, dtype=torch.float16), _data(1, 5, dtype=torch.float16)
    w = _data(2, 5, dtype=torch.float32)
    f = lambda x: x * w + x.sum()  # noqa: E731
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert out.dtype == torch.float32 and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.func.jvp(f, (x,), (v,))[1])


# ---- complex -------------------------------------------------------------------------------

CW = torch.randn(4, 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(9))

COMPLEX_TO_ANY = {
    "z*z": lambda z: z * z,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sin": torch.sin,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "reciprocal": torch.reciprocal,
    "pow": lambda z: z**3,
    "matmul": lambda z: CW @ z,
    "conj": lambda z: z.conj() * 1,
    "sgn": torch.sgn,
    "div by abs": lambda z: z / (z.abs() + 1),
    "abs (complex to real)": torch.abs,
    "angle": torch.angle,
    "real": torch.real,
    "imag": lambda z: z.imag,
    "view_as_real": lambda z: torch.view_as_real(z * 1),
    "norm": torch.linalg.vector_norm,
    "z * conj(z) sum": lambda z: (z * z.conj()).sum(),
    "fft": torch.fft.fft,
    "cumsum": lambda z: z.cumsum(0),
    "in-place on a view": lambda z: z.clone()[1:].mul_(2j).add_(z[:-1].conj()),
}

REAL_TO_COMPLEX = {
    "polar": lambda x: torch.polar(x.abs() + 1, x),
    "complex": lambda x: torch.complex(x, x * 2),
    "view_as_complex": lambda x: torch.view_as_complex(x.reshape(2, 2).contiguous()),
    "times 1j": lambda x: x * 1j,
    "rfft": torch.fft.rfft,
}


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=str)
@pytest.mark.parametrize("name", list(COMPLEX_TO_ANY))
def test_complex_inputs_follow_torch_func(name, dtype):
    f = COMPLEX_TO_ANY[name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, dtype=dtype, generator=g)
    v = torch.randn(4, dtype=dtype, generator=g)
    if name == "matmul":
        f = lambda z: CW.to(dtype) @ z  # noqa: E731
    out, t = fwdgrad.jvp(f, (z,), (v,))
    ref_out, ref_t = torch.func.jvp(f, (z,), (v,))
    assert t.dtype == ref_t.dtype == out.dtype
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize("name", list(REAL_TO_COMPLEX))
def test_real_to_complex_follows_torch_func(name):
    f = REAL_TO_COMPLEX[name]
    x, v = _data(0, 4), _data(1, 4)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    ref_out, ref_t = torch.func.jvp(f, (x,), (v,))
    assert t.dtype == ref_t.dtype == out.dtype
    torch.testing.assert_close(t, ref_t)


def test_complex_tangent_is_the_real_linear_map():
    """For non-holomorphic f(z) = |z|^2 the JVP along v is 2 Re(conj(z) v):
    finite differences in the complex direction v agree."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, dtype=torch.complex128, generator=g)
    v = torch.randn(5, dtype=torch.complex128, generator=g)
    f = lambda z: (z * z.conj()).real  # noqa: E731
    out, t = fwdgrad.jvp(f, (z,), (v,))
    eps = 1e-6
    fd = (f(z + eps * v) - f(z - eps * v)) / (2 * eps)
    torch.testing.assert_close(t, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(t, 2 * (z.conj() * v).real)


# ---- CUDA ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_jvp_matches_torch_func(name, dtype):
    f = FUNCTIONS[name]
    x, v = _data(0, 4, 6, dtype=dtype, device="cuda"), _data(1, 4, 6, dtype=dtype, device="cuda")
    if name in ("matmul", "gelu_linear"):
        w = _weight(dtype).cuda()
        f = {"matmul": lambda x: torch.tanh(x @ w), "gelu_linear": lambda x: F.linear(F.gelu(x), w, w[0])}[name]
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert out.device.type == "cuda" and t.device.type == "cuda" and t.dtype == dtype
    ref_t = torch.func.jvp(f, (x,), (v,))[1]
    torch.testing.assert_close(t.double(), ref_t.double(), **TOL[dtype])


@cuda
def test_cuda_tangent_on_another_device_is_refused():
    x = torch.ones(3, device="cuda")
    with pytest.raises(ValueError, match="is on cpu but primals\\[0\\] is on cuda"):
        fwdgrad.jvp(torch.sin, (x,), (torch.ones(3),))


@cuda
def test_cuda_forward_over_reverse():
    x, v = _data(0, 5, 6, device="cuda"), _data(1, 5, 6, device="cuda")

    def loss(x):
        return (x.tanh() @ x.mT).softmax(-1).pow(2).sum()

    def gradient(x):
        with torch.enable_grad():
            x = x.requires_grad_()
            return torch.autograd.grad(loss(x), x, create_graph=True)[0]

    hv = fwdgrad.jvp(gradient, (x.clone(),), (v,))[1]
    assert hv.device.type == "cuda"
    torch.testing.assert_close(hv, torch.autograd.functional.hvp(loss, x, v)[1])


@cuda
def test_cuda_random_ops_use_the_primals_draw():
    x, v = _data(0, 64, device="cuda"), _data(1, 64, device="cuda")
    f = lambda x: F.dropout(x, 0.5, training=True)  # noqa: E731
    torch.manual_seed(0)
    plain = f(x)
    torch.manual_seed(0)
    out, t = fwdgrad.jvp(f, (x,), (v,))
    assert torch.equal(out, plain)
    torch.testing.assert_close(t, v * (plain != 0) * 2)
