"""Interrupt injection: a ``KeyboardInterrupt`` at any point of a transform leaves nothing behind.

Each transform is run once to count its dispatched ops (calls of the
interpreter) and the lines it executes inside fwdgrad; then it is run again
and again with a ``KeyboardInterrupt`` raised at every k-th of them.  After
each interrupt the model's parameters must be the same objects with the same
values, its buffers and the random state as before the call, no dual may be
left alive, and plain torch must work; a later uninterrupted call must give
the same result as before.

An interrupt that comes after the transform's own guard has closed (while
its results are being put together) may find the state as after one
complete call instead; the parameters must still be intact.

Lines inside ``Deferred`` blocks (the closure form's swaps, restoring a
snapshot, where a real SIGINT is held back until they are complete) are not
interrupted, as a signal could not interrupt them either; nor is the state
guard's own entry and exit, nor the exit of a ``with`` statement (the line
event Python reports when it leaves a ``with`` block: an exception there
skips ``__exit__``, a hazard of CPython's ``with`` for asynchronous
exceptions that no library can close).
"""

import linecache
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad import interpreter
from fwdgrad import state
from fwdgrad.state import Deferred, State
from state_checks import assert_plain_torch, live_duals

PACKAGE = os.path.dirname(os.path.abspath(fwdgrad.__file__))
INJECTIONS = 4  # per scenario and kind by default; the whole file stays under 30 s
FULL = pytest.param(True, marks=pytest.mark.sweep)  # every op, and 200 lines: pytest --sweep


class Net(torch.nn.Module):
    """Parameters, BatchNorm statistics, a running average and a dropout: all the state kinds."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.out = torch.nn.Linear(4, 1)
        self.register_buffer("avg", torch.zeros(4))

    def forward(self, x):
        h = self.bn(self.lin(x))
        self.avg.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.out(F.dropout(torch.tanh(h), 0.25)).squeeze(-1)


def _scenarios():
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}

    def pure(params):
        return torch.func.functional_call(net, params, (x,)).pow(2).sum()

    return net, {
        "jvp": lambda: fwdgrad.jvp(net, (x,), (torch.ones_like(x),))[1],
        "jacfwd": lambda: fwdgrad.jacfwd(net)(x),
        "linearize": lambda: fwdgrad.linearize(net, x)[1](torch.ones_like(x)),
        "hvp_pure": lambda: fwdgrad.hvp(pure, {n: p for n, p in net.named_parameters()}, v),
        "hvp_closure": lambda: fwdgrad.hvp(lambda: net(x).pow(2).sum(), dict(net.named_parameters()), v),
    }, names


def _state(net):
    params = [(p, p.detach().clone()) for p in net.parameters()]
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    return params, buffers, torch.get_rng_state()


def _reset(net, state):
    _, buffers, rng = state
    with torch.no_grad():
        for k, b in net.named_buffers():
            b.copy_(buffers[k])
    torch.set_rng_state(rng)


def _assert_state(net, before, where):
    params, buffers, rng = before
    for (p, value), now in zip(params, net.parameters()):
        assert now is p, f"{where}: a parameter object was replaced"
        assert type(now) is torch.nn.Parameter, f"{where}: a parameter is a {type(now).__name__}"
        assert torch.equal(now.detach(), value), f"{where}: a parameter's value changed"
    for k, b in net.named_buffers():
        assert torch.equal(b, buffers[k]), f"{where}: buffer {k} changed"
    assert torch.equal(torch.get_rng_state(), rng), f"{where}: the random state changed"


class _OpInterrupt:
    """Raise ``KeyboardInterrupt`` at the k-th dispatched op (``k=None``: count only)."""

    def __init__(self, monkeypatch, k=None):
        self.count = 0
        self.k = k
        real = interpreter.interpret

        def interpret(func, args, kwargs):
            self.count += 1
            if self.count == self.k:
                raise KeyboardInterrupt(f"injected at op {self.count} ({func})")
            return real(func, args, kwargs)

        monkeypatch.setattr(interpreter, "interpret", interpret)


_ATOMIC = {  # the guards' own entry and exit
    f.__code__ for f in (
        state._UndoneOnError.__enter__, state._UndoneOnError.__exit__, Deferred.__enter__, Deferred.__exit__
    )
}
_last_line = {}


def _leaves_with(frame):
    """Whether this line event is Python leaving a ``with`` block (back on the ``with`` line)."""
    key = id(frame)
    last = _last_line.get(key)
    _last_line[key] = frame.f_lineno
    if last is None or frame.f_lineno >= last:
        return False
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with ")


class _LineInterrupt:
    """Raise ``KeyboardInterrupt`` at the k-th line executed in fwdgrad's own files."""

    def __init__(self, k=None):
        self.count = 0
        self.k = k
        self.guarded = None  # whether the interrupt came inside a transform's state guard

    def _local(self, frame, event, arg):
        if event == "line" and Deferred.depth == 0 and frame.f_code not in _ATOMIC and not _leaves_with(frame):
            self.count += 1
            if self.count == self.k:
                self.guarded = State.guarding > 0
                raise KeyboardInterrupt(f"injected at line {frame.f_code.co_filename}:{frame.f_lineno}")
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(PACKAGE):
            return self._local
        return None

    def __enter__(self):
        _last_line.clear()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        return False


def _points(total, full):
    step = 1 if full else max(1, total // INJECTIONS)
    return range(1, total + 1, step)


def _line_points(total, full):
    return range(1, total + 1, max(1, total // (200 if full else INJECTIONS)))


def _assert_clean_afterwards(name, run, duals):
    """After the interrupts: no dual outlived them, plain torch is untouched, and the
    transform still gives the same result twice."""
    assert len(live_duals()) <= duals, f"{name}: duals outlived the interrupts"
    assert_plain_torch()
    torch.manual_seed(3)
    expected = run()
    torch.manual_seed(3)
    torch.testing.assert_close(run(), expected)


@pytest.mark.parametrize("full", [False, FULL])
@pytest.mark.parametrize("name", ["jvp", "jacfwd", "linearize", "hvp_pure", "hvp_closure"])
def test_interrupt_at_every_kth_op_leaves_no_trace(name, full, monkeypatch):
    net, scenarios, _ = _scenarios()
    run = scenarios[name]
    with monkeypatch.context() as m:
        counter = _OpInterrupt(m)
        torch.manual_seed(1)
        run()
        total = counter.count
    assert total >= 5
    torch.manual_seed(2)
    before = _state(net)
    duals = len(live_duals())
    for k in _points(total, full):
        with monkeypatch.context() as m:
            _OpInterrupt(m, k)
            with pytest.raises(KeyboardInterrupt):
                run()
        _assert_state(net, before, f"{name}, interrupt at op {k} of {total}")
    _assert_clean_afterwards(name, run, duals)


@pytest.mark.parametrize("full", [False, FULL])
@pytest.mark.parametrize("name", ["jvp", "jacfwd", "linearize", "hvp_pure", "hvp_closure"])
def test_interrupt_at_every_kth_line_leaves_no_trace(name, full):
    net, scenarios, _ = _scenarios()
    run = scenarios[name]
    torch.manual_seed(1)
    run()  # warm up: first calls take paths (caches filled) later ones do not
    torch.manual_seed(2)
    before = _state(net)
    with _LineInterrupt() as counter:
        run()
    total = counter.count
    assert total >= 5
    after = _state(net)  # as after one complete call
    _reset(net, before)
    duals = len(live_duals())
    for k in _line_points(total, full):
        with pytest.raises(KeyboardInterrupt):
            with _LineInterrupt(k) as injected:
                run()
        where = f"{name}, interrupt at line {k} of {total}"
        if injected.guarded:
            _assert_state(net, before, where)
        else:
            try:
                _assert_state(net, before, where)
            except AssertionError:
                _assert_state(net, after, where + " (after the guard)")
                _reset(net, before)
    _assert_clean_afterwards(name, run, duals)


def test_closure_hvp_survives_an_interrupt_during_backward(monkeypatch):
    """The interrupt comes from a backward op that autograd's engine runs (forward over reverse)."""
    net, scenarios, _ = _scenarios()
    before = _state(net)
    real = interpreter.interpret

    def interpret(func, args, kwargs):
        if func is torch.ops.aten.tanh_backward.default:
            raise KeyboardInterrupt("in backward")
        return real(func, args, kwargs)

    with monkeypatch.context() as m:
        m.setattr(interpreter, "interpret", interpret)
        with pytest.raises(KeyboardInterrupt):
            scenarios["hvp_closure"]()
    _assert_state(net, before, "interrupt in backward")
    torch.manual_seed(0)
    got = scenarios["hvp_closure"]()
    torch.manual_seed(0)
    ref = scenarios["hvp_pure"]()
    torch.testing.assert_close(got, ref)


def test_a_level_whose_pop_was_interrupted_is_dropped_by_the_next_transform():
    """An interrupt on the very line of a scope's ``finally`` that pops its level skips
    the pop; the next transform finds the level's scope gone and drops it."""
    from fwdgrad import functorch_layers

    code = functorch_layers._functorch_scope.__wrapped__.__code__
    lines = [i for i, text in enumerate(linecache.getlines(code.co_filename), 1) if "leave_to(depth)" in text]
    assert len(lines) == 1
    x = torch.randn(3, dtype=torch.float64)

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == lines[0]:
                raise KeyboardInterrupt("at the pop")
            return local
        return local

    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt, match="at the pop"):
            fwdgrad.jvp(torch.sin, (x,), (torch.ones_like(x),))
    finally:
        sys.settrace(None)
    assert len(interpreter._stack()) == 1, "the interrupt left the level (the case this test is about)"
    out, t = fwdgrad.jvp(lambda y: fwdgrad.jvp(torch.sin, (y,), (torch.ones_like(y),))[1] * y, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(t, torch.cos(x) - x * torch.sin(x))
    assert interpreter._stack() == []


def test_no_with_body_opens_with_a_try():
    """On Python 3.11 an exception raised at a ``try:`` line that opens a ``with`` body
    skips the ``with``'s exit (a torch-function switch stayed off for good)."""
    import ast
    import pathlib

    found = []
    for path in pathlib.Path(PACKAGE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.With) and isinstance(node.body[0], ast.Try):
                found.append(f"{path}:{node.lineno}")
    assert not found, found
