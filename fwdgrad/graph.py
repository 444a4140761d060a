"""The light graph that fwdgrad records programs into, and running it.

A recorded program is a list of ``Node``s (placeholder, get_attr, call,
output) in execution order.  Recording appends to the list; a ``torch.fx``
graph is built from it only when someone looks (``Program.code``,
``Program.graph_module``) or for ``torch.func.functionalize``, because fx's
``create_node`` costs more than the rest of recording an op.  A ``Program``
runs a graph as generated straight-line Python.
"""

import keyword
import operator

import torch
import torch.fx as fx

from .ops import mutated_args, op_name

_set_grad_enabled = torch._C._set_grad_enabled


class Node:
    """One step of a recorded program (``op``: placeholder, get_attr, call or output)."""

    __slots__ = ("op", "target", "args", "kwargs", "name", "tangent", "data")

    def __init__(self, op, target, args, kwargs, name, tangent=False, data=True):
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.name = name
        self.tangent = tangent  # depends on a tangent input
        # Depends on data: an input, a captured tensor or a random draw (else it
        # is a function of shapes and literal arguments, which the guards cover).
        self.data = data

    def inputs(self):
        """The nodes this node reads."""
        found = []
        _collect_nodes((self.args, tuple(self.kwargs.values())), found)
        return found

    def __repr__(self):
        return f"Node({self.name})"


def _collect_nodes(a, found):
    if isinstance(a, Node):
        found.append(a)
    elif isinstance(a, (list, tuple)):
        for b in a:
            _collect_nodes(b, found)


def remap(a, env):
    if isinstance(a, Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(remap(b, env) for b in a)
    return a


class Graph:
    """A list of nodes in execution order, with unique readable names."""

    def __init__(self):
        self.nodes = []
        self._names = set()
        self._counts = {}

    def _unique(self, base):
        if not base.isidentifier() or keyword.iskeyword(base):
            base = "v_" + "".join(c if c.isalnum() else "_" for c in base)
        count = self._counts.get(base, 0)
        name = base if count == 0 else f"{base}_{count}"
        while name in self._names:
            count += 1
            name = f"{base}_{count}"
        self._counts[base] = count + 1
        self._names.add(name)
        return name

    def add(self, op, target, args=(), kwargs=None, name=None, tangent=False, data=True):
        node = Node(op, target, args, kwargs or {}, self._unique(name or op_name(target)), tangent, data)
        self.nodes.append(node)
        return node

    def copy(self, node, env, target=None):
        """Append a copy of ``node`` (from another graph) with its inputs mapped through ``env``."""
        return self.add(
            node.op, target or node.target, remap(node.args, env), remap(node.kwargs, env), node.name, node.tangent
        )

    def eliminate_dead_code(self):
        """Drop nodes that neither feed the output nor have side effects."""
        live = set()
        for node in reversed(self.nodes):
            if node in live or node.op in ("placeholder", "output") or has_effects(node.target):
                live.add(node)
                live.update(node.inputs())
        self.nodes = [n for n in self.nodes if n in live]

    def to_fx(self):
        graph = fx.Graph()
        env = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = graph.placeholder(node.name)
            elif node.op == "get_attr":
                env[node] = graph.get_attr(node.target)
            elif node.op == "call":
                env[node] = graph.create_node(
                    "call_function", node.target, remap(node.args, env), remap(node.kwargs, env), name=node.name
                )
            else:
                graph.output(remap(node.args[0], env))
        return graph


def has_effects(target):
    return target is _set_grad_enabled or (isinstance(target, _OpOverload) and bool(mutated_args(target)))


_OpOverload = torch._ops.OpOverload
_INF = float("inf")


class Program:
    """A recorded graph, callable.

    Calls run a straight-line Python function generated from the graph that
    calls each op's C++ entry point directly and frees each value after its
    last use: about a third less per-op overhead than the fx ``GraphModule``'s
    code, which goes through ``OpOverload.__call__``.  ``graph_module`` and
    ``code`` give the fx form, for reading and for ``torch.compile``.
    """

    def __init__(self, graph, constants):
        self.graph = graph
        self.constants = constants
        self._module = None
        self.run = _straight_line(graph, constants)

    def __call__(self, *inputs):
        return self.run(*inputs)

    @property
    def graph_module(self):
        if self._module is None:
            self._module = fx.GraphModule(dict(self.constants), self.graph.to_fx())
        return self._module

    @property
    def code(self):
        return self.graph_module.code


def _straight_line(graph, constants):
    """Python source for ``graph``, compiled: ``v3 = _f0(v1, 2.0); del v1`` and so on."""
    env = {}  # globals of the generated function
    names = {}
    last_use = {}
    nodes = graph.nodes
    for i, node in enumerate(nodes):
        for a in node.inputs():
            last_use[a] = i

    def glob(value, prefix):
        name = f"{prefix}{len(env)}"
        env[name] = value
        return name

    def ref(a):
        if isinstance(a, Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(ref(b) for b in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or type(a) in (bool, int, str) or (type(a) is float and -_INF < a < _INF):
            return repr(a)
        return glob(a, "_c")

    params, lines = [], []
    for i, node in enumerate(nodes):
        name = names[node] = f"v{i}"
        if node.op == "placeholder":
            params.append(name)
            continue
        if node.op == "get_attr":
            lines.append(f"{name} = {glob(constants[node.target], '_c')}")
        elif node.op == "call":
            target = node.target
            if target is operator.getitem:
                lines.append(f"{name} = {ref(node.args[0])}[{node.args[1]}]")
            else:
                fn = target._op if isinstance(target, _OpOverload) else target
                args = [ref(a) for a in node.args] + [f"{k}={ref(v)}" for k, v in node.kwargs.items()]
                lines.append(f"{name} = {glob(fn, '_f')}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"return {ref(node.args[0])}")
            break
        dead = sorted({names[a] for a in node.inputs() if last_use[a] == i})
        if dead:
            lines.append(f"del {', '.join(dead)}")
    source = f"def run({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in lines)
    exec(compile(source, "<fwdgrad program>", "exec"), env)
    return env["run"]
