"""DTensor primals: checks that a tangent lies out like its primal, and storage behind a subclass.

A dual over a DTensor works like any dual (the DTensor does its own
dispatch underneath); what fwdgrad adds is refusing a tangent whose layout
differs (a plain tangent for a DTensor primal, another mesh or placement),
which would otherwise fail deep inside an op or give a per-shard answer.
"""

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .errors import ArgumentTypeError, ArgumentValueError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # no torch.distributed in this build
    DTensor = ()


# What DTensor's dispatch says when another tensor type reaches an op before it.
MIXED_DTENSOR = "got mixed torch.Tensor and DTensor"


def is_dtensor(x):
    return isinstance(x, DTensor)


def check_layout(name, where, p, t):
    """``t`` (the tangent of ``where``) must be a DTensor on ``p``'s mesh with ``p``'s placements."""
    if not (is_dtensor(p) or is_dtensor(t)):
        return
    if not (is_dtensor(p) and is_dtensor(t)):
        raise ArgumentTypeError(
            f"{name}: {where} is {'a DTensor' if is_dtensor(p) else 'a plain tensor'} but its tangent is "
            f"{'a plain tensor' if is_dtensor(p) else 'a DTensor'}; give the tangent the primal's layout "
            f"(torch.distributed.tensor.distribute_tensor(t, p.device_mesh, p.placements))"
        )
    if t.device_mesh != p.device_mesh:
        raise ArgumentValueError(f"{name}: the tangent of {where} is on mesh {t.device_mesh} but {where} is on {p.device_mesh}")
    if tuple(t.placements) != tuple(p.placements):
        raise ArgumentValueError(
            f"{name}: the tangent of {where} has placements {tuple(t.placements)} but {where} has "
            f"{tuple(p.placements)}; redistribute it (t.redistribute(p.device_mesh, p.placements))"
        )


def storage_ptr(t):
    """The data pointer of the storage under ``t``, looking through wrapper subclasses (DTensor)."""
    while is_traceable_wrapper_subclass(t):
        t = getattr(t, t.__tensor_flatten__()[0][0])
    return t.untyped_storage().data_ptr()
