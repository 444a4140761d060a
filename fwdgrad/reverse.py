"""Composition with reverse mode: ``grad``, ``value_and_grad``, and forward-over-reverse ``hvp``.

``grad`` is a thin wrapper over ``torch.autograd.grad``.  Inside a fwdgrad
transform the function's inputs are duals, so the backward pass that
``torch.autograd.grad`` runs goes through the interpreter and the gradient
comes back carrying its own tangent: forward over reverse.  The graph of the
backward pass itself is built (``create_graph``) only when something outside
may differentiate the gradient again.

``hvp`` is Pearlmutter's Hessian-vector product computed that way in one pass:
the parameters become duals whose tangent is ``v``, the loss and its gradient
are computed once, and the tangent of the gradient is ``H v``.  With a closure
``loss()`` the live parameter objects are turned into duals in place
(``torch.utils.swap_tensors``) for the duration of the call.
"""

import functools
import gc
import inspect
import traceback

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from . import fsdp, interpreter
from .arguments import (
    check_argnums, check_callable, check_scalar_output, is_float, normal_mode, primal_and_tangent, split_aux,
    usable,
)
from .distributed import check_group, ddp_holding, watch_forwards, weighted_mean
from .dtensor import check_layout, is_dtensor, storage_ptr
from .errors import ArgumentTypeError, ArgumentValueError
from .functorch_layers import inside_functorch, level_scope, lift_input
from .functorch_layers import strip as functorch_strip
from .interpreter import Dual, strip
from .state import Deferred, State

_aten_detach = torch.ops.aten.detach.default


def detach_keeping_tangents(x):
    """``x`` without autograd history at the outermost level, but with its tangents.

    ``x.detach()`` drops tangents (that is what a user's detach means).  The
    aten op called directly is the route autograd uses for saved outputs, and
    the interpreter keeps the tangent for it.
    """
    return _aten_detach(x)


# --------------------------------------------------------------------------
# grad and value_and_grad.


def _input_leaf(x):
    """A fresh tensor to differentiate with respect to, equal to ``x`` with its tangents.

    If ``x`` already takes part in a graph, the new tensor is a view of it, so
    that an enclosing ``grad`` can differentiate through this one; otherwise it
    is a new leaf.  Either way gradients w.r.t. the new tensor count only the
    uses of this argument, not other uses of ``x`` (captured by a closure).
    """
    if x.requires_grad:
        return x.view_as(x)
    return detach_keeping_tangents(usable(x)).requires_grad_()


def _reaches_other_leaves(out, inputs):
    """Whether ``out``'s graph leads to a leaf other than ``inputs`` (a captured parameter)."""
    ours = {id(x) for x in inputs}
    seen = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad
        if variable is not None:
            if id(variable) not in ours:
                return True
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def _checked_leaves(args, nums, name):
    """The tensor leaves (and tree specs) of the arguments picked by ``argnums``, checked."""
    specs, leaves_per_arg = [], []
    for n in nums:
        leaves, spec = pytree.tree_flatten(args[n])
        for path, leaf in pytree.tree_flatten_with_path(args[n])[0]:
            where = f"argument {n}" + "".join(str(k) for k in path)
            if not isinstance(leaf, torch.Tensor):
                raise ArgumentTypeError(f"{name}: {where} is a {type(leaf).__name__}; only tensors can be differentiated")
            if not is_float(leaf):
                raise ArgumentTypeError(
                    f"{name}: {where} has dtype {leaf.dtype}; only floating-point or complex "
                    f"tensors can be differentiated"
                )
        specs.append(spec)
        leaves_per_arg.append(leaves)
    return specs, leaves_per_arg


def _fresh_inputs(args, nums, leaves_per_arg, specs):
    """Put fresh autograd leaves (``_input_leaf``) in ``args`` for the picked arguments; return them flat."""
    inputs = []
    for n, leaves, spec in zip(nums, leaves_per_arg, specs):
        fresh = [_input_leaf(x) for x in leaves]
        inputs.extend(fresh)
        args[n] = pytree.tree_unflatten(fresh, spec)
    return inputs


def _value_and_grad(func, argnums, has_aux, args, kwargs, name, process_group=None, weight=None):
    nums, many = check_argnums(argnums, len(args), name), isinstance(argnums, tuple)
    args = list(args)
    specs, leaves_per_arg = _checked_leaves(args, nums, name)
    flat = [x for leaves in leaves_per_arg for x in leaves]
    sharded = fsdp.owners(flat)  # FSDP2 parameters: differentiated as full tensors (see fsdp)
    if sharded and process_group is None:
        process_group = fsdp.mesh_group([p for _, p in sharded.values()], name)
    group, weight = check_group(process_group, weight, name)
    if inside_functorch():
        _check_no_group_inside_functorch(group, name)
        return _functorch_value_and_grad(func, argnums, has_aux, args, kwargs, name)
    if sharded:
        full = iter([fsdp.gather(x.detach()) if i in sharded else x for i, x in enumerate(flat)])
        leaves_per_arg = [[next(full) for _ in leaves] for leaves in leaves_per_arg]
    outer_grad = torch.is_grad_enabled()
    originals = [x for leaves in leaves_per_arg for x in leaves]
    with torch.enable_grad():
        inputs = _fresh_inputs(args, nums, leaves_per_arg, specs)
        with watch_forwards() as ddps, fsdp.unsharded(_stand_ins(sharded, inputs), name):
            out = func(*args, **kwargs)
        out, aux = split_aux(out, has_aux, name)
        check_scalar_output(out, name)
        # Keep the graph of the backward pass only if someone may differentiate
        # the gradient again: an enclosing grad (or jvp over params that require
        # grad), or a captured tensor that requires grad.
        create_graph = outer_grad and (
            any(x.requires_grad for x in originals) or _reaches_other_leaves(out, inputs)
        )
        if ddps is not None:
            ddps.check_reduced(group, name)
        if group is not None and create_graph:
            raise NotImplementedError(
                f"{name}: with process_group=, the gradient cannot be differentiated again by "
                f"reverse mode (the all-reduce is not recorded by autograd); forward mode over it "
                f"(fwdgrad.jvp, fwdgrad.hvp) works"
            )
        if out.requires_grad:
            try:
                grads = torch.autograd.grad(
                    out, inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
                )
            except BaseException as e:
                _free_graph(e)
                raise
        else:
            grads = [torch.zeros_like(x) for x in inputs]
    if not create_graph:
        out = detach_keeping_tangents(out)
        aux = pytree.tree_map_only(torch.Tensor, detach_keeping_tangents, aux)
    if group is not None:
        out, *grads = weighted_mean([out, *grads], group, weight, name)
    for i in sharded:  # back to the parameters' layout
        grads[i] = fsdp.shard_like(grads[i], flat[i])
    grads = iter(grads)
    results = []
    for leaves, spec in zip(leaves_per_arg, specs):
        results.append(pytree.tree_unflatten([next(grads) for _ in leaves], spec))
    g = tuple(results) if many else results[0]
    return out, g, aux


def _check_no_group_inside_functorch(group, name):
    if group is not None:
        raise NotImplementedError(
            f"{name}: process_group= cannot be used inside a torch.func transform (the all-reduce "
            f"would see functorch's wrappers, not tensors); call {name} with process_group= outside "
            f"it, or reduce the transform's results yourself"
        )


def _functorch_value_and_grad(func, argnums, has_aux, args, kwargs, name):
    """Inside a torch.func transform autograd must be functorch's own (plain
    ``torch.autograd.grad`` and ``requires_grad_`` are refused there), so the
    gradient is ``torch.func.grad_and_value``'s.  Its wrappers sit above any
    fwdgrad dual in ``args``, so forward over reverse still works."""

    def scalar(*a):
        out, aux = split_aux(func(*a, **kwargs), has_aux, name)
        check_scalar_output(out, name)
        return (out, aux) if has_aux else out

    g, value = torch.func.grad_and_value(scalar, argnums, has_aux=has_aux)(*args)
    out, aux = value if has_aux else (value, None)
    return out, g, aux


def jacobian_by_reverse(func, argnums, name):
    """``func``'s Jacobian by reverse mode, in ``torch.func.jacrev``'s layout: for each
    output leaf, the arguments' structure (a tuple for a tuple ``argnums``) of
    tensors shaped ``output.shape + input.shape``.  One forward pass and one
    backward pass per output element; ``hessian``'s inner half."""

    @functools.wraps(func)
    def jac(*args):
        if inside_functorch():
            return torch.func.jacrev(func, argnums)(*args)
        nums = check_argnums(argnums, len(args), name)
        args = list(args)
        specs, leaves_per_arg = _checked_leaves(args, nums, name)
        outer_grad = torch.is_grad_enabled()
        originals = [x for leaves in leaves_per_arg for x in leaves]
        with torch.enable_grad():
            inputs = _fresh_inputs(args, nums, leaves_per_arg, specs)
            out = func(*args)
            out_leaves, out_spec = pytree.tree_flatten(out)
            if not out_leaves or not all(isinstance(o, torch.Tensor) and is_float(o) for o in out_leaves):
                raise ArgumentTypeError(
                    f"{name}: func must return a floating-point tensor or a non-empty pytree of them"
                )
            create_graph = outer_grad and (
                any(x.requires_grad for x in originals)
                or any(o.requires_grad and _reaches_other_leaves(o, inputs) for o in out_leaves)
            )
            per_out = [_jacobian_rows(o, inputs, create_graph) for o in out_leaves]
        results = []
        for rows in per_out:
            it = iter(rows)
            per_arg = [pytree.tree_unflatten([next(it) for _ in leaves], spec)
                       for leaves, spec in zip(leaves_per_arg, specs)]
            results.append(tuple(per_arg) if isinstance(argnums, tuple) else per_arg[0])
        return pytree.tree_unflatten(results, out_spec)

    return jac


def _jacobian_rows(out, inputs, create_graph):
    """``d out / d input`` for each input, shaped ``out.shape + input.shape``."""
    flat = out.reshape(-1)
    rows = []
    for j in range(flat.numel()):
        if flat.requires_grad:
            rows.append(torch.autograd.grad(
                flat[j], inputs, retain_graph=True, create_graph=create_graph,
                allow_unused=True, materialize_grads=True,
            ))
        else:
            rows.append([torch.zeros_like(x) for x in inputs])
    jacs = []
    for k, x in enumerate(inputs):
        if rows:
            jk = torch.stack([r[k] for r in rows]).reshape(*out.shape, *x.shape)
        else:
            jk = x.new_zeros((*out.shape, *x.shape))
        jacs.append(jk if create_graph else detach_keeping_tangents(jk))
    return jacs


def grad(func, argnums=0, *, has_aux=False, process_group=None, weight=None):
    """Reverse-mode gradient of a scalar-valued ``func``, as a function (``torch.func.grad``'s interface).

    ``grad(f)(x)`` is ``df/dx``; ``argnums`` (an int or a tuple of ints) picks
    the positional arguments to differentiate, each a tensor or a pytree of
    tensors.  With ``has_aux=True``, ``func`` returns ``(output, aux)`` and the
    result is ``(gradient, aux)``.  It composes with fwdgrad's transforms in
    both directions (``jvp(grad(f))`` is forward over reverse) and with itself.

    With ``process_group=`` (a ``torch.distributed`` group) each rank passes
    its own shard, and the gradient is that of the global mean of the ranks'
    losses, weighted by each rank's ``weight=`` (default 1; see
    :doc:`distributed`).

    >>> import torch, fwdgrad
    >>> x = torch.tensor([1.0, 2.0])
    >>> fwdgrad.grad(lambda x: (x ** 3).sum())(x)
    tensor([ 3., 12.])
    """
    name = "grad"
    check_callable(func, name)

    @functools.wraps(func)
    @normal_mode
    def grad_f(*args, **kwargs):
        with State(func).undone_on_error():
            _, g, aux = _value_and_grad(func, argnums, has_aux, args, kwargs, name, process_group, weight)
        return (g, aux) if has_aux else g

    return grad_f


def value_and_grad(func, argnums=0, *, has_aux=False, process_group=None, weight=None):
    """Like :func:`grad`, but the function returns ``(value, gradient)`` from the same pass.

    With ``has_aux=True`` it returns ``((value, aux), gradient)`` (JAX's convention).
    ``process_group=`` and ``weight=`` reduce the value and the gradient as in :func:`grad`.

    >>> import torch, fwdgrad
    >>> v, g = fwdgrad.value_and_grad(lambda x: (x ** 2).sum())(torch.tensor([1.0, 2.0]))
    >>> float(v), g
    (5.0, tensor([2., 4.]))
    """
    name = "value_and_grad"
    check_callable(func, name)

    @functools.wraps(func)
    @normal_mode
    def value_and_grad_f(*args, **kwargs):
        with State(func).undone_on_error():
            out, g, aux = _value_and_grad(func, argnums, has_aux, args, kwargs, name, process_group, weight)
        return ((out, aux), g) if has_aux else (out, g)

    return value_and_grad_f


# --------------------------------------------------------------------------
# hvp and value_grad_and_hvp.


def _flatten_params(params, v, name):
    """Leaves of ``params`` and ``v`` (checked to match exactly), and a function to rebuild."""
    if isinstance(params, torch.Tensor):
        if not isinstance(v, torch.Tensor):
            raise ArgumentTypeError(f"{name}: params is a tensor, so v must be a tensor, got {type(v).__name__}")
        keys, p_leaves, v_leaves = [""], [params], [v]

        def rebuild(xs):
            return xs[0]

    elif isinstance(params, dict):
        if not isinstance(v, dict):
            raise ArgumentTypeError(f"{name}: params is a dict, so v must be a dict with the same keys, got {type(v).__name__}")
        missing = [k for k in params if k not in v]
        extra = [k for k in v if k not in params]
        if missing or extra:
            raise ArgumentValueError(
                f"{name}: v must have exactly the keys of params; missing {missing}, unexpected {extra}"
            )
        names = list(params)
        keys = [f"[{k!r}]" for k in names]
        p_leaves = [params[k] for k in names]
        v_leaves = [v[k] for k in names]

        def rebuild(xs):
            return dict(zip(names, xs))

    elif isinstance(params, (list, tuple)):
        if not isinstance(v, (list, tuple)):
            raise ArgumentTypeError(
                f"{name}: params is a {type(params).__name__}, so v must be a sequence of the same "
                f"length, got {type(v).__name__}"
            )
        if len(v) != len(params):
            raise ArgumentValueError(f"{name}: params has {len(params)} tensors but v has {len(v)}")
        keys = [f"[{i}]" for i in range(len(params))]
        p_leaves, v_leaves = list(params), list(v)
        kind = type(params)

        def rebuild(xs):
            return kind(xs)

    else:
        raise ArgumentTypeError(
            f"{name}: params must be a tensor, a list/tuple of tensors or a dict of tensors, got "
            f"{type(params).__name__} (for a model, pass dict(model.named_parameters()) or "
            f"list(model.parameters()))"
        )
    if not p_leaves:
        raise ArgumentValueError(f"{name}: params is empty")
    for k, p, t in zip(keys, p_leaves, v_leaves):
        if not isinstance(p, torch.Tensor):
            raise ArgumentTypeError(f"{name}: params{k} is a {type(p).__name__}, expected a tensor")
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name}: v{k} is a {type(t).__name__}, expected a tensor")
        if not is_float(p):
            raise ArgumentTypeError(f"{name}: params{k} has dtype {p.dtype}; only floating-point parameters have a Hessian")
        if t.shape != p.shape:
            raise ArgumentValueError(f"{name}: v{k} has shape {tuple(t.shape)} but params{k} has shape {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise ArgumentValueError(f"{name}: v{k} has dtype {t.dtype} but params{k} has dtype {p.dtype}")
        if t.device != p.device:
            raise ArgumentValueError(f"{name}: v{k} is on {t.device} but params{k} is on {p.device}")
        check_layout(name, f"params{k}", p, t)
    return keys, p_leaves, v_leaves, rebuild


def _is_closure(loss, pure_args):
    """Whether ``loss`` takes no arguments (it reads the parameters where they live)."""
    try:
        sig = inspect.signature(loss)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind()
    except TypeError:
        return False
    try:
        sig.bind(*pure_args)
    except TypeError:
        return True
    return False


def _scalar_loss(out, name):
    check_scalar_output(out, name, "loss", any_shape=True)
    return out


def _loss_and_grads(loss, call_args, inputs, level, name):
    """Run ``loss`` and autograd on duals; return plain ``(value, grads, Hvs)``.

    Kept in its own frame so that nothing here outlives the call: the closure
    form can swap the parameters back only once the graph is gone.
    """
    functorch = inside_functorch()
    with torch.enable_grad():
        if functorch and call_args:
            out, grads = _functorch_loss_and_grads(loss, call_args, inputs, name)
        else:
            out = _scalar_loss(loss(*call_args), name)
            if out.requires_grad:
                grads = torch.autograd.grad(out, inputs, allow_unused=True)
            else:
                grads = (None,) * len(inputs)
    value = out._primal if isinstance(out, Dual) and out._level == level else out
    gs, hvs = [], []
    for x, g in zip(inputs, grads):
        if isinstance(g, Dual) and g._level == level:
            p, t = primal_and_tangent(g)
            gs.append(p)
            hvs.append(t)
        else:
            gs.append(g)
            hvs.append(None)
    if functorch:  # the graphs are the enclosing torch.func transforms'
        return value, gs, hvs
    # Results carry no graph (a loss that captures tensors requiring grad would
    # give the value one); lower-level tangents, if any, stay.
    return (
        _no_graph(value),
        [_no_graph(g) for g in gs],
        [_no_graph(h) for h in hvs],
    )


def _functorch_loss_and_grads(loss, call_args, inputs, name):
    """The pure form inside a torch.func transform: the gradient is
    ``torch.func.grad_and_value``'s (see ``_functorch_value_and_grad``)."""

    def of_inputs(*xs):
        by_id = {id(d): x for d, x in zip(inputs, xs)}
        args = pytree.tree_map_only(torch.Tensor, lambda t: by_id.get(id(t), t), call_args)
        return _scalar_loss(loss(*args), name)

    grads, out = torch.func.grad_and_value(of_inputs, argnums=tuple(range(len(inputs))))(*inputs)
    return functorch_strip(out), [functorch_strip(g) for g in grads]


def _no_graph(t):
    if t is not None and t.requires_grad:
        return detach_keeping_tangents(t)
    return t


def _own(t, like, foreign):
    """``t`` as a result the caller may modify: zeros if absent, copied if it aliases an input."""
    if t is None:
        return torch.zeros_like(like)
    ptr = None if foreign is None else _storage_ptr(t)
    if ptr is None or t.stride() != like.stride() or ptr in foreign:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _storage_ptr(t):
    t = strip(t)
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return None  # no storage to compare (inside torch.func): _own copies
    return storage_ptr(t)


@normal_mode
def _forward_over_reverse(loss, params, v, name, process_group=None, weight=None):
    """One forward-over-reverse pass: ``(value, grads, Hvs)``.

    Under ``torch.compile`` it is traced into the graph when Dynamo traces
    ``torch.autograd.grad`` (``torch._dynamo.config.trace_autograd_ops``);
    otherwise it runs eagerly behind one graph break: a graph that ended
    before ``autograd.grad`` would differentiate compiled code whose backward
    cannot take dual cotangents.
    """
    if torch.compiler.is_compiling() and not torch._dynamo.config.trace_autograd_ops:
        return _forward_over_reverse_eager(loss, params, v, name, process_group, weight)
    check_callable(loss, name, "loss")
    keys, p_leaves, v_leaves, rebuild = _flatten_params(params, v, name)
    sharded = fsdp.owners(p_leaves)  # {leaf index: (FSDP2 root, its parameter)}
    if sharded and process_group is None:
        # The parameters' shards live across the mesh: only the global loss's result is meaningful.
        process_group = fsdp.mesh_group([p for _, p in sharded.values()], name)
    group, weight = check_group(process_group, weight, name)
    if isinstance(params, (list, tuple)):
        pure_args = p_leaves
    else:
        pure_args = [params]
    closure = _is_closure(loss, pure_args)
    if closure and any(is_dtensor(p) for i, p in enumerate(p_leaves) if i not in sharded):
        raise NotImplementedError(
            f"{name}: the closure form cannot swap DTensor parameters (distribute_module, "
            f"distribute_tensor) for duals; use the pure form, e.g. loss(params) with "
            f"torch.func.functional_call"
        )
    if closure and sharded and len(sharded) != len(p_leaves):
        raise NotImplementedError(
            f"{name}: the closure form takes an FSDP2 model's parameters alone; "
            f"{len(p_leaves) - len(sharded)} of params are not that model's sharded parameters "
            f"(use the pure form for a mix)"
        )
    held = frozenset()
    if closure and any(p._use_count() > 1 for p in p_leaves):
        # DDP's reducer holds its parameters for good: not a pending graph.
        ddp = ddp_holding(p_leaves)
        if ddp is not None:
            held = frozenset(id(p) for p in p_leaves)
            if group is None:
                group, weight = check_group(ddp.process_group, None, name)
    if group is not None and inside_functorch():
        _check_no_group_inside_functorch(group, name)
    # A direction that is itself a parameter object (v = params, for H @ w) would
    # become its own dual when the closure form swaps that object: use an alias.
    v_leaves = [usable(t.detach()) if any(t is p for p in p_leaves) else usable(t) for t in v_leaves]
    # FSDP2 parameters: the duals are over the full (all-gathered) tensors.
    primals = [fsdp.gather(p) if i in sharded else p for i, p in enumerate(p_leaves)]
    v_leaves = [fsdp.gather(t) if i in sharded else t for i, t in enumerate(v_leaves)]
    with level_scope() as level, State(loss).undone_on_error(), watch_forwards() as ddps:
        duals = [
            Dual(_hvp_primal(usable(p), level), t, level, requires_grad=True)
            for p, t in zip(primals, v_leaves)
        ]
        if closure and not sharded:
            value, gs, hvs = _in_closure(loss, keys, p_leaves, duals, level, name, held)
        else:
            call_args = () if closure else duals if isinstance(params, (list, tuple)) else [rebuild(duals)]
            unsharded = fsdp.unsharded(_stand_ins(sharded, duals), name)
            try:
                with unsharded:
                    value, gs, hvs = _loss_and_grads(loss, call_args, duals, level, name)
            except BaseException as e:
                del call_args, unsharded
                _free_graph(e)
                raise
            del unsharded
        del duals
    if ddps is not None:
        ddps.check_reduced(group, name)
    if group is not None:
        n = len(p_leaves)
        gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, primals)]
        hvs = [torch.zeros_like(p) if h is None else h for h, p in zip(hvs, primals)]
        value, *rest = weighted_mean([value, *gs, *hvs], group, weight, name)
        gs, hvs = rest[:n], rest[n:]
    for i in sharded:  # back to the parameters' layout
        gs[i], hvs[i] = fsdp.shard_like(gs[i], p_leaves[i]), fsdp.shard_like(hvs[i], p_leaves[i])
    # Under torch.compile storages have no address to compare: copy every result.
    foreign = None if torch.compiler.is_compiling() else {_storage_ptr(x) for x in p_leaves + v_leaves}
    grads = [_own(g, p, foreign) for g, p in zip(gs, p_leaves)]
    hvps = [_own(h, p, foreign) for h, p in zip(hvs, p_leaves)]
    return value, rebuild(grads), rebuild(hvps)


_forward_over_reverse_eager = torch.compiler.disable(_forward_over_reverse)


def _stand_ins(sharded, duals):
    """``fsdp.unsharded``'s map: each FSDP2 parameter's dual.  (A comprehension over
    ``duals`` inside ``_forward_over_reverse`` would make it a cell, which Dynamo cannot delete.)"""
    return {id(p): (model, duals[i]) for i, (model, p) in sharded.items()}


def _hvp_primal(p, level):
    """The primal of a parameter's dual: detached (hvp is not differentiable), but
    inside a torch.func transform kept as it is, for the enclosing transforms."""
    if interpreter.functorch_stacks.get(level) is not None and torch._C._functorch.is_functorch_wrapped_tensor(p):
        return lift_input(p, level)
    return detach_keeping_tangents(p)


def _in_closure(loss, keys, params, duals, level, name, held=frozenset()):
    """Run the closure with each live parameter object temporarily turned into its dual.

    Whatever happens (an exception or a ``KeyboardInterrupt`` at any point),
    every parameter is swapped back: the swaps and their bookkeeping run with
    SIGINT deferred (``Deferred``), and on an exception the partial graph is
    freed before the swap back.  ``held``: ids of parameters that a DDP
    reducer holds; those references are not a pending graph (the reducer goes
    on seeing the original tensors, which the swap moves to the duals' objects
    and back).
    """
    check_swappable([f"params{k}" for k in keys], params, name, held)
    return run_swapped(params, duals, lambda: _loss_and_grads(loss, (), params, level, name), name, held)


def check_swappable(names, params, name, held=frozenset()):
    """Refuse a closure form whose parameters cannot be swapped: one given twice, or one
    that something other than ``held`` (a DDP reducer) references from C++."""
    seen = set()
    for where, p in zip(names, params):
        if id(p) in seen:
            raise ArgumentValueError(f"{name}: {where} appears twice in params")
        seen.add(id(p))
        holder = None if id(p) in held else _holder(p)
        if holder is not None:
            raise RuntimeError(
                f"{name}: cannot use {where} in the closure form: {holder}.  Call {name} "
                f"before building that graph (or free it), or use the pure form."
            )


def run_swapped(params, replacements, body, name, held=frozenset()):
    """``body()`` with each parameter object swapped with its replacement, swapped back
    whatever happens (the swaps and their bookkeeping with SIGINT deferred)."""
    swapped = []  # (param, replacement, hook handle or None), in swap order
    raised = False
    try:
        with Deferred():
            for p, r in zip(params, replacements):
                swapped.append((p, r, _swap(p, r, force=id(p) in held)))
        return body()
    except BaseException as e:
        # The traceback's frames hold the partial graph, which holds the
        # parameters; free it so that they can be swapped back.
        raised = True
        _free_graph(e)
        raise
    finally:
        with Deferred():
            _swap_all_back(swapped, name, force=raised, held=held)


def _free_graph(e):
    """After ``e`` was raised inside a call: free the partial graph (which holds the parameters).

    The traceback's frames hold it.  When the error came out of a backward
    pass, autograd's engine also keeps its last graph task (and with it the
    graph) until the next backward pass on the thread: run a tiny one.
    """
    # Also the exceptions it was raised from or while handling: a missing rule
    # is reported ``from None``, but its context, and that traceback, stay attached.
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
    with _disable_current_modes(), torch.enable_grad():
        leaf = torch.zeros((), requires_grad=True)
        torch.autograd.grad(leaf * 1.0, leaf)
    gc.collect()


def _swap_all_back(swapped, name, force, held=frozenset()):
    failed = []
    for p, d, hook in reversed(swapped):
        try:
            if id(p) in held:  # the DDP reducer's references are expected
                _swap(p, d, block=False, force=True)
            else:
                _swap_back(p, d, name, force)
        except RuntimeError as e:
            failed.append(e)  # restore the others before reporting
            continue
        if hook is not None:
            hook.remove()
    if failed:
        raise failed[0]


def _holder(t):
    """Why ``t`` cannot be swapped now (``None`` if it can).

    The Python object holds one reference to its C++ tensor.  A leaf's
    gradient accumulator holds one more while a graph that used it is alive
    (``torch.optim.LBFGS`` keeps the last loss, and with it its graph, after
    ``backward``); that node cannot run during the swap (``_swap`` blocks it),
    so it is harmless.  Any other reference (a graph that saved the tensor and
    has not run its backward, DDP's reducer) is not.
    """
    n = t._use_count()
    if n == 1 or (n == 2 and t.is_leaf and t.requires_grad and _accumulator_holds(t)):
        return None
    return (
        f"another reference to it is alive ({n - 1} from C++: an autograd graph that saved it, "
        f"such as a loss whose backward has not run or a graph kept with retain_graph=True, or a "
        f"wrapper such as DistributedDataParallel that holds its parameters)"
    )


def _accumulator_holds(t):
    """Whether the extra reference to the leaf ``t`` is its live gradient accumulator."""
    node = torch.autograd.graph.get_gradient_edge(t).node
    return t._use_count() == 2 and node is not None


def _poisoned(grad_outputs):
    raise RuntimeError(
        "fwdgrad.hvp: this graph used a parameter while hvp had turned it into a dual "
        "(closure form); it cannot be differentiated during that call"
    )


def _swap(t1, t2, block=True, force=False):
    """Exchange the contents of two tensor objects, keeping their identities.

    Like ``torch.utils.swap_tensors``, but weak references are allowed: a weak
    reference to a parameter (``nn.LSTM`` keeps them) goes on pointing at the
    same object, which is what the temporary swap of the closure form needs.
    A leaf held by the gradient accumulator of a live graph (``_holder``) gets
    a hook (with ``block``) that stops that graph's backward while the swap lasts; the hook's
    handle is returned (``None`` if none was needed), to be removed after the
    swap back.
    """
    hook = None
    for t in () if force else (t1, t2):
        why = _holder(t)
        if why is not None:
            raise RuntimeError(f"a tensor to swap is held elsewhere: {why}")
        if block and t._use_count() == 2:
            node = torch.autograd.graph.get_gradient_edge(t).node
            hook = node.register_prehook(_poisoned)
    for attr in ("__class__", "__dict__"):
        tmp = getattr(t1, attr)
        setattr(t1, attr, getattr(t2, attr))
        setattr(t2, attr, tmp)
    torch._C._swap_tensor_impl(t1, t2)
    return hook


def _swap_back(p, d, name, force):
    """Swap ``p`` back.  ``force`` (the call raised): even if C++ still holds
    the dual's tensor.  What holds it then is a graph that a backward pass
    interrupted part-way left behind, unreachable from Python, so it can
    never run on the swapped tensors; the parameter must come back regardless.
    """
    try:
        _swap(p, d, block=False)
    except RuntimeError:
        gc.collect()
        try:
            _swap(p, d, block=False, force=force)
        except RuntimeError as e:
            raise RuntimeError(
                f"{name}: could not restore a parameter after the closure ran, because a "
                f"reference to it taken during the call is still alive (an output or graph "
                f"stored by the closure?): {e}"
            ) from None


def hvp(loss, params, v, *, process_group=None, weight=None):
    """The unbatched ``H v`` of :func:`fwdgrad.hvp` (whose docstring is the contract),
    from one forward-over-reverse pass."""
    return _forward_over_reverse(loss, params, v, "hvp", process_group, weight)[2]


def value_grad_and_hvp(loss, params, v, *, process_group=None, weight=None):
    """``(loss_value, grad, H v)`` from the single forward-over-reverse pass of :func:`fwdgrad.hvp`.

    The gradient is the primal of that pass, so it costs nothing extra.
    ``process_group=`` and ``weight=`` reduce all three as in :func:`fwdgrad.hvp`.

    >>> import torch, fwdgrad
    >>> w = torch.tensor([1.0, 2.0])
    >>> value, g, hv = fwdgrad.value_grad_and_hvp(lambda w: (w ** 3).sum(), w, torch.ones(2))
    >>> float(value), g, hv
    (9.0, tensor([ 3., 12.]), tensor([ 6., 12.]))
    """
    return _forward_over_reverse(loss, params, v, "value_grad_and_hvp", process_group, weight)


__all__ = ["grad", "value_and_grad", "hvp", "value_grad_and_hvp", "jacobian_by_reverse"]
