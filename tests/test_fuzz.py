"""Differential fuzzing: random programs, fwdgrad against torch.func and finite differences.

A program is a hypothesis-drawn list of steps ``(op, a, b, p)``: ``op`` picks an
entry of ``OPS``, ``a`` and ``b`` pick earlier values (registers) and ``p`` is a
small parameter (a dim, an index).  Building the program turns each step into
Python source, so a failure shrinks to a minimal program that is printed as
runnable code, and the code printed is exactly the code that ran.

Each program is checked in float64 for
* ``jvp``: the primal output is bitwise the plain call's, and the tangent
  matches ``torch.func.jvp`` and central finite differences;
* ``hvp`` (forward over reverse) of a scalar loss built on the program,
  against ``torch.autograd.functional.hvp`` and finite differences of the
  gradient.

CI runs a fixed, derandomized budget of a few seconds.  For a larger search:

    FWDGRAD_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py

(random seeds; failures are saved in hypothesis' example database and replayed
first on the next run).  To replay one reported failure by hand:

    from test_fuzz import Program, check_jvp, check_hvp
    check_hvp(Program(steps=[(61, 0, 0, 0), (39, 0, 0, 1)], shapes=((3, 4), (4,)), seed=0))
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import fwdgrad
from expected_failures import EXPECTED_FAILURES

DT = torch.float64
MAX_STEPS = 8
MAX_NUMEL = 48
MAX_DIM = 4
MAX_ABS = 1e4

_EXAMPLES = int(os.environ.get("FWDGRAD_FUZZ_EXAMPLES", "0"))
FUZZ_SETTINGS = settings(
    max_examples=_EXAMPLES or 40,
    derandomize=not _EXAMPLES,  # CI: the same examples on every run
    database=None if not _EXAMPLES else settings.default.database,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------
# Helpers that programs call (they appear by name in the printed source).


def fit(b, like):
    """``b`` made to broadcast against ``like``: as is, a slice reshaped, or its mean."""
    try:
        if torch.broadcast_shapes(b.shape, like.shape) == like.shape:
            return b
    except RuntimeError:
        pass
    if b.numel() >= like.numel() > 0:
        return b.reshape(-1)[: like.numel()].reshape(like.shape)
    return b.mean()


def mm(a, b):
    """A matrix product of any two values: both as matrices, inner sizes truncated."""
    A = a.reshape(-1, a.shape[-1]) if a.dim() else a.reshape(1, 1)
    B = b.reshape(-1, b.shape[-1]) if b.dim() else b.reshape(1, 1)
    k = min(A.shape[1], B.shape[1])
    return A[:, :k] @ B[:, :k].mT


def ix(n, p):
    """Indices into a dim of size ``n``, with a repeat (index_put accumulates it)."""
    return torch.tensor([p % n, (p + 1) % n, p % n])


def gidx(a, p):
    """A gather index shaped like ``a``."""
    n = a.shape[-1]
    return ((torch.arange(n) * (p + 1) + 1) % n).expand(a.shape)


def const(shape, p):
    """A deterministic constant (a captured weight, no tangent)."""
    g = torch.Generator().manual_seed(p)
    return torch.randn(shape, dtype=DT, generator=g) * 0.5


def perm(a, p):
    """A scatter index shaped like ``a``: a permutation of the last dim (no repeats)."""
    n = a.shape[-1]
    return torch.arange(n).roll(p + 1).expand(a.shape)


def spd(a):
    """A well-conditioned symmetric positive definite matrix built from ``a``."""
    A = a.reshape(-1, a.shape[-1]) if a.dim() else a.reshape(1, 1)
    return A @ A.mT + torch.eye(A.shape[0], dtype=a.dtype)


def attention(a, b):
    """Scaled dot-product attention with queries = keys from ``a``, values from ``b``."""
    q = a.reshape(1, -1, a.shape[-1]) if a.dim() else a.reshape(1, 1, 1)
    return F.scaled_dot_product_attention(q, q, fit(b, q))


def labels(a, p):
    """Class labels for the rows of ``a`` as a (rows, classes) matrix."""
    A = a.reshape(-1, a.shape[-1])
    return (torch.arange(A.shape[0]) * (p + 1)) % A.shape[1]


NAMESPACE = {
    "torch": torch, "F": F, "fit": fit, "mm": mm, "ix": ix, "gidx": gidx, "const": const,
    "perm": perm, "spd": spd, "attention": attention, "labels": labels,
}


# --------------------------------------------------------------------------
# The ops.  Each renders source lines for ``out`` from registers named ``a``
# and ``b`` (whose values are ``A`` and ``B``) and a parameter ``p``; it
# returns None when it does not apply to these shapes.


def _dim(A, p):
    return p % A.dim() if A.dim() else None


def _unary(template):
    return lambda out, a, b, A, B, p: [f"{out} = {template.format(a=a)}"]


def _binary(template):
    return lambda out, a, b, A, B, p: [f"{out} = {template.format(a=a, b=f'fit({b}, {a})')}"]


def _needs_dim(min_dim, render):
    def r(out, a, b, A, B, p):
        if A.dim() < min_dim:
            return None
        return render(out, a, b, A, B, p)

    return r


def _reduce(template):
    """``template`` with ``{d}`` the reduced dim (at least 1-d input)."""

    def r(out, a, b, A, B, p):
        if A.dim() == 0:
            return None
        return [f"{out} = {template.format(a=a, d=_dim(A, p), k=min(2, A.shape[_dim(A, p)]))}"]

    return r


def _inplace_lines(out, a, A, first, statement):
    return [f"{out} = {first.format(a=a)}", statement.format(out=out)]


def _slice_add(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    d = _dim(A, p)
    v = f"{out}.narrow({d}, 0, 1)"
    return [f"{out} = {a}.clone()", f"{v}.mul_(2).add_(fit({b}, {v}))"]


def _setitem_zeros(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[0] < 2:
        return None
    return [f"{out} = torch.zeros_like({a})", f"{out}[1:] = fit({b}, {out}[1:]) * 2"]


def _index_put(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[0] == 0:
        return None
    i = f"ix({A.shape[0]}, {p})"
    return [f"{out} = {a}.clone()", f"{out}.index_put_(({i},), fit({b}, {out}[{i}]), accumulate=True)"]


def _index_add(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[0] == 0:
        return None
    i = f"ix({A.shape[0]}, {p})"
    return [f"{out} = {a}.clone()", f"{out}.index_add_(0, {i}, fit({b}, {out}[{i}]))"]


def _mutate_register(out, a, b, A, B, p):
    """In place on an earlier value itself: every view of it must see the change."""
    return [f"{a}.mul_(fit({b}, {a}).tanh() + 1)", f"{out} = {a}"]


def _base_then_view(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[-1] < 2:
        return None
    return [
        f"{out}_base = {a}.clone()",
        f"{out} = {out}_base[..., 1:]",
        f"{out}_base.mul_(3).add_(fit({b}, {out}_base))",
    ]


def _view_chain_inplace(out, a, b, A, B, p):
    v = f"{out}.reshape(-1)[::2]"
    return [f"{out} = {a}.clone()", f"{v}.add_(fit({b}, {v}).sin())"]


def _inplace_view_op(out, a, b, A, B, p):
    if A.dim() < 2:
        return None
    return [f"{out} = {a}.clone()", f"{out}.t_()" if A.dim() == 2 else f"{out}.transpose_(0, -1)", f"{out}.unsqueeze_(0)"]


def _narrow(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    d = _dim(A, p)
    n = A.shape[d]
    if n < 2:
        return None
    return [f"{out} = {a}.narrow({d}, {p % (n - 1)}, {n - 1 - p % (n - 1)})"]


def _expand(out, a, b, A, B, p):
    if A.dim() >= MAX_DIM:
        return None
    return [f"{out} = {a}.unsqueeze(0).expand(2, *{a}.shape)"]


def _unsqueeze(out, a, b, A, B, p):
    if A.dim() >= MAX_DIM:
        return None
    return [f"{out} = {a}.unsqueeze({p % (A.dim() + 1)})"]


def _select(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[0] == 0:
        return None
    d = _dim(A, p)
    return [f"{out} = {a}.select({d}, {p % A.shape[d]})"] if A.shape[d] else None


def _unbind(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[_dim(A, p)] == 0:
        return None
    d = _dim(A, p)
    return [f"{out} = {a}.unbind({d})[{p % A.shape[d]}]"]


def _index(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[0] == 0:
        return None
    return [f"{out} = {a}[ix({A.shape[0]}, {p})]"]


def _index_select(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    d = _dim(A, p)
    return [f"{out} = torch.index_select({a}, {d}, ix({A.shape[d]}, {p}))"] if A.shape[d] else None


def _linear(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    return [f"{out} = F.linear({a}, const((3, {A.shape[-1]}), {p}), const((3,), {p + 1}))"]


def _conv1d(out, a, b, A, B, p):
    if A.numel() < 3 or B.numel() < 2:
        return None
    return [f"{out} = F.conv1d({a}.reshape(1, 1, -1), {b}.reshape(1, 1, -1)[..., :2], padding=1)"]


def _layer_norm(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    n = A.shape[-1]
    return [f"{out} = F.layer_norm({a}, ({n},), fit({b}, {a}[..., :{n}].reshape(-1)[:{n}]), const(({n},), {p}))"]


def _batch_norm(out, a, b, A, B, p):
    if A.dim() == 0 or A.numel() // A.shape[-1] < 2:
        return None
    return [f"{out} = F.batch_norm({a}.reshape(-1, {A.shape[-1]}), None, None, training=True)"]


def _pool(kind):
    def r(out, a, b, A, B, p):
        if A.numel() < 2:
            return None
        return [f"{out} = F.{kind}({a}.reshape(1, 1, -1), 2)"]

    return r


def _gather(out, a, b, A, B, p):
    if A.dim() == 0 or A.shape[-1] == 0:
        return None
    return [f"{out} = {a}.gather(-1, gidx({a}, {p}))"]


def _conv2d(out, a, b, A, B, p):
    if A.dim() < 2 or A.shape[-1] < 2 or A.shape[-2] < 2:
        return None
    r, c = A.shape[-2], A.shape[-1]
    return [f"{out} = F.conv2d({a}.reshape(-1, 1, {r}, {c})[:1], const((2, 1, 2, 2), {p}), padding=1)"]


def _pool2d(kind):
    def r(out, a, b, A, B, p):
        if A.dim() < 2 or A.shape[-1] < 2 or A.shape[-2] < 2:
            return None
        return [f"{out} = F.{kind}({a}.reshape(1, -1, {A.shape[-2]}, {A.shape[-1]}), 2)"]

    return r


def _embedding(out, a, b, A, B, p):
    if A.dim() != 2 or A.shape[0] == 0:
        return None
    return [f"{out} = F.embedding(ix({A.shape[0]}, {p}), {a})"]


def _nonempty(template):
    def r(out, a, b, A, B, p):
        if A.numel() == 0:
            return None
        return [f"{out} = {template.format(a=a, b=b)}"]

    return r


def _even(template):
    def r(out, a, b, A, B, p):
        if A.numel() == 0 or A.numel() % 2:
            return None
        return [f"{out} = {template.format(a=a, b=b)}"]

    return r


def _last_even(template):
    def r(out, a, b, A, B, p):
        if A.dim() == 0 or A.shape[-1] % 2:
            return None
        return [f"{out} = {template.format(a=a, b=b)}"]

    return r


def _square(template):
    def r(out, a, b, A, B, p):
        if A.dim() < 2:
            return None
        return [f"{out} = {template.format(a=a, b=b, p=p)}"]

    return r


def _unfold(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    d = _dim(A, p)
    return [f"{out} = {a}.unfold({d}, 2, 1)"] if A.shape[d] >= 2 else None


def _no_grad_block(out, a, b, A, B, p):
    return [f"with torch.no_grad():", f"    {out} = {a}.sin() * fit({b}, {a})"]


def _inplace_view_ops(out, a, b, A, B, p):
    return [f"{out} = {a}.clone()", f"{out}.unsqueeze_(0)", f"{out}.transpose_(0, -1)", f"{out}.squeeze_()"]


def _addcdiv_(out, a, b, A, B, p):
    return [f"{out} = {a}.clone()", f"{out}.addcdiv_(fit({b}, {a}), fit({b}, {a}) ** 2 + 1, value=0.5)"]


def _exp_on_view_(out, a, b, A, B, p):
    if A.dim() == 0:
        return None
    return [f"{out} = {a}.clamp(-2, 2)", f"{out}[..., ::2].exp_()"]


OPS = [
    # elementwise
    ("mul", _binary("{a} * {b}")),
    ("add", _binary("{a} + {b}")),
    ("sub", _binary("{a} - {b}")),
    ("div", _binary("{a} / ({b} ** 2 + 1)")),
    ("neg", _unary("-{a}")),
    ("sin", _unary("torch.sin({a})")),
    ("cos", _unary("{a}.cos()")),
    ("tanh", _unary("torch.tanh({a})")),
    ("sigmoid", _unary("torch.sigmoid({a})")),
    ("exp", _unary("torch.exp({a}.clamp(-3, 3))")),
    ("log", _unary("torch.log({a}.abs() + 0.5)")),
    ("sqrt", _unary("torch.sqrt({a} * {a} + 0.5)")),
    ("rsqrt", _unary("({a} * {a} + 0.5).rsqrt()")),
    ("pow", _unary("({a}.abs() + 0.5) ** 1.5")),
    ("atan", _unary("torch.atan({a})")),
    ("erf", _unary("torch.erf({a})")),
    ("relu", _unary("F.relu({a})")),
    ("gelu", _unary("F.gelu({a})")),
    ("silu", _unary("F.silu({a})")),
    ("softplus", _unary("F.softplus({a})")),
    ("elu", _unary("F.elu({a})")),
    ("leaky_relu", _unary("F.leaky_relu({a}, 0.1)")),
    ("abs", _unary("{a}.abs()")),
    ("clamp", _unary("{a}.clamp(-1, 1)")),
    ("maximum", _binary("torch.maximum({a}, {b})")),
    ("minimum", _binary("torch.minimum({a}, {b})")),
    ("where", _binary("torch.where({a} > 0, {a}, {b})")),
    ("atan2", _binary("torch.atan2({a}, {b} ** 2 + 1)")),
    ("lerp", _binary("torch.lerp({a}, {b}, 0.3)")),
    ("addcmul", _binary("torch.addcmul({a}, {a}, {b}, value=0.5)")),
    # reductions
    ("sum_all", _unary("{a}.sum()")),
    ("sum", _reduce("{a}.sum({d})")),
    ("mean", _reduce("{a}.mean({d}, keepdim=True)")),
    ("amax", _reduce("{a}.amax({d})")),
    ("max", _reduce("{a}.max({d}).values")),
    ("min", _reduce("torch.min({a}, {d}).values")),
    ("prod", _reduce("{a}.prod({d})")),
    ("logsumexp", _reduce("torch.logsumexp({a}, {d})")),
    ("var", _reduce("{a}.var({d}, correction=0)")),
    ("std", _reduce("{a}.std({d}, correction=0)")),
    ("norm", _reduce("torch.linalg.vector_norm({a}, dim={d})")),
    ("cumsum", _reduce("{a}.cumsum({d})")),
    ("cumprod", _reduce("{a}.cumprod({d})")),
    ("sort", _reduce("{a}.sort({d}).values")),
    ("topk", _reduce("{a}.topk({k}, {d}).values")),
    # views
    ("transpose", _needs_dim(1, _unary("{a}.transpose(0, -1)"))),
    ("mT", _needs_dim(2, _unary("{a}.mT"))),
    ("narrow", _narrow),
    ("step", _needs_dim(1, _unary("{a}[::2]"))),
    ("flatten", _unary("{a}.reshape(-1)")),
    ("view", _unary("{a}.contiguous().view(-1, 1)")),
    ("unsqueeze", _unsqueeze),
    ("squeeze", _unary("{a}.squeeze()")),
    ("expand", _expand),
    ("diagonal", _needs_dim(2, _unary("{a}.diagonal(0, 0, -1)"))),
    ("select", _select),
    ("unbind", _unbind),
    ("chunk", _needs_dim(1, _unary("{a}.chunk(2, -1)[0]"))),
    ("movedim", _needs_dim(2, _unary("{a}.movedim(0, -1)"))),
    ("as_strided", _unary("{a}.reshape(-1).as_strided(({a}.numel() // 2,), (2,))")),
    # in-place
    ("slice_add_", _slice_add),
    ("setitem_zeros", _setitem_zeros),
    ("index_put_", _index_put),
    ("index_add_", _index_add),
    ("mutate_register_", _mutate_register),
    ("base_then_view", _base_then_view),
    ("view_chain_", _view_chain_inplace),
    ("inplace_view_", _inplace_view_op),
    ("masked_fill_", _unary("{a}.clone().masked_fill_({a} > 0.5, 0.25)")),
    ("tanh_", _unary("({a} * 1).tanh_()")),
    ("copy_", _binary("torch.empty_like({a}).copy_({b})")),
    # matmul
    ("mm", lambda out, a, b, A, B, p: [f"{out} = mm({a}, {b})"]),
    ("gram", _needs_dim(2, _unary("{a} @ {a}.mT"))),
    ("einsum", _needs_dim(1, _binary("torch.einsum('...i,...i->...', {a}, {b})"))),
    ("linear", _linear),
    ("outer", lambda out, a, b, A, B, p: [f"{out} = torch.outer({a}.reshape(-1)[:4], {b}.reshape(-1)[:3])"]),
    ("conv1d", _conv1d),
    # indexing
    ("index", _index),
    ("index_select", _index_select),
    ("gather", _gather),
    ("masked_select", _unary("{a}[{a} > 0]")),
    ("cat", lambda out, a, b, A, B, p: [f"{out} = torch.cat([{a}.reshape(-1), {b}.reshape(-1)])"]),
    ("stack", _binary("torch.stack([{a}, {b}.expand_as({a})])")),
    ("pad", _needs_dim(1, _unary("F.pad({a}, (1, 0))"))),
    # softmax and norms
    ("softmax", _reduce("torch.softmax({a}, {d})")),
    ("log_softmax", _reduce("F.log_softmax({a}, {d})")),
    ("normalize", _reduce("F.normalize({a}, dim={d})")),
    ("layer_norm", _layer_norm),
    ("batch_norm", _batch_norm),
    ("max_pool", _pool("max_pool1d")),
    ("avg_pool", _pool("avg_pool1d")),
    # more elementwise
    ("rsub", _unary("1.5 - {a}")),
    ("fmod", _unary("torch.fmod({a} * 3, 1.7)")),
    ("remainder", _binary("torch.remainder({a}, {b} ** 2 + 0.5)")),
    ("hypot", _binary("torch.hypot({a}, {b})")),
    ("xlogy", _binary("torch.xlogy({a}, {b} ** 2 + 0.5)")),
    ("log1p", _unary("torch.log1p({a}.abs())")),
    ("expm1", _unary("torch.expm1({a}.clamp(-3, 3))")),
    ("logit", _unary("torch.logit({a}.sigmoid() * 0.9 + 0.05)")),
    ("lgamma", _unary("torch.lgamma({a}.abs() + 0.5)")),
    ("digamma", _unary("torch.digamma({a}.abs() + 0.5)")),
    ("mish", _unary("F.mish({a})")),
    ("hardtanh", _unary("F.hardtanh({a})")),
    ("selu", _unary("F.selu({a})")),
    ("logsigmoid", _unary("F.logsigmoid({a})")),
    ("softsign", _unary("F.softsign({a})")),
    ("clamp_tensor", _binary("torch.clamp({a}, min={b})")),
    ("where_scalar", _unary("torch.where({a} > 0, {a}, 0.0)")),
    ("masked_fill_tensor", _binary("{a}.masked_fill({a} > 0, {b}.sum())")),
    ("complex_square", _even("torch.view_as_real(torch.view_as_complex({a}.reshape(-1, 2).contiguous()) ** 2)")),
    ("polar", _unary("torch.view_as_real(torch.polar({a}.abs() + 1, {a}))")),
    # more reductions and scans
    ("amin", _reduce("{a}.amin({d})")),
    ("median", _reduce("{a}.median({d}).values")),
    ("cummax", _reduce("{a}.cummax({d}).values")),
    ("logcumsumexp", _reduce("torch.logcumsumexp({a}, {d})")),
    ("std_mean", _reduce("torch.std_mean({a}, {d})[1]")),
    ("norm3", _reduce("torch.linalg.vector_norm({a}, 3, dim={d})")),
    ("norm_inf", _reduce("torch.linalg.vector_norm({a}, float('inf'), dim={d})")),
    ("matrix_norm", _square("torch.linalg.matrix_norm({a})")),
    ("prod_all", _unary("{a}.prod()")),
    # more views and copies
    ("roll", _reduce("{a}.roll(1, {d})")),
    ("flip", _reduce("{a}.flip({d})")),
    ("repeat", _needs_dim(1, _unary("{a}.repeat(2, *([1] * ({a}.dim() - 1)))"))),
    ("tril", _square("{a}.tril()")),
    ("triu", _square("{a}.triu(1)")),
    ("trace", _square("{a}.reshape(-1, {a}.shape[-1]).trace()")),
    ("unfold", _unfold),
    ("split", _reduce("{a}.split(1, {d})[0]")),
    ("swapaxes", _needs_dim(2, _unary("{a}.swapaxes(0, 1)"))),
    ("diag_embed", _needs_dim(1, _unary("torch.diag_embed({a}.reshape(-1)[:4])"))),
    ("inplace_view_ops_", _inplace_view_ops),
    ("addcdiv_", _addcdiv_),
    ("exp_on_view_", _exp_on_view_),
    ("no_grad_block", _no_grad_block),
    ("out=", _unary("torch.sin({a}, out=torch.empty_like({a}))")),
    # more indexing
    ("scatter", _needs_dim(1, _binary("{a}.scatter(-1, perm({a}, 0), {b}.expand_as({a}))"))),
    ("scatter_add", _needs_dim(1, _binary("torch.scatter_add({a}, -1, gidx({a}, 1), {b}.expand_as({a}))"))),
    ("embedding", _embedding),
    # linear algebra on well-conditioned matrices
    ("addmm", lambda out, a, b, A, B, p: [f"{out} = torch.addmm(mm({a}, {b}), mm({a}, {b}), mm({b}, {b}))"]),
    ("det", _unary("torch.linalg.det(spd({a}))")),
    ("slogdet", _unary("torch.linalg.slogdet(spd({a})).logabsdet")),
    ("inv", _unary("torch.linalg.inv(spd({a}))")),
    ("solve", _unary("torch.linalg.solve(spd({a}), {a}.reshape(-1, {a}.shape[-1]) if {a}.dim() else {a}.reshape(1, 1))")),
    ("cholesky", _unary("torch.linalg.cholesky(spd({a}))")),
    ("eigvalsh", _unary("torch.linalg.eigvalsh(spd({a}))")),
    ("cdist", lambda out, a, b, A, B, p: [f"{out} = torch.cdist(mm({a}, {b}), mm({b}, {b}) * 0.5)"]),
    # nn
    ("attention", lambda out, a, b, A, B, p: [f"{out} = attention({a}, {b})"]),
    ("conv2d", _conv2d),
    ("max_pool2d", _pool2d("max_pool2d")),
    ("avg_pool2d", _pool2d("avg_pool2d")),
    ("interpolate", _nonempty("F.interpolate({a}.reshape(1, 1, -1), scale_factor=2, mode='linear')")),
    ("group_norm", _even("F.group_norm({a}.reshape(1, 2, -1), 1)")),
    ("rms_norm", _needs_dim(1, _unary("F.rms_norm({a}, ({a}.shape[-1],))"))),
    ("glu", _last_even("F.glu({a}, -1)")),
    ("cross_entropy", _needs_dim(1, lambda out, a, b, A, B, p: [f"{out} = F.cross_entropy({a}.reshape(-1, {A.shape[-1]}), labels({a}, {p}))"])),
    ("mse_loss", _binary("F.mse_loss({a}, {b}.expand_as({a}))")),
    ("smooth_l1", _binary("F.smooth_l1_loss({a}, {b}.expand_as({a}))")),
    ("kl_div", _needs_dim(1, _binary("F.kl_div(F.log_softmax({a}, -1), F.softmax({b}.expand_as({a}), -1), reduction='batchmean')"))),
]

# Fuzz ops that exercise an OpInfo entry of tests/expected_failures.py (the one
# list of known failures) sit out while that entry is listed there.
OPINFO_NAMES = {
    "cdist": "cdist",
    "eigvalsh": "linalg.eigvalsh",
    "rms_norm": "nn.functional.rms_norm",
    "norm_inf": "linalg.norm.subgradients_at_zero",
}
OPS = [(name, render) for name, render in OPS if OPINFO_NAMES.get(name) not in EXPECTED_FAILURES]

INPUT_SHAPES = [((3, 4), (4,)), ((2, 3), (2, 3)), ((5,), ())]


class Program:
    """A built program: source lines, its function, and its inputs."""

    def __init__(self, steps, shapes, seed):
        g = torch.Generator().manual_seed(seed)
        self.inputs = tuple(torch.randn(s, dtype=DT, generator=g) for s in shapes)
        self.tangents = tuple(torch.randn(s, dtype=DT, generator=g) for s in shapes)
        self.lines = []
        names = ["x", "y"]
        for k, (op_i, ai, bi, p) in enumerate(steps):
            name, render = OPS[op_i % len(OPS)]
            a, b = names[ai % len(names)], names[bi % len(names)]
            out = f"r{k}"
            env = self._run(self.lines)
            lines = render(out, a, b, env[a], env[b], p)
            if lines is None:
                continue
            if name == "mutate_register_" and (
                _shares_storage(env[a], env["x"], env["y"]) or 0 in env[a].stride()
            ):
                continue  # never write into f's inputs (or an expanded value)
            try:
                env = self._run(self.lines + lines)
            except (RuntimeError, IndexError, ValueError):
                continue  # e.g. a size-1 batch norm, a 0-d value where a dim is needed
            if not _acceptable(env[out]):
                continue
            self.lines += [f"# {name}"] + lines
            names.append(out)
        self.outputs = names[2:] or ["x"]
        src = ["def f(x, y):"] + [f"    {line}" for line in self.lines]
        src.append(f"    return ({', '.join(self.outputs)},)")
        self.source = "\n".join(src)
        ns = dict(NAMESPACE)
        exec(self.source, ns)
        self.f = ns["f"]

    def _run(self, lines):
        """The registers after running ``lines`` on fresh copies of the inputs."""
        env = dict(NAMESPACE, x=self.inputs[0].clone(), y=self.inputs[1].clone())
        exec("\n".join(lines), env)
        return env

    def loss(self, x, y):
        """A scalar loss with a nonzero Hessian, built on the program's outputs."""
        outputs = self.f(x, y)
        # The last term keeps the loss a function of x and y even when the
        # program's outputs are not (a no_grad block, an integer path).
        return sum((o.tanh() ** 2).sum() * (i + 1) for i, o in enumerate(outputs)) + 0.1 * (
            x.pow(2).sum() + y.pow(2).sum()
        )

    def __str__(self):
        shapes = [tuple(t.shape) for t in self.inputs]
        return f"{self.source}\n# inputs x, y of shapes {shapes[0]}, {shapes[1]}"


def _shares_storage(t, *others):
    return any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in others)


def _acceptable(value):
    if not isinstance(value, torch.Tensor) or value.dtype != DT:
        return False
    if value.numel() > MAX_NUMEL or value.dim() > MAX_DIM:
        return False
    return bool(value.isfinite().all()) and (value.numel() == 0 or float(value.abs().max()) < MAX_ABS)


steps_strategy = st.lists(
    st.tuples(
        st.integers(0, len(OPS) - 1), st.integers(0, MAX_STEPS + 1), st.integers(0, MAX_STEPS + 1), st.integers(0, 3)
    ),
    min_size=1,
    max_size=MAX_STEPS,
)


def _event(message):
    if currently_in_test_context():
        event(message)


def _finite(tensors):
    return all(bool(t.isfinite().all()) for t in tensors)


def _directional_fd(f, xs, vs, eps):
    plus = f(*(x + eps * v for x, v in zip(xs, vs)))
    minus = f(*(x - eps * v for x, v in zip(xs, vs)))
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def _smooth_fd(f, xs, vs, eps=1e-6):
    """Central differences, or None where f is not smooth along ``vs`` (a kink, a
    mask that flips): there two step sizes disagree and only torch.func is an oracle."""
    fine = _directional_fd(f, xs, vs, eps)
    coarse = _directional_fd(f, xs, vs, eps * 100)
    for a, b in zip(fine, coarse):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-5):
            return None
    return fine


def _close(actual, expected, what, program, rtol=1e-6, atol=1e-8):
    for i, (a, e) in enumerate(zip(actual, expected)):
        finite = e[e.isfinite()]
        scale = 1.0 + float(finite.abs().max()) if finite.numel() else 1.0
        assert a.shape == e.shape, f"{what}: output {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert torch.allclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True), (
            f"{what}: output {i} differs\n{program}\nfwdgrad: {a}\nexpected: {e}"
        )


def check_jvp(program):
    """Check fwdgrad.jvp on ``program``; False when no oracle applies."""
    f, xs, vs = program.f, program.inputs, program.tangents
    out, t = fwdgrad.jvp(f, xs, vs)
    assert all(type(o) is torch.Tensor for o in out + t)
    # The primal is bitwise the plain call's where the same kernels run.  Composite
    # ops may pick another kernel for a subclass or an input that needs grad
    # (eigvalsh then computes the eigenvectors): then it is bitwise that of a
    # call whose inputs require grad, or (when a no_grad block hides that) equal
    # to rounding.
    with torch.no_grad():
        plain = f(*xs)
    same = all(map(torch.equal, out, plain))
    if not same:
        with torch.enable_grad():
            plain_grad = f(*(x.clone().requires_grad_() for x in xs))
        same = all(map(torch.equal, out, plain_grad))
    if not same:
        _event("primal equal only to rounding (another kernel)")
        same = all(torch.allclose(o, p, rtol=1e-12, atol=1e-12) for o, p in zip(out, plain))
    assert same, f"primal differs from a plain call\n{program}"
    try:
        ref_t = torch.func.jvp(f, xs, vs)[1]
    except (RuntimeError, NotImplementedError) as e:
        _event(f"torch.func.jvp fails: {type(e).__name__}")
        ref_t = None
    return _compare(
        t, program,
        ("torch.func.jvp", ref_t, 1e-6, 1e-8),
        ("finite differences", _smooth_fd(f, xs, vs), 1e-5, 1e-6),
    )


def _compare(actual, program, *oracles):
    """Compare with each oracle that exists and is finite (PyTorch's double
    backward gives nan in places, e.g. std at 0, where the true value is finite)."""
    used = 0
    for name, expected, rtol, atol in oracles:
        if expected is None:
            _event(f"no {name} oracle")
        elif not _finite(expected):
            _event(f"{name} oracle not finite")
        else:
            _close(actual, expected, f"fwdgrad vs {name}", program, rtol=rtol, atol=atol)
            used += 1
    return used > 0


def check_hvp(program):
    """Check fwdgrad.hvp (forward over reverse) on ``program``; False when no oracle applies."""
    xs, vs = program.inputs, program.tangents

    def gradient(*xs):
        xs = [x.detach().requires_grad_() for x in xs]
        with torch.enable_grad():
            return torch.autograd.grad(program.loss(*xs), xs, allow_unused=True, materialize_grads=True)

    try:
        ref = torch.autograd.functional.hvp(program.loss, xs, vs)[1]
    except RuntimeError:
        ref = None  # e.g. an op without double backward, or an in-place write to a saved value
    if "torch.no_grad()" in program.source:
        # Double backward holds a no_grad value constant; forward over reverse
        # (like torch.func's jvp of grad, and finite differences of the
        # gradient) sees it move with the inputs, since no_grad keeps tangents.
        ref = None
    try:
        fd = _smooth_fd(gradient, xs, vs, eps=1e-5)
    except RuntimeError:
        fd = None
    try:
        hv = fwdgrad.hvp(program.loss, xs, vs)
    except RuntimeError:
        if fd is None and ref is None:
            _event("autograd and fwdgrad both refuse")
            return False
        raise
    return _compare(
        hv, program,
        ("torch.autograd.functional.hvp", ref, 1e-6, 1e-8),
        ("finite differences of the gradient", fd, 1e-4, 1e-5),
    )


@FUZZ_SETTINGS
@given(steps=steps_strategy, shapes=st.sampled_from(INPUT_SHAPES), seed=st.integers(0, 7))
def test_random_programs_jvp(steps, shapes, seed):
    program = Program(steps, shapes, seed)
    note(str(program))
    assume(check_jvp(program))


@FUZZ_SETTINGS
@given(steps=steps_strategy, shapes=st.sampled_from(INPUT_SHAPES), seed=st.integers(0, 7))
def test_random_programs_hvp(steps, shapes, seed):
    program = Program(steps, shapes, seed)
    note(str(program))
    assume(check_hvp(program))
