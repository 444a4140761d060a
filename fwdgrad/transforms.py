"""The public forward-mode transforms ``jvp`` and ``forward_grad``.

Each call enters a fresh level (one deeper than every running transform in
this thread) and leaves it in ``finally``, so nothing is left behind when
``func`` raises, and threads never share state.  ``jvp(batched=True)`` goes
to ``fwdgrad.jacobian``, ``trace=True`` to ``fwdgrad.traced``.
"""

import functools

import torch
from torch.utils import _pytree as pytree

from .arguments import (
    check_callable, check_tangent, drop_level, lift, normal_mode, split_aux, split_outputs,
)
from . import fsdp
from .distributed import watch_forwards
from .dtensor import is_dtensor
from .errors import ArgumentTypeError, ArgumentValueError
from .functorch_layers import level_scope, lift_input
from .interpreter import Dual
from .jacobian import batched_jvp
from .state import State
from .traced import TracedForwardGrad, jvp_traced


@normal_mode
def jvp(func, primals, tangents, *, strict=False, has_aux=False, batched=False, trace=False, compile=False):
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
    size ``k``; the ``k`` jvps share one primal computation.
    ``trace=True``: record the program once per input signature and replay it
    on later calls whose inputs match (shapes, dtypes, captured tensors...).
    ``strict=True`` (as in ``torch.func.jvp``): raise if an output does not
    depend on the inputs, instead of returning a zero tangent for it.
    ``compile=True`` (with ``trace=True``; or a dict of ``torch.compile``
    keyword arguments) runs each recorded program through ``torch.compile``.
    ``fwdgrad.jvp`` can also be called inside a function given to
    ``torch.compile`` (``fullgraph=True`` works).
    """
    name = "jvp"
    check_callable(func, name)
    if not isinstance(primals, (tuple, list)):
        raise ArgumentTypeError(
            f"{name}: Expected primals to be a tuple of func's positional arguments, got "
            f"{type(primals).__name__}"
        )
    if not isinstance(tangents, (tuple, list)) or type(tangents) is not type(primals):
        raise ArgumentTypeError(
            f"{name}: tangents must be a {type(primals).__name__} with the same python structure "
            f"as primals, got {type(tangents).__name__}"
        )
    if len(primals) != len(tangents):
        raise ArgumentValueError(
            f"{name}: got {len(primals)} primals but {len(tangents)} tangents; they must match "
            f"(the same python structure)"
        )
    if not pytree.tree_leaves(tuple(primals)):
        raise ArgumentValueError(f"{name}: primals must contain at least one Tensor")
    if strict and (batched or trace):
        raise ArgumentValueError(f"{name}: strict=True cannot be combined with batched=True or trace=True")
    if batched and trace:
        raise ArgumentValueError(f"{name}: batched=True and trace=True cannot be combined")
    if compile is not False and not trace:
        raise ArgumentValueError(f"{name}: compile= applies to the traced mode; pass trace=True as well")
    if batched:
        return batched_jvp(func, primals, tangents, has_aux, name)
    if trace:
        return jvp_traced(func, primals, tangents, has_aux, compile)
    with level_scope() as level:
        stand_ins = {}
        duals = lift(tuple(primals), tuple(tangents), level, name, stand_ins=stand_ins)
        with State(func).undone_on_error(), watch_forwards(), fsdp.unsharded(stand_ins, name):
            out = func(*duals)
        out, aux = split_aux(out, has_aux, name)
        primal_out, tangent_out = split_outputs(out, level, name, strict)
        if has_aux:
            return primal_out, tangent_out, drop_level(aux, level)
        return primal_out, tangent_out


def forward_grad(func, *, has_aux=False, trace=False, compile=False):
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
    on later calls whose inputs match; ``df.code`` shows it, and
    ``df.graph_module`` is it as a ``torch.fx.GraphModule``.  ``compile=True``
    (with ``trace=True``; or a dict of ``torch.compile`` keyword arguments)
    runs each recorded program through ``torch.compile``.
    """
    name = "forward_grad"
    check_callable(func, name)
    if compile is not False and not trace:
        raise ArgumentValueError(f"{name}: compile= applies to the traced mode; pass trace=True as well")
    if trace:
        return TracedForwardGrad(func, has_aux, compile)

    @functools.wraps(func)
    @normal_mode
    def df(*pairs, **kwargs):
        if len(pairs) % 2:
            raise ArgumentTypeError(
                f"{name}: df takes (value, tangent) pairs, got {len(pairs)} positional arguments"
            )
        with level_scope() as level:
            args, stand_ins = [], {}
            for i in range(0, len(pairs), 2):
                p, t = pairs[i], pairs[i + 1]
                where = f"argument {i // 2}"
                if t is None and not isinstance(p, torch.Tensor):
                    args.append(p)  # a constant
                    continue
                if isinstance(p, torch.Tensor) and not is_dtensor(p):
                    check_tangent(name, where, p, t)
                    args.append(Dual(lift_input(p, level), t, level, requires_grad=p.requires_grad))
                else:
                    args.append(lift(p, t, level, name, prefix=where, stand_ins=stand_ins))
            with State(func).undone_on_error(), watch_forwards(), fsdp.unsharded(stand_ins, name):
                out = func(*args, **kwargs)
            out, aux = split_aux(out, has_aux, name)
            r, dr = split_outputs(out, level, name)
            if has_aux:
                return r, dr, drop_level(aux, level)
            return r, dr

    return df


__all__ = ["jvp", "forward_grad"]
