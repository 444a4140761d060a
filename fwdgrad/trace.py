"""Recording a jvp as a graph of plain aten ops.

Underneath fwdgrad's dual tensors every primal and tangent computation is an
aten op on plain tensors.  ``Recorder`` is a ``TorchDispatchMode`` that sees
exactly those ops (it declines duals, so their ``__torch_dispatch__`` runs and
sends the unwrapped ops back through the mode), runs each one for real and
appends it to a ``graph.Graph``.  The result is the primal-plus-tangent
program, runnable as a ``graph.Program`` and readable as fx ``.code``.

While recording it notes what later users of the graph must know:

- which nodes depend on a tangent input (the *tangent program*); the rest is
  the primal program;
- the primal values that the tangent program reads (*residuals*), kept so
  that ``linearize`` and ``jacfwd`` can replay the tangent program alone,
  without computing the primal again;
- *value reads*: ops that move tensor values into Python (``.item()``,
  ``bool(t)``, ``torch.equal``) or whose output shape depends on values
  (``nonzero``, boolean indexing).  Python then branches on, or bakes in,
  a value, so the graph is right at the traced inputs only;
- *mutations* that vmap cannot batch (a tangent written in place into a
  primal buffer) or that change a kept residual afterwards.  Such a recording
  is redone through ``torch.func.functionalize`` (``functionalized``).

Grad mode is part of the program: a change of ``torch.is_grad_enabled()``
between ops is recorded as a ``torch._C._set_grad_enabled`` call.

When the recording's tangent values are not needed (``skip_tangent_work``:
zero tangent inputs, only the graph and the residuals are used), heavy
tangent ops are recorded without being run; see ``Recorder._skip``.
"""

import functools
import operator
import types

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import _disable_current_modes as _no_modes
from torch.utils.weak import WeakTensorKeyDictionary

from .arguments import drop_level, param_names, split_aux, split_outputs
from .graph import Graph, Node, Program, has_effects, remap
from .functorch_layers import level_scope, lift_input
from .interpreter import Dual
from .ops import fill_defaults, functional_variant, is_random, mutated_args, op_name, returns_alias

_set_grad_enabled = torch._C._set_grad_enabled

_plain_dispatch = torch.Tensor.__torch_dispatch__
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_READ_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

_aten = torch.ops.aten
_SLICE_DIM = {_aten.slice.Tensor: 1, _aten.slice_scatter.default: 2}  # op -> position of `dim`
_DATA_FIRST = {_aten.index.Tensor, _aten.masked_select.default}  # shape from the index, not `self`
_VIEWS = {_aten.view.default, _aten._unsafe_view.default}


def _normalized(func, args):
    """Arguments as recorded: slice ends clamped to the size (``sys.maxsize`` ends break vmap).

    Returns ``(func, args)``; a functional ``copy(dst, src)`` (made by
    functionalization) is recorded as ``expand(src, dst.shape)``, which vmap
    batches natively.
    """
    if func in _SLICE_DIM:
        d = _SLICE_DIM[func]
        args = list(args)
        dim = args[d] if len(args) > d else 0
        size = args[0].shape[dim] if args[0].dim() else 0
        for j in (d + 1, d + 2):  # start, end
            if len(args) > j and isinstance(args[j], int) and args[j] > size:
                args[j] = size
        return func, tuple(args)
    if func is _aten.copy.default and len(args) == 2:
        dst, src = args
        if src.dtype == dst.dtype and src.device == dst.device:
            return _aten.expand.default, (src, list(dst.shape))
    return func, args


HEAVY = 1 << 20  # tensor elements read by a tangent op above which a skipping recorder skips it


def meta_like(t):
    """A tensor with ``t``'s shape, strides and dtype on the meta device (no data)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _on_meta(a):
    if isinstance(a, torch.Tensor):
        return meta_like(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_on_meta(b) for b in a)
    return a


def _zeros_like_meta(out, device):
    if isinstance(out, torch.Tensor):
        return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=device).zero_()
    if isinstance(out, (list, tuple)):
        return type(out)(_zeros_like_meta(o, device) for o in out)
    return out


_skippable_cache = {}
_functional_cache = {}


def _skippable(func):
    """A functional op that returns new tensors (no views, no in-place writes)."""
    v = _skippable_cache.get(func)
    if v is None:
        schema = getattr(func, "_schema", None)
        v = _skippable_cache[func] = schema is not None and not any(
            r.alias_info is not None for r in schema.returns
        ) and not mutated_args(func) and not any(tag in func.tags for tag in _READ_TAGS)
    return v


def describe_read(func):
    """How a value-reading op usually arises, for messages."""
    name = str(func)
    hints = {
        "aten._local_scalar_dense.default": ".item(), float(t), bool(t) or `if t:`",
        "aten.is_nonzero.default": "bool(t) or `if t:`",
        "aten.equal.default": "torch.equal",
    }
    if name in hints:
        return f"{name} ({hints[name]})"
    if torch.Tag.dynamic_output_shape in getattr(func, "tags", ()):
        return f"{name} (an output shape that depends on values, e.g. boolean indexing)"
    return name


class Recorder(TorchDispatchMode):
    """Run aten ops on plain tensors and append each one to ``self.graph``.

    Register the inputs with ``input`` before entering the mode.  A tensor the
    recorder has not seen (a parameter or other tensor captured by the traced
    function) becomes a ``get_attr`` constant that holds the tensor itself, by
    reference, so in-place updates to it are seen when the graph is replayed.
    """

    def __init__(self, keep_residuals=False, skip_tangent_work=False):
        super().__init__()
        self.skip_tangent_work = skip_tangent_work
        self.graph = Graph()
        self.node_of = WeakTensorKeyDictionary()
        self.keep_residuals = keep_residuals
        self.residuals = {}  # primal node -> (tensor, its _version when kept)
        self.constants = {}  # attribute name -> tensor
        self.constant_names = {}  # id(tensor) -> preferred name (parameter names)
        self.reads = []  # (func, depends on a tangent)
        self.unbatchable_mutation = None  # first tangent write into a primal tensor
        self.inputs = []  # (node, tensor)
        self.input_storages = {}  # StorageWeakRef -> index into self.inputs
        self.snapshots = {}  # index into self.inputs -> value before its first mutation
        self.aliased = set()  # storages that views were taken of
        self.tainted = set()  # storages that data was written into in place
        self.grad_enabled = torch.is_grad_enabled()
        self.initial_grad_enabled = self.grad_enabled

    # -- inputs, constants and arguments ------------------------------------

    def input(self, tensor, name, tangent=False):
        node = self.graph.add("placeholder", name, name=name, tangent=tangent)
        self.node_of[tensor] = node
        self.input_storages.setdefault(StorageWeakRef(tensor.untyped_storage()), len(self.inputs))
        self.inputs.append((node, tensor))
        return node

    def _constant(self, tensor):
        base = self.constant_names.get(id(tensor), "const").replace(".", "_")
        if not base.isidentifier():
            base = "p_" + base
        name = base
        i = 0
        while name in self.constants:
            i += 1
            name = f"{base}_{i}"
        self.constants[name] = tensor
        self.input_storages.setdefault(StorageWeakRef(tensor.untyped_storage()), ("const", name))
        node = self.graph.add("get_attr", name, name=name)
        self.node_of[tensor] = node
        return node

    def node_for(self, tensor):
        node = self.node_of.get(tensor)
        return node if node is not None else self._constant(tensor)

    def _arg(self, a, found):
        if isinstance(a, torch.Tensor):
            node = self.node_for(a)
            found.append((node, a))
            return node
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(b, found) for b in a)
        return a

    # -- the dispatch hook ---------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in types:
            if t.__torch_dispatch__ is not _plain_dispatch:
                return NotImplemented  # a dual: let it unwrap itself and come back
        kwargs = kwargs or {}
        grad = torch.is_grad_enabled()
        if grad != self.grad_enabled:
            self.graph.add("call", _set_grad_enabled, (grad,))
            self.grad_enabled = grad
        found = []
        mutated = mutated_args(func)
        functional = self._functional_instead(func, args, kwargs) if mutated else None
        # The out-of-place op may lack a default the in-place one has (bernoulli_'s p).
        rfunc, rargs = _normalized(functional or func, fill_defaults(func, args) if functional else args)
        nargs = tuple(self._arg(a, found) for a in rargs)
        nkwargs = {k: self._arg(v, found) for k, v in kwargs.items()}
        depends = any(n.tangent for n, _ in found)
        data = any(n.data for n, _ in found) or is_random(func)
        if self.tainted and not data:
            data = any(StorageWeakRef(t.untyped_storage()) in self.tainted for _, t in found)
        if mutated and functional is None:
            self._before_mutation(func, [args[i] for i in mutated if i < len(args)], depends, data)
        out = None
        if depends and self.skip_tangent_work and sum(t.numel() for _, t in found) >= HEAVY:
            out = self._skip(func, args, kwargs, found)
        if out is None:
            out = func(*args, **kwargs)
        name = ("d" if depends else "") + op_name(rfunc)
        node = self.graph.add("call", rfunc, nargs, nkwargs, name=name, tangent=depends, data=data)
        if depends and self.keep_residuals:
            for n, t in found:
                if not n.tangent and n not in self.residuals:
                    self.residuals[n] = (t, t._version)
        if data and (any(tag in func.tags for tag in _READ_TAGS) if hasattr(func, "tags") else False):
            if func in _DATA_FIRST:  # x[mask]: the shape comes from the mask, not from x
                depends = any(n.tangent for n, _ in found[1:])
            self.reads.append((func, depends))
        self._bind_outputs(func, out, node, depends, data)
        if returns_alias(func):
            for o in out if isinstance(out, (list, tuple)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.aliased.add(StorageWeakRef(o.untyped_storage()))
        return out

    def _functional_instead(self, func, args, kwargs):
        """The out-of-place op to record for an in-place op on a private tensor, or ``None``.

        ``t.addcmul_(a, b)`` on a tensor nobody else can see (not an input, a
        captured tensor, a view or viewed) is recorded as ``t = addcmul(t, a, b)``:
        vmap batches functional ops better, and a functional graph needs no
        functionalization pass.
        """
        if mutated_args(func) != (0,) or kwargs or not isinstance(args[0], torch.Tensor):
            return None
        w = args[0]
        if w._base is not None or w.is_meta or self.node_of.get(w) is None:
            return None  # a view, or a tensor the recording did not make (captured: BatchNorm's counter)
        storage = StorageWeakRef(w.untyped_storage())
        if storage in self.input_storages or storage in self.aliased:
            return None
        for a in args[1:]:
            if isinstance(a, torch.Tensor) and (a.dtype != w.dtype or a.device != w.device):
                return None
        functional = _functional_cache.get(func, False)
        if functional is False:
            try:
                functional = functional_variant(func)
            except NotImplementedError:
                functional = None
            _functional_cache[func] = functional
        return functional

    def _skip(self, func, args, kwargs, found):
        """Zeros shaped like ``func``'s output, from its meta kernel (``None``: run it after all).

        With zero tangent inputs every value of a tangent program is zero, so
        skipping a heavy tangent op (a matrix product, a convolution) changes
        nothing but the recording's cost.
        """
        if func is _aten.mv.default:  # its meta kernel is a slow Python decomposition
            m, v = args
            return torch.zeros(m.shape[0], dtype=m.dtype, device=m.device)
        if not _skippable(func):
            return None
        try:
            with _no_modes():  # an enclosing recorder need not see meta tensors
                out = func(*_on_meta(args), **_on_meta(kwargs))
        except Exception:  # no meta kernel
            return None
        return _zeros_like_meta(out, found[0][1].device)

    def _bind_outputs(self, func, out, node, depends, data):
        if isinstance(out, torch.Tensor):
            self.node_of[out] = node
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.node_of[o] = self.graph.add(
                        "call", operator.getitem, (node, i), name=f"{node.name}_{i}", tangent=depends, data=data
                    )
        elif out is not None and data and not any(tag in func.tags for tag in _READ_TAGS):
            self.reads.append((func, depends))  # a Python value out of tensors

    def _before_mutation(self, func, written, depends, data):
        for w in written:
            if not isinstance(w, torch.Tensor):
                continue
            if data:  # its views recorded earlier now hold data too
                self.tainted.add(StorageWeakRef(w.untyped_storage()))
            node = self.node_of.get(w)
            if depends and (node is None or not node.tangent):
                if self.unbatchable_mutation is None:
                    self.unbatchable_mutation = func
            where = self.input_storages.get(StorageWeakRef(w.untyped_storage()))
            if where is not None and where not in self.snapshots:
                source = self.inputs[where][1] if isinstance(where, int) else self.constants[where[1]]
                self.snapshots[where] = source.clone()

    # -- finishing -----------------------------------------------------------

    def finish(self, outputs):
        """Close the graph with ``outputs`` (a flat list; non-tensors are baked in)."""
        if self.grad_enabled != self.initial_grad_enabled:
            self.graph.add("call", _set_grad_enabled, (self.initial_grad_enabled,))
        nodes = [self.node_for(o) if isinstance(o, torch.Tensor) else o for o in outputs]
        self.graph.add("output", "output", (tuple(nodes),))
        self.output_nodes = nodes
        self.outputs = list(outputs)
        return self

    def foreign_outputs(self):
        """Whether an output is a tensor subclass: a dual of an enclosing transform that
        the function reached without taking it as an argument (a closure), which a
        recorded program, holding plain tensors only, cannot reproduce."""
        return any(isinstance(o, torch.Tensor) and type(o) not in _PLAIN for o in self.outputs)

    def value_reads(self, tangent_only=False):
        return [f for f, dep in self.reads if dep or not tangent_only]

    def stale_residuals(self):
        """Whether a kept residual was written in place after it was kept."""
        return any(t._version != v for t, v in self.residuals.values())

    def module(self):
        """The recorded graph as an fx GraphModule (constants held by reference)."""
        return fx.GraphModule(dict(self.constants), self.graph.to_fx())

    def program(self):
        """The recorded graph as a ``Program`` (constants held by reference)."""
        return Program(self.graph, dict(self.constants))


def record(body, inputs, names, is_tangent, keep_residuals=False, constant_names=None, skip_tangent_work=False):
    """Run ``body(*inputs)`` under a ``Recorder``; returns the finished recorder.

    ``body`` must return a flat list or tuple of outputs.  With
    ``skip_tangent_work`` (for zero tangent inputs whose results nobody
    needs) heavy tangent ops are recorded but not run, so recording costs
    about one primal evaluation.
    """
    rec = Recorder(keep_residuals=keep_residuals, skip_tangent_work=skip_tangent_work)
    if constant_names:
        rec.constant_names = constant_names
    # The recorder tells tensors apart by identity.  Each input gets its own
    # alias, so that a tensor passed twice (jvp(f, (x,), (x,))) gives two
    # inputs, and one that f also captures stays a constant of the program.
    inputs = [t.view_as(t) for t in inputs]
    for t, name, tan in zip(inputs, names, is_tangent):
        rec.input(t, name, tangent=tan)
    with rec:
        outputs = body(*inputs)
    return rec.finish(list(outputs))


def functionalized(rec, inputs, is_tangent, restore_rng):
    """Record ``rec``'s program again, without mutations, through ``torch.func.functionalize``.

    ``inputs`` are real values for ``rec``'s inputs (zeros for the tangents).
    The replay runs on the input values from before the first recording
    mutated them (its snapshots) and on the random-number state from before
    it, so it computes the same values; the first recording's side effects
    (e.g. BatchNorm running statistics) are not repeated.
    """
    gm = rec.module()
    names = [n.name for n, _ in rec.inputs]
    inputs = [rec.snapshots.get(i, t) for i, t in enumerate(inputs)]
    const_names = {}
    for name in rec.constants:
        if ("const", name) in rec.snapshots:
            # Replay on a copy of a captured tensor that the program mutates.
            delattr(gm, name)
            setattr(gm, name, rec.snapshots[("const", name)])
        const_names[id(getattr(gm, name))] = name
    restore_rng()
    pure = torch.func.functionalize(gm, remove="mutations")
    again = record(
        lambda *xs: pure(*xs), inputs, names, is_tangent, keep_residuals=True, constant_names=const_names
    )
    return again


def tangent_program(rec, tangent_outputs):
    """The tangent program alone: ``(Program, residual values, residual nodes)``.

    The program takes the residuals, then the tangent inputs, and returns the
    outputs of ``rec`` at the indices ``tangent_outputs``.  A primal value
    returned as a tangent (a materialised zero tangent) is a residual too.
    The residual nodes are ``rec``'s, for ``primal_program``.
    """
    graph = Graph()
    env = {}
    residuals = {}  # placeholder -> value
    sources = {}  # placeholder -> rec's node

    def residual(node, value):
        if node not in env:
            env[node] = graph.add("placeholder", node.name, name=node.name)
            residuals[env[node]] = value
            sources[env[node]] = node

    for node, (value, _) in rec.residuals.items():
        residual(node, value)
    wanted = [(rec.output_nodes[i], rec.outputs[i]) for i in tangent_outputs]
    for node, value in wanted:
        if isinstance(node, Node) and not node.tangent:
            residual(node, value)
    for node, _ in rec.inputs:
        if node.tangent:
            env[node] = graph.add("placeholder", node.name, name=node.name, tangent=True)
    # Without in-place ops nothing depends on a view aliasing its base, so views
    # become reshapes: those decide view or copy when they run, on the strides
    # they get (vmap's batched tangents, or jvp_fn's tangents, may have other
    # strides than the recording's).
    in_place = any(n.tangent and has_effects(n.target) for n in rec.graph.nodes if n.op == "call")
    for node in rec.graph.nodes:
        if node.op == "call" and (node.tangent or node.target is _set_grad_enabled):
            target = None if in_place or node.target not in _VIEWS else _aten.reshape.default
            env[node] = graph.copy(node, env, target)
    graph.add("output", "output", (tuple(remap(n, env) for n, _ in wanted),))
    graph.eliminate_dead_code()
    used = {n for node in graph.nodes for n in node.inputs()}
    graph.nodes = [n for n in graph.nodes if n.op != "placeholder" or n.tangent or n in used]
    values = [residuals[n] for n in graph.nodes if n in residuals]
    return Program(graph, {}), values, [sources[n] for n in graph.nodes if n in residuals]


def primal_program(rec, primal_outputs, residual_nodes):
    """The primal program alone, to compute at new inputs what ``tangent_program`` reads.

    It takes ``rec``'s primal inputs and returns its outputs at the indices
    ``primal_outputs``, then the values of ``residual_nodes``.
    """
    graph = Graph()
    env = {}
    for node, _ in rec.inputs:
        if not node.tangent:
            env[node] = graph.add("placeholder", node.name, name=node.name)
    for node in rec.graph.nodes:
        if node.op == "get_attr" or (node.op == "call" and (not node.tangent or node.target is _set_grad_enabled)):
            env[node] = graph.copy(node, env)
    wanted = [rec.output_nodes[i] for i in primal_outputs] + list(residual_nodes)
    graph.add("output", "output", (tuple(remap(n, env) for n in wanted),))
    graph.eliminate_dead_code()
    return Program(graph, dict(rec.constants))


# --------------------------------------------------------------------------
# What a traced function captures.


_HOLDS = (torch.Tensor, torch.nn.Module)


def _contents(obj):
    """Tensors and modules in ``obj``: itself, or the items of a list, tuple or dict (one level)."""
    if isinstance(obj, _HOLDS):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [x for x in obj if isinstance(x, _HOLDS)]
    if isinstance(obj, dict):
        return [x for x in obj.values() if isinstance(x, _HOLDS)]
    return []


_SCALARS = (bool, int, complex, str, bytes, type(None))
_MISSING = object()


def value_key(obj):
    """What a recording may have baked in from a captured non-tensor value: the
    value itself for numbers, strings and tuples of them (a float by its exact
    bits, so NaN matches itself); otherwise the object's identity."""
    if isinstance(obj, float):
        return (float, obj.hex())
    if isinstance(obj, _SCALARS):
        return (type(obj), obj)
    if isinstance(obj, tuple):
        return (tuple, tuple(value_key(x) for x in obj))
    return ("id", id(obj))


def _module_values(module):
    """Plain attributes of ``module`` and its submodules (``p`` of Dropout, ``eps``, a
    user's ``self.scale``): a forward may read them."""
    out = []
    for m in module.modules():
        for k, v in vars(m).items():
            if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module)):
                out.append(value_key(v))
    return out


class Captures:
    """Where ``func`` may find tensors that are not its arguments (shallow).

    Tensors and modules (or lists, tuples and dicts of them) in its closure,
    its defaults, the globals it names; the module of a bound method; the
    pieces of a ``functools.partial``.
    """

    def __init__(self, func):
        self.direct = []  # objects reached without a lookup
        self.cells = []
        self.globals = []  # (dict, name)
        self.other_globals = []  # (dict, name) of other values it names (not modules)
        self._collect(func, depth=0)

    def _collect(self, obj, depth):
        if _contents(obj):
            self.direct.append(obj)
            return
        if depth > 1:
            return
        if isinstance(obj, functools.partial):
            self._collect(obj.func, depth + 1)
            for a in (*obj.args, *obj.keywords.values()):
                self._collect(a, depth + 1)
            return
        self_ = getattr(obj, "__self__", None)
        if isinstance(self_, torch.nn.Module):
            self.direct.append(self_)
        fn = getattr(obj, "__func__", obj)
        code = getattr(fn, "__code__", None)
        if code is None:
            return
        self.cells.extend(fn.__closure__ or ())
        g = getattr(fn, "__globals__", {})
        for name in code.co_names:
            if _contents(g.get(name)):
                self.globals.append((g, name))
            elif name in g and not isinstance(g[name], types.ModuleType):
                self.other_globals.append((g, name))
        for d in (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()):
            if _contents(d):
                self.direct.append(d)

    def objects(self):
        """The tensors and modules reachable now."""
        found = []
        for obj in self.direct:
            found.extend(_contents(obj))
        for cell in self.cells:
            try:
                found.extend(_contents(cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        for g, name in self.globals:
            found.extend(_contents(g.get(name)))
        return found

    def state(self):
        """``(key, objects)``: identities and flags to guard on, and the objects to keep alive."""
        ids, flags, keep = [], [], []
        for obj in self.objects():
            ids.append(id(obj))
            keep.append(obj)
            if isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(), *obj.buffers()):
                    ids.append(id(t))
                    keep.append(t)
                flags.extend(m.training for m in obj.modules())
                flags.extend(_module_values(obj))
        # Non-tensor values in the closure and the globals it names: a float a
        # recording multiplied by is baked into the graph.
        for cell in self.cells:
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if not _contents(v):
                flags.append(value_key(v))
                keep.append(v)
        for g, name in self.other_globals:
            v = g.get(name, _MISSING)
            flags.append(value_key(v))
            keep.append(v)
        return (tuple(ids), tuple(flags)), keep

    def names(self):
        """Parameter and buffer names of the captured modules, by tensor id (for ``.code``)."""
        names = {}
        for obj in self.objects():
            if isinstance(obj, torch.nn.Module):
                for n, t in (*obj.named_parameters(), *obj.named_buffers()):
                    names.setdefault(id(t), n)
        return names


def leaf_key(x):
    """What a recorded program may depend on in one argument leaf."""
    if isinstance(x, torch.Tensor):
        return (type(x), x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return (type(x), x)


def signature(spec, leaves, captured, *extra):
    """The guard of a recorded program: the arguments' structure and leaves, what
    the function captures (``Captures.state``), ``extra``, and the modes."""
    return (
        spec,
        tuple(map(leaf_key, leaves)),
        *extra,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        # autocast's switches and target dtypes: a bfloat16 recording must not replay under float16
        tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")),
        captured,
    )


# --------------------------------------------------------------------------
# The traced function: a jvp call with its arguments flattened to tensors.


class FlatJvp:
    """``func``'s jvp as a function of flat tensors: ``body(*tensor_leaves, *tangents)``.

    ``args``/``kwargs`` are one call's arguments.  Their tensor leaves become
    the body's inputs; a leaf whose index is in ``dual`` is wrapped as a dual
    (with the tangent given for it, if its index is in ``tangent_idx``, else a
    zero tangent); other leaves keep their values.  The body returns the flat
    primal outputs, the flat tangent outputs, then the flat aux outputs; after
    a run ``n_out``, ``out_spec`` and ``aux_spec`` describe them.
    """

    def __init__(self, func, args, kwargs, dual, tangent_idx, has_aux, name):
        self.func = func
        self.has_aux = has_aux
        self.name = name
        self.leaves, self.spec = pytree.tree_flatten((tuple(args), kwargs))
        self.tensor_idx = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]
        self.dual = dual
        self.tangent_idx = list(tangent_idx)
        self.arg_names = _leaf_names(func, args, kwargs)

    def __call__(self, *xs):
        with level_scope() as level:
            return self._run(xs, level)

    def _run(self, xs, level):
        n = len(self.tensor_idx)
        leaves = list(self.leaves)
        tangents = dict(zip(self.tangent_idx, xs[n:]))
        for i, p in zip(self.tensor_idx, xs[:n]):
            if i in self.dual:
                leaves[i] = Dual(lift_input(p, level), tangents.get(i), level, requires_grad=p.requires_grad)
            else:
                leaves[i] = p
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = self.func(*args, **kwargs)
        out, aux = split_aux(out, self.has_aux, self.name)
        primal, tangent = split_outputs(out, level, self.name)
        aux = drop_level(aux, level)
        p_leaves, self.out_spec = pytree.tree_flatten(primal)
        t_leaves = pytree.tree_flatten(tangent)[0]
        aux_leaves, self.aux_spec = pytree.tree_flatten(aux)
        self.n_out = len(p_leaves)
        return [*p_leaves, *t_leaves, *aux_leaves]

    def forget_values(self):
        """Drop the references to this call's tensors (the spec and indices stay)."""
        self.leaves = [None if isinstance(x, torch.Tensor) else x for x in self.leaves]

    def input_names(self):
        primal = [self.arg_names[i] for i in self.tensor_idx]
        return primal + ["d" + self.arg_names[i] for i in self.tangent_idx]

    def is_tangent(self):
        return [False] * len(self.tensor_idx) + [True] * len(self.tangent_idx)

    def record(self, primals, tangents, keep_residuals=False, constant_names=None, skip_tangent_work=False):
        return record(
            self, [*primals, *tangents], self.input_names(), self.is_tangent(),
            keep_residuals=keep_residuals, constant_names=constant_names,
            skip_tangent_work=skip_tangent_work,
        )

    def unflatten(self, outputs):
        """``(primal_out, tangent_out, aux)`` from the body's flat outputs."""
        n = self.n_out
        if n == 1 and self.out_spec.is_leaf() and not self.has_aux:
            return outputs[0], outputs[1], None
        primal = pytree.tree_unflatten(outputs[:n], self.out_spec)
        tangent = pytree.tree_unflatten(outputs[n:2 * n], self.out_spec)
        aux = pytree.tree_unflatten(outputs[2 * n:], self.aux_spec) if self.has_aux else None
        return primal, tangent, aux


def _leaf_names(func, args, kwargs):
    """A readable name for each leaf of ``(args, kwargs)``: ``x``, ``params_w``, ``arg1_0``."""
    names = []
    bases = param_names(func, len(args)) + list(kwargs)
    for arg, base in zip([*args, *kwargs.values()], bases):
        paths = pytree.tree_flatten_with_path(arg)[0]
        for path, _ in paths:
            parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            names.append("_".join([base, *parts]))
    return names
