"""The public transforms: argument checking, pytrees, and entering a level.

Each call gets a fresh level.  Levels need no stack: a ``Dual`` carries its
own level and later levels are higher, so nothing global is left behind when
``func`` raises, and threads never share state.
"""

import functools

import torch
from torch.utils import _pytree as pytree

from .interpreter import Dual, new_level, strip, tangent_of


def _is_float(x):
    return x.is_floating_point() or x.is_complex()


def check_outside_functorch(name):
    """Refuse to start a transform inside a torch.func transform (grad, jacrev, vmap).

    functorch's wrappers cannot see the tangents that fwdgrad's duals carry in
    ``__torch_dispatch__``: ``torch.func.grad`` of a function calling
    ``fwdgrad.jvp`` would be silently wrong.  The other order works.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(
            f"{name}: fwdgrad's forward-mode transforms cannot run inside a torch.func "
            f"transform (torch.func.grad, jacrev, vmap, ...), whose wrappers do not see "
            f"fwdgrad's tangents.  Nest them the other way round (e.g. "
            f"fwdgrad.jvp(torch.func.grad(f), ...)), or use fwdgrad.grad for the reverse part."
        )


def check_callable(func, name, what="func"):
    if not callable(func):
        raise TypeError(f"{name}: {what} must be callable, got {type(func).__name__}")


def _kind(x):
    """``x``'s type for an error message."""
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return "a Tensor"
    return f"a {type(x).__name__}"


def _describe(path):
    return "".join(str(k) for k in path)


def check_argnums(argnums, n_args, name):
    """``argnums`` (an int or a tuple of ints) as a list of non-negative positions."""
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise TypeError(f"{name}: argnums must be an int or a tuple of ints, got {type(argnums).__name__}")
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if not nums:
        raise ValueError(f"{name}: argnums must not be an empty tuple")
    out = []
    for a in nums:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{name}: argnums must contain ints, got {type(a).__name__}")
        if not -n_args <= a < n_args:
            raise ValueError(
                f"{name}: argnums {a} is out of range for a call with {n_args} positional "
                f"argument(s)"
            )
        out.append(a % n_args)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: argnums {argnums} contains duplicates")
    return out



def check_tangent(name, where, p, t):
    """Raise a clear error if ``t`` cannot be the tangent of primal ``p``.

    ``where`` names the primal as the user wrote it, e.g. ``primals[0]['w']``.
    """
    if not isinstance(p, torch.Tensor):
        raise TypeError(
            f"{name}: {where} is a {type(p).__name__}; only tensors (or pytrees of tensors) "
            f"can be differentiated; pass non-tensor constants through a closure or keyword argument"
        )
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name}: the tangent of {where} is a {type(t).__name__}; expected a tensor or None"
        )
    if not _is_float(p):
        raise TypeError(
            f"{name}: {where} has dtype {p.dtype}, which carries no tangent; "
            f"pass None as its tangent (or make it floating point)"
        )
    if t.shape != p.shape:
        raise ValueError(
            f"{name}: the tangent of {where} has shape {tuple(t.shape)} but {where} has shape "
            f"{tuple(p.shape)}"
        )
    if t.dtype != p.dtype:
        raise ValueError(
            f"{name}: the tangent of {where} has dtype {t.dtype} but {where} has dtype {p.dtype}"
        )
    if t.device != p.device:
        raise ValueError(
            f"{name}: the tangent of {where} is on {t.device} but {where} is on {p.device}"
        )


def checked_leaves(name, primals, tangents, prefix="primals"):
    """The leaves of matching pytrees ``primals``/``tangents`` as ``(where, p, t)``, checked.

    Also returns the primals' tree spec.
    """
    p_leaves, p_spec = pytree.tree_flatten(primals)
    t_leaves, t_spec = pytree.tree_flatten(tangents, is_leaf=lambda x: x is None)
    if p_spec != t_spec:
        raise ValueError(
            f"{name}: tangents must have the same structure as {prefix}; {prefix}: "
            f"{pytree.treespec_pprint(p_spec)}, tangents: {pytree.treespec_pprint(t_spec)}"
        )
    paths = [prefix + _describe(path) for path, _ in pytree.tree_flatten_with_path(primals)[0]]
    leaves = list(zip(paths, p_leaves, t_leaves))
    for where, p, t in leaves:
        check_tangent(name, where, p, t)
    return leaves, p_spec


def lift(primals, tangents, level, name, prefix="primals"):
    """Wrap matching pytrees of primals and tangents as duals at ``level``."""
    leaves, spec = checked_leaves(name, primals, tangents, prefix)
    duals = [Dual(p, t, level, requires_grad=p.requires_grad) for _, p, t in leaves]
    return pytree.tree_unflatten(duals, spec)


def lower_output(o, level):
    """``(primal, tangent)`` of an output at ``level``; a zero tangent is materialised."""
    if isinstance(o, Dual) and o._level == level:
        p = o._primal
        t = tangent_of(o)
        if t is None:
            t = torch.zeros_like(p)
        return p, t
    return o, torch.zeros_like(o)


def drop_level(tree, level):
    """Replace duals of ``level`` by their primals (for auxiliary outputs)."""
    return pytree.tree_map_only(
        Dual, lambda d: d._primal if d._level == level else d, tree
    )


def split_outputs(out, level, name):
    leaves, spec = pytree.tree_flatten(out)
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{name}: func must return a tensor or a pytree of tensors, but "
                f"{'output' + _describe(path) + ' is' if path else 'it returned'} {_kind(leaf)}"
            )
    pairs = [lower_output(o, level) for o in leaves]
    return (
        pytree.tree_unflatten([p for p, _ in pairs], spec),
        pytree.tree_unflatten([t for _, t in pairs], spec),
    )


def split_aux(out, has_aux, name):
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"{name}: with has_aux=True, func must return a pair (output, aux), "
            f"got {_kind(out)}"
        )
    return out[0], out[1]


def jvp(func, primals, tangents, *, has_aux=False, batched=False, trace=False):
    """Jacobian-vector product of ``func`` at ``primals`` along ``tangents``.

    Returns ``(output, jvp_out)``, or ``(output, jvp_out, aux)`` with ``has_aux``.
    ``primals`` and ``tangents`` are tuples matching ``func``'s positional
    arguments (pytrees allowed); a ``None`` tangent is zero.

    >>> import torch, fwdgrad
    >>> x = torch.tensor([0.0, 1.0])
    >>> out, t = fwdgrad.jvp(torch.sin, (x,), (torch.ones(2),))
    >>> torch.allclose(t, torch.cos(x))
    True

    ``batched=True``: every tangent has a leading batch dimension of the same
    size ``k``; the ``k`` jvps share one primal computation (``fwdgrad.jacobian``).
    ``trace=True``: record the program once per input signature and replay it
    on later calls (``fwdgrad.traced``).
    """
    name = "jvp"
    check_callable(func, name)
    check_outside_functorch(name)
    if not isinstance(primals, (tuple, list)):
        raise TypeError(f"{name}: primals must be a tuple of func's positional arguments, got {type(primals).__name__}")
    if not isinstance(tangents, (tuple, list)):
        raise TypeError(f"{name}: tangents must be a tuple matching primals, got {type(tangents).__name__}")
    if len(primals) != len(tangents):
        raise ValueError(
            f"{name}: got {len(primals)} primals but {len(tangents)} tangents; they must match"
        )
    if batched and trace:
        raise ValueError(f"{name}: batched=True and trace=True cannot be combined")
    if batched:
        from .jacobian import batched_jvp

        return batched_jvp(func, primals, tangents, has_aux, name)
    if trace:
        from .traced import jvp_traced

        return jvp_traced(func, primals, tangents, has_aux)
    level = new_level()
    duals = lift(tuple(primals), tuple(tangents), level, name)
    out = func(*duals)
    out, aux = split_aux(out, has_aux, name)
    primal_out, tangent_out = split_outputs(out, level, name)
    if has_aux:
        return primal_out, tangent_out, drop_level(aux, level)
    return primal_out, tangent_out


def forward_grad(func, *, has_aux=False, trace=False):
    """HIPS/Tangent-style forward derivative: ``df(x, dx, y, dy, ...) -> (r, dr)``.

    Arguments come in (value, tangent) pairs; a ``None`` tangent is zero and a
    non-tensor value with a ``None`` tangent passes through as a constant.
    Keyword arguments pass through untouched.

    >>> import torch, fwdgrad
    >>> df = fwdgrad.forward_grad(lambda x, y: x * y)
    >>> r, dr = df(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(3.0), None)
    >>> float(r), float(dr)
    (6.0, 3.0)

    ``trace=True`` records the program once per input signature and replays it
    on later calls; ``df.code`` shows it (``fwdgrad.traced``).
    """
    name = "forward_grad"
    check_callable(func, name)
    if trace:
        from .traced import TracedForwardGrad

        return TracedForwardGrad(func, has_aux)

    @functools.wraps(func)
    def df(*pairs, **kwargs):
        if len(pairs) % 2:
            raise TypeError(
                f"{name}: df takes (value, tangent) pairs, got {len(pairs)} positional arguments"
            )
        check_outside_functorch(name)
        level = new_level()
        args = []
        for i in range(0, len(pairs), 2):
            p, t = pairs[i], pairs[i + 1]
            where = f"argument {i // 2}"
            if t is None and not isinstance(p, torch.Tensor):
                args.append(p)  # a constant
                continue
            if isinstance(p, torch.Tensor):
                check_tangent(name, where, p, t)
                args.append(Dual(p, t, level, requires_grad=p.requires_grad))
            else:
                args.append(lift(p, t, level, name, prefix=where))
        out = func(*args, **kwargs)
        out, aux = split_aux(out, has_aux, name)
        r, dr = split_outputs(out, level, name)
        if has_aux:
            return r, dr, drop_level(aux, level)
        return r, dr

    return df


__all__ = ["jvp", "forward_grad", "strip"]
