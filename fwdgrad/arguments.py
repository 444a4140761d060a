"""What crosses a transform's boundary: argument checks, pytrees, and lifting to and from a level.

The layer between the interpreter and the public transforms.  Inputs are
checked here (with errors that name the argument as the user wrote it),
lifted to duals of a fresh level, and the outputs lowered back to
``(primal, tangent)`` pairs.
"""

import functools
import inspect

import torch
from torch.utils import _pytree as pytree

from . import fsdp
from .dtensor import check_layout
from .errors import ArgumentTypeError, ArgumentValueError
from .functorch_layers import lift_input, strip
from .interpreter import Dual, tangent_of

try:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
except ImportError:  # no torch.distributed in this build
    AsyncCollectiveTensor = ()


def is_float(x):
    return x.is_floating_point() or x.is_complex()


def check_outside_functorch(name):
    """Refuse to start ``name`` inside a torch.func transform (vmap, grad, jacrev, ...).

    For the products that are not yet carried through functorch's layers (the
    batched hvp and the Gauss-Newton/Fisher products): their several passes
    would see functorch's wrappers without the layers fwdgrad's levels record.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(
            f"{name}: cannot run inside a torch.func transform (vmap, grad, jacrev, ...) yet.  "
            f"Call it outside, or use fwdgrad.hvp (unbatched), which works inside torch.func: "
            f"torch.func.vmap(lambda v: fwdgrad.hvp(loss, params, v))(V)."
        )


def normal_mode(transform):
    """Run a transform outside any ``torch.inference_mode`` of the caller.

    Under inference mode every tensor made is an inference tensor: no version
    counter (the recorder reads it) and no autograd (hvp and grad need it), so
    a transform run there gives zeros or crashes.  A transform's own work runs
    in normal mode, whatever the caller's mode, as in torch.func; its results
    are ordinary tensors.
    """

    @functools.wraps(transform)
    def run(*args, **kwargs):
        # (torch.compile traces no inference mode, and cannot ask about it)
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return transform(*args, **kwargs)
        with torch.inference_mode(False):
            return transform(*args, **kwargs)

    return run


def usable(x):
    """``x``, or a normal copy of it if it is an inference tensor (one that autograd
    cannot save and that has no version counter)."""
    if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling() and x.is_inference():
        with torch.inference_mode(False):
            return x.clone()
    return x


def usable_tree(tree):
    """``usable`` on every tensor of a pytree."""
    return pytree.tree_map_only(torch.Tensor, usable, tree)


def check_callable(func, name, what="func"):
    if not callable(func):
        raise ArgumentTypeError(f"{name}: {what} must be callable, got {type(func).__name__}")


def kind(x):
    """``x``'s type for an error message."""
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return "a Tensor"
    return f"a {type(x).__name__}"


def describe(path):
    return "".join(str(k) for k in path)


def check_argnums(argnums, n_args, name):
    """``argnums`` (an int or a tuple of ints) as a list of non-negative positions."""
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise ArgumentTypeError(f"{name}: argnums must be int or Tuple[int, ...], got {type(argnums).__name__}")
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if not nums:
        raise ArgumentValueError(f"{name}: argnums must be non-empty, got an empty tuple")
    out = []
    for a in nums:
        if isinstance(a, bool) or not isinstance(a, int):
            raise ArgumentTypeError(f"{name}: argnums elements must be int, got {type(a).__name__}")
        if not -n_args <= a < n_args:
            raise ArgumentValueError(
                f"{name}: argnums {a} is out of range: the call has only {n_args} positional inputs"
            )
        out.append(a % n_args)
    if len(set(out)) != len(out):
        raise ArgumentValueError(f"{name}: argnums {argnums} contains duplicates; its elements must be unique")
    return out


def in_torch_func_words(words):
    """A suffix with torch.func's message for the same mistake, so that code which matches
    torch.func's errors (its own test suite does) matches fwdgrad's too."""
    return f" (in torch.func's words: {words})"



def check_tangent(name, where, p, t, flattened=False):
    """Raise a clear error if ``t`` cannot be the tangent of primal ``p``.

    ``where`` names the primal as the user wrote it, e.g. ``primals[0]['w']``.
    ``flattened``: the tangents came as a flat pytree (``linearize``'s
    ``jvp_fn``), and a mismatch also gets torch.func's words for it.
    """

    def flattened_words(what):
        if not flattened:
            return ""
        return in_torch_func_words(f"a tangent in flattened pytree doesn't match the {what} of its primal")

    if not isinstance(p, torch.Tensor):
        raise ArgumentTypeError(
            f"{name}: {where} is a {type(p).__name__}; primals must only contain Tensors (or pytrees "
            f"of tensors); pass non-tensor constants through a closure or keyword argument"
        )
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(
            f"{name}: the tangent of {where} is a {type(t).__name__}; tangents must only contain "
            f"Tensors (or None for a zero tangent)"
        )
    if not is_float(p):
        raise ArgumentTypeError(
            f"{name}: {where} has dtype {p.dtype}, which carries no tangent; "
            f"pass None as its tangent (or make it floating point)"
        )
    if t.shape != p.shape:
        raise ArgumentValueError(
            f"{name}: the tangent of {where} has shape {tuple(t.shape)} but {where} has shape "
            f"{tuple(p.shape)}" + flattened_words("shape")
        )
    if t.dtype != p.dtype:
        raise ArgumentValueError(
            f"{name}: the tangent of {where} has dtype {t.dtype} but {where} has dtype {p.dtype}"
            + flattened_words("dtype")
        )
    if t.device != p.device:
        raise ArgumentValueError(
            f"{name}: the tangent of {where} is on {t.device} but {where} is on {p.device}"
        )
    check_layout(name, where, p, t)


def checked_leaves(name, primals, tangents, prefix="primals"):
    """The leaves of matching pytrees ``primals``/``tangents`` as ``(where, p, t)``, checked.

    Also returns the primals' tree spec.
    """
    p_leaves, p_spec = pytree.tree_flatten(primals)
    t_leaves, t_spec = pytree.tree_flatten(tangents, is_leaf=lambda x: x is None)
    if p_spec != t_spec:
        raise ArgumentValueError(
            f"{name}: tangents must have the same python structure as {prefix}; {prefix}: "
            f"{pytree.treespec_pprint(p_spec)}, tangents: {pytree.treespec_pprint(t_spec)}"
        )
    paths = [prefix + describe(path) for path, _ in pytree.tree_flatten_with_path(primals)[0]]
    leaves = list(zip(paths, p_leaves, t_leaves))
    for where, p, t in leaves:
        check_tangent(name, where, p, t)
    return leaves, p_spec


def leading_batch_size(name, where, t, k, what):
    """The leading (batch) size of ``t`` under ``batched=True``, checked against ``k``, the
    earlier ones' (``None`` for the first)."""
    if t.dim() == 0:
        raise ArgumentValueError(
            f"{name}: with batched=True, {where} needs a leading batch dimension, got a 0-dim tensor"
        )
    if k is not None and t.shape[0] != k:
        raise ArgumentValueError(
            f"{name}: with batched=True, every {what} needs the same leading batch size; "
            f"{where} has {t.shape[0]}, an earlier one has {k}"
        )
    return t.shape[0]


def lift(primals, tangents, level, name, prefix="primals", stand_ins=None):
    """Wrap matching pytrees of primals and tangents as duals at ``level``.

    A primal that is an FSDP2 model's sharded parameter becomes a dual over the
    full (all-gathered) tensor, recorded in ``stand_ins`` (``{id(parameter):
    (model, dual)}``) for ``fsdp.unsharded``; without ``stand_ins`` such a
    primal is refused.
    """
    leaves, spec = checked_leaves(name, primals, tangents, prefix)
    if stand_ins is None:
        fsdp.refuse([p for _, p, _ in leaves], name)
    sharded = {} if stand_ins is None else fsdp.owners([p for _, p, _ in leaves])
    duals = []
    for i, (_, p, t) in enumerate(leaves):
        if i in sharded:
            model, param = sharded[i]
            d = Dual(fsdp.gather(p), None if t is None else fsdp.gather(t), level, requires_grad=p.requires_grad)
            stand_ins[id(param)] = (model, d)
        else:
            d = Dual(lift_input(p, level), t, level, requires_grad=p.requires_grad)
        duals.append(d)
    return pytree.tree_unflatten(duals, spec)


@torch.compiler.allow_in_graph
def primal_and_tangent(d):
    """``d``'s primal and tangent at its own level; a zero tangent is materialised.

    ``torch.compile`` writes this call into its graph instead of reading the
    dual's attributes: a view's record of its base is nothing Dynamo can hold.
    """
    p = d._primal
    t = tangent_of(d)
    return p, torch.zeros_like(p) if t is None else t


def lower_output(o, level):
    """``(primal, tangent)`` of an output at ``level``; a zero tangent is materialised."""
    if isinstance(o, AsyncCollectiveTensor):  # a functional collective's result wraps our dual
        o = o.trigger_wait()
    o = strip(o)
    if isinstance(o, Dual) and o._level == level:
        return primal_and_tangent(o)
    return o, torch.zeros_like(o)


def drop_level(tree, level):
    """Replace duals of ``level`` by their primals (for auxiliary outputs)."""
    def drop(x):
        x = strip(x)
        return x._primal if isinstance(x, Dual) and x._level == level else x

    return pytree.tree_map_only(torch.Tensor, drop, tree)


def split_outputs(out, level, name, strict=False):
    """``(primal outputs, tangent outputs)`` of ``func``'s output at ``level``.

    The output must be a non-empty pytree of tensors (as torch.func requires).
    With ``strict`` every output must depend on the inputs (a nonzero tangent).
    """
    leaves, spec = pytree.tree_flatten(out)
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if leaf is None and not path:
            leaves = []  # None alone is an empty output, as torch.func counts it
            break
        if not isinstance(leaf, torch.Tensor):
            raise ArgumentTypeError(
                f"{name}: func must return a tensor or a pytree of tensors, but "
                f"{'output' + describe(path) + ' is' if path else 'it returned'} {kind(leaf)}"
                f"{in_torch_func_words('jvp(f, primals, tangents): expected f(*primals) to return only tensors')}"
            )
    if not leaves:
        raise ArgumentValueError(
            f"{name}: expected func to return at least one tensor, but its output "
            f"{pytree.treespec_pprint(spec)} holds none"
            f"{in_torch_func_words('jvp(f, primals, tangents): Expected f to be a function that has non-empty output')}"
        )
    if strict:
        for path, leaf in pytree.tree_flatten_with_path(out)[0]:
            d = strip(leaf)
            if not (isinstance(d, Dual) and d._level == level and tangent_of(d) is not None):
                raise ArgumentValueError(
                    f"{name}: with strict=True, output{describe(path)} does not depend on the "
                    f"inputs (its tangent is zero); pass strict=False to get zeros"
                )
    pairs = [lower_output(o, level) for o in leaves]
    return (
        pytree.tree_unflatten([p for p, _ in pairs], spec),
        pytree.tree_unflatten([t for _, t in pairs], spec),
    )


def split_aux(out, has_aux, name):
    """``(output, aux)`` of ``func``'s result: with ``has_aux`` a tuple of two, whose
    aux is a pytree of tensors (torch.func's rules)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ArgumentTypeError(
            f"{name}: with has_aux=True, func must return a pair (output, aux), "
            f"got {kind(out)}"
            f"{in_torch_func_words('jvp(f, primals, tangents): output of function f should be a tuple: (output, aux)')}"
        )
    for path, leaf in pytree.tree_flatten_with_path(out[1])[0]:
        if not isinstance(leaf, torch.Tensor):
            raise ArgumentTypeError(
                f"{name}: with has_aux=True, aux must be a tensor or a pytree of tensors, but "
                f"{'aux' + describe(path) + ' is' if path else 'it is'} {kind(leaf)}"
                f"{in_torch_func_words(f'Expected tensors, got unsupported type {type(leaf)}')}"
            )
    return out[0], out[1]


def check_scalar_output(out, name, what="func", any_shape=False):
    """``out`` must be a real floating scalar (with ``any_shape``, any one-element tensor)."""
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(f"{name}: {what} must return a scalar tensor, got {type(out).__name__}")
    if out.numel() != 1 if any_shape else out.dim() != 0:
        raise ArgumentValueError(
            f"{name}: {what} must return a scalar {'tensor (one element)' if any_shape else '(0-dim) tensor'}, "
            f"got one of shape {tuple(out.shape)}; reduce it first (e.g. .sum() or .mean())"
        )
    if not is_float(out):
        raise ArgumentTypeError(f"{name}: {what} must return a floating-point tensor, got dtype {out.dtype}")


def check_differentiable(args, argnums, name, names):
    """Every leaf of ``args[i]`` for ``i`` in ``argnums`` must be a floating tensor."""
    for i in argnums:
        for path, leaf in pytree.tree_flatten_with_path(args[i])[0]:
            where = f"argument {i} ({names[i]}{''.join(str(k) for k in path)})"
            if not isinstance(leaf, torch.Tensor):
                raise ArgumentTypeError(
                    f"{name}: {where} is a {type(leaf).__name__}; the arguments selected by "
                    f"argnums must be tensors (or pytrees of tensors)"
                )
            if not is_float(leaf):
                raise ArgumentTypeError(
                    f"{name}: {where} has dtype {leaf.dtype}; only floating point or complex "
                    f"inputs can be differentiated"
                )


def check_real(leaves, name, what):
    """torch.func's Jacobians take and give real tensors only: refuse complex ones.

    ``leaves`` are ``(where, tensor)`` pairs; ``what`` is "input" or "output".
    """
    for where, t in leaves:
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise ArgumentTypeError(
                f"{name}: Expected all {what}s to be real, but {where} is complex ({t.dtype}), "
                f"as torch.func requires.  Pass the real and imaginary parts as separate real "
                f"tensors (torch.view_as_real) if you need that {what}'s derivative"
            )


def diff_mask(args, argnums):
    mask = []
    for i, a in enumerate(args):
        mask.extend([i in argnums] * len(pytree.tree_leaves(a)))
    return mask


def param_names(func, n):
    if isinstance(func, torch.nn.Module):
        func = func.forward
    try:
        params = [
            p.name
            for p in inspect.signature(func).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(n)]
