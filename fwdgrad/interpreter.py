"""The forward-mode interpreter: dual tensors, levels and the per-op dispatch loop.

A ``Dual`` is a wrapper tensor that carries a primal, a tangent and the level of
the transform that created it.  Every aten op that reaches a ``Dual`` lands in
``Dual.__torch_dispatch__``, which finds the highest level among the arguments,
unwraps only that level (lower levels pass through as constants, so nesting is
free of perturbation confusion), runs the primal kernel, runs fwdgrad's JVP rule
and wraps the outputs again.

A missing tangent is ``None`` (a symbolic zero).  When every input tangent of
an op is zero only the primal runs.

Tangent math runs with autograd re-enabled (``_RestorePythonTLSSnapshot``), so
tangents get a ``grad_fn`` when primals, tangents or captured parameters
require grad (reverse over forward).  The wrapper itself takes part in
autograd as an ordinary tensor, so ``torch.autograd.grad`` called inside a
transform sends the backward ops through this dispatch loop (forward over
reverse).
"""

import hashlib
import itertools
import os
import threading
import weakref

import torch
from torch._C import _functorch as _ft

from . import ops, registry
from .dtensor import MIXED_DTENSOR, is_dtensor

_make_wrapper = torch.Tensor._make_wrapper_subclass
_restore_autograd = torch._C._RestorePythonTLSSnapshot
_disable_torch_function = torch._C.DisableTorchFunctionSubclass
_fwd_grad_enabled = torch._C._is_fwd_grad_enabled

# Set FWDGRAD_CHECK=1 to verify every tangent's shape and dtype against its primal.
CHECK_TANGENTS = os.environ.get("FWDGRAD_CHECK", "") not in ("", "0")


# A level is an int: the transform's depth in this thread's stack of running
# transforms (1 = outermost) in its low bits, and in eager mode a serial number
# above them.  Depths order levels (an inner transform is deeper, so it wins);
# the serial tells two transforms of the same depth apart, so a dual that
# escaped a finished transform is refused rather than taken for the new one's.
# Under ``torch.compile`` the level is the depth alone: a value that changed
# on every call would be a guard that fails on every call (recompiles), and
# the depth is also what ``Dual.__tensor_flatten__`` puts in a dual's context.
_DEPTH_BITS = 6
_DEPTH_MASK = (1 << _DEPTH_BITS) - 1
_serials = itertools.count(1)
class _Levels(threading.local):
    """This thread's running levels, innermost last (made on a thread's first use,
    so that compiled code never sees it missing and then present)."""

    def __init__(self):
        self.stack = []
        self.owners = []  # per level: a weak reference to its scope's ScopeOwner (None: not tracked)


_local = _Levels()


def _stack():
    return _local.stack


class ScopeOwner:
    """Held only by the frame of a running level scope: alive while the scope runs.

    A scope pops its level in ``finally``, but an interrupt that lands on that
    very line skips it.  The scope's frame then ends (once the exception is
    dropped), its owner dies, and ``drop_stale_levels`` sees that.
    """

    __slots__ = ("__weakref__",)


def drop_stale_levels():
    """Pop the levels whose scope has ended without popping them (see ``ScopeOwner``)."""
    owners = _local.owners
    for i, owner in enumerate(owners):
        if owner is not None and owner() is None:
            del _local.stack[i:], owners[i:]
            return


def enter_level(owner=None):
    """Push and return a fresh level, deeper than every running one in this thread.

    ``owner``: the scope's ``ScopeOwner`` (kept by a weak reference), so that
    ``drop_stale_levels`` can find a level an interrupt left behind.  Pair it
    with ``exit_level``/``leave_to`` in a ``finally``.
    """
    owners = _local.owners
    s = _stack()
    depth = len(s) + 1
    if depth > _DEPTH_MASK:
        raise RuntimeError(f"fwdgrad: more than {_DEPTH_MASK} nested transforms")
    level = depth if _compiling() else next(_serials) << _DEPTH_BITS | depth
    s.append(level)
    owners.append(None if owner is None else weakref.ref(owner))
    return level


def exit_level(level):
    s = _stack()
    if not s or s[-1] != level:
        raise RuntimeError("fwdgrad: transform levels left out of order")
    s.pop()
    _local.owners.pop()


def current_depth():
    """How many levels are running in this thread."""
    return len(_stack())


def leave_to(depth):
    """Pop every level above ``depth``: the ones a scope pushed, even when an
    interrupt came between a push and the bookkeeping that pairs it."""
    del _stack()[depth:], _local.owners[depth:]


def depth_of(level):
    return level & _DEPTH_MASK


def level_at(depth):
    """The running level of ``depth`` in this thread (the depth alone if none runs there)."""
    s = _stack()
    return s[depth - 1] if depth <= len(s) else depth


def _deeper(a, b):
    """Whether level ``a`` is deeper than level ``b`` (two different levels)."""
    da, db = a & _DEPTH_MASK, b & _DEPTH_MASK
    if da == db:
        raise RuntimeError(
            f"fwdgrad: a dual tensor of a transform that has finished (or runs in another "
            f"thread) met one of a running transform at the same depth ({da}).  A tensor "
            f"computed inside a transformed function was kept (in a global, an attribute, a "
            f"closure) and used after that transform returned; return it from the function "
            f"instead."
        )
    return da > db


class View:
    """How a view ``Dual`` derives its tangent from its base's tangent."""

    __slots__ = ("base", "func", "args", "kwargs", "index")

    def __init__(self, base, func, args, kwargs, index):
        self.base = base
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.index = index

    def derive(self, base_tangent):
        out = view_tangent(self.func, base_tangent, self.base._primal, self.args, self.kwargs)
        return out if self.index is None else out[self.index]


class Dual(torch.Tensor):
    """A tensor with a primal, a tangent (``None`` means zero) and a level."""

    # Defaults read through the class, so that a new dual stores only what differs.
    _view = None
    _tangent_from = None  # for views: the base tangent the cached tangent came from
    _owns_tangent = False  # for roots: the tangent may be written in place

    @staticmethod
    def __new__(cls, primal, tangent, level, view=None, requires_grad=False):
        # Dynamo writes this call into its graph (Dual is traceable) rather
        # than tracing it, so the ints read here are never guarded on.
        if functorch_stacks and _ft.is_functorch_wrapped_tensor(primal):
            return _over_functorch(cls, primal, tangent, level, view)
        r = _make_wrapper(
            cls,
            primal.size(),
            strides=primal.stride(),
            storage_offset=primal.storage_offset(),
            dtype=primal.dtype,
            device=primal.device,
            layout=primal.layout,
            requires_grad=requires_grad,
        )
        return _filled(r, primal, tangent, level, view)

    def __tensor_flatten__(self):
        """What ``torch.compile`` sees: the primal and the tangent (if nonzero) as
        inner tensors, the level's depth as the context (a view becomes a root)."""
        if tangent_of(self) is None:
            return ["_primal"], depth_of(self._level)
        return ["_primal", "_tangent"], depth_of(self._level)

    @staticmethod
    def __tensor_unflatten__(inner, depth, outer_size, outer_stride):
        return Dual(inner["_primal"], inner.get("_tangent"), level_at(depth))

    def _stable_hash_for_caching(self):
        """AOTAutograd's cache key for a dual: its depth, which inner tensors it has, their metadata."""
        attrs, depth = self.__tensor_flatten__()
        parts = [str(depth), str(self.requires_grad)]
        for name in attrs:
            t = getattr(self, name)
            parts.append(
                t._stable_hash_for_caching() if isinstance(t, Dual)
                else f"{name}{tuple(t.shape)}{t.stride()}{t.dtype}{t.device}{t.requires_grad}"
            )
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self):
        with _disable_torch_function():
            return (
                f"Dual(level={self._level}, primal={self._primal!r}, "
                f"tangent={tangent_of(self)!r})"
            )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # A user's detach (method, function or ``.data``) drops every tangent;
        # autograd's internal detach of saved outputs never comes through here.
        if func in _USER_DETACH:
            return strip(args[0]).detach()
        if func is _TOLIST:
            return _tolist(args[0])
        if kwargs is None:
            kwargs = {}
        # (The ``try`` is outside the ``with``: on Python 3.11 an exception raised
        # at a ``try:`` line that opens a ``with`` body skips the ``with``'s exit.)
        try:
            with _disable_torch_function():
                return func(*args, **kwargs)
        except RuntimeError as e:
            # A DTensor argument ahead of a dual got the op first and refused
            # the dual: lift the DTensor constants to duals and dispatch again.
            if MIXED_DTENSOR not in str(e):
                raise
        args, kwargs = _lift_dtensors(args, kwargs)
        with _disable_torch_function():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return interpret(func, args, kwargs or {})


_compiling = torch.compiler.is_compiling
def _over_functorch(cls, primal, tangent, level, view):
    """A dual over a functorch wrapper (BatchedTensor, TensorWrapper): such
    wrappers have no storage, so the dual takes no strides from them.  Its
    own ``requires_grad`` stays off: the wrapper underneath carries
    functorch's autograd for it."""
    r = _make_wrapper(cls, primal.size(), dtype=primal.dtype, device=primal.device, layout=primal.layout)
    return _filled(r, primal, tangent, level, view)


def _filled(r, primal, tangent, level, view):
    """The new dual ``r`` with its fields set (a view's record only if it is one)."""
    r._primal = primal
    r._tangent = tangent
    r._level = level
    if view is not None:
        r._view = view
    return r


_USER_DETACH = {torch.Tensor.detach, torch.detach, torch.Tensor.data.__get__}
_TOLIST = torch.Tensor.tolist


def _tolist(d):
    """``.tolist()`` of a dual: the primal's values (PyTorch refuses it for subclasses).

    A recording dispatch mode does not see ``tolist`` on a plain tensor, so it
    is told with a value read it does see (``.item()`` of a sum): a recording
    that read values must not be replayed for other values.
    """
    p = strip(d)
    if torch._C._len_torch_dispatch_stack():
        _aten._local_scalar_dense.default(_aten.sum.default(p.detach()))
    return p.tolist()


def _lift_dtensors(args, kwargs):
    """DTensor constants among ``args``/``kwargs`` as duals (zero tangent) of the top level."""
    flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else (a,))]
    level = None
    for a in flat:
        if isinstance(a, Dual) and (level is None or (a._level != level and _deeper(a._level, level))):
            level = a._level
    if level is None:
        return args, kwargs

    def lift(a):
        if isinstance(a, (list, tuple)):
            return type(a)(lift(b) for b in a)
        return Dual(a, None, level) if is_dtensor(a) else a

    return tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}


def strip(x):
    """The plain tensor under every level of ``Dual``."""
    while isinstance(x, Dual):
        x = x._primal
    return x


def tangent_of(d):
    """The tangent of ``d`` at its own level (``None`` for zero).

    A view's tangent is derived from its base's, and derived again when the
    base's tangent object changes (materialised or replaced by an in-place op).
    """
    if d._view is None:
        return d._tangent
    chain = []  # iterative, so that a chain of thousands of views cannot overflow the stack
    while d._view is not None:
        chain.append(d)
        d = d._view.base
    t = d._tangent
    for v in reversed(chain):
        if t is None:
            return None
        if v._tangent_from is not t:
            v._tangent = v._view.derive(t)
            v._tangent_from = t
        t = v._tangent
    return t


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
    plain = strip(primal)
    numel = plain.untyped_storage().nbytes() // plain.element_size()
    buf = t.new_zeros(max(numel, 1))
    laid = buf.as_strided(primal.size(), primal.stride(), primal.storage_offset())
    laid.copy_(t)
    return laid


# --------------------------------------------------------------------------
# Per-op entries, made once per OpOverload: its kind, its rule, its C++ entry point.

FUNCTIONAL, VIEW, INPLACE, INPLACE_VIEW, OUT = ops.FUNCTIONAL, ops.VIEW, ops.INPLACE, ops.INPLACE_VIEW, ops.OUT
COLLECTIVE = "collective"


class OpEntry:
    __slots__ = ("func", "kind", "_rule", "_functional", "out_args", "call")

    def __init__(self, func):
        if getattr(func, "namespace", None) == "prims":
            func = ops.aten_twin(func) or func
        self.func = func
        self.call = getattr(func, "_op", func)  # the C++ entry point, without OpOverload.__call__
        self._rule = None
        self._functional = None
        self.kind, self.out_args = ops.kind_of(func)
        if registry.is_collective(func):
            self.kind = COLLECTIVE

    @property
    def rule(self):
        if self._rule is None:
            self._rule = registry.rule_for(self.func)
        return self._rule

    @property
    def functional(self):
        if self._functional is None:
            self._functional = ops.functional_variant(self.func)
        return self._functional


_entries = {}
_aten = torch.ops.aten


def entry_for(func):
    e = _entries.get(func)
    if e is None:
        e = _entries[func] = OpEntry(func)
    return e


def _forget_rule(op):
    """A rule was replaced (``register_jvp``): drop the cached one."""
    e = _entries.get(op)
    if e is not None:
        e._rule = None


registry.watch(_forget_rule)


# --------------------------------------------------------------------------
# The dispatch loop.


def _unwrap(args, kwargs, level=None):
    """``(level, primals, tangents, kwarg primals, kwarg tangents, any tangent nonzero)``.

    ``level`` is the deepest level among the duals in ``args`` and ``kwargs``;
    duals of that level are unwrapped, shallower ones pass through as
    constants.  One pass: the first dual sets the level, and a deeper one found
    later starts the pass again at that level (nesting is rare, so this is
    cheap).  Levels are compared by depth only when they differ.
    """
    primals = []
    tangents = []
    any_t = False
    for a in args:
        if isinstance(a, Dual):
            la = a._level
            if la != level:
                if level is None:
                    level = la
                elif _deeper(la, level):
                    return _unwrap(args, kwargs, la)
            if la == level:
                primals.append(a._primal)
                t = a._tangent if a._view is None else tangent_of(a)
                tangents.append(t)
                if t is not None:
                    any_t = True
                continue
        elif isinstance(a, (list, tuple)) and a:
            top = _top(a)
            if top is not None and top != level:
                if level is None:
                    level = top
                elif _deeper(top, level):
                    return _unwrap(args, kwargs, top)
            if top == level and top is not None:
                ps, ts = unwrap_list(a, level)
                sub = any(t is not None for t in ts)
                primals.append(ps)
                tangents.append(ts if sub else None)
                any_t = any_t or sub
                continue
        primals.append(a)
        tangents.append(None)
    if not kwargs:
        return level, primals, tangents, kwargs, registry.NO_KW_TANGENTS, any_t
    for a in kwargs.values():
        if isinstance(a, Dual) and a._level != level:
            if level is None or _deeper(a._level, level):
                return _unwrap(args, kwargs, a._level)
    pkwargs = {}
    tkwargs = {}
    for k, a in kwargs.items():
        if isinstance(a, Dual) and a._level == level:
            pkwargs[k] = a._primal
            t = tangent_of(a)
            if t is not None:
                tkwargs[k] = t
        else:
            pkwargs[k] = a
    return level, primals, tangents, pkwargs, tkwargs, any_t or bool(tkwargs)


def _top(items):
    """The deepest level among the duals in a list argument (``None`` if there are none)."""
    top = None
    for b in items:
        if isinstance(b, Dual) and b._level != top:
            if top is None or _deeper(b._level, top):
                top = b._level
    return top


def unwrap_list(items, level):
    """Primals and tangents (``None`` for zero) of ``items`` at ``level``."""
    primals, tangents = [], []
    for b in items:
        if isinstance(b, Dual) and b._level == level:
            primals.append(b._primal)
            tangents.append(tangent_of(b))
        else:
            primals.append(b)
            tangents.append(None)
    return primals, tangents


def _check(func, p, t):
    if t is not None and (t.shape != p.shape or t.dtype != p.dtype):
        raise AssertionError(
            f"fwdgrad rule for {func} returned a tangent of shape {tuple(t.shape)} and "
            f"dtype {t.dtype} for a primal of shape {tuple(p.shape)} and dtype {p.dtype}"
        )


def _fit(t, p):
    """Give a rule's tangent the primal's dtype and shape (rules may broadcast)."""
    if t.dtype != p.dtype:
        t = t.to(p.dtype)
    if t.shape != p.shape:
        t = t.expand(p.shape)
    return t


def _wrap(func, ans, tans, level):
    """Wrap an op's outputs as duals of ``level`` carrying the rule's tangents ``tans``
    (fitted to each primal; dropped where the primal cannot carry one)."""
    if isinstance(ans, torch.Tensor):
        if tans is not None:
            if ans.dtype not in _DIFFERENTIABLE:
                tans = None
            elif tans.dtype != ans.dtype or tans.shape != ans.shape:
                tans = _fit(tans, ans)
            if CHECK_TANGENTS:
                _check(func, ans, tans)
        return Dual(ans, tans, level)
    if isinstance(ans, (tuple, list)):
        if tans is None:
            tans = (None,) * len(ans)
        elif not isinstance(tans, (tuple, list)):
            raise TypeError(
                f"fwdgrad rule for {func} must return a tuple of {len(ans)} tangents, "
                f"got {type(tans).__name__}"
            )
        out = [
            _wrap(func, a, t, level) if isinstance(a, (torch.Tensor, list, tuple)) else a
            for a, t in zip(ans, tans)
        ]
        return type(ans)(out) if isinstance(ans, tuple) else out
    return ans


def _differentiable(ans):
    """Whether an op's output can carry a tangent (comparisons, argmax etc. cannot)."""
    if isinstance(ans, torch.Tensor):
        return ans.dtype in _DIFFERENTIABLE
    if isinstance(ans, (tuple, list)):
        return any(_differentiable(a) for a in ans)
    return False


def _tangents(targs, tkwargs):
    """``registry.Tangents`` without the Python-level constructor (the hot path)."""
    t = _new_tuple(_Tangents, targs)
    if tkwargs:
        t.kw = tkwargs
    return t


_Tangents = registry.Tangents
_new_tuple = tuple.__new__
_DIFFERENTIABLE = frozenset(
    d for d in vars(torch).values() if isinstance(d, torch.dtype) and (d.is_floating_point or d.is_complex)
)


def interpret(func, args, kwargs):
    """Run ``func`` on the primals of the top level among ``args``/``kwargs``, and its rule on their tangents."""
    entry = _entries.get(func)
    if entry is None:
        entry = entry_for(func)
    level, pargs, targs, pkwargs, tkwargs, any_t = _unwrap(args, kwargs)
    if any_t and not _fwd_grad_enabled() and torch.is_grad_enabled():
        # torch.autograd.forward_ad's switch is off (torch._C._set_fwd_grad_enabled):
        # as in torch.func, no tangent flows through this op.  Not where grad mode
        # is off too: that is how PyTorch runs an autograd.Function's forward (and
        # inference_mode), whose ops fwdgrad differentiates.
        any_t, targs, tkwargs = False, [None] * len(targs), registry.NO_KW_TANGENTS
        if entry.kind is VIEW:
            return _wrap(func, func(*pargs, **pkwargs), None, level)
    if functorch_stacks:
        layers = functorch_stacks.get(level)
        if layers is not None:
            return _in_layers(layers[0], func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t)
    return _run(func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t)


def _run(func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t, layered=False):
    with _restore_autograd():
        if layered:  # after restoring the caller's dispatch keys, which exclude functorch's
            _functorch_keys_on()
        if _any_autocast():
            # Restoring the caller's TLS re-enables autocast, which the primal
            # kernel never saw (the op was cast once, above this dispatch):
            # primal and tangent math run as the plain kernel would.
            with _ExcludeKeys(_AUTOCAST_KEYS):
                return _dispatch(func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t)
        return _dispatch(func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t)


_any_autocast = torch._C._is_any_autocast_enabled
_ExcludeKeys = torch._C._ExcludeDispatchKeyGuard
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
for _k in ("AutocastCUDA", "AutocastXPU", "AutocastMPS", "AutocastHPU", "AutocastIPU", "AutocastPrivateUse1"):
    if hasattr(torch._C.DispatchKey, _k):
        _AUTOCAST_KEYS = _AUTOCAST_KEYS | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _k))


def _dispatch(func, entry, args, kwargs, level, pargs, targs, pkwargs, tkwargs, any_t):
    kind = entry.kind
    if kind is FUNCTIONAL:
        ans = entry.call(*pargs, **pkwargs)
        if not any_t or not _differentiable(ans):
            return _wrap(func, ans, None, level)
        rule = entry._rule or entry.rule
        return _wrap(func, ans, rule(_tangents(targs, tkwargs), ans, *pargs, **pkwargs), level)
    if kind is VIEW:
        return _view(func, entry, args, pargs, pkwargs, targs, any_t, level)
    if kind is INPLACE:
        return _inplace(func, entry, args, pargs, pkwargs, targs, tkwargs, any_t, level)
    if kind is INPLACE_VIEW:
        return _inplace_view(func, entry, args, pargs, pkwargs, level)
    if kind is COLLECTIVE:
        return _collective(func, entry, args, pargs, pkwargs, targs, tkwargs, level)
    return _out(func, entry, kwargs, pargs, pkwargs, targs, tkwargs, level)


# --------------------------------------------------------------------------
# Levels started inside torch.func transforms (``fwdgrad/functorch_layers.py``
# starts and ends them).  By the time an op reaches ``__torch_dispatch__``
# functorch has popped its whole dynamic layer stack, but the primals of such
# a level are functorch wrappers (BatchedTensor, TensorWrapper) of the layers
# that were active when the level started.  The kernel and the rule run with
# those layers pushed back, so vmap's batching rules and grad's autograd see
# the ops on the primals and tangents.

functorch_stacks = {}  # level -> (its functorch DynamicLayers, top first; their level numbers)
_FRONT_MODE = torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode
_BACK_MODE = torch._C.DispatchKey.FuncTorchDynamicLayerBackMode
_included = torch._C._dispatch_tls_is_dispatch_key_included


def _functorch_keys_on():
    """Make the dispatcher enter functorch's layers again (until the enclosing
    TLS guard restores the caller's key sets)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (_FRONT_MODE, _BACK_MODE):
        if exclude.has(key):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    _ft._set_dynamic_layer_keys_included(True)


_functorch_hook = None  # level -> context manager for the ops run in its layers


def set_functorch_hook(hook):
    """``fwdgrad.functorch_layers`` lifts the wrappers that meet lower-level duals
    in rules and kernels run inside the layers (``hook(level)``)."""
    global _functorch_hook
    _functorch_hook = hook


def _in_layers(layers, func, entry, args, kwargs, level, *run_args):
    """``_run`` with ``layers`` pushed back onto functorch's stack."""
    was_included = _included(_FRONT_MODE)
    pushed = 0
    try:
        # Usually functorch has popped them all; push back those it has not.
        for layer in layers[::-1][_ft.get_dynamic_layer_stack_depth():]:
            _ft.push_dynamic_layer_stack(layer)
            pushed += 1
        with _functorch_hook(level):
            return _run(func, entry, args, kwargs, level, *run_args, layered=True)
    finally:
        for _ in range(pushed):
            _ft.pop_dynamic_layer_stack()
        _ft._set_dynamic_layer_keys_included(was_included)


def _view(func, entry, args, pargs, pkwargs, targs, any_t, level):
    base = args[0]
    if func is _aten_detach:
        return _saved_output(pargs[0], targs[0], level)
    ans = func(*pargs, **pkwargs)
    if not (isinstance(base, Dual) and base._level == level):
        # A view of a lower-level tensor that takes a tangent-carrying argument
        # (rare; e.g. view_as_real of a plain tensor is not one).  Treat as functional.
        tans = entry.rule(_tangents(targs, None), ans, *pargs, **pkwargs) if any_t else None
        return _wrap(func, ans, tans, level)
    rest = tuple(pargs[1:])
    base_t = targs[0]
    if isinstance(ans, torch.Tensor):
        d = Dual(ans, None, level, View(base, func, rest, pkwargs, None))
        if base_t is not None:
            d._tangent = view_tangent(func, base_t, pargs[0], rest, pkwargs)
            d._tangent_from = base_t
        return d
    outs = []
    derived = view_tangent(func, base_t, pargs[0], rest, pkwargs) if base_t is not None else None
    for i, a in enumerate(ans):
        d = Dual(a, None, level, View(base, func, rest, pkwargs, i))
        if derived is not None:
            d._tangent = derived[i]
            d._tangent_from = base_t
        outs.append(d)
    return type(ans)(outs) if isinstance(ans, tuple) else outs


_aten_detach = torch.ops.aten.detach.default


def _saved_output(primal, tangent, level):
    """Autograd's internal detach of a saved output: keep the tangent, and keep
    the inner autograd history (an alias, not a detach, underneath).

    The result is a root sharing the base's current tangent, not a view that
    refers to its base: autograd stores it in the base's own ``grad_fn``, so a
    reference back to the base would be a cycle through C++ that the garbage
    collector cannot see, leaking the graph whenever it is kept
    (``create_graph=True``, or a backward that raised).  Autograd's version
    counter forbids using the saved value after the base changes in place, so
    the tangent of the moment is the right one.
    """
    return Dual(torch.ops.aten.alias.default(primal), tangent, level)


def _root(d):
    while d._view is not None:
        d = d._view.base
    return d


def write_tangent(d, t):
    """Make ``t`` (``None`` for zero) the tangent of ``d`` after an in-place op on it.

    A root simply takes the new tangent, and its views derive theirs again.  A
    view writes into its root's tangent, which is first made private to the
    root (materialised, or copied if it may be shared), so that the base and
    every other view see the change.
    """
    if d._view is None:
        if t is not None:
            t = _fit(t, d._primal)
        d._tangent = t
        d._owns_tangent = False
        return
    root = _root(d)
    rt = root._tangent
    if rt is None and t is None:
        return
    if rt is None:
        root._tangent = torch.zeros_like(root._primal)
    elif not root._owns_tangent:
        root._tangent = rt.clone()
    root._owns_tangent = True
    st = tangent_of(d)
    if t is None:
        st.zero_()
    else:
        st.copy_(t)


def _inplace(func, entry, args, pargs, pkwargs, targs, tkwargs, any_t, level):
    self = args[0]
    self_is_dual = isinstance(self, Dual) and self._level == level
    if not any_t:
        func(*pargs, **pkwargs)
        return self
    if not self_is_dual:
        raise RuntimeError(
            f"fwdgrad: the in-place op {func} writes a value that carries a tangent into a "
            f"tensor that has none at this level (one created outside the transformed "
            f"function, or by a factory such as torch.zeros).  Build that tensor from the "
            f"function's inputs (e.g. torch.zeros_like(x)) or use the out-of-place op."
        )
    functional = entry.functional
    pargs = ops.fill_defaults(func, pargs)
    ans = functional(*pargs, **pkwargs)
    fentry = entry_for(functional)
    t = fentry.rule(_tangents(targs, tkwargs), ans, *pargs, **pkwargs)
    if isinstance(ans, (tuple, list)):
        ans, t = ans[0], (t[0] if t is not None else None)
    pargs[0].copy_(ans)
    if not (ans.is_floating_point() or ans.is_complex()):
        t = None
    write_tangent(self, t)
    return self


def _inplace_view(func, entry, args, pargs, pkwargs, level):
    """``squeeze_``, ``transpose_``, ``as_strided_``...: the dual becomes a view of its old self.

    The old state moves to a fresh dual (which takes over the tangent), the
    primal is replaced by the out-of-place view of the old primal, and the
    wrapper's own sizes and strides are changed by the same op.
    """
    self = args[0]
    view_func = entry.functional
    old = Dual(self._primal, self._tangent, level, self._view)
    old._tangent_from = self._tangent_from
    old._owns_tangent = self._owns_tangent
    rest = tuple(pargs[1:])
    self._primal = view_func(self._primal, *rest, **pkwargs)
    self._view = View(old, view_func, rest, pkwargs, None)
    self._tangent = None
    self._tangent_from = None
    self._owns_tangent = False
    with torch._C._DisableTorchDispatch():
        func(self, *rest, **pkwargs)
    return self


def _out(func, entry, kwargs, pargs, pkwargs, targs, tkwargs, level):
    functional = entry.functional
    fkwargs = {k: v for k, v in pkwargs.items() if k not in entry.out_args}
    ftk = _tangents(targs, {k: v for k, v in tkwargs.items() if k not in entry.out_args})
    ans = functional(*pargs, **fkwargs)
    t = entry_for(functional).rule(ftk, ans, *pargs, **fkwargs) if any(
        x is not None for x in targs
    ) or ftk.kw else None
    outs = [kwargs[name] for name in entry.out_args]
    anss = ans if isinstance(ans, (tuple, list)) else (ans,)
    ts = t if isinstance(t, (tuple, list)) else ((t,) if t is not None else (None,) * len(anss))
    for o, po, a, ti in zip(outs, (pkwargs[n] for n in entry.out_args), anss, ts):
        if po.shape != a.shape:
            po.resize_(a.shape)
        po.copy_(a)
        if isinstance(o, Dual) and o._level == level:
            write_tangent(o, ti if (a.is_floating_point() or a.is_complex()) else None)
        elif ti is not None:
            raise RuntimeError(
                f"fwdgrad: {func} writes a value that carries a tangent into an out= tensor "
                f"that has none at this level; use the out-of-place op."
            )
    return outs[0] if len(outs) == 1 else tuple(outs)


def _collective(func, entry, args, pargs, pkwargs, targs, tkwargs, level):
    """A ``torch.distributed`` collective: its rule runs the primal and the tangent
    collectives together, on every call, so that every rank issues the same ones
    whether or not its tangent is zero.  An in-place one writes the primals
    itself and names the arguments whose tangents it wrote."""
    ans, t = entry.rule(_tangents(targs, tkwargs), *pargs, **pkwargs)
    if not isinstance(t, dict):
        return _wrap(func, ans, t, level)
    for where, ti in t.items():
        pos, index = where if isinstance(where, tuple) else (where, None)
        d = args[pos] if index is None else args[pos][index]
        if isinstance(d, Dual) and d._level == level:
            write_tangent(d, ti)
        else:
            raise RuntimeError(
                f"fwdgrad: the collective {func} writes into a tensor that is not a dual of this "
                f"transform; build it from the function's inputs (e.g. torch.empty_like(x))"
            )
    # The op's result holds the written primals: hand back their duals instead.
    duals = {}
    for a in args:
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, Dual) and b._level == level:
                duals[id(b._primal)] = b
    return _rewrap(ans, duals)


def _rewrap(x, duals):
    if isinstance(x, torch.Tensor):
        return duals.get(id(x), x)
    if isinstance(x, (list, tuple)):
        out = [_rewrap(y, duals) for y in x]
        return tuple(out) if isinstance(x, tuple) else out
    return x
