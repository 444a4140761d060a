"""Elementwise ops: unary math, binary arithmetic, activations, casts and copies.

Formulas follow the forward derivatives in PyTorch's derivatives.yaml and the
textbook derivatives; ``g`` is the input tangent, ``ans`` the primal output.
"""

import math

import torch

from ..ops import aten_ops
from ..registry import def_elementwise, def_linear, def_zero, defrule, or_scalar_zero, tmul, tsum, unrecorded
from ..slicing import fresh_ok

aten = torch.ops.aten
_unary = def_elementwise

# Two ways to make a unary rule cheaper, given with its formula (see
# ``registry.def_elementwise``):
#
# * ``kernel=``: ATen's backward kernels compute ``g * f'(x)`` (or ``g * f'``
#   from the output) in one pass, without the formula's temporaries: for GELU
#   on 256 x 1024 floats 0.25 ms against 1.9 ms.  They are differentiable
#   (autograd has their double backward, and fwdgrad has rules for them in
#   ``backward.py``), so reverse over forward and nested transforms stay
#   exact.  They conjugate the derivative for complex inputs, so complex
#   tensors keep the formulas.  Kernels without a double backward (silu,
#   mish, hardsigmoid) are used only while nothing records the tangent
#   (``when=unrecorded``), and mish's, which vmap cannot batch, only while no
#   tracer watches either (``when=fresh_ok``).  Math without such a kernel
#   gets an in-place formula on one fresh tensor, used when nothing watches
#   the tangent (``when=fresh_ok``): no temporaries.
# * ``sliced=True``: formulas that build several temporaries the size of the
#   input run in slices on large tensors (``fwdgrad/slicing.py``), which keeps
#   the peak memory of jvp and hvp near that of the values themselves where
#   the kernel is not used.


def _identity(g, ans, *args, **kwargs):
    """The contribution of an argument whose partial derivative is 1."""
    return g


# ---- linear unary ops ------------------------------------------------------
for _op in (
    aten.neg.default,
    aten.clone.default,
    aten._conj_physical.default,
    aten._conj.default,
    aten.lift_fresh_copy.default,
    aten.lift_fresh.default,
    aten._to_copy.default,
    aten._neg_view.default,
    aten.deg2rad.default,
    aten.rad2deg.default,
):
    def_linear(_op)

def_linear(aten.mul.Scalar)
def_linear(aten.div.Scalar)
def_linear(aten.view_as_real.default)
def_linear(aten.view_as_complex.default)

# ---- unary math --------------------------------------------------------------
_unary(aten.sin.default, lambda g, ans, x: g * x.cos(),
       kernel=lambda g, ans, x: x.cos().mul_(g), when=fresh_ok, sliced=True)
_unary(aten.cos.default, lambda g, ans, x: -g * x.sin(),
       kernel=lambda g, ans, x: x.sin().mul_(g).neg_(), when=fresh_ok, sliced=True)
_unary(aten.tan.default, lambda g, ans, x: g * (1 + ans * ans))
_unary(aten.asin.default, lambda g, ans, x: g * (1 - x * x).rsqrt())
_unary(aten.acos.default, lambda g, ans, x: -g * (1 - x * x).rsqrt())
_unary(aten.atan.default, lambda g, ans, x: g / (1 + x * x))
_unary(aten.sinh.default, lambda g, ans, x: g * x.cosh())
_unary(aten.cosh.default, lambda g, ans, x: g * x.sinh())
_unary(aten.tanh.default, lambda g, ans, x: g * (1 - ans * ans),
       kernel=lambda g, ans, x: aten.tanh_backward.default(g, ans), when=fresh_ok, sliced=True)
_unary(aten.asinh.default, lambda g, ans, x: g * (x * x + 1).rsqrt())
_unary(aten.acosh.default, lambda g, ans, x: g * ((x - 1).rsqrt() * (x + 1).rsqrt()))
_unary(aten.atanh.default, lambda g, ans, x: g / (1 - x * x))
_unary(aten.exp.default, lambda g, ans, x: g * ans, kernel=lambda g, ans, x: g * ans, when=fresh_ok, sliced=True)
_unary(aten.exp2.default, lambda g, ans, x: g * ans * math.log(2.0))
_unary(aten.expm1.default, lambda g, ans, x: g * (ans + 1))
_unary(aten.log.default, lambda g, ans, x: g / x, kernel=lambda g, ans, x: g / x, when=fresh_ok, sliced=True)
_unary(aten.log2.default, lambda g, ans, x: g / (x * math.log(2.0)))
_unary(aten.log10.default, lambda g, ans, x: g / (x * math.log(10.0)))
_unary(aten.log1p.default, lambda g, ans, x: g / (x + 1))
_unary(aten.sqrt.default, lambda g, ans, x: g / (2 * ans),
       kernel=lambda g, ans, x: torch.div(g, ans).mul_(0.5), when=fresh_ok, sliced=True)
_unary(aten.rsqrt.default, lambda g, ans, x: -0.5 * g * ans * ans * ans,
       kernel=lambda g, ans, x: ans.pow(3).mul_(g).mul_(-0.5), when=fresh_ok, sliced=True)
_unary(aten.reciprocal.default, lambda g, ans, x: -g * ans * ans)
_unary(aten.sigmoid.default, lambda g, ans, x: g * (ans * (1 - ans)),
       kernel=lambda g, ans, x: aten.sigmoid_backward.default(g, ans), sliced=True)
_unary(aten.erf.default, lambda g, ans, x: g * (2 / math.sqrt(math.pi)) * (-x * x).exp(),
       kernel=lambda g, ans, x: (x * x).neg_().exp_().mul_(g).mul_(2 / math.sqrt(math.pi)),
       when=fresh_ok, sliced=True)
_unary(aten.erfc.default, lambda g, ans, x: g * (-2 / math.sqrt(math.pi)) * (-x * x).exp())
_unary(aten.erfinv.default, lambda g, ans, x: g * (math.sqrt(math.pi) / 2) * (ans * ans).exp())
_unary(aten.lgamma.default, lambda g, ans, x: g * x.digamma())
_unary(aten.digamma.default, lambda g, ans, x: g * torch.polygamma(1, x))
def_elementwise(aten.polygamma.default, None, lambda g, ans, n, x: g * torch.polygamma(n + 1, x))
_unary(aten.i0.default, lambda g, ans, x: g * torch.special.i1(x))
_unary(aten.special_i0e.default, lambda g, ans, x: g * (torch.special.i1e(x) - x.sgn() * ans))
_unary(aten.special_i1.default, lambda g, ans, x: g * (torch.i0(x) - torch.where(x == 0, 0.5, ans / x)))
_unary(
    aten.special_i1e.default,
    # i1e'(x) = i0e(x) - i1e(x) (sgn(x) + 1/x), with the limit 1/2 at 0
    lambda g, ans, x: g * torch.where(x == 0, 0.5, torch.special.i0e(x) - ans * (x.sgn() + 1 / x)),
)
_unary(aten.special_ndtri.default, lambda g, ans, x: g * math.sqrt(2 * math.pi) * (ans * ans / 2).exp())
_unary(aten.special_log_ndtr.default, lambda g, ans, x: g * (-(x * x) / 2 - ans).exp() / math.sqrt(2 * math.pi))
_unary(aten.special_erfcx.default, lambda g, ans, x: g * (2 * x * ans - 2 / math.sqrt(math.pi)))
_unary(aten.special_entr.default, lambda g, ans, x: -g * (x.log() + 1))
def_elementwise(
    aten.mvlgamma.default,
    lambda g, ans, x, p: g * sum((x - 0.5 * i).digamma() for i in range(p)),
)
_unary(aten.frac.default, lambda g, ans, x: g)
_unary(aten.sinc.default, lambda g, ans, x: g * torch.where(
    x == 0, 0.0, ((math.pi * x).cos() * math.pi * x - (math.pi * x).sin()) / (math.pi * x * x)
).to(g.dtype))
_unary(aten.angle.default, lambda g, ans, x: (
    (g * x.conj()).imag / x.abs().square().clamp_min(torch.finfo(x.real.dtype).tiny)
    if x.is_complex() else None  # the angle of a real number is piecewise constant
))


def _abs_jvp(g, ans, x):
    if x.is_complex():
        return (g * x.sgn().conj()).real
    return g * x.sign()


_unary(aten.abs.default, _abs_jvp)


def _sgn_jvp(g, ans, x):
    if not x.is_complex():
        return None
    a = x.abs()
    return torch.where(a == 0, 0.0, (g - (g * ans.conj()).real * ans) / a).to(g.dtype)


_unary(aten.sgn.default, _sgn_jvp)

# Piecewise constant: zero derivative almost everywhere.
def_zero(
    aten.sign.default,
    aten.ceil.default,
    aten.floor.default,
    aten.round.default,
    aten.round.decimals,
    aten.trunc.default,
    aten.heaviside.default,
    aten.div.Tensor_mode,
    aten.div.Scalar_mode,
    aten.floor_divide.default,
    aten.floor_divide.Scalar,
    aten.bernoulli.default,
    aten.bernoulli.p,
    aten.bernoulli.Tensor,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.randint_like.default,
    aten.randint_like.low_dtype,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
    aten.fill.Scalar,
    aten.zero.default,
    aten.uniform.default,
    aten.normal_functional.default,
    aten.exponential.default,
    aten.geometric.default,
    aten.log_normal.default,
    aten.cauchy.default,
    aten.random.default,
    *aten_ops("random.from", "random.to"),
    aten.multinomial.default,
    aten.special_zeta.default,
)

def_linear(aten.fill.Tensor, 1)


# ---- sampling ----------------------------------------------------------------
# The pathwise (reparameterisation) derivative: the draw z = (ans - mean) / std is
# held fixed, as the same seed would reproduce it.  (PyTorch's own formula treats
# normal as constant in mean and std; finite differences at a fixed seed agree
# with this one.)


def _standard_draw(ans, mean, std):
    return torch.where(std == 0, 0.0, (ans - mean) / std)


@defrule(aten.normal.Tensor_Tensor)
def _normal_tt_jvp(t, ans, mean, std, *, generator=None):
    return tsum(t[0], None if t[1] is None else t[1] * _standard_draw(ans, mean, std))


@defrule(aten.normal.Tensor_float)
def _normal_tf_jvp(t, ans, mean, std=1.0, *, generator=None):
    return t[0]


@defrule(aten.normal.float_Tensor)
def _normal_ft_jvp(t, ans, mean, std, *, generator=None):
    return t[1] * _standard_draw(ans, mean, std)


@defrule(aten.rrelu_with_noise.default)
def _rrelu_jvp(t, ans, x, noise, lower=0.125, upper=1.0 / 3.0, training=False, generator=None):
    if training:
        return t[0] * noise  # the kernel wrote each element's slope (1 where x >= 0) into noise
    return t[0] * torch.where(x >= 0, 1.0, (lower + upper) / 2).to(t[0].dtype)


@defrule(aten.rrelu_with_noise_functional.default)
def _rrelu_functional_jvp(t, ans, x, noise, lower=0.125, upper=1.0 / 3.0, training=False, generator=None):
    out, noise_out = ans
    return _rrelu_jvp(t, out, x, noise_out, lower, upper, training), None


@defrule(aten.copy.default)
def _copy_jvp(t, ans, self, src, non_blocking=False):
    return t[1]


# ---- activations -------------------------------------------------------------
_unary(aten.relu.default, lambda g, ans, x: g.where(ans > 0, 0),
       kernel=lambda g, ans, x: aten.threshold_backward.default(g, ans, 0), sliced=True)
def_elementwise(
    aten.threshold.default, lambda g, ans, x, threshold, value: g.where(x > threshold, 0),
    kernel=lambda g, ans, x, threshold, value: aten.threshold_backward.default(g, x, threshold), sliced=True,
)
def_elementwise(
    aten.leaky_relu.default,
    lambda g, ans, x, slope=0.01: g * torch.where(x > 0, 1.0, slope).to(g.dtype),
    kernel=lambda g, ans, x, slope=0.01: aten.leaky_relu_backward.default(g, x, slope, False), sliced=True,
)
def_elementwise(
    aten.hardtanh.default,
    lambda g, ans, x, lo=-1.0, hi=1.0: g.where((x > lo) & (x < hi), 0),
    kernel=lambda g, ans, x, lo=-1.0, hi=1.0: aten.hardtanh_backward.default(g, x, lo, hi), sliced=True,
)
_unary(aten.hardsigmoid.default, lambda g, ans, x: g.where((x > -3) & (x < 3), 0) / 6,
       kernel=lambda g, ans, x: aten.hardsigmoid_backward.default(g, x), when=unrecorded, sliced=True)
_unary(
    aten.hardswish.default,
    lambda g, ans, x: g * torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0)).to(g.dtype),
    kernel=lambda g, ans, x: aten.hardswish_backward.default(g, x), sliced=True,
)
_unary(aten.silu.default, lambda g, ans, x: g * (lambda s: s * (1 + x * (1 - s)))(x.sigmoid()),
       kernel=lambda g, ans, x: aten.silu_backward.default(g, x), when=unrecorded, sliced=True)
_unary(aten.mish.default, lambda g, ans, x: g * (lambda tsp, s: tsp + x * s * (1 - tsp * tsp))(
    torch.nn.functional.softplus(x).tanh(), x.sigmoid()),
    kernel=lambda g, ans, x: aten.mish_backward.default(g, x), when=fresh_ok, sliced=True)


def_elementwise(aten.hardshrink.default, lambda g, ans, x, lambd=0.5: g.where(x.abs() > lambd, 0),
                kernel=lambda g, ans, x, lambd=0.5: aten.hardshrink_backward.default(g, x, lambd))
def_elementwise(aten.softshrink.default, lambda g, ans, x, lambd=0.5: g.where(x.abs() > lambd, 0),
                kernel=lambda g, ans, x, lambd=0.5: aten.softshrink_backward.default(g, x, lambd))


@defrule(aten.glu.default)
def _glu_jvp(t, ans, x, dim=-1):
    a, b = x.chunk(2, dim)
    ta, tb = t[0].chunk(2, dim)
    s = b.sigmoid()
    return s * (ta + a * (1 - s) * tb)


@defrule(aten._prelu_kernel.default)
def _prelu_jvp(t, ans, x, w):
    positive = x > 0
    return tsum(None if t[0] is None else torch.where(positive, t[0], w * t[0]),
                None if t[1] is None else torch.where(positive, 0.0, x * t[1]))


def _gelu_jvp(g, ans, x, approximate="none"):
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        inner = k * (x + 0.044715 * x * x * x)
        th = inner.tanh()
        d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * k * (1 + 3 * 0.044715 * x * x)
        return g * d
    cdf = 0.5 * (1 + (x * (1 / math.sqrt(2))).erf())
    pdf = (-0.5 * x * x).exp() * (1 / math.sqrt(2 * math.pi))
    return g * (cdf + x * pdf)


_unary(aten.gelu.default, _gelu_jvp, sliced=True,
       kernel=lambda g, ans, x, approximate="none": aten.gelu_backward.default(g, x, approximate=approximate))


def _elu_jvp(g, ans, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return g * torch.where(x > 0, scale, (x * input_scale).exp() * (alpha * scale * input_scale))


_unary(aten.elu.default, _elu_jvp, sliced=True,
       kernel=lambda g, ans, x, alpha=1.0, scale=1.0, input_scale=1.0: aten.elu_backward.default(
           g, alpha, scale, input_scale, False, x))
# celu(x, a) = elu(x, alpha=a, scale=1, input_scale=1/a)
_unary(aten.celu.default, lambda g, ans, x, alpha=1.0: g * torch.where(x > 0, 1.0, (x / alpha).exp()).to(g.dtype),
       kernel=lambda g, ans, x, alpha=1.0: (
           aten.elu_backward.default(g, alpha, 1.0, 1.0 / alpha, False, x) if alpha != 0 else NotImplemented),
       sliced=True)


def _softplus_jvp(g, ans, x, beta=1.0, threshold=20.0):
    z = x * beta
    return g * torch.where(z > threshold, 1.0, z.sigmoid())


_unary(aten.softplus.default, _softplus_jvp, sliced=True,
       kernel=lambda g, ans, x, beta=1.0, threshold=20.0: aten.softplus_backward.default(g, x, beta, threshold))


@defrule(aten.logit.default)
def _logit_jvp(t, ans, x, eps=None):
    g = t[0]
    d = g / (x * (1 - x))
    if eps is not None:
        d = torch.where((x < eps) | (x > 1 - eps), 0.0, d).to(d.dtype)
    return d


@defrule(aten.nan_to_num.default)
def _nan_to_num_jvp(t, ans, x, nan=None, posinf=None, neginf=None):
    return torch.where(x.isfinite(), t[0], 0.0).to(t[0].dtype)


@defrule(aten.frexp.Tensor)
def _frexp_jvp(t, ans, x):
    mantissa, exponent = ans  # x = mantissa * 2**exponent, exponent locally constant
    return t[0] * (-exponent).to(mantissa.dtype).exp2(), None


@defrule(aten.native_dropout.default)
def _dropout_jvp(t, ans, x, p, train):
    out, mask = ans
    if train is False or p == 0:
        return t[0], None
    if p >= 1:
        return None, None
    return (t[0] * (1.0 / (1.0 - p))).where(mask, 0), None


# More random ops (see also "sampling" above): tangents from the primal's own draw.
def_zero(aten.poisson.default, *aten_ops("rand_like.generator", "randn_like.generator"))


@defrule(aten._standard_gamma.default)
def _standard_gamma_jvp(t, ans, alpha, generator=None):
    return t[0] * aten._standard_gamma_grad.default(alpha, ans)


@defrule(aten.log_sigmoid_forward.default)
def _log_sigmoid_jvp(t, ans, x):
    if x.is_complex():
        return t[0] * (-x).sigmoid(), None
    return aten.log_sigmoid_backward.default(t[0], x, ans[1]), None


# ---- binary arithmetic -------------------------------------------------------


def _scaled(g, alpha):
    """The tangent ``g * alpha``: ``g`` itself when alpha is 1 (or ``g`` is zero)."""
    return g if alpha == 1 else tmul(g, alpha)


@defrule(aten.add.Tensor)
def _add_jvp(t, ans, x, y, alpha=1):
    return tsum(t[0], _scaled(t[1], alpha))


@defrule(aten.sub.Tensor)
def _sub_jvp(t, ans, x, y, alpha=1):
    return tsum(t[0], _scaled(t[1], -alpha))


@defrule(aten.rsub.Tensor)
def _rsub_jvp(t, ans, x, y, alpha=1):
    return _sub_jvp((t[1], t[0]), ans, y, x, alpha)


# ``x + c`` and ``x - c`` are affine, not linear: the tangent passes through unchanged.
for _op in (aten.add.Scalar, aten.sub.Scalar):
    def_elementwise(_op, _identity)
def_elementwise(aten.rsub.Scalar, lambda g, ans, x, y, alpha=1: -g * alpha)


@defrule(aten.mul.Tensor)
def _mul_jvp(t, ans, x, y):
    out, ty = tmul(t[0], y), t[1]
    if out is None or ty is None:
        return tsum(out, tmul(x, ty))
    if out.shape == ans.shape and out.dtype == ans.dtype and fresh_ok(out, x, ty):
        return out.addcmul_(x, ty)  # one output-sized tensor, two kernels
    return out + x * ty


@defrule(aten.div.Tensor)
def _div_jvp(t, ans, x, y):
    return tsum(None if t[0] is None else t[0] / y, None if t[1] is None else -t[1] * ans / y)


def _pow_base_term(g, x, e):
    if isinstance(e, torch.Tensor):
        return g * torch.where(e == 0, 0.0, e * x.pow(e - 1))
    if e == 0:
        return None
    return g * e * x.pow(e - 1)


def _pow_lean(g, ans, x, e):
    if e == 0 or isinstance(e, complex):
        return NotImplemented
    return x.pow(e - 1).mul_(g).mul_(e)


def_elementwise(aten.pow.Tensor_Scalar, lambda g, ans, x, e: _pow_base_term(g, x, e),
                kernel=_pow_lean, when=fresh_ok, sliced=True)
def_elementwise(
    aten.pow.Tensor_Tensor,
    lambda g, ans, x, e: _pow_base_term(g, x, e),
    lambda g, ans, x, e: g * torch.where((x == 0) & (e.real >= 0), 0.0, ans * x.log()).to(
        torch.result_type(g, ans)
    ),
)
def _pow_exponent_term(g, ans, s, e):
    """d s**e / de = s**e log(s), taken as 0 where s = 0 and e >= 0 (as in ATen)."""
    if isinstance(s, complex) or s < 0:
        return g * ans * torch.log(torch.tensor(s, dtype=ans.dtype, device=ans.device))
    if s == 0:
        return g * torch.where(e.real >= 0, 0.0, float("-inf") * ans)
    return g * ans * math.log(s)


def_elementwise(aten.pow.Scalar, None, _pow_exponent_term)

def_elementwise(
    aten.atan2.default,
    lambda g, ans, y, x: g * x / (x * x + y * y),
    lambda g, ans, y, x: -g * y / (x * x + y * y),
)
def_elementwise(
    aten.hypot.default,
    lambda g, ans, x, y: g * x / ans,
    lambda g, ans, x, y: g * y / ans,
)
def_elementwise(
    aten.fmod.Tensor,
    lambda g, ans, x, y: g,
    lambda g, ans, x, y: -g * (x / y).trunc(),
)
def_elementwise(aten.fmod.Scalar, _identity)
# nextafter(x, y) moves x by one ulp towards y: the derivative is 1 in x and 0 in y.
def_elementwise(aten.nextafter.default, _identity)
def_elementwise(
    aten.remainder.Tensor,
    lambda g, ans, x, y: g,
    lambda g, ans, x, y: -g * (x / y).floor(),
)
def_elementwise(aten.remainder.Scalar, _identity)
def_elementwise(aten.remainder.Scalar_Tensor, None, lambda g, ans, x, y: -g * (x / y).floor())


def _pick_jvp(takes_x):
    """The tangent of an elementwise choice between x and y; ties share it
    equally, as in ATen."""

    def rule(t, ans, x, y):
        tx, ty = or_scalar_zero(t[0], ans), or_scalar_zero(t[1], ans)
        return torch.where(x == y, (tx + ty) / 2, torch.where(takes_x(x, y), tx, ty))

    return rule


defrule(aten.maximum.default)(_pick_jvp(lambda x, y: x > y))
defrule(aten.minimum.default)(_pick_jvp(lambda x, y: x < y))
# fmax and fmin ignore a NaN operand
defrule(aten.fmax.default)(_pick_jvp(lambda x, y: (x > y) | y.isnan()))
defrule(aten.fmin.default)(_pick_jvp(lambda x, y: (x < y) | y.isnan()))

def_elementwise(
    aten.copysign.Tensor,
    lambda g, ans, x, y: g * torch.where(x == 0, 0.0, ans / x).to(g.dtype),
    None,  # piecewise constant in the sign source
)
def_elementwise(aten.copysign.Scalar, lambda g, ans, x, y: g * torch.where(x == 0, 0.0, ans / x).to(g.dtype))

def_elementwise(
    aten.logaddexp.default,
    lambda g, ans, x, y: g * (x - ans).exp(),
    lambda g, ans, x, y: g * (y - ans).exp(),
)
def_elementwise(
    aten.logaddexp2.default,
    lambda g, ans, x, y: g * (x - ans).exp2(),
    lambda g, ans, x, y: g * (y - ans).exp2(),
)
def_elementwise(
    aten.xlogy.Tensor,
    lambda g, ans, x, y: g * torch.where((x == 0) & ~y.isnan(), 0.0, y.log()).to(g.dtype),
    lambda g, ans, x, y: g * torch.where((x == 0) & ~y.isnan(), 0.0, x / y).to(g.dtype),
)
def_elementwise(
    aten.xlogy.Scalar_Other,
    lambda g, ans, x, y: g * (0.0 if y != y else math.log(y) if y > 0 else float("-inf") if y == 0
                              else float("nan")) * (x != 0),
)
def_elementwise(
    aten.xlogy.Scalar_Self,
    None,
    lambda g, ans, x, y: g * (0.0 if x == 0 else 1.0) * x / y,
)
def_elementwise(
    aten.special_xlog1py.default,
    lambda g, ans, x, y: g * torch.where((x == 0) & ~y.isnan(), 0.0, y.log1p()).to(g.dtype),
    lambda g, ans, x, y: g * torch.where((x == 0) & ~y.isnan(), 0.0, x / (1 + y)).to(g.dtype),
)


@defrule(aten.lerp.Scalar)
def _lerp_scalar_jvp(t, ans, start, end, weight):
    # (1 - weight) is a tensor op when lerp.Tensor calls this: only for a nonzero t[0]
    return tsum(None if t[0] is None else t[0] * (1 - weight), tmul(t[1], weight))


@defrule(aten.lerp.Tensor)
def _lerp_tensor_jvp(t, ans, start, end, weight):
    return tsum(_lerp_scalar_jvp(t, ans, start, end, weight), None if t[2] is None else t[2] * (end - start))


@defrule(aten.addcmul.default)
def _addcmul_jvp(t, ans, s, a, b, value=1):
    return tsum(t[0], None if t[1] is None else t[1] * b * value, None if t[2] is None else t[2] * a * value)


@defrule(aten.addcdiv.default)
def _addcdiv_jvp(t, ans, s, a, b, value=1):
    return tsum(t[0], None if t[1] is None else t[1] / b * value,
                None if t[2] is None else -t[2] * a / (b * b) * value)


@defrule(aten.where.self)
def _where_jvp(t, ans, cond, x, y):
    return torch.where(cond, or_scalar_zero(t[1], ans), or_scalar_zero(t[2], ans))


@defrule(aten.masked_fill.Scalar)
def _masked_fill_scalar_jvp(t, ans, x, mask, value):
    return t[0].masked_fill(mask, 0)


@defrule(aten.masked_fill.Tensor)
def _masked_fill_tensor_jvp(t, ans, x, mask, value):
    return torch.where(mask, or_scalar_zero(t[2], ans), or_scalar_zero(t[0], ans))


def_elementwise(
    aten.ldexp.Tensor,
    lambda g, ans, x, e: torch.ldexp(g, e),
    lambda g, ans, x, e: g * ans * math.log(2.0),
)
def_elementwise(
    aten.polar.default,
    lambda g, ans, r, theta: g * torch.polar(torch.ones_like(r), theta),
    lambda g, ans, r, theta: g * 1j * ans,
)


# ---- clamps ------------------------------------------------------------------
# Rules that select (clamps, relu-like ops, dropout masks, extremes) pick the
# tangent with ``where`` rather than multiplying by a 0/1 mask: an infinite or
# NaN tangent where the op does not pass it on (sqrt at 0, clamped away) must
# give 0, not 0 * inf = nan.


@defrule(aten.clamp.default)
def _clamp_jvp(t, ans, x, min=None, max=None):
    if min is None:
        return t[0].where(x <= max, 0)
    if max is None:
        return t[0].where(x >= min, 0)
    return t[0].where((x >= min) & (x <= max), 0)


@defrule(aten.clamp_min.default)
def _clamp_min_jvp(t, ans, x, min):
    return t[0].where(x >= min, 0)


@defrule(aten.clamp_max.default)
def _clamp_max_jvp(t, ans, x, max):
    return t[0].where(x <= max, 0)


@defrule(aten.clamp.Tensor)
def _clamp_tensor_jvp(t, ans, x, min=None, max=None):
    """clamp(x, min, max) = minimum(maximum(x, min), max): the tangent of whichever
    argument supplies the value (max where min > max, as in the primal); at a
    tie with a bound the tangent of x."""
    tmin = t[1] if len(t) > 1 else None
    tmax = t[2] if len(t) > 2 else None
    out = or_scalar_zero(t[0], ans)
    low = x
    if min is not None:
        out = torch.where(x < min, or_scalar_zero(tmin, ans), out)
        low = torch.maximum(x, min)
    if max is not None:
        out = torch.where(low > max, or_scalar_zero(tmax, ans), out)
    return out


@defrule(aten.clamp_min.Tensor)
def _clamp_min_tensor_jvp(t, ans, x, min):
    return _clamp_tensor_jvp((t[0], t[1], None), ans, x, min, None)


@defrule(aten.clamp_max.Tensor)
def _clamp_max_tensor_jvp(t, ans, x, max):
    return _clamp_tensor_jvp((t[0], None, t[1]), ans, x, None, max)
