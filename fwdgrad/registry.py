"""The JVP rule table, its small vocabulary, and ``register_jvp``.

A rule has the signature ``rule(tangents, ans, *args, **kwargs)``:

* ``args``/``kwargs`` are the op's primal arguments (this level unwrapped);
* ``tangents[i]`` is the tangent of ``args[i]`` (``None`` when zero or not a
  tensor; a list for a list argument), and ``tangents.kw`` maps keyword names
  to tangents;
* ``ans`` is the primal output, already computed by the real kernel;
* it returns the output tangent (a tuple for several outputs), ``None`` for zero.

Most rules are one line built from the vocabulary below, in the spirit of
HIPS/autograd's ``defjvp``.
"""

import inspect

import torch

RULES = {}
NO_KW_TANGENTS = {}


class Tangents(tuple):
    """The tangents of an op's positional arguments, with keyword tangents in ``.kw``."""

    kw = NO_KW_TANGENTS

    def __new__(cls, items, kw=NO_KW_TANGENTS):
        t = tuple.__new__(cls, items)
        if kw:
            t.kw = kw
        return t


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
        raise TypeError(
            f"register_jvp needs an op overload such as {op}.default, got the packet {op}"
        )
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(
            f"register_jvp needs a torch.ops op overload (e.g. torch.ops.aten.sin.default), "
            f"got {type(op).__name__}"
        )

    def decorate(fn):
        if not callable(fn):
            raise TypeError(f"register_jvp({op}): the rule must be callable, got {type(fn).__name__}")
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
                raise TypeError(
                    f"register_jvp({op}): the rule {getattr(fn, '__name__', fn)}{sig} cannot be "
                    f"called as rule(tangents, ans, {names}): {e}"
                ) from None
        RULES[op] = fn
        _forget(op)
        return fn

    return decorate if rule is None else decorate(rule)


def _forget(op):
    """Drop the cached rule of ``op`` so that a new registration takes effect."""
    from . import interpreter

    e = interpreter._entries.get(op)
    if e is not None:
        e._rule = None


def defrule(*ops):
    """Register one hand-written rule for several overloads (internal, no signature check)."""

    def decorate(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return decorate


# --------------------------------------------------------------------------
# Vocabulary.


def zeros_for(x):
    """A zero tangent for ``x`` that costs no memory (an expanded scalar)."""
    return torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)


def _sum_tangents(out, c):
    """Add two tangents, either of which may be ``None`` (zero)."""
    if c is None:
        return out
    return c if out is None else out + c


def def_linear(op, *argnums):
    """The op is linear in ``argnums`` (default: the first argument): apply it to the tangents.

    Zero tangents among several linear arguments, or within a list argument
    (``cat``), become expanded zeros that cost no memory.
    """
    argnums = argnums or (0,)
    for o in _as_list(op):
        RULES[o] = _linear_rule(o, argnums)


def _takes_list(op, i):
    args = op._schema.arguments
    return i < len(args) and isinstance(args[i].type, torch.ListType)


def _linear_rule(op, argnums):
    if argnums == (0,) and not _takes_list(op, 0):
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


def def_elementwise(op, *arg_rules):
    """HIPS-style ``defjvp``: ``arg_rules[i](g, ans, *args, **kwargs)`` is the
    contribution of argument ``i`` with tangent ``g`` (it may return ``None``
    for zero); contributions are summed.  ``None`` in place of a rule marks a
    non-differentiable argument."""

    if len(arg_rules) == 1 and arg_rules[0] is not None:
        only = arg_rules[0]

        def rule(t, ans, *args, **kwargs):  # one differentiable argument: the hot path
            g = t[0]
            return None if g is None else only(g, ans, *args, **kwargs)

        RULES[op] = rule
        return rule

    def rule(t, ans, *args, **kwargs):
        out = None
        for i, r in enumerate(arg_rules):
            if r is None or i >= len(t) or t[i] is None:
                continue
            out = _sum_tangents(out, r(t[i], ans, *args, **kwargs))
        return out

    RULES[op] = rule
    return rule


def add_to_fresh(out, c):
    """``out + c`` for a tangent ``out`` that the calling rule made itself (so no
    one else holds it), in place where that is safe: no temporary the size of
    the output."""
    if out is None:
        return c
    if c is None:
        return out
    from .slicing import fresh_ok

    if out.shape == torch.broadcast_shapes(out.shape, c.shape) and out.dtype == c.dtype and fresh_ok(out, c):
        return out.add_(c)
    return out + c


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

    RULES[op] = rule
    return rule


def def_zero(*ops):
    """Ops whose outputs do not depend differentiably on the inputs."""
    for op in ops:
        RULES[op] = zero_rule


def zero_rule(t, ans, *args, **kwargs):
    return None


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


def aten_ops(*names):
    """The aten overloads named ``"packet.overload"`` that exist in this torch build."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        p = getattr(torch.ops.aten, packet, None)
        if p is not None and (overload or "default") in p.overloads():
            found.append(getattr(p, overload or "default"))
    return found


def _as_list(op):
    return op if isinstance(op, (list, tuple)) else (op,)


# --------------------------------------------------------------------------
# Helpers the interpreter needs for views and in-place ops.

_aten = torch.ops.aten


def view_tangent(func, base_t, base_primal, args, kwargs):
    """Apply the view ``func`` to the base's tangent.

    The tangent's strides may differ from the primal's: ``view`` then falls
    back to ``reshape``, and ``as_strided`` first lays the tangent out like the
    primal's storage.
    """
    if func is _aten.detach.default:
        return _aten.alias.default(base_t)
    if func is _aten.as_strided.default or func is _aten.as_strided_.default:
        if base_t.stride() != base_primal.stride() or base_t.storage_offset() != base_primal.storage_offset():
            base_t = _like_storage(base_t, base_primal)
        return func(base_t, *args, **kwargs)
    if func is _aten.view.default or func is _aten._unsafe_view.default:
        try:
            return func(base_t, *args, **kwargs)
        except RuntimeError:
            return _aten.reshape.default(base_t, *args)
    return func(base_t, *args, **kwargs)


def _like_storage(t, primal):
    from .interpreter import strip

    plain = strip(primal)
    numel = plain.untyped_storage().nbytes() // plain.element_size()
    buf = t.new_zeros(max(numel, 1))
    laid = buf.as_strided(primal.size(), primal.stride(), primal.storage_offset())
    laid.copy_(t)
    return laid


def fill_defaults(func, args):
    """``args`` with ``func``'s omitted positional defaults filled in.

    The dispatcher drops trailing arguments equal to their defaults, but the
    out-of-place variant may have no default there (``bernoulli_.float``'s
    ``p=0.5`` against ``bernoulli.p``'s required ``p``).
    """
    pos = [a for a in func._schema.arguments if not a.kwarg_only]
    if len(args) >= len(pos):
        return args
    return list(args) + [a.default_value for a in pos[len(args):]]


def functional_variant(func):
    """The out-of-place overload matching an in-place (``foo_``) or ``out=`` overload."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    ns = getattr(torch.ops, schema.name.split("::")[0])
    base = name[:-1] if name.endswith("_") and not name.startswith("__") else name
    if name.startswith("__i"):  # __iadd__ -> __add__? aten has add_ for these; map to the plain op
        base = name[3:-2]
    packet = getattr(ns, base, None)
    if packet is None:
        return _functional_named(func, ns, base)
    want = [
        (a.name, str(a.type))
        for a in schema.arguments
        if not (a.alias_info is not None and a.alias_info.is_write and a.kwarg_only)
    ]
    want_view = torch.Tag.inplace_view in func.tags
    for overload in packet.overloads():
        cand = getattr(packet, overload)
        cs = cand._schema
        if not want_view and any(r.alias_info is not None for r in cs.returns):
            continue
        if [(a.name, str(a.type)) for a in cs.arguments] == want:
            return cand
    # In-place overloads whose self argument is spelled differently: match on count.
    for overload in (func._overloadname, "default", "Tensor"):
        cand = getattr(packet, overload, None) if overload in packet.overloads() else None
        if cand is not None and (want_view or not any(r.alias_info is not None for r in cand._schema.returns)):
            if len(cand._schema.arguments) == len(want):
                return cand
    return _functional_named(func, ns, base)


def _functional_named(func, ns, base):
    """``foo_functional``, the variant some in-place ops have (``normal_``)."""
    packet = getattr(ns, base + "_functional", None)
    if packet is not None and func._overloadname in packet.overloads():
        return getattr(packet, func._overloadname)
    raise NotImplementedError(f"fwdgrad: no out-of-place variant of {func} to derive its JVP from")


def resolve_rule(func):
    """The rule for ``func``: registered, else a decomposition, else linearization."""
    rule = RULES.get(func)
    if rule is not None:
        return rule
    from . import fallback

    return fallback.rule_for(func)
