"""fwdgrad's modules import downward only (DESIGN.md, "Layers").

The import graph is read from the source with ``ast``, imports inside
functions included, so a cycle cannot hide in a function body.  Every module
must have a place in ``LAYERS``: a new module states where it sits.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fwdgrad"

# Bottom first.  A module may import modules of its own layer or lower ones.
LAYERS = [
    {"ops", "errors", "slicing", "dtensor", "distributed", "fsdp"},
    {"registry"},
    {"interpreter"},
    {"functorch_layers"},
    {"fallback"},
    {"rules"},
    {"arguments"},
    {"graph", "trace"},
    {"state"},
    {"reverse"},
    {"traced"},
    {"jacobian"},
    {"transforms"},
    {"curvature"},
    {"linops", "spectra"},
    {"__init__"},
]


def _module_name(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def _resolve(importer, node):
    """The fwdgrad modules an import statement in ``importer`` names."""
    package = importer.split(".")[:-1]  # "rules.nn" and "rules.__init__" both sit in rules
    if isinstance(node, ast.Import):
        return [a.name[len("fwdgrad."):] for a in node.names if a.name.startswith("fwdgrad.")]
    if node.level == 0:
        if node.module == "fwdgrad":
            return [a.name for a in node.names]
        if node.module and node.module.startswith("fwdgrad."):
            return [node.module[len("fwdgrad."):]]
        return []
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    if node.module:
        return [".".join(base + [node.module])]
    return [".".join(base + [a.name]) for a in node.names]


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(modules) | {m[: -len(".__init__")] for m in modules if m.endswith(".__init__")}
    graph, nested = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, node):
                    # "from . import x" may name a function of a package: keep modules only
                    while target and target not in known:
                        target = target.rpartition(".")[0]
                    if target and target != name.removesuffix(".__init__"):
                        targets.add(target)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(isinstance(n, (ast.Import, ast.ImportFrom)) and _resolve(name, n) for n in ast.walk(fn)):
                    nested.append(f"{name}.{fn.name}")
        graph[name.removesuffix(".__init__") or "__init__"] = targets
    return graph, nested


def _layer(module):
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"fwdgrad/{module.replace('.', '/')}.py has no place in LAYERS: add it to "
                         "tests/test_layers.py and to DESIGN.md's layer diagram")


def test_the_graph_is_read():
    graph, _ = _graph()
    assert "registry" in graph["interpreter"] and "interpreter" in graph["reverse"]
    assert "registry" in graph["rules.pointwise"]


def test_no_import_inside_a_function():
    _, nested = _graph()
    assert nested == []


def test_no_cycles():
    graph, _ = _graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_go_downward():
    graph, _ = _graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if a != "__init__" and _layer(b) > _layer(a)]
    assert upward == []
