"""Data-parallel reverse mode: one all-reduce turns each rank's results into the global loss's.

With ``process_group=`` each rank computes ``(value, grad, H v)`` of its own
shard's loss ``L_r``; one flattened all-reduce (per dtype) of ``w_r * (value,
grad, Hv)`` and ``w_r`` gives those of the global weighted mean ``sum_r w_r
L_r / sum_r w_r`` (``w_r = 1`` by default: the mean over ranks, DDP's
convention; pass the local batch size for uneven shards of a mean loss).

DistributedDataParallel's forward reduces nothing by itself (its reducer
reduces ``.grad`` during ``backward()``, which ``torch.autograd.grad`` never
runs), so a call through it without ``process_group=`` would be silently
shard-local.  ``ParallelForwards`` watches module calls inside a transform:
each DDP forward runs as under ``no_sync()`` (and without the static-graph first
iteration's delayed all-reduce), so DDP's own later ``backward()`` steps are
untouched; the transform then either reduces over its group or refuses.
An FSDP2 module runs inside a transform only as ``fsdp.Unsharded`` set it
up (hooks off, full parameters), when its parameters are what is
differentiated; any other FSDP2 forward is refused: its hooks gather its own
parameters and would drop the tangents.
"""

import contextlib
import gc
import math
import threading
import weakref

import torch

from .errors import ArgumentTypeError, ArgumentValueError

try:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP
except ImportError:  # a torch build without distributed support
    dist = None
    DDP = FSDPModule = ()

_DDP_STATE = ("require_backward_grad_sync", "require_forward_param_sync", "_static_graph_delay_allreduce_enqueued")
_known_ddps = weakref.WeakSet()
running_unsharded = weakref.WeakSet()  # FSDP2 modules that fsdp.Unsharded runs as plain modules now


def check_group(process_group, weight, name):
    """The process group to reduce over (or ``None``) and this rank's weight, checked."""
    if process_group is None:
        if weight is not None:
            raise ArgumentValueError(f"{name}: weight= is this rank's share of a process group; pass process_group= too")
        return None, None
    if dist is None or not dist.is_available():
        raise RuntimeError(f"{name}: process_group= needs a torch build with torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{name}: process_group= was given but torch.distributed is not initialised; call "
            f"torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ArgumentTypeError(
            f"{name}: process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD or model.process_group of a DDP model), got "
            f"{type(process_group).__name__}"
        )
    if weight is None:
        return process_group, 1.0
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ArgumentValueError(f"{name}: weight must be a number, got a tensor of shape {tuple(weight.shape)}")
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ArgumentTypeError(f"{name}: weight must be a non-negative number, got {type(weight).__name__}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ArgumentValueError(f"{name}: weight must be a finite non-negative number, got {weight}")
    return process_group, float(weight)


def weighted_mean(tensors, group, weight, name):
    """``sum_r w_r t_r / sum_r w_r`` for each tensor (``None`` counts as zero), one all-reduce per dtype."""
    out = list(tensors)
    by_kind = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_kind.setdefault((t.dtype, t.device), []).append(i)
    if not by_kind:  # nothing to reduce here, but the other ranks reduce: take part
        by_kind[(torch.get_default_dtype(), torch.device("cpu"))] = []
    for (dtype, device), idx in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        parts = [tensors[i].reshape(-1) for i in idx] + [torch.ones(1, dtype=dtype, device=device)]
        buf = torch.cat(parts) * weight
        dist.all_reduce(buf, group=group)
        total = buf[-1]
        if not total.real > 0:
            raise ArgumentValueError(f"{name}: the weights of the process group's ranks sum to {total.item()}; they must sum to more than 0")
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = (buf[offset:offset + n] / total).view(tensors[i].shape)
            offset += n
    return out


def ddp_holding(params):
    """The DDP module whose reducer holds all of ``params`` (by identity), or ``None``.

    Searched among DDP modules seen before, then (once per new module) the heap.
    """
    ids = {id(p) for p in params}
    for ddp in list(_known_ddps):
        if ids <= {id(p) for p in ddp._module_parameters}:
            return ddp
    if not DDP:
        return None
    for obj in gc.get_objects():
        if issubclass(type(obj), DDP) and hasattr(obj, "_module_parameters"):
            _known_ddps.add(obj)
            if ids <= {id(p) for p in obj._module_parameters}:
                return obj
    return None


class ParallelForwards:
    """Watch this thread's module calls; run each DDP forward as under ``no_sync()``, refuse FSDP2's.

    Leaves each DDP module's synchronisation state as it found it, so the
    user's later ``forward``/``backward()`` steps (``static_graph`` included)
    go on as if this call had not happened.
    """

    def __init__(self):
        self.ddps = []
        self._saved = []
        self._thread = None
        self._handle = None

    def _pre_hook(self, module, args):
        if (isinstance(module, FSDPModule) and module not in running_unsharded
                and threading.get_ident() == self._thread):
            # Its hooks all-gather its own sharded parameters, whatever the
            # transform passed in: the result would ignore the duals.
            raise NotImplementedError(
                "fwdgrad: a module sharded by FSDP2 (fully_shard) ran inside a transform whose "
                "inputs are not its sharded parameters; FSDP2 swaps in its own gathered "
                "parameters, so tangents would be lost.  Supported: jvp, forward_grad, grad, "
                "value_and_grad, hvp and value_grad_and_hvp with respect to the model's parameters (dict(model."
                "named_parameters()), or detached copies of them); include them, with zero "
                "tangents if need be"
            )
        if isinstance(module, DDP) and threading.get_ident() == self._thread:
            if all(m is not module for m in self.ddps):
                self.ddps.append(module)
                _known_ddps.add(module)
                self._saved.append((module, {a: getattr(module, a, None) for a in _DDP_STATE}))
            module.require_backward_grad_sync = False
            if getattr(module, "static_graph", False):
                module._static_graph_delay_allreduce_enqueued = True

    def __enter__(self):
        # Under torch.compile it stands aside (Dynamo cannot trace the hook's
        # bookkeeping; DDP under compile is DDP's own compiled path).
        if DDP and not torch.compiler.is_compiling():
            self._thread = threading.get_ident()
            self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        for module, state in self._saved:
            for a, value in state.items():
                setattr(module, a, value)
        return False

    def check_reduced(self, group, name):
        """Refuse a shard-local result: a DDP forward ran and no process group was given."""
        if self.ddps and group is None:
            raise RuntimeError(
                f"{name}: the loss ran a DistributedDataParallel module, whose forward reduces "
                f"nothing by itself, so the result would be this rank's shard only.  Pass "
                f"process_group=model.process_group (and weight=this rank's share, e.g. its batch "
                f"size, for uneven shards) for the global loss's result, or call model.module "
                f"for this rank's own"
            )


def watch_forwards():
    """``ParallelForwards()`` where DDP or FSDP2 can run (a process group exists), else nothing.

    The forward-mode transforms use it, so that without torch.distributed
    (and under torch.compile) they carry no context manager of their own.
    """
    if torch.compiler.is_compiling() or dist is None or not dist.is_available() or not dist.is_initialized():
        return contextlib.nullcontext()
    return ParallelForwards()
