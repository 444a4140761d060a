"""Checking fwdgrad's JVP of one OpInfo entry against independent oracles.

For each sample (float64, CPU) the tensors that OpInfo marks ``requires_grad``
are the differentiable inputs.  fwdgrad's JVP along a random direction is
compared with ``torch.func.jvp`` where PyTorch supports the op, and with
central finite differences otherwise (and recorded as extra evidence).
"""

import contextlib
import dataclasses
import warnings

import torch
from torch.utils import _pytree as pytree

import fwdgrad

DTYPE = torch.float64
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


def _samples(op):
    try:
        it = op.sample_inputs("cpu", DTYPE, requires_grad=True)
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
        if isinstance(x, torch.Tensor) and x.requires_grad and x.dtype.is_floating_point
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


def _close(a, b, rtol=1e-5, atol=1e-5):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.layout != torch.strided:
            x = x.to_dense()
        if y.layout != torch.strided:
            y = y.to_dense()
        if x.shape != y.shape:
            return False
        if not torch.allclose(x.to(torch.complex128 if x.is_complex() or y.is_complex() else DTYPE),
                              y.to(torch.complex128 if x.is_complex() or y.is_complex() else DTYPE),
                              rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def finite_difference(fn, primals, tangents, eps=FD_EPS):
    plus = fn(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - eps * t for p, t in zip(primals, tangents)))
    return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))


def check_op(op, n_samples=N_SAMPLES):
    try:
        return _check_op(op, n_samples)
    except Exception as e:  # noqa: BLE001 - a harness problem is reported, not raised
        return Result(op_id(op), "error", f"harness: {type(e).__name__}: {str(e)[:200]}")


def _check_op(op, n_samples):
    name = op_id(op)
    samples = _samples(op)[:n_samples]
    if not samples:
        return Result(name, "nosample")
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
            if not _close(ours_out, plain, 0, 0):
                return Result(name, "fail", f"sample {k}: primal output differs from a plain call",
                              samples=len(samples))
            ref = None
            tf = "unsupported"
            if op.supports_forward_ad:
                try:
                    _, ref = torch.func.jvp(fn, primals, tangents)
                    tf = "pass"
                except Exception:  # noqa: BLE001
                    ref = None
            fd = None
            with contextlib.suppress(Exception):
                fd = finite_difference(fn, primals, tangents)
            if ref is not None:
                if not _close(ours, ref):
                    if fd is not None and _close(ours, fd, 1e-4, 1e-4) and not _close(ref, fd, 1e-4, 1e-4):
                        tf = "mismatch"  # PyTorch disagrees with finite differences; we agree
                    else:
                        return Result(name, "fail", f"sample {k}: differs from torch.func.jvp",
                                      torch_func=tf, samples=len(samples))
            else:
                if fd is None or not _close(ours, fd, 1e-4, 1e-4):
                    return Result(name, "fail", f"sample {k}: differs from finite differences",
                                  torch_func=tf, samples=len(samples))
            tf_states.append(tf)
    tf = "pass" if tf_states and all(s == "pass" for s in tf_states) else (
        "mismatch" if "mismatch" in tf_states else "unsupported")
    return Result(name, "pass", torch_func=tf, samples=len(samples))


def check_torch_func(op, n_samples=N_SAMPLES):
    """Whether ``torch.func.jvp`` itself passes this op on the same samples (the anchor)."""
    samples = _samples(op)[:n_samples]
    if not samples or not op.supports_forward_ad:
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
        if not _close(ref, fd, 1e-4, 1e-4):
            return False
    return True
