"""The JVP rule table, its small vocabulary, and ``register_jvp``.

A rule has the signature ``rule(tangents, ans, *args, **kwargs)``:

* ``args``/``kwargs`` are the op's primal arguments (this level unwrapped);
* ``tangents[i]`` is the tangent of ``args[i]`` (``None`` when zero or not a
  tensor; a list for a list argument), and ``tangents.kw`` maps keyword names
  to tangents;
* ``ans`` is the primal output, already computed by the real kernel;
* it returns the output tangent (a tuple for several outputs), ``None`` for zero.

Every built-in rule is declared exactly once, by one of the ``def_*``
functions below, in the module of its op family (``fwdgrad/rules/``); a
second declaration of the same overload raises.  ``register_jvp`` is the
one way to replace a rule.  ``where(op)`` tells where a rule was declared.

This module knows nothing of the interpreter: it looks rules up
(``rule_for``), asks a hook for a rule when none is registered (the fallback
chain plugs in with ``set_fallback``), and tells watchers (the interpreter's
per-op cache) when ``register_jvp`` changes a rule.
"""

import inspect
import sys

import torch

from .errors import ArgumentTypeError
from .ops import takes_list
from .slicing import SLICE, add_to_fresh, fresh_ok, records

RULES = {}  # op overload -> rule
_declared = {}  # op overload -> (file, line, how)
_watchers = []
_fallback = None
NO_KW_TANGENTS = {}


class Tangents(tuple):
    """The tangents of an op's positional arguments, with keyword tangents in ``.kw``."""

    kw = NO_KW_TANGENTS

    def __new__(cls, items, kw=NO_KW_TANGENTS):
        t = tuple.__new__(cls, items)
        if kw:
            t.kw = kw
        return t


# --------------------------------------------------------------------------
# The table.


def _declare(op, rule, how, depth=2):
    """Enter the built-in rule of ``op``; a second declaration is a bug and raises."""
    if op in RULES:
        file, line, _ = _declared[op]
        raise RuntimeError(
            f"fwdgrad: a JVP rule for {op} is already declared at {file}:{line}; each op's rule "
            f"is declared once (use fwdgrad.register_jvp to replace one)"
        )
    frame = sys._getframe(depth)
    RULES[op] = rule
    _declared[op] = (frame.f_code.co_filename, frame.f_lineno, how)
    return rule


def rule_for(func):
    """The rule for ``func``: registered, else the fallback hook's."""
    rule = RULES.get(func)
    if rule is not None:
        return rule
    if is_collective(func):
        return _no_collective_rule(func)
    if _fallback is None:
        raise NotImplementedError(f"fwdgrad has no JVP rule for {func} (and no fallback is installed)")
    return _fallback(func)


def set_fallback(hook):
    """``hook(func) -> rule`` is asked for ops without a registered rule."""
    global _fallback
    _fallback = hook


def watch(callback):
    """``callback(op)`` runs whenever ``register_jvp`` replaces the rule of ``op``."""
    _watchers.append(callback)


def where(op):
    """``(file, line, how)`` of the declaration of ``op``'s rule, or ``None``."""
    return _declared.get(op)


def _required_args(op):
    pos, kw = [], {}
    for a in op._schema.arguments:
        if a.has_default_value():
            continue
        if a.kwarg_only:
            kw[a.name] = None
        else:
            pos.append(None)
    return pos, kw


def register_jvp(op, rule=None):
    """Add or override the JVP rule of an aten (or custom) op overload.

    Needed for ops whose kernel fwdgrad cannot see into and that have no
    reverse-mode formula to fall back on (a custom op with a NumPy or C++
    kernel, say); also lets you replace a built-in rule.  The rule is called
    as ``rule(tangents, ans, *args, **kwargs)``: ``tangents[i]`` is the tangent
    of ``args[i]`` (``None`` for zero) and ``ans`` the primal output.  Return
    the output tangent (``None`` for zero, a tuple for several outputs).

    >>> import torch, fwdgrad
    >>> @torch.library.custom_op("fwdgrad_doc::cube", mutates_args=())
    ... def cube(x: torch.Tensor) -> torch.Tensor:
    ...     return torch.from_numpy(x.numpy() ** 3)   # opaque to autograd
    >>> @fwdgrad.register_jvp(torch.ops.fwdgrad_doc.cube.default)
    ... def cube_jvp(tangents, ans, x):
    ...     return 3 * x ** 2 * tangents[0]
    >>> fwdgrad.jvp(cube, (torch.tensor([1.0, 2.0]),), (torch.ones(2),))
    (tensor([1., 8.]), tensor([ 3., 12.]))
    """
    if isinstance(op, torch._ops.OpOverloadPacket):
        raise ArgumentTypeError(
            f"register_jvp needs an op overload such as {op}.default, got the packet {op}"
        )
    if not isinstance(op, torch._ops.OpOverload):
        raise ArgumentTypeError(
            f"register_jvp needs a torch.ops op overload (e.g. torch.ops.aten.sin.default), "
            f"got {type(op).__name__}"
        )

    def decorate(fn):
        if not callable(fn):
            raise ArgumentTypeError(f"register_jvp({op}): the rule must be callable, got {type(fn).__name__}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            pos, kw = _required_args(op)
            try:
                sig.bind(None, None, *pos, **kw)
            except TypeError as e:
                names = ", ".join(a.name for a in op._schema.arguments)
                raise ArgumentTypeError(
                    f"register_jvp({op}): the rule {getattr(fn, '__name__', fn)}{sig} cannot be "
                    f"called as rule(tangents, ans, {names}): {e}"
                ) from None
        frame = sys._getframe(1)
        RULES[op] = fn
        _declared[op] = (frame.f_code.co_filename, frame.f_lineno, "register_jvp")
        for callback in _watchers:
            callback(op)
        return fn

    return decorate if rule is None else decorate(rule)


# --------------------------------------------------------------------------
# Symbolic zeros: ``None`` is a zero tangent.  These keep rules free of
# ``if t is None`` branches.


def tsum(*terms):
    """The sum of tangent terms, skipping zeros (``None`` if all are zero)."""
    out = None
    for c in terms:
        if c is not None:
            out = c if out is None else out + c
    return out


def tmul(a, b):
    """``a * b`` where either factor may be a zero tangent (``None``)."""
    return None if a is None or b is None else a * b


def tsub(a, b):
    """``a - b`` for tangents where either may be zero (``None``): one subtraction
    when both are nonzero, ``-b`` when only ``b`` is (``tsum(a, -b)`` would
    spend a negation and an addition)."""
    if b is None:
        return a
    return -b if a is None else a - b


def zeros_for(x):
    """A zero tangent for ``x`` that costs no memory (an expanded scalar)."""
    return torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)


def or_zeros(g, like):
    """``g``, or a zero tangent shaped like ``like`` (expanded: no memory)."""
    return zeros_for(like) if g is None else g


def or_scalar_zero(g, like):
    """``g``, or a zero-dimensional zero that broadcasts against ``like`` (no memory)."""
    return torch.zeros((), dtype=like.dtype, device=like.device) if g is None else g


# --------------------------------------------------------------------------
# The vocabulary.  Each ``def_*`` declares the rule of its ops once.


def defrule(*ops):
    """Declare one hand-written rule for several overloads."""

    def decorate(fn):
        for op in ops:
            _declare(op, fn, "hand-written")
        return fn

    return decorate


COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


def is_collective(func):
    """Whether ``func`` talks to other processes (a ``torch.distributed`` collective).

    Such an op's rule runs on every call, tangent or not, because it issues
    the collectives for the tangent: ranks whose tangent is zero must issue
    the same ones as the others, or they would wait on each other forever.
    """
    return getattr(func, "namespace", None) in COLLECTIVE_NAMESPACES


def def_collective(*ops):
    """Declare the rule of collectives: ``rule(tangents, *args, **kwargs) -> (ans, tangent)``.

    Unlike other rules it also computes the primal ``ans`` (so the primal and
    the tangent can travel in one collective), and it runs even when every
    tangent is zero.  An in-place collective writes its primals itself and
    returns ``(op's result, {argument position or (position, index): tangent})``.
    """

    def decorate(fn):
        for op in ops:
            _declare(op, fn, "collective")
        return fn

    return decorate


def _no_collective_rule(func):
    def rule(t, *args, **kwargs):
        raise NotImplementedError(
            f"fwdgrad has no JVP rule for the collective {func}; it cannot be linearised like "
            f"other ops, since every rank must issue the same collectives.  Use an all-reduce, "
            f"all-gather, reduce-scatter, broadcast or all-to-all, or register a rule that issues "
            f"the tangent's collective on every rank with fwdgrad.register_jvp"
        )

    return rule


def def_linear(op, *argnums):
    """The op is linear in ``argnums`` (default: the first argument): apply it to the tangents.

    Zero tangents among several linear arguments, or within a list argument
    (``cat``), become expanded zeros that cost no memory.
    """
    argnums = argnums or (0,)
    for o in op if isinstance(op, (list, tuple)) else (op,):
        _declare(o, _linear_rule(o, argnums), "linear")


def _linear_rule(op, argnums):
    if argnums == (0,) and not takes_list(op, 0):
        def rule(t, ans, x, *args, **kwargs):
            return op(t[0], *args, **kwargs)

        return rule

    def rule(t, ans, *args, **kwargs):
        args = list(args)
        for i in argnums:
            if i >= len(args):
                continue
            ti = t[i]
            if isinstance(args[i], (list, tuple)):
                if ti is None:
                    ti = [None] * len(args[i])
                args[i] = [
                    (zeros_for(a) if g is None else g) if isinstance(a, torch.Tensor) else a
                    for a, g in zip(args[i], ti)
                ]
            elif isinstance(args[i], torch.Tensor):
                args[i] = zeros_for(args[i]) if ti is None else ti
        return op(*args, **kwargs)

    return rule


def def_elementwise(op, *arg_rules, kernel=None, when=None, sliced=False):
    """HIPS-style ``defjvp``: ``arg_rules[i](g, ans, *args, **kwargs)`` is the
    contribution of argument ``i`` with tangent ``g`` (it may return ``None``
    for zero); contributions are summed.  ``None`` in place of a rule marks a
    non-differentiable argument.

    For unary ops, two ways to spend less memory and time, given here with the
    formula they stand in for:

    * ``sliced=True``: on large plain tensors, evaluate the formula in slices
      into one output (``fwdgrad.slicing``), so its temporaries stay small;
    * ``kernel(g, ans, x, *args)``: a fused kernel (an activation's backward
      kernel) or an in-place formula, used for real tensors where
      ``when(g, ans, x)`` holds (always if ``when`` is None); it may decline
      by returning ``NotImplemented``.  Complex tensors, and calls where
      ``when`` fails (reverse mode records the tangent, a tracer watches), use
      the formula.
    """
    if len(arg_rules) == 1 and arg_rules[0] is not None:
        only = arg_rules[0]

        def rule(t, ans, *args, **kwargs):  # one differentiable argument: the hot path
            g = t[0]
            return None if g is None else only(g, ans, *args, **kwargs)

    else:
        def rule(t, ans, *args, **kwargs):
            out = None
            for i, r in enumerate(arg_rules):
                if r is None or i >= len(t) or t[i] is None:
                    continue
                c = r(t[i], ans, *args, **kwargs)
                if c is not None:
                    out = c if out is None else out + c
            return out

    how = "elementwise"
    if sliced:
        rule, how = _sliced(rule), how + ", sliced"
    if kernel is not None:
        rule, how = _with_kernel(kernel, rule, when), how + ", kernel"
    return _declare(op, rule, how)


def _with_kernel(kernel, formula, when):
    def rule(t, ans, x, *args, **kwargs):
        g = t[0]
        if g is None or x.is_complex() or t.kw or (when is not None and not when(g, ans, x)):
            return formula(t, ans, x, *args, **kwargs)
        out = kernel(g, ans, x, *args, **kwargs)
        return formula(t, ans, x, *args, **kwargs) if out is NotImplemented else out

    return rule


def unrecorded(g, ans, x):
    """A ``when`` for kernels without a double backward: nothing records the tangent."""
    return not records((g, x))


def _sliced(formula):
    """``formula`` for an elementwise op ``op(x, *scalars)``, run slice by slice
    into one output tensor on a large plain tensor."""

    def rule(t, ans, x, *args, **kwargs):
        g = t[0]
        if (
            x.numel() <= SLICE  # small tensors first: the common, cheap exit
            or g is None
            or t.kw
            or any(a is not None for a in t[1:])
            or not isinstance(ans, torch.Tensor)
            or not (g.shape == ans.shape == x.shape)
            or not (g.is_contiguous() and ans.is_contiguous() and x.is_contiguous())
            or not fresh_ok(g, ans, x)
        ):
            return formula(t, ans, x, *args, **kwargs)
        gf, af, xf = g.view(-1), ans.view(-1), x.view(-1)
        rest = (None,) * (len(t) - 1)
        out = flat = None
        n = xf.numel()
        for i in range(0, n, SLICE):
            k = min(SLICE, n - i)
            piece = formula(Tangents((gf.narrow(0, i, k),) + rest), af.narrow(0, i, k),
                            xf.narrow(0, i, k), *args, **kwargs)
            if piece is None:
                return None  # a zero tangent is zero on every slice
            if out is None:
                out = torch.empty(x.shape, dtype=piece.dtype, device=x.device)
                flat = out.view(-1)
            flat.narrow(0, i, k).copy_(piece)
        return out

    return rule


def def_multilinear(op, *argnums):
    """The op is linear in each of ``argnums`` separately (``mm``, ``mul``, ``bmm``):
    the tangent is the sum over those arguments of the op with that one argument
    replaced by its tangent (accumulated in place where safe)."""

    def rule(t, ans, *args, **kwargs):
        out = None
        for i in argnums:
            if i < len(t) and t[i] is not None:
                a = list(args)
                a[i] = t[i]
                out = add_to_fresh(out, op(*a, **kwargs))
        return out

    return _declare(op, rule, "multilinear")


def zero_rule(t, ans, *args, **kwargs):
    return None


def def_zero(*ops):
    """Ops whose outputs do not depend differentiably on the inputs."""
    for op in ops:
        _declare(op, zero_rule, "zero")


def curvature_term(forward, rule, g, primals, tangents):
    """For a backward op ``J(x)^T g`` of ``forward``, the part of its tangent that
    comes from ``x`` moving along ``tangents``: the Hessian-vector product
    grad_x <g, J(x) dx>, from reverse mode through fwdgrad's own ``rule`` for
    ``forward``.  Used where ATen has no double backward to linearize.

    Returns one gradient per primal (``None`` where it does not depend on it).
    """
    with torch.enable_grad():
        xs = [p.detach().requires_grad_() for p in primals]
        jdx = rule(Tangents(tangents), forward(*xs), *xs)
        if jdx is None:
            return [None] * len(xs)
        inner = (g.conj() * jdx).real.sum() if jdx.is_complex() else (g * jdx).sum()
        return torch.autograd.grad(inner, xs, allow_unused=True)
