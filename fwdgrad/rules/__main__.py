"""``python -m fwdgrad.rules where aten.tanh [aten.mm.default ...]``: where each op's rule is declared.

A packet name (``aten.tanh``) lists all its overloads.  Ops without a
declared rule say which fallback they get.
"""

import os
import sys

import torch

from .. import ops, registry  # importing fwdgrad registers the rules


def _takes_tensors(op):
    schema = op._schema
    return any("Tensor" in str(a.type) for a in (*schema.arguments, *schema.returns))


def _overloads(name):
    parts = name.split(".")
    if parts[0] == "torch" and len(parts) > 2 and parts[1] == "ops":
        parts = parts[2:]
    if len(parts) < 2:
        raise SystemExit(f"expected a name such as aten.tanh or aten.add.Tensor, got {name!r}")
    packet = getattr(getattr(torch.ops, parts[0]), parts[1], None)
    if packet is None:
        raise SystemExit(f"no op {parts[0]}.{parts[1]}")
    names = [parts[2]] if len(parts) > 2 else packet.overloads()
    return [getattr(packet, o) for o in names]


def where(name):
    """One line per overload of ``name``: the op, the file and line of its rule, how it is built."""
    lines = []
    for op in _overloads(name):
        lines.append(f"{op}: {_describe(op)}")
    return lines


def _describe(op):
    found = registry.where(op)
    if found is not None:
        file, line, how = found
        return f"{os.path.relpath(file)}:{line} ({how})"
    if not _takes_tensors(op):
        return "takes and returns no tensors (never reaches the interpreter)"
    kind, _ = ops.kind_of(op)
    if kind in (ops.INPLACE, ops.OUT):
        try:
            functional = ops.functional_variant(op)
        except NotImplementedError:
            return f"{kind} variant with no out-of-place twin"
        return f"{kind} variant of {functional}: {_describe(functional)}"
    return "no rule declared (the fallback: a decomposition, else linearization)"


def main(argv):
    if len(argv) < 2 or argv[0] != "where":
        print(__doc__.strip())
        return 2
    for name in argv[1:]:
        print("\n".join(where(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
