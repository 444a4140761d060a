"""Checking fwdgrad's JVP of one OpInfo entry against independent oracles.

For each sample (CPU; float64, or complex128 for complex-only ops) the tensors
that OpInfo marks ``requires_grad`` are the differentiable inputs.  fwdgrad's
JVP along a random direction is compared with ``torch.func.jvp`` where PyTorch
supports the op, and with central finite differences otherwise (and recorded
as extra evidence).

Finite differences need an output precise enough to resolve the step: for an
output in a lower precision than double (only the dtype conversions ``float``,
``half``, ``bfloat16``, ``cfloat``, ``chalf`` produce one here; they are
linear) the step is 1 and the tolerance a few units in the last place of that
dtype, scaled by the output's magnitude.
"""

import contextlib
import dataclasses
import warnings

import torch
from torch.utils import _pytree as pytree

import fwdgrad

DTYPE = torch.float64
COMPLEX_DTYPE = torch.complex128
N_SAMPLES = 3
FD_EPS = 1e-6
# Very large samples only slow the suite down; OpInfo has smaller ones.
MAX_NUMEL = 20_000


@dataclasses.dataclass
class Result:
    name: str
    status: str  # "pass", "fail", "error", "nosample"
    detail: str = ""
    torch_func: str = "n/a"  # "pass", "unsupported", "mismatch"
    samples: int = 0


def op_id(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def autograd_ops():
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_autograd]


def sample_dtype(op):
    """float64, or complex128 for ops that only take complex inputs; ``None`` if neither
    runs on CPU with autograd (CUDA-only kernels, integer-only ops such as one_hot)."""
    dtypes = op.supported_dtypes("cpu") & op.supported_backward_dtypes("cpu")
    for dtype in (DTYPE, COMPLEX_DTYPE):
        if dtype in dtypes:
            return dtype
    return None


def _samples(op):
    dtype = sample_dtype(op)
    if dtype is None:
        return []
    try:
        it = op.sample_inputs("cpu", dtype, requires_grad=True)
    except Exception:  # noqa: BLE001 - some OpInfos refuse a dtype
        return []
    out = []
    for s in it:
        leaves = [x for x in pytree.tree_leaves((s.input, s.args, s.kwargs)) if isinstance(x, torch.Tensor)]
        if any(x.numel() > MAX_NUMEL for x in leaves):
            continue
        if not any(x.requires_grad for x in leaves):
            continue
        out.append(s)
        if len(out) >= N_SAMPLES:
            break
    return out


def _as_function(op, sample):
    """A function of the differentiable tensors of ``sample`` and those tensors."""
    tree = (sample.input, sample.args, sample.kwargs)
    leaves, spec = pytree.tree_flatten(tree)
    diff_pos = [
        i for i, x in enumerate(leaves)
        if isinstance(x, torch.Tensor) and x.requires_grad and (x.dtype.is_floating_point or x.dtype.is_complex)
    ]
    primals = tuple(leaves[i].detach() for i in diff_pos)
    fn_op = op.get_op()
    wrapper = op.gradcheck_wrapper

    def fn(*xs):
        new = list(leaves)
        for i, x in zip(diff_pos, xs):
            new[i] = x
        inp, args, kwargs = pytree.tree_unflatten(new, spec)
        out = wrapper(fn_op, inp, *args, **kwargs)
        flat = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        return tuple(o for o in flat if o.dtype.is_floating_point or o.dtype.is_complex)

    return fn, primals


def _seeded(fn, seed=1234):
    def g(*xs):
        torch.manual_seed(seed)
        return fn(*xs)

    return g


def _dense(x):
    return x.to_dense() if x.layout != torch.strided else x


def _close(a, b, rtol=1e-5, atol=1e-5):
    """Tensor-wise ``allclose``; ``atol`` may be a sequence with one entry per tensor."""
    if len(a) != len(b):
        return False
    atols = atol if isinstance(atol, (list, tuple)) else [atol] * len(a)
    for x, y, at in zip(a, b, atols):
        x, y = _dense(x), _dense(y)
        if x.shape != y.shape:
            return False
        if x.is_complex() or y.is_complex():
            x, y = x.to(COMPLEX_DTYPE), y.to(COMPLEX_DTYPE)
        else:
            x, y = _wide(x), _wide(y)
        if not torch.allclose(x, y, rtol=rtol, atol=at, equal_nan=True):
            return False
    return True


def _wide(x):
    x = _dense(x)
    return x.to(COMPLEX_DTYPE if x.is_complex() else DTYPE)


def _low_precision(x):
    return x.dtype not in (torch.float64, torch.complex128)


def _same(a, b):
    """Bitwise equality (NaNs in the same places count as equal)."""
    return _close(a, b, 0, 0)


class FiniteDifference(tuple):
    """Central differences of each output, with the absolute tolerance each one supports."""

    atol = ()


def finite_difference(fn, primals, tangents, eps=FD_EPS, tol=1e-4):
    out = fn(*primals)
    if any(_low_precision(o) for o in out):
        eps = 1.0  # see the module docstring: a 1e-6 step is below these outputs' resolution
    plus = fn(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - eps * t for p, t in zip(primals, tangents)))
    fd = FiniteDifference((_wide(a) - _wide(b)) / (2 * eps) for a, b in zip(plus, minus))
    atol = []
    for a, b in zip(plus, minus):
        if _low_precision(a):
            scale = max(_dense(a).abs().max().item(), _dense(b).abs().max().item(), 1.0) if a.numel() else 1.0
            atol.append(tol + 4 * torch.finfo(a.dtype).eps * scale / eps)
        else:
            atol.append(tol)
    fd.atol = tuple(atol)
    return fd


def _matches_fd(x, fd, tol=1e-4):
    return _close(x, fd, tol, fd.atol)


def _tolerances(outs):
    """Comparison tolerance against torch.func: tight in double, a few ulps otherwise."""
    return max([1e-5] + [8 * torch.finfo(o.dtype).eps for o in outs if _low_precision(o)])


def check_op(op, n_samples=N_SAMPLES):
    try:
        return _check_op(op, n_samples)
    except Exception as e:  # noqa: BLE001 - a harness problem is reported, not raised
        return Result(op_id(op), "error", f"harness: {type(e).__name__}: {str(e)[:200]}")


def _check_op(op, n_samples):
    name = op_id(op)
    samples = _samples(op)[:n_samples]
    if not samples:
        dtype = sample_dtype(op)
        why = (f"no CPU autograd kernel for float64 or complex128 (OpInfo lists "
               f"{sorted(str(d) for d in op.supported_dtypes('cpu')) or 'none'})") if dtype is None else \
            "no sample with a differentiable input"
        return Result(name, "nosample", why)
    tf_states = []
    gen = torch.Generator().manual_seed(0)
    for k, sample in enumerate(samples):
        fn, primals = _as_function(op, sample)
        fn = _seeded(fn)
        if not primals:
            continue
        tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ours_out, ours = fwdgrad.jvp(fn, primals, tangents)
            except Exception as e:  # noqa: BLE001
                return Result(name, "error", f"sample {k}: {type(e).__name__}: {str(e)[:300]}",
                              samples=len(samples))
            plain = fn(*primals)
            # Composite ops may pick another kernel when an input is a subclass or needs
            # grad (svdvals computes U and V, eigvalsh the eigenvectors); the primal must
            # then be bitwise the one of a plain call whose inputs require grad.
            if not _same(ours_out, plain) and not _same(
                ours_out, tuple(o.detach() for o in fn(*(p.clone().requires_grad_() for p in primals)))
            ):
                return Result(name, "fail", f"sample {k}: primal output differs from a plain call",
                              samples=len(samples))
            tol = _tolerances(plain)
            # torch.func is tried even where OpInfo says PyTorch lacks forward AD.
            ref = None
            tf = "unsupported"
            try:
                _, ref = torch.func.jvp(fn, primals, tangents)
                tf = "pass"
            except Exception:  # noqa: BLE001
                ref = None
            fd = None
            with contextlib.suppress(Exception):
                fd = finite_difference(fn, primals, tangents)
            if ref is not None:
                if not _close(ours, ref, tol, tol):
                    if fd is not None and _matches_fd(ours, fd) and not _matches_fd(ref, fd):
                        tf = "mismatch"  # PyTorch disagrees with finite differences; we agree
                    else:
                        return Result(name, "fail", f"sample {k}: differs from torch.func.jvp",
                                      torch_func=tf, samples=len(samples))
            else:
                if fd is None or not _matches_fd(ours, fd):
                    return Result(name, "fail", f"sample {k}: differs from finite differences",
                                  torch_func=tf, samples=len(samples))
            tf_states.append(tf)
    tf = "pass" if tf_states and all(s == "pass" for s in tf_states) else (
        "mismatch" if "mismatch" in tf_states else "unsupported")
    return Result(name, "pass", torch_func=tf, samples=len(samples))


def check_torch_func(op, n_samples=N_SAMPLES):
    """Whether ``torch.func.jvp`` itself passes this op on the same samples (the anchor)."""
    samples = _samples(op)[:n_samples]
    if not samples:
        return False
    gen = torch.Generator().manual_seed(0)
    for sample in samples:
        fn, primals = _as_function(op, sample)
        fn = _seeded(fn)
        tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, ref = torch.func.jvp(fn, primals, tangents)
                fd = finite_difference(fn, primals, tangents)
        except Exception:  # noqa: BLE001
            return False
        if not _matches_fd(ref, fd):
            return False
    return True
