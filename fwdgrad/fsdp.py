"""FSDP2 (``fully_shard``) parameters: differentiate the model as the plain module on full parameters.

An FSDP2 module's forward hooks all-gather its own sharded parameters into
unsharded ones, whatever a transform passed in, so duals over its DTensor
parameters would be dropped (a zero tangent, or an error).  What fwdgrad does
instead, for a transform whose differentiated leaves are an FSDP2 model's
sharded parameters (the parameters themselves, or detached copies sharing
their storage):

* each such primal and its tangent are all-gathered into full tensors (the
  tangent must have the primal's mesh and placements);
* for the call, ``Unsharded`` switches off the forward hooks of every FSDP2
  module in the model and puts full tensors in place of its parameters (the
  transform's duals for the differentiated ones, gathered constants for the
  rest), so the model runs as its plain module;
* results with a parameter's shape (a gradient, ``H v``) are reduced over the
  model's mesh like any data-parallel result and handed back as DTensors with
  the parameter's layout (``shard_like``).

Everything is restored afterwards: the hooks, the registered sharded
parameters, and FSDP2's own state, which never ran.  A mixed-precision policy
is refused (the plain module would compute in the parameters' own dtype).
"""

import contextlib
import gc
import weakref

from .distributed import FSDPModule, running_unsharded
from .dtensor import is_dtensor, storage_ptr
from .errors import ArgumentValueError

try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # no torch.distributed in this build
    distribute_tensor = None

_known_roots = weakref.WeakSet()


def _key(t):
    """What identifies a sharded parameter's local data, also through ``detach()``."""
    local = t.to_local()
    return storage_ptr(t), local.storage_offset(), tuple(local.shape), tuple(t.shape)


def _roots():
    """The outermost FSDP2 modules alive, searched on the heap (and cached)."""
    found = [m for m in gc.get_objects() if issubclass(type(m), FSDPModule)] if FSDPModule else []
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    for m in found:
        if id(m) in inner:
            _known_roots.discard(m)
        else:
            _known_roots.add(m)
    return list(_known_roots)


def _cached_roots():
    """The cached roots that still are roots (``fully_shard`` may have wrapped one in another since)."""
    for m in list(_known_roots):
        if m._get_fsdp_state()._is_root is False:
            _known_roots.discard(m)
    return list(_known_roots)


def owners(leaves):
    """``{i: (root, parameter)}`` for each leaf that is (or shares storage with) a sharded
    parameter of an FSDP2 model; empty when none is."""
    wanted = {_key(t): i for i, t in enumerate(leaves) if is_dtensor(t)}
    if not wanted or not FSDPModule:
        return {}
    found = {}
    for search in (_cached_roots, _roots):
        for root in search():
            for p in root.parameters():
                i = wanted.get(_key(p)) if is_dtensor(p) else None
                if i is not None:
                    found[i] = (root, p)
        if len(found) == len(wanted):
            break
    return found


def refuse(leaves, name):
    """Raise if a leaf is an FSDP2 model's sharded parameter (for the transforms that record
    a program: FSDP2's hooks would swap in their own gathered parameters, a zero tangent)."""
    if owners(leaves):
        raise NotImplementedError(
            f"{name}: an argument is an FSDP2 model's sharded parameter, which this transform "
            f"cannot take (FSDP2 would gather its own parameters and drop the tangents); jvp, "
            f"forward_grad, grad, value_and_grad and the unbatched hvp and value_grad_and_hvp can"
        )


def gather(t):
    """The full tensor behind a DTensor (an all-gather; differentiable, as ``full_tensor`` is)."""
    return t.full_tensor()


def shard_like(full, p):
    """``full`` (the same on every rank) as a DTensor laid out like ``p``, with no communication."""
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def mesh_group(params, name):
    """The process group of the FSDP2 parameters' mesh (they must share one 1-D mesh)."""
    meshes = []
    for p in params:
        if all(p.device_mesh != m for m in meshes):
            meshes.append(p.device_mesh)
    if len(meshes) != 1:
        raise ArgumentValueError(f"{name}: the FSDP2 parameters lie on {len(meshes)} different meshes; they must share one")
    mesh = meshes[0]
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{name}: FSDP2 parameters on a {mesh.ndim}-D mesh (HSDP) are not supported; shard "
            f"over a 1-D mesh, or pass unsharded parameters with process_group="
        )
    return mesh.get_group()


class Unsharded:
    """For one call, run the FSDP2 models ``roots`` as plain modules on full parameters.

    ``full`` maps ``id(parameter)`` to the tensor that stands in for it (the
    transform's duals); every other sharded parameter is all-gathered as a
    constant.  Every rank gathers the same parameters in the same order.
    """

    def __init__(self, roots, full, name):
        self.roots = list({id(r): r for r in roots}.values())
        self.full = full
        self.name = name
        self._hooks = []  # (module, pre hooks, hooks): the originals to put back
        self._params = []  # (module, attribute, parameter)

    def __enter__(self):
        try:
            for root in self.roots:
                self._switch_hooks_off(root)
                self._put_full_parameters(root)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _switch_hooks_off(self, root):
        for m in root.modules():
            if not isinstance(m, FSDPModule):
                continue
            state = m._get_fsdp_state()
            policy = state._mp_policy
            if policy.param_dtype is not None or policy.output_dtype is not None:
                raise NotImplementedError(
                    f"{self.name}: an FSDP2 module with a mixed-precision policy ({policy}) cannot be "
                    f"differentiated by fwdgrad: it would run in the parameters' own dtype, not the "
                    f"policy's; shard it without param_dtype/output_dtype"
                )
            ids = set()
            for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                ids.update(h.id for h in getattr(handle, "handles", (handle,)))
            pre, post = m._forward_pre_hooks, m._forward_hooks
            self._hooks.append((m, pre, post))
            m._forward_pre_hooks = type(pre)((k, h) for k, h in pre.items() if k not in ids)
            m._forward_hooks = type(post)((k, h) for k, h in post.items() if k not in ids)
            running_unsharded.add(m)

    def _put_full_parameters(self, root):
        gathered = {}
        for qualified, p in root.named_parameters(remove_duplicate=False):
            path, _, attribute = qualified.rpartition(".")
            module = root.get_submodule(path)
            if id(p) not in gathered:
                stand_in = self.full.get(id(p))
                gathered[id(p)] = stand_in if stand_in is not None else gather(p) if is_dtensor(p) else p
            self._params.append((module, attribute, p))
            module._parameters[attribute] = gathered[id(p)]

    def __exit__(self, *exc):
        for module, attribute, p in reversed(self._params):
            module._parameters[attribute] = p
        for m, pre, post in reversed(self._hooks):
            m._forward_pre_hooks, m._forward_hooks = pre, post
            running_unsharded.discard(m)
        self._params, self._hooks = [], []
        return False



def unsharded(stand_ins, name):
    """``Unsharded`` for ``{id(parameter): (model, stand-in)}``; nothing to do when it is empty."""
    if not stand_ins:
        return contextlib.nullcontext()
    return Unsharded([model for model, _ in stand_ins.values()], {k: d for k, (_, d) in stand_ins.items()}, name)
