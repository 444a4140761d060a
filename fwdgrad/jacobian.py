"""Many tangents at one point: ``linearize``, batched ``jvp``, ``jacfwd`` and ``hessian``.

All four share one step (``Linearized``): run ``func``'s jvp once under the
``Recorder`` (``fwdgrad.trace``), with zero tangents and its heavy tangent ops
skipped, which yields the primal outputs, the tangent program as a graph of
plain aten ops, and the primal values that program reads (residuals).  The tangent program is then replayed alone: once per call
of ``linearize``'s ``jvp_fn``, or under ``torch.vmap`` for a whole batch of
directions (batched ``jvp``, and ``jacfwd``'s basis in chunks of
``chunk_size``).  The primal is computed once.

Tracing happens at the given inputs, so Python control flow takes the branch
that those inputs take, which is what a derivative at that point needs.  When
the tangent program itself reads a value into Python, or writes a tangent
into a primal tensor in a way no functionalization removes, it cannot be
replayed for other tangents; fwdgrad then warns and pushes the directions
one at a time through the eager interpreter.  So it does, silently, for
tensor-subclass inputs (the duals of an enclosing fwdgrad transform, as in
``jacfwd(jacfwd(f))``), which the recorder cannot see through.
"""

import collections
import functools
import threading

import torch
from torch.utils import _pytree as pytree

from . import fsdp, trace
from .arguments import (
    check_argnums, check_callable, check_differentiable, check_real, check_tangent, diff_mask, in_torch_func_words,
    leading_batch_size, normal_mode, param_names, usable_tree,
)
from .errors import ArgumentTypeError, ArgumentValueError, warn
from .functorch_layers import inside_functorch
from .graph import has_effects
from .reverse import jacobian_by_reverse
from .state import State, rng_state, set_rng_state

_set_grad_enabled = torch._C._set_grad_enabled


_lock = threading.Lock()  # kept recordings are shared by threads
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Programs:
    """Recordings of one function's jvp kept for later calls: at most ``size``
    signatures (``trace.signature``: shapes, dtypes, captured tensors, modes...).

    A call whose signature was recorded before runs the recorded primal
    program at its own inputs (residuals included) instead of recording
    again; only recordings that are valid at other values are kept (no value
    read into Python, no in-place op, nothing functionalized).
    """

    def __init__(self, func, size=8):
        self.captures = trace.Captures(func)
        self.size = size
        self.entries = collections.OrderedDict()  # signature -> _Replay, least recently used first

    def key(self, args, diff):
        leaves, spec = pytree.tree_flatten(tuple(args))
        captured, keep = self.captures.state()
        return trace.signature(spec, leaves, captured, tuple(diff)), keep

    def get(self, key):
        with _lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry

    def put(self, key, entry):
        with _lock:
            self.entries[key] = entry
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)


class _Replay:
    """One kept recording: the primal program (primal outputs, aux, residuals), the
    tangent program, and the output structure."""

    __slots__ = ("primal", "tangent", "n_residuals", "n_out", "out_spec", "aux_spec", "keep")

    def __init__(self, primal, tangent, n_residuals, call, keep):
        self.primal = primal
        self.tangent = tangent
        self.n_residuals = n_residuals
        self.n_out, self.out_spec, self.aux_spec = call.n_out, call.out_spec, call.aux_spec
        self.keep = keep  # the captured objects, so that the ids in the key stay theirs


class Linearized:
    """``func``'s jvp at fixed primals, ready to push any number of tangents.

    ``push(tangents)`` takes one tensor per differentiable leaf and returns the
    flat tangent outputs; ``push_batched`` does the same for tangents with a
    leading batch dimension, under ``torch.vmap``.  When the recording could
    not be reused (see the module docstring) both fall back to the eager
    interpreter, one direction at a time.  With ``programs`` (a ``Programs``),
    a signature recorded before is replayed instead of recorded again.
    """

    def __init__(self, func, args, diff, has_aux, name, programs=None):
        self.func = func
        self.name = name
        # The state before the first evaluation: eager pushes evaluate func
        # again from it (same random draws, same buffers) and leave no trace.
        self.state = State(func)
        args = usable_tree(args)
        leaves = pytree.tree_leaves(args)
        fsdp.refuse(leaves, name)
        tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.call = trace.FlatJvp(
            func, args, {}, set(tensors), [i for i in tensors if diff[i]], has_aux, name
        )
        self.inputs = [leaves[i] for i in self.call.tangent_idx]
        self.program = None
        self.reason = None
        if inside_functorch() or any(type(leaves[i]) not in _PLAIN for i in tensors):
            # Tensor subclasses (e.g. duals of an enclosing fwdgrad transform) and
            # functorch's wrappers (inside a torch.func transform) are invisible
            # to the recorder: push tangents eagerly.  This first evaluation is
            # the plain call's: it draws and writes buffers for real.
            call = self.call
            self._set_outputs(call(*[call.leaves[i] for i in call.tensor_idx], *[None] * len(self.inputs)))
            return
        primals = [leaves[i] for i in tensors]
        key = keep = None
        if programs is not None:
            key, keep = programs.key(args, diff)
            entry = programs.get(key)
            if entry is not None:
                self._replay(entry, primals)
                return
        rec, residual_nodes = self._record(primals)
        if programs is not None and rec is not None and _replayable(rec):
            n = self.call.n_out
            primal = trace.primal_program(rec, [*range(n), *range(2 * n, len(rec.outputs))], residual_nodes)
            programs.put(key, _Replay(primal, self.program, len(residual_nodes), self.call, keep))

    def _replay(self, entry, primals):
        call = self.call
        call.n_out, call.out_spec, call.aux_spec = entry.n_out, entry.out_spec, entry.aux_spec
        values = list(entry.primal(*primals))
        split = len(values) - entry.n_residuals
        outs, self.residuals = values[:split], values[split:]
        n = call.n_out
        self._set_outputs([*outs[:n], *outs[:n], *outs[n:]])  # the middle stands in for the tangents
        self.program = entry.tangent

    def _record(self, primals):
        """Record, set the outputs and (where it can be replayed) the tangent program.

        Returns ``(recording, residual nodes)`` when the first recording is the
        one replayed, ``(None, None)`` otherwise.
        """
        call = self.call
        rng = rng_state()
        names = trace.Captures(self.func).names()
        zeros = [torch.zeros_like(x) for x in self.inputs]
        # The recording's tangent values are not needed: skip the heavy tangent ops.
        rec = call.record(primals, zeros, keep_residuals=True, constant_names=names, skip_tangent_work=True)
        if rec.foreign_outputs():
            # f reached a dual of an enclosing transform (captured, not passed):
            # the program holds only its primal, so push tangents eagerly.
            self._set_outputs(rec.outputs)
            return None, None
        functionalized = rec.unbatchable_mutation is not None or rec.stale_residuals()
        if functionalized:
            try:
                rec = trace.functionalized(
                    rec, [*primals, *zeros], call.is_tangent(), lambda: set_rng_state(rng)
                )
            except Exception as e:  # an op functionalization cannot handle
                self._fall_back(rec, f"functionalizing its in-place ops failed ({type(e).__name__}: {e})")
                return None, None
            if rec.unbatchable_mutation is not None:
                self._fall_back(rec, f"it writes a tangent in place ({rec.unbatchable_mutation})")
                return None, None
        reads = rec.value_reads(tangent_only=True)
        if reads:
            self._fall_back(
                rec, "its tangent computation reads tensor values into Python: "
                + ", ".join(sorted({trace.describe_read(f) for f in reads}))
            )
            return None, None
        self._set_outputs(rec.outputs)
        n = call.n_out
        self.program, self.residuals, residual_nodes = trace.tangent_program(rec, range(n, 2 * n))
        return (None, None) if functionalized else (rec, residual_nodes)

    def _set_outputs(self, outputs):
        self.primal_out, _, self.aux = self.call.unflatten(outputs)
        self.primal_leaves = outputs[: self.call.n_out]
        self.out_spec = self.call.out_spec

    def _fall_back(self, rec, reason):
        self.reason = reason
        self._set_outputs(rec.outputs)
        warn(
            f"fwdgrad.{self.name}: cannot replay the traced tangent program of "
            f"{getattr(self.func, '__name__', self.func)!r} because {reason}; pushing tangents "
            f"one at a time through the eager interpreter instead (slower, same values)."
        )

    def _eager(self, tangent_leaves):
        """All flat outputs of one eager jvp along ``tangent_leaves``."""
        call = self.call
        with self.state.again():
            return call(*[call.leaves[i] for i in call.tensor_idx], *tangent_leaves)

    # -- pushing tangents ----------------------------------------------------

    def push(self, tangent_leaves):
        """The flat tangent outputs for one tangent per differentiable leaf."""
        if self.program is None:
            n = self.call.n_out
            return self._eager(tangent_leaves)[n:2 * n]
        return list(self.program(*self.residuals, *tangent_leaves))

    def push_batched(self, tangent_leaves):
        """Like ``push`` for tangents with a leading batch dimension (all the same size)."""
        if self.program is None:
            k = tangent_leaves[0].shape[0]
            cols = [self.push([t[j] for t in tangent_leaves]) for j in range(k)]
            return [torch.stack(c) for c in zip(*cols)]
        residuals, program = self.residuals, self.program
        out = torch.vmap(lambda *ts: program(*residuals, *ts))(*tangent_leaves)
        return list(out)


def _replayable(rec):
    """Whether ``rec``'s primal program gives the right residuals at other inputs:
    no value read into Python (control flow may depend on it), no output that
    is a tensor subclass (a dual of an enclosing transform: the program holds
    plain tensors only), and no in-place op (a replay would apply it on a
    different footing; functionalized recordings never get here)."""
    if rec.value_reads():
        return False
    if rec.foreign_outputs():
        return False
    return not any(n.op == "call" and n.target is not _set_grad_enabled and has_effects(n.target)
                   for n in rec.graph.nodes)


# --------------------------------------------------------------------------
# linearize


@normal_mode
def linearize(func, *primals):
    """``(output, jvp_fn)``: ``func(*primals)`` and a function pushing tangents through it.

    ``jvp_fn(*tangents)`` (tangents structured like ``primals``) returns the
    jvp at ``primals`` without computing the primal again: the tangent
    program is recorded once and only it is replayed.  Matches
    ``torch.func.linearize``.

    >>> import torch, fwdgrad
    >>> out, jvp_fn = fwdgrad.linearize(torch.sin, torch.tensor([0.0, 1.0]))
    >>> torch.allclose(jvp_fn(torch.ones(2)), torch.cos(torch.tensor([0.0, 1.0])))
    True
    """
    name = "linearize"
    check_callable(func, name)
    check_differentiable(primals, range(len(primals)), name, param_names(func, len(primals)))
    with State(func).undone_on_error():
        lin = Linearized(func, primals, [True] * len(pytree.tree_leaves(primals)), False, name)
    in_spec = pytree.tree_structure(tuple(primals))

    @normal_mode
    def jvp_fn(*tangents):
        if len(tangents) != len(primals):
            raise ArgumentValueError(f"{name}: jvp_fn expected {len(primals)} tangent(s), got {len(tangents)}")
        t_leaves, t_spec = pytree.tree_flatten(tangents)
        if t_spec != in_spec:
            raise ArgumentValueError(
                f"{name}: jvp_fn's tangents must have the structure of the primals; primals: "
                f"{pytree.treespec_pprint(in_spec)}, tangents: {pytree.treespec_pprint(t_spec)}"
                + in_torch_func_words("expected the tangents to have the same argspec as the primals")
            )
        for path, p, t in zip(pytree.tree_flatten_with_path(tangents)[0], lin.inputs, t_leaves):
            where = "primals" + pytree.keystr(path[0])
            if t is None:
                raise ArgumentTypeError(f"{name}: jvp_fn got None as the tangent of {where}; pass a tensor")
            check_tangent(name, where, p, t, flattened=True)
        return pytree.tree_unflatten(lin.push(t_leaves), lin.out_spec)

    return lin.primal_out, jvp_fn


# --------------------------------------------------------------------------
# batched jvp (jvp(batched=True))

_MAX_FUNCTIONS = 64
_programs = collections.OrderedDict()  # (func, has_aux) -> Programs, least recently used first


def _programs_for(func, has_aux):
    """The kept recordings of ``jacfwd`` and batched ``jvp`` for ``func`` (the last 64 functions).

    ``None`` (record on every call) for an unhashable callable, and for one
    that captures a tensor subclass, such as a dual of an enclosing transform:
    a replay would see only its primal, and keeping the function would keep
    that dual alive.
    """
    try:
        key = (func, has_aux)
        hash(key)
    except TypeError:
        return None
    if any(isinstance(o, torch.Tensor) and type(o) not in _PLAIN for o in trace.Captures(func).objects()):
        return None
    with _lock:
        programs = _programs.get(key)
        if programs is None:
            programs = _programs[key] = Programs(func)
            if len(_programs) > _MAX_FUNCTIONS:
                _programs.popitem(last=False)
        else:
            _programs.move_to_end(key)
        return programs



@normal_mode
def batched_jvp(func, primals, tangents, has_aux, name="jvp"):
    """``jvp`` with a leading batch dimension on every tangent; one primal computation."""
    p_leaves, p_spec = pytree.tree_flatten(tuple(primals))
    t_leaves, t_spec = pytree.tree_flatten(tuple(tangents), is_leaf=lambda x: x is None)
    if p_spec != t_spec:
        raise ArgumentValueError(
            f"{name}: tangents must have the same python structure as primals; primals: "
            f"{pytree.treespec_pprint(p_spec)}, tangents: {pytree.treespec_pprint(t_spec)}"
        )
    paths = ["primals" + pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tuple(primals))[0]]
    k = None
    diff = []
    for where, p, t in zip(paths, p_leaves, t_leaves):
        if t is None:
            check_tangent(name, where, p, None)
            diff.append(False)
            continue
        if not isinstance(t, torch.Tensor):
            raise ArgumentValueError(
                f"{name}: with batched=True, the tangent of {where} must be a tensor with a leading "
                f"batch dimension, got {type(t).__name__}"
            )
        k = leading_batch_size(name, f"the tangent of {where}", t, k, "tangent")
        check_tangent(name, where, p, t[0] if k else t.new_empty(t.shape[1:]))
        diff.append(True)
    if k is None:
        raise ArgumentValueError(f"{name}: with batched=True, at least one tangent must be a tensor (not None)")
    with State(func).undone_on_error():
        lin = Linearized(func, tuple(primals), diff, has_aux, name, _programs_for(func, has_aux))
        batch = [t for t, d in zip(t_leaves, diff) if d]
        if k == 0:
            outs = [o.new_zeros((0, *o.shape)) for o in lin.primal_leaves]
        else:
            outs = lin.push_batched(batch)
    tangent_out = pytree.tree_unflatten(outs, lin.out_spec)
    if has_aux:
        return lin.primal_out, tangent_out, lin.aux
    return lin.primal_out, tangent_out


# --------------------------------------------------------------------------
# jacfwd


def _basis_chunk(start, stop, offset, leaf):
    """Rows ``start:stop`` of the identity restricted to ``leaf``'s columns, shaped like ``leaf``."""
    n = leaf.numel()
    rows = torch.zeros(stop - start, n, dtype=leaf.dtype, device=leaf.device)
    rows.diagonal(start - offset).fill_(1)
    return rows.view(stop - start, *leaf.shape)


def jacfwd(func, argnums=0, *, has_aux=False, chunk_size=None):
    """The Jacobian of ``func`` by forward mode, in ``torch.func.jacfwd``'s layout.

    Each output leaf gets a Jacobian with the output's dims followed by the
    input's dims; with a tuple ``argnums`` there is one per selected argument.
    All basis directions go through one batched (``torch.vmap``) replay of the
    recorded tangent program, ``chunk_size`` directions at a time if given
    (fewer directions at once: less memory).

    >>> import torch, fwdgrad
    >>> J = fwdgrad.jacfwd(torch.sin)(torch.tensor([0.0, 1.0]))
    >>> torch.allclose(J, torch.diag(torch.cos(torch.tensor([0.0, 1.0]))))
    True
    """
    name = "jacfwd"
    check_callable(func, name)
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise ArgumentTypeError(f"{name}: argnums must be int or Tuple[int, ...], got {type(argnums).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise ArgumentTypeError(f"{name}: chunk_size must be None or an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ArgumentValueError(f"{name}: chunk_size must be at least 1, got {chunk_size}")

    programs = _programs_for(func, has_aux)  # shared by every jacfwd(func): jacfwd(f)(x) in a loop

    @functools.wraps(func)
    @normal_mode
    def jac_fn(*args):
        nums = check_argnums(argnums, len(args), name)
        names = param_names(func, len(args))
        check_differentiable(args, nums, name, names)
        check_real(_selected(args, nums, names), name, "input")
        with State(func).undone_on_error():
            return _jacobian(func, args, nums, argnums, has_aux, chunk_size, name, programs)

    return jac_fn


def _selected(args, nums, names):
    """``(where, leaf)`` for the leaves of the arguments picked by ``argnums``."""
    return [
        (f"argument {i} ({names[i]}{pytree.keystr(path)})", leaf)
        for i in nums for path, leaf in pytree.tree_flatten_with_path(args[i])[0]
    ]


def _jacobian(func, args, nums, argnums, has_aux, chunk_size, name, programs):
    lin = Linearized(func, args, diff_mask(args, nums), has_aux, name, programs)
    check_real(
        [(f"output{pytree.keystr(p)}", o) for (p, _), o in
         zip(pytree.tree_flatten_with_path(lin.primal_out)[0], lin.primal_leaves)],
        name, "output",
    )
    inputs = lin.inputs
    sizes = [x.numel() for x in inputs]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    total = sum(sizes)
    step = total if chunk_size is None else min(chunk_size, total)
    if total == 0:
        full = [o.new_zeros((0, *o.shape)) for o in lin.primal_leaves]
    elif step == total:
        full = lin.push_batched([_basis_chunk(0, total, o, x) for o, x in zip(offsets, inputs)])
    else:
        full = None
        for start in range(0, total, step):
            stop = min(start + step, total)
            part = lin.push_batched([_basis_chunk(start, stop, o, x) for o, x in zip(offsets, inputs)])
            if full is None:
                full = [p.new_empty((total, *p.shape[1:])) for p in part]
            for f, p in zip(full, part):
                f[start:stop] = p
    jac = []
    for f in full:  # one output leaf: (total, *out_shape)
        per_leaf = [
            f[o:o + n].movedim(0, -1).reshape((*f.shape[1:], *x.shape))
            for o, n, x in zip(offsets, sizes, inputs)
        ]
        jac.append(_arrange(per_leaf, args, nums, argnums))
    result = pytree.tree_unflatten(jac, lin.out_spec)
    return (result, lin.aux) if has_aux else result


def _arrange(per_leaf, args, nums, argnums):
    """Per-leaf Jacobians of one output (in argument order), arranged like ``args[argnums]``.

    A tuple ``argnums`` gives a tuple in the order of ``argnums``.
    """
    trees = {}
    pos = 0
    for i in sorted(nums):
        leaves, spec = pytree.tree_flatten(args[i])
        trees[i] = pytree.tree_unflatten(per_leaf[pos:pos + len(leaves)], spec)
        pos += len(leaves)
    return trees[nums[0]] if isinstance(argnums, int) else tuple(trees[i] for i in nums)


# --------------------------------------------------------------------------
# hessian


def hessian(func, argnums=0):
    """The Hessian of ``func``, forward over reverse: ``jacfwd`` of its reverse-mode Jacobian.

    Any output shape, in ``torch.func.hessian``'s layout (``output.shape +
    input.shape + input.shape`` per output leaf and argument); a scalar
    output is ``jacfwd(grad(func))``.

    >>> import torch, fwdgrad
    >>> H = fwdgrad.hessian(lambda x: (x ** 3).sum())(torch.tensor([1.0, 2.0]))
    >>> torch.allclose(H, torch.diag(torch.tensor([6.0, 12.0])))
    True
    """
    name = "hessian"
    check_callable(func, name)

    @functools.wraps(func)
    def hess_fn(*args):
        nums = check_argnums(argnums, len(args), name)  # errors name hessian, not jacfwd
        check_real(_selected(args, nums, param_names(func, len(args))), name, "input")
        return jacfwd(jacobian_by_reverse(func, argnums, name), argnums)(*args)

    return hess_fn


__all__ = ["jacfwd", "linearize", "hessian", "batched_jvp", "Linearized"]
