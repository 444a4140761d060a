"""fwdgrad levels inside torch.func transforms (vmap, grad, jvp, jacrev, vjp).

functorch keeps its own stack of transforms (``torch._C._functorch``'s
dynamic layers) and sees every op before any ``__torch_dispatch__``.  A
fwdgrad level started while that stack is not empty sits *above* the layers
active at its start: its duals hold functorch wrappers (a ``BatchedTensor``
inside vmap, a ``TensorWrapper`` inside grad) as primals, and the
interpreter pushes those layers back around each op's kernel and rule
(``interpreter.functorch_stacks``), so vmap batches and grad records the
primal and tangent math exactly as it would a plain call.

Two things keep the two level systems from confusing each other:

- **lifting**: a functorch wrapper of one of those outer layers that meets a
  dual in a torch call (a batched tensor captured by ``func``) becomes a
  dual with a zero tangent first, at every active fwdgrad level whose layers
  include its layer.  Otherwise vmap would batch the captured tensor against
  a dual it takes for unbatched, and add the batch dimension twice.
- **stripping**: functorch's grad wraps every op's output in a
  ``TensorWrapper`` of its level, duals included.  A wrapper of an outer
  layer around a dual of this level is dropped: the primal underneath
  already carries that layer's autograd history.

Both happen in a ``TorchFunctionMode`` held while ``func`` runs, and only
then; outside torch.func nothing here runs.
"""

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import interpreter
from .interpreter import Dual, ScopeOwner, current_depth, drop_stale_levels, enter_level, exit_level, leave_to

_ft = torch._C._functorch
_FUNCTORCH_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode).add(
    torch._C.DispatchKey.FuncTorchDynamicLayerBackMode
)


def _skip_functorch():
    return torch._C._ExcludeDispatchKeyGuard(_FUNCTORCH_KEYS)
_local = threading.local()  # .active: [(level, functorch levels)] of this thread, outermost first


def _active():
    a = getattr(_local, "active", None)
    if a is None:
        a = _local.active = []
    return a


def inside_functorch():
    return _ft.maybe_current_level() is not None


def _layers_of(level):
    entry = interpreter.functorch_stacks.get(level)
    return entry[1] if entry is not None else None


def strip(x):
    """``x`` without functorch wrappers of the layers below the dual they wrap."""
    if isinstance(x, Dual) or not _ft.is_functorch_wrapped_tensor(x):
        return x
    inner, outer = x, []
    while not isinstance(inner, Dual) and _ft.is_functorch_wrapped_tensor(inner):
        outer.append((_ft.maybe_get_level(inner), _ft.is_batchedtensor(inner)))
        inner = _ft.get_unwrapped(inner)
    if not isinstance(inner, Dual):
        return x
    ours = _layers_of(inner._level)
    if ours is None or any(lv not in ours for lv, _ in outer):
        return x  # wrappers of transforms started inside this level: genuine
    if any(batched for _, batched in outer):
        raise RuntimeError(
            "fwdgrad: torch.func.vmap batched a fwdgrad dual against a tensor of its own batch "
            "(an op reached vmap without passing through Python).  Pass the batched tensor to "
            "the fwdgrad transform as an argument instead of capturing it."
        )
    return inner


def lift(x, below=None):
    """A functorch wrapper of an outer layer as a dual of every active level whose
    layers include it (zero tangent), lowest level first; other values unchanged.

    ``below``: only levels lower than it (a transform's own inputs, at its start).
    """
    x = strip(x)
    if isinstance(x, Dual) or not _ft.is_functorch_wrapped_tensor(x):
        return x
    lv = _ft.maybe_get_level(x)
    for level, layers in _active():
        if below is not None and level >= below:
            break
        if lv in layers:
            x = Dual(x, None, level)
    return x


class _Lift(TorchFunctionMode):
    """Lifts and strips the tensor arguments and outputs of every torch call (see
    the module docstring), for the active levels below ``ceiling`` (all if None)."""

    def __init__(self, ceiling=None):
        super().__init__()
        self.ceiling = ceiling

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ceiling = self.ceiling
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda x: lift(x, ceiling), (args, kwargs or {}))
        active = [a for a in _active() if ceiling is None or a[0] < ceiling]
        if active and _ft.maybe_current_level() in active[-1][1]:
            # Every functorch layer active now sits below the innermost fwdgrad
            # level, and the arguments hold no wrapper of theirs (all lifted):
            # the op skips them and reaches the duals, whose interpreter pushes
            # them back under the primals (vmap's randomness= then applies to
            # the draw on the primal, not to a dual it takes for unbatched).
            with _skip_functorch():
                out = _call(func, types, args, kwargs)
        else:
            out = _call(func, types, args, kwargs)
        return pytree.tree_map_only(torch.Tensor, strip, out)


def _call(func, types, args, kwargs):
    """``func`` with torch-function handling off, so that no other ``_Lift`` mode
    (of an enclosing level) lifts again; a dual's own handler (the user's detach)
    still runs first."""
    with torch._C.DisableTorchFunction():
        if any(issubclass(t, Dual) for t in types):
            return Dual.__torch_function__(func, types, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def level_scope():
    """A fresh level for one transform call; inside torch.func it records the
    functorch layers active now and lifts and strips while the transform runs.

    Like ``torch.func.jvp``, a transform turns PyTorch's forward-AD switch
    (``torch._C._set_fwd_grad_enabled``) on while it runs; ``func`` may turn
    it off for a region, and no tangent flows there.
    """
    if torch.compiler.is_compiling():
        # Dynamo traces neither functorch's layer stack nor the forward-AD
        # switch; a compiled transform runs outside torch.func.
        level = enter_level()
        try:
            yield level
        finally:
            exit_level(level)
        return
    if torch._C._is_fwd_grad_enabled():
        with _functorch_scope() as level:
            yield level
        return
    try:
        torch._C._set_fwd_grad_enabled(True)
        with _functorch_scope() as level:
            yield level
    finally:
        torch._C._set_fwd_grad_enabled(False)


@contextlib.contextmanager
def _functorch_scope():
    drop_stale_levels()
    owner = ScopeOwner()  # lives in this frame only
    depth = current_depth()
    try:
        level = enter_level(owner)
        if not inside_functorch():
            yield level
            return
        with _recording_layers(level):
            yield level
    finally:
        leave_to(depth)  # exit_level, robust to an interrupt right after the push


@contextlib.contextmanager
def _recording_layers(level):
    """Record the functorch layers active now for ``level``, and lift and strip
    while it runs."""
    levels = frozenset(i.level() for i in _ft.get_interpreter_stack())
    layers = []
    try:
        while _ft.peek_interpreter_stack() is not None:
            layers.append(_ft.pop_dynamic_layer_stack())
    finally:
        for layer in reversed(layers):
            _ft.push_dynamic_layer_stack(layer)
    interpreter.functorch_stacks[level] = (layers, levels)
    active = _active()
    active.append((level, levels))
    try:
        with _Lift():
            yield
    finally:
        active.remove((level, levels))
        del interpreter.functorch_stacks[level]


@contextlib.contextmanager
def _interpreting(level):
    """While the interpreter runs an op of ``level`` inside its layers: values
    there are that level's primals, so only lower levels lift them."""
    with torch._C._EnableTorchFunction(), _Lift(ceiling=level):
        yield


interpreter.set_functorch_hook(_interpreting)


def lift_input(x, level):
    """A transform's input ``x`` before it becomes a dual of ``level``: lifted to the
    active lower levels, so that the duals nest in the order the levels do."""
    if not interpreter.functorch_stacks:
        return x
    return lift(x, below=level)


__all__ = ["level_scope", "lift_input", "strip", "lift", "inside_functorch"]
