"""Coverage of PyTorch's Core ATen opset (``torch.Tag.core``) by explicit JVP rules.

Every core op that can carry a tangent (a tensor input and a floating or
complex tensor output) must have its own rule in ``fwdgrad.registry.RULES``;
``out=`` overloads are served by the rule of their functional variant, in-place
variants likewise.  The few exceptions are listed below with their reasons,
and the lists are checked so that they cannot go stale.
"""

import pytest
import torch
import torch._decomp

from fwdgrad.ops import functional_variant
from fwdgrad.registry import RULES

aten = torch.ops.aten


def _core_ops():
    ops = []
    for name in dir(aten):
        packet = getattr(aten, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                ops.append(op)
    return sorted(ops, key=str)


CORE = _core_ops()


def _name(op):
    return str(op).removeprefix("aten.")


def _is_tensor(t):
    return isinstance(t, torch.TensorType) or (
        isinstance(t, (torch.OptionalType, torch.ListType)) and _is_tensor(t.getElementType())
    )


def _takes_tensor(op):
    return any(_is_tensor(a.type) for a in op._schema.arguments)


def _returns_tensor(op):
    return any(_is_tensor(r.type) for r in op._schema.returns)


def _is_out_variant(op):
    return any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


# Core ops whose outputs are bool or integer for every input: no tangent exists.
# test_non_float_outputs_are_non_float runs each one to confirm it.
NON_FLOAT_OUTPUT = {
    "any.default", "any.dim", "any.dims", "argmax.default", "argmin.default", "nonzero.default",
    "isinf.default", "isnan.default",
    "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor", "lt.Scalar",
    "le.Tensor", "le.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor", "ge.Scalar",
    "logical_and.default", "logical_or.default", "logical_xor.default", "logical_not.default",
    "bitwise_and.Tensor", "bitwise_and.Scalar", "bitwise_or.Tensor", "bitwise_or.Scalar",
    "bitwise_xor.Tensor", "bitwise_xor.Scalar", "bitwise_not.default",
}

# Differentiable core ops served by the fallback chain (a torch._decomp
# decomposition, else linearization of their reverse-mode formula) instead of
# an explicit rule.  Keep this list short; each entry needs a reason.
FALLBACK_ALLOWED = {
    # Core ops left to the fallback chain (a decomposition, or linearization of
    # their double-backward formula), with the reason.  Empty: the backward ops
    # have their rules in fwdgrad/rules/backward.py.
}


def _decomposes_above_the_interpreter(op):
    """CompositeImplicitAutograd ops (``var.dim``, ``upsample_bilinear2d.vec``) are
    decomposed by the dispatcher before a ``Dual`` sees them, unless they also
    have their own autograd kernel (``silu_backward``: it reaches the interpreter
    when autograd runs it)."""
    name = op.name()
    return (
        _in_dispatcher(op)
        and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    )


def _needs_rule(op):
    return (
        _takes_tensor(op)
        and _returns_tensor(op)
        and _name(op) not in NON_FLOAT_OUTPUT
        and not _is_out_variant(op)
        and not _decomposes_above_the_interpreter(op)
    )


def test_core_opset_is_found():
    # A sanity check that the enumeration sees the opset (about 190 overloads in torch 2.13).
    assert len(CORE) > 150
    assert aten.convolution.default in CORE and aten.native_layer_norm.default in CORE


def test_every_differentiable_core_op_has_an_explicit_rule():
    missing = [
        _name(op) for op in CORE
        if _needs_rule(op) and op not in RULES and _name(op) not in FALLBACK_ALLOWED
    ]
    assert not missing, f"core ops without an explicit JVP rule: {missing}"


@pytest.mark.parametrize("op", [op for op in CORE if _is_out_variant(op)], ids=_name)
def test_out_variants_use_a_functional_rule(op):
    assert functional_variant(op) in RULES


def _in_dispatcher(op):
    """False for TorchScript-only overloads (``copy_.int``, list ``add_.t``)."""
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
    except RuntimeError:
        return False
    return _is_tensor(op._schema.arguments[0].type)


def _inplace_variants(op):
    packet = getattr(aten, op._schema.name.split("::")[1] + "_", None)
    if packet is None:
        return []
    return [getattr(packet, o) for o in packet.overloads() if _in_dispatcher(getattr(packet, o))]


def test_inplace_variants_of_core_ops_resolve_to_a_rule():
    checked, missing = 0, []
    for op in CORE:
        if not _needs_rule(op):
            continue
        for inplace in _inplace_variants(op):
            if torch.Tag.inplace_view in inplace.tags:
                continue
            try:
                functional = functional_variant(inplace)
            except NotImplementedError:
                missing.append(f"{inplace}: no functional variant")
                continue
            checked += 1
            if functional not in RULES and _name(functional) not in FALLBACK_ALLOWED:
                missing.append(f"{inplace} -> {functional}")
    assert checked > 40
    assert not missing, missing


def test_allow_lists_name_core_ops_and_are_not_stale():
    names = {_name(op) for op in CORE}
    assert not (set(NON_FLOAT_OUTPUT) - names), set(NON_FLOAT_OUTPUT) - names
    assert not (set(FALLBACK_ALLOWED) - names), set(FALLBACK_ALLOWED) - names
    by_name = {_name(op): op for op in CORE}
    stale = [n for n in FALLBACK_ALLOWED if by_name[n] in RULES]
    assert not stale, f"these now have explicit rules; remove them from FALLBACK_ALLOWED: {stale}"
    for n in FALLBACK_ALLOWED:
        op = by_name[n]
        # The fallback can serve it: a decomposition, or an autograd formula to linearize.
        assert op in torch._decomp.decomposition_table or torch._C._dispatch_has_kernel_for_dispatch_key(
            op.name(), "Autograd"
        ) or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutogradCPU"), n


def _example_args(op, dtype):
    """Small arguments built from the schema."""
    args = []
    for a in op._schema.arguments:
        if a.kwarg_only:
            break
        t = a.type
        if _is_tensor(t):
            args.append(torch.ones(2, 3, dtype=dtype))
        elif isinstance(t, torch.ListType):
            args.append([0])
        elif a.has_default_value():
            break
        elif isinstance(t, torch.IntType):
            args.append(0)
        elif isinstance(t, torch.BoolType):
            args.append(False)
        else:
            args.append(1)
    return args


@pytest.mark.parametrize("name", sorted(NON_FLOAT_OUTPUT))
def test_non_float_outputs_are_non_float(name):
    op = {_name(o): o for o in CORE}[name]
    ran = 0
    for dtype in (torch.float64, torch.complex128, torch.int64, torch.bool):
        try:
            out = op(*_example_args(op, dtype))
        except RuntimeError:  # e.g. argmax of complex, bitwise ops of floats
            continue
        ran += 1
        outs = out if isinstance(out, tuple) else (out,)
        assert all(not (o.is_floating_point() or o.is_complex()) for o in outs), (name, dtype)
    assert ran


def test_no_rule_is_registered_for_an_op_that_never_reaches_the_interpreter():
    # CompositeImplicitAutograd ops decompose above the dispatcher's Python key,
    # so a rule for one is dead code.
    dead = [str(op) for op in RULES if _decomposes_above_the_interpreter(op)]
    assert not dead, dead
