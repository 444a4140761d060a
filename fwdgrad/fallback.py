"""What happens for an op with no registered rule.

1. A ``torch._decomp`` decomposition, run on dual tensors of a fresh level so
   that each op inside it uses its own rule.  The primal still comes from the
   real kernel; only the tangent comes from the decomposition.
2. Linearization through the op's reverse-mode formula: with ``u`` a dummy
   cotangent, ``vjp(u) = J^T u`` is linear in ``u``, so differentiating it
   with respect to ``u`` along the input tangents gives ``J t`` (two
   ``torch.autograd.grad`` calls on that single op).  This works for any op
   that has a backward formula, including ones PyTorch's forward AD lacks.
3. Otherwise a ``NotImplementedError`` that names the op and shows
   ``fwdgrad.register_jvp``.

Random ops (tagged ``nondeterministic_seeded``) skip 1 and 2: both run the op
again, which would draw new random numbers.

Importing this module installs ``rule_for`` as the registry's fallback hook.
"""

import torch
import torch._decomp

from . import registry
from .functorch_layers import level_scope
from .interpreter import Dual, tangent_of

_decompositions = torch._decomp.decomposition_table


def rule_for(func):
    if torch.Tag.nondeterministic_seeded in func.tags:
        return _refuse_random(func)
    decomp = _decompositions.get(func)
    linear = linearized(func)
    if decomp is None:
        return linear

    def decomposition_rule(t, ans, *args, **kwargs):
        out = _through_decomposition(decomp, t, args, kwargs)
        if out is NotImplemented:
            return linear(t, ans, *args, **kwargs)
        return out

    return decomposition_rule


def _through_decomposition(decomp, t, args, kwargs):
    with level_scope() as level:
        return _decomposed(decomp, t, args, kwargs, level)


def _decomposed(decomp, t, args, kwargs, level):
    def lift(a, ta):
        if isinstance(a, torch.Tensor):
            return Dual(a, ta, level)
        if isinstance(a, (list, tuple)):
            ta = ta if ta is not None else [None] * len(a)
            return type(a)(lift(b, tb) for b, tb in zip(a, ta))
        return a

    dargs = [lift(a, ta) for a, ta in zip(args, t)]
    dkwargs = {k: lift(v, t.kw.get(k)) for k, v in kwargs.items()}
    out = decomp(*dargs, **dkwargs)
    if out is NotImplemented:
        return out

    def lower(o):
        if isinstance(o, Dual) and o._level == level:
            return tangent_of(o)
        if isinstance(o, (list, tuple)):  # a plain tuple also for named tuples (return_types)
            return (list if isinstance(o, list) else tuple)(lower(x) for x in o)
        return None

    return lower(out)


def _refuse_random(func):
    """A random op needs a rule: both fallbacks run the op again, which draws new
    random numbers (a tangent that does not match the primal) and advances the
    generator (later primals that differ from a plain call)."""

    def random_op_rule(t, ans, *args, **kwargs):
        raise _no_rule(
            func, "it is random: linearizing it would run it again and draw new random numbers"
        )

    return random_op_rule


def _float(x):
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def linearized(func):
    def linearization_rule(t, ans, *args, **kwargs):
        args = list(args)
        kwargs = dict(kwargs)
        inputs, directions, originals = [], [], []

        def take(a, ta):
            if _float(a) and ta is not None:
                originals.append(a)
                x = a if a.requires_grad else a.detach().requires_grad_()
                inputs.append(x)
                directions.append(ta)
                return x
            return a

        outer_grad = torch.is_grad_enabled()
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)) and t[i] is not None:
                args[i] = type(a)(take(b, tb) for b, tb in zip(a, t[i]))
            else:
                args[i] = take(a, t[i])
        for k, tk in t.kw.items():
            kwargs[k] = take(kwargs[k], tk)
        # Keep a graph only when someone outside may differentiate the tangent.
        need_graph = outer_grad and any(x.requires_grad for x in directions + originals)
        with torch.enable_grad():
            out = func(*args, **kwargs)
            flat = list(out) if isinstance(out, (tuple, list)) else [out]
            diff = [o for o in flat if _float(o) and o.requires_grad]
            if not diff:
                raise _no_rule(func, "it has no reverse-mode formula to linearize")
            cotangents = [torch.zeros_like(o).requires_grad_() for o in diff]
            try:
                vjps = torch.autograd.grad(diff, inputs, cotangents, create_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise _no_rule(func, f"its reverse-mode formula failed ({e})") from None
            pairs = [(v, d) for v, d in zip(vjps, directions) if v is not None and v.requires_grad]
            if not pairs:
                return None
            try:
                jvps = torch.autograd.grad(
                    [v for v, _ in pairs], cotangents, [d for _, d in pairs],
                    create_graph=need_graph, allow_unused=True,
                )
            except RuntimeError as e:
                raise _no_rule(func, f"its reverse-mode formula is not differentiable ({e})") from None
        res = iter(jvps)
        tangents = [next(res) if (_float(o) and o.requires_grad) else None for o in flat]
        if isinstance(out, (tuple, list)):
            return tuple(tangents)
        return tangents[0]

    return linearization_rule


def _no_rule(func, why):
    return NotImplementedError(
        f"fwdgrad has no JVP rule for {func}, and {why}.  Register one:\n\n"
        f"    @fwdgrad.register_jvp(torch.ops.{str(func)})\n"
        f"    def my_jvp(tangents, ans, *args, **kwargs):\n"
        f"        return ...  # the output tangent; tangents[i] belongs to args[i]\n"
    )


registry.set_fallback(rule_for)
