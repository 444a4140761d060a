"""What an aten op is, from its schema: its kind, what it writes, its out-of-place twin.

The bottom layer: plain facts about ``torch._ops.OpOverload``\\ s, cached per
overload, with no knowledge of tangents.  The interpreter dispatches on the
kind, the rules' vocabulary reads argument types, and the recorder needs the
written arguments and the functional variants.
"""

import torch

FUNCTIONAL, VIEW, INPLACE, INPLACE_VIEW, OUT = "functional", "view", "inplace", "inplace_view", "out"

_mutated = {}


def kind_of(func):
    """``(kind, out_args)``: one of the five kinds above, and the names of ``out=`` arguments."""
    schema = func._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    ret_alias = [r.alias_info for r in schema.returns]
    out_args = [a.name for a in written if a.kwarg_only]
    if torch.Tag.inplace_view in func.tags:
        return INPLACE_VIEW, out_args
    if any(a is not None and a.is_write for a in ret_alias):
        return (OUT if out_args else INPLACE), out_args
    if ret_alias and ret_alias[0] is not None:
        return VIEW, out_args
    return FUNCTIONAL, out_args


def mutated_args(func):
    """Indices of the positional arguments that ``func`` writes in place (cached)."""
    idx = _mutated.get(func)
    if idx is None:
        schema = getattr(func, "_schema", None)
        idx = ()
        if schema is not None:
            idx = tuple(
                i
                for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only
            )
        _mutated[func] = idx
    return idx


def returns_alias(func):
    """Whether some output of ``func`` aliases an input (a view or an in-place result)."""
    schema = getattr(func, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def takes_list(func, i):
    """Whether positional argument ``i`` of ``func`` is a list (``cat``'s tensors)."""
    args = func._schema.arguments
    return i < len(args) and isinstance(args[i].type, torch.ListType)


def is_random(func):
    return torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())


def op_name(func):
    """A short name for ``func`` (``mul`` for ``aten.mul.Tensor``)."""
    packet = getattr(func, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(func, "__name__", "op")


def aten_ops(*names):
    """The aten overloads named ``"packet.overload"`` that exist in this torch build."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        p = getattr(torch.ops.aten, packet, None)
        if p is not None and (overload or "default") in p.overloads():
            found.append(getattr(p, overload or "default"))
    return found


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
    namespace, name = schema.name.split("::")
    ns = getattr(torch.ops, namespace)
    base = name[:-1] if name.endswith("_") and not name.startswith("__") else name
    if name.startswith("__i"):  # __iadd__ and the like: the plain op
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
        if not want_view and returns_alias(cand):
            continue
        if [(a.name, str(a.type)) for a in cand._schema.arguments] == want:
            return cand
    # In-place overloads whose self argument is spelled differently: match on count.
    for overload in (func._overloadname, "default", "Tensor"):
        cand = getattr(packet, overload, None) if overload in packet.overloads() else None
        if cand is not None and (want_view or not returns_alias(cand)):
            if len(cand._schema.arguments) == len(want):
                return cand
    return _functional_named(func, ns, base)


def _functional_named(func, ns, base):
    """``foo_functional``, the variant some in-place ops have (``normal_``)."""
    packet = getattr(ns, base + "_functional", None)
    if packet is not None and func._overloadname in packet.overloads():
        return getattr(packet, func._overloadname)
    raise NotImplementedError(f"fwdgrad: no out-of-place variant of {func} to derive its JVP from")


def aten_twin(func):
    """The aten op that an elementwise ``prims`` op computes (``prims.mul`` is
    ``aten.mul.Tensor``), or ``None``.  Prims reach the interpreter when
    functorch's jvp runs ATen's Python meta kernels (``torch._refs``) on duals;
    their own kernels cannot run on functorch's wrappers, and they have no rules."""
    schema = func._schema
    names = [a.name for a in schema.arguments]
    if func.namespace != "prims" or names not in (["self"], ["self", "other"]):
        return None  # only the elementwise prims: (Tensor self[, Tensor other]) -> Tensor
    packet = getattr(torch.ops.aten, schema.name.split("::")[-1], None)
    for overload in ("Tensor", "Tensor_Tensor", "default"):
        op = getattr(packet, overload, None) if packet is not None else None
        if op is not None:
            required = [(a.name, str(a.type)) for a in op._schema.arguments if not a.has_default_value()]
            if required == [(n, "Tensor") for n in names]:
                return op
    return None
