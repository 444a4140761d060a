"""The traced mode: record a jvp once as an fx graph, replay it while the inputs match.

``forward_grad(f, trace=True)`` and ``jvp(f, ..., trace=True)`` run through a
``TracedJvp``.  The first call with a given input signature records the
primal-plus-tangent program (``fwdgrad.trace``); later calls whose signature
matches replay that graph, a straight line of aten calls with none of the
interpreter's per-op work.  ``.code`` shows the program as Python; tangent
values are named ``d...``.

The signature (the guard) holds everything the recording may depend on:

- the pytree structure of the arguments, and which leaves carry tangents;
- every tensor's shape, strides, dtype, device and ``requires_grad``;
- every non-tensor argument's value (by equality; identity if unhashable);
- grad mode, inference mode and autocast (with its dtype);
- the tensors ``f`` captures: tensors and ``nn.Module``\\ s (or lists,
  tuples and dicts of them) in its closure, its defaults or the globals it
  names, and, for a module (or a bound method of one), every parameter and
  buffer by identity plus every submodule's ``training`` flag and plain
  attributes (``Dropout.p``);
- the other values in its closure and the globals it names (a float the
  recording multiplied by is baked in): numbers, strings and tuples by
  value, other objects by identity (``trace.value_key``).

Captured tensors are graph constants held by reference, never copied, so an
in-place update (``optimizer.step()``, ``load_state_dict``) is seen by the
next replay, and replacing one (``model.weight = nn.Parameter(...)``) is a
guard miss that records again.  A tensor the guard cannot see (reached
through an attribute of a plain object) is still held by reference, so
in-place changes reach the replay but replacing it does not; a tensor built
inside ``f`` from Python data that is not an argument
(``torch.tensor(some_global)``) is baked in.  Pass such values as arguments.
``jvp(f, ..., trace=True)`` keeps one cache per function object (the last 64
functions), so define ``f`` once rather than as a new lambda on every call.

A guard miss records a new program (up to ``max_traces`` per function).  A
recording that read tensor values into Python (``.item()``, ``if t:``,
boolean indexing: data-dependent control flow) is not reused: those inputs
run eagerly, with a warning (once).  So do tensor-subclass inputs, such as
the duals of an enclosing fwdgrad transform.

``compile=True`` (or a dict of ``torch.compile`` keyword arguments) passes
each recorded program to ``torch.compile`` (``dynamic=False`` unless given):
the guard above chooses the program, torch.compile's own guards then see only
the program's tensor inputs and constants.
"""

import collections
import functools

import torch
from torch.utils import _pytree as pytree

from . import fsdp, trace
from .arguments import check_tangent, checked_leaves, normal_mode
from .errors import ArgumentTypeError, warn
from .functorch_layers import inside_functorch
from .state import State

_EAGER = object()  # a cache value: run these inputs eagerly
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Entry:
    __slots__ = ("program", "call", "keep")

    def __init__(self, program, call, keep):
        self.program = program
        self.call = call
        self.keep = keep  # captured objects, so the ids in the key stay theirs


class TracedJvp:
    """A jvp of ``func`` that records its program once per input signature and replays it.

    Call it as ``traced(args, kwargs, dual, tangents)``: ``args`` the positional
    arguments, ``dual`` the indices of the leaves of ``(args, kwargs)`` that
    are wrapped as duals, ``tangents`` a dict from leaf index to tangent.
    Returns ``(primal_out, tangent_out, aux)``.
    """

    def __init__(self, func, has_aux, name, max_traces=8, compile=None):
        self.func = func
        self.has_aux = has_aux
        self.name = name
        self.compile = compile_options(compile, name)
        self.max_traces = max_traces
        self.cache = {}
        self.last = None
        self.captures = trace.Captures(func)
        self._warned = set()

    def _warn(self, reason, detail):
        if reason in self._warned:
            return
        self._warned.add(reason)
        fname = getattr(self.func, "__name__", type(self.func).__name__)
        warn(f"fwdgrad.{self.name}(trace=True) on {fname!r}: {detail}")

    @property
    def graph_module(self):
        """The most recently used program as a ``torch.fx.GraphModule``.

        It takes the tensor arguments, then the tangents, and returns the flat
        primal outputs, tangent outputs and aux; hand it to ``torch.compile``
        to fuse the ops (worth it for long chains of tiny ops).
        """
        if self.last is None:
            raise RuntimeError(
                f"fwdgrad.{self.name}(trace=True): nothing has been traced yet; call the "
                f"function once first"
            )
        return self.last.program.graph_module

    @property
    def code(self):
        """The Python code of the most recently used program (primal and tangent ops)."""
        return self.graph_module.code

    def __call__(self, args, kwargs, dual, tangents):
        with State(self.func).undone_on_error():
            return self._run(args, kwargs, dual, tangents)

    def _run(self, args, kwargs, dual, tangents):
        if not kwargs and all(type(a) in _PLAIN for a in args):
            leaves, spec = args, len(args)  # the common case, without pytree's cost
        else:
            leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if inside_functorch():
            # functorch's wrappers have no storage to record, and a recording made
            # inside one torch.func call could not be replayed in another: eager.
            return self._eager(args, kwargs, dual, tangents)
        for t in tensors:
            if type(t) not in _PLAIN:
                self._warn(
                    "subclass",
                    f"an argument is a {type(t).__name__}, not a plain tensor (for example a "
                    f"dual of an enclosing fwdgrad transform); running eagerly.",
                )
                return self._eager(args, kwargs, dual, tangents)
        captured, keep = self.captures.state()
        key = trace.signature(
            spec, leaves, captured, tuple(dual), tuple((i, trace.leaf_key(t)) for i, t in tangents.items())
        )
        entry = self.cache.get(key)
        if entry is None:
            if len(self.cache) >= self.max_traces:
                self._warn(
                    "full",
                    f"{len(self.cache)} programs were recorded already (guard misses: new "
                    f"shapes, dtypes, strides, arguments or captured tensors); running new "
                    f"signatures eagerly.",
                )
                return self._eager(args, kwargs, dual, tangents)
            return self._record(key, keep, args, kwargs, dual, tangents)
        if entry is _EAGER:
            return self._eager(args, kwargs, dual, tangents)
        self.last = entry
        t_leaves = [tangents[i] for i in entry.call.tangent_idx]
        grad = torch.is_grad_enabled()
        try:
            outputs = entry.program(*tensors, *t_leaves)
        finally:
            torch._C._set_grad_enabled(grad)
        return entry.call.unflatten(outputs)

    def _call(self, args, kwargs, dual, tangents):
        return trace.FlatJvp(self.func, args, kwargs, set(dual), sorted(tangents), self.has_aux, self.name)

    def _eager(self, args, kwargs, dual, tangents):
        call = self._call(args, kwargs, dual, tangents)
        primals = [call.leaves[i] for i in call.tensor_idx]
        return call.unflatten(call(*primals, *[tangents[i] for i in call.tangent_idx]))

    def _record(self, key, keep, args, kwargs, dual, tangents):
        call = self._call(args, kwargs, dual, tangents)
        primals = [call.leaves[i] for i in call.tensor_idx]
        rec = call.record(
            primals, [tangents[i] for i in call.tangent_idx], constant_names=self.captures.names()
        )
        reads = rec.value_reads()
        if rec.foreign_outputs():
            self.cache[key] = _EAGER
            self._warn(
                "subclass",
                "the function reaches a tensor subclass it does not take as an argument (for "
                "example a dual of an enclosing fwdgrad transform, captured in a closure), which "
                "a recorded program cannot hold; running eagerly.",
            )
        elif reads:
            self.cache[key] = _EAGER
            self._warn(
                "reads",
                "the function reads tensor values into Python ("
                + ", ".join(sorted({trace.describe_read(f) for f in reads}))
                + "), so its program may depend on the values (data-dependent control flow) "
                "and cannot be replayed; running these inputs eagerly.",
            )
        else:
            rec.graph.eliminate_dead_code()
            call.forget_values()
            program = rec.program()
            if self.compile is not None:
                program = _Compiled(program, self.compile)
            entry = _Entry(program, call, keep)
            self.cache[key] = entry
            self.last = entry
        return call.unflatten(rec.outputs)


def compile_options(compile, name):
    """``compile=`` as ``torch.compile`` keyword arguments (``None``: do not compile)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {"dynamic": False}
    if isinstance(compile, dict):
        return {"dynamic": False, **compile}
    raise ArgumentTypeError(
        f"{name}: compile must be True, False or a dict of torch.compile keyword arguments, "
        f"got {type(compile).__name__}"
    )


class _Compiled:
    """A recorded program run through ``torch.compile`` (compiled on its first call).

    fwdgrad's own signature guard picks the program; torch.compile then guards
    only the values it sees: the program's tensor inputs and its constants
    (``dynamic=False`` by default, so one compile per recorded program).
    """

    def __init__(self, program, options):
        self.program = program
        self.run = torch.compile(program.graph_module, **options)

    @property
    def graph_module(self):
        return self.program.graph_module

    def __call__(self, *inputs):
        return self.run(*inputs)


# --------------------------------------------------------------------------
# One TracedJvp per function for ``jvp(..., trace=True)``.

_MAX_FUNCTIONS = 64
_by_function = collections.OrderedDict()  # (func, has_aux) -> TracedJvp, least recently used first
_codes_seen = collections.Counter()  # __code__ -> function objects seen with it (re-created lambdas)


def traced_jvp_for(func, has_aux, compile=None):
    """The ``TracedJvp`` that ``jvp(func, ..., trace=True)`` uses (one per function
    object and ``compile=`` setting).

    The last ``_MAX_FUNCTIONS`` functions keep their programs (and stay alive).
    """
    options = compile_options(compile, "jvp")
    frozen = None if options is None else tuple(sorted(options.items(), key=lambda kv: kv[0]))
    try:
        key = (func, has_aux, frozen)
        hash(key)
    except TypeError:
        key = (id(func), has_aux, repr(frozen))
    traced = _by_function.get(key)
    if traced is not None and traced.func is func:
        _by_function.move_to_end(key)
        return traced
    traced = _by_function[key] = TracedJvp(func, has_aux, "jvp", compile=options)
    if len(_by_function) > _MAX_FUNCTIONS:
        _by_function.popitem(last=False)
    code = getattr(func, "__code__", None)
    if code is not None:
        _codes_seen[code] += 1
        if _codes_seen[code] == 4:
            warn(
                f"fwdgrad.jvp(trace=True): 4 function objects with the same code "
                f"({getattr(func, '__qualname__', func)!r}); programs are cached per function "
                f"object, so each new one records again.  Define the function once, outside "
                f"the loop, or use fwdgrad.forward_grad(f, trace=True)."
            )
    return traced


def _check_leaves(name, primal, tangent, prefix, first, dual, tangents):
    """Check matching pytrees ``primal``/``tangent``; note their leaves from index ``first``."""
    leaves, _ = checked_leaves(name, primal, tangent, prefix)
    fsdp.refuse([p for _, p, _ in leaves], name)
    for j, (_, _, t) in enumerate(leaves):
        dual.append(first + j)
        if t is not None:
            tangents[first + j] = t
    return first + len(leaves)


def jvp_traced(func, primals, tangents, has_aux, compile=None):
    """``jvp(func, primals, tangents, trace=True)`` (arguments already checked for shape)."""
    dual, tans = [], {}
    if all(type(p) in _PLAIN for p in primals):
        for i, (p, t) in enumerate(zip(primals, tangents)):
            check_tangent("jvp", f"primals[{i}]", p, t)
            dual.append(i)
            if t is not None:
                tans[i] = t
    else:
        _check_leaves("jvp", tuple(primals), tuple(tangents), "primals", 0, dual, tans)
    primal, tangent, aux = traced_jvp_for(func, has_aux, compile)(tuple(primals), {}, dual, tans)
    return (primal, tangent, aux) if has_aux else (primal, tangent)


class TracedForwardGrad:
    """``forward_grad(func, trace=True)``: ``df(x, dx, y, dy, ...)`` with a traced program.

    ``df.code`` shows the most recently used program.
    """

    def __init__(self, func, has_aux, compile=None):
        functools.update_wrapper(self, func, updated=())
        self.traced = TracedJvp(func, has_aux, "forward_grad", compile=compile)

    @property
    def code(self):
        """The Python code of the most recently used program (tangent values are ``d...``)."""
        return self.traced.code

    @property
    def graph_module(self):
        """The most recently used program as a ``torch.fx.GraphModule``."""
        return self.traced.graph_module

    @normal_mode
    def __call__(self, *pairs, **kwargs):
        name = "forward_grad"
        if len(pairs) % 2:
            raise ArgumentTypeError(
                f"{name}: df takes (value, tangent) pairs, got {len(pairs)} positional arguments"
            )
        args, dual, tangents = [], [], {}
        first = 0
        for i in range(0, len(pairs), 2):
            p, t = pairs[i], pairs[i + 1]
            args.append(p)
            if t is None and not isinstance(p, torch.Tensor):
                first += len(pytree.tree_leaves(p))  # a constant
                continue
            if isinstance(p, torch.Tensor):
                check_tangent(name, f"argument {i // 2}", p, t)
                dual.append(first)
                if t is not None:
                    tangents[first] = t
                first += 1
            else:
                first = _check_leaves(name, p, t, f"argument {i // 2}", first, dual, tangents)
        primal, tangent, aux = self.traced(tuple(args), kwargs, dual, tangents)
        return (primal, tangent, aux) if self.traced.has_aux else (primal, tangent)
