"""Long runs leave nothing behind: repeated jvp, traced jvp and hvp calls keep
no duals, tensors or cache entries per call, and free every dual by reference
counting alone (no cycle waits for the garbage collector).

The full-size run (10,000 jvp and 1,000 hvp calls, resident memory printed
over time) is ``benchmarks/long_run.py``.
"""

import gc
import weakref

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad import interpreter, registry, traced

CALLS = 40  # a leak of even one object per call shows as growth >= CALLS

_g = torch.Generator().manual_seed(0)
W1 = torch.randn(8, 16, dtype=torch.float64, generator=_g) * 0.3
W2 = torch.randn(16, 4, dtype=torch.float64, generator=_g) * 0.3
X = torch.randn(5, 8, dtype=torch.float64, generator=_g)
V = torch.randn(5, 8, dtype=torch.float64, generator=_g)

SEEN = []  # weak references to duals made inside the functions


def model(x):
    SEEN.append(weakref.ref(x))
    h = F.gelu(x @ W1)
    SEEN.append(weakref.ref(h))
    y = h.clone()
    y[:, 1:].mul_(h[:, :-1].sigmoid())  # views and in-place ops
    SEEN.append(weakref.ref(y))
    return F.layer_norm(y, (16,)) @ W2


def loss(x):
    return F.log_softmax(model(x), -1).pow(2).sum()


MODEL = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
PARAMS = dict(MODEL.named_parameters())
DIRECTION = {k: torch.randn(p.shape, dtype=p.dtype, generator=_g) for k, p in PARAMS.items()}


def closure_loss():
    return F.log_softmax(MODEL(X), -1).pow(2).sum()


def _counts():
    gc.collect()
    objects = gc.get_objects()
    return {
        "duals": sum(type(o) is interpreter.Dual for o in objects),
        "tensors": sum(issubclass(type(o), torch.Tensor) for o in objects),
        "weakrefs": sum(type(o) is weakref.ref for o in objects),
        "op cache": len(interpreter._entries),
        "rules": len(registry.RULES),
        "traced programs": len(traced._by_function) + sum(len(t.cache) for t in traced._by_function.values()),
        "objects": len(objects),
    }


def _run(step, calls):
    for _ in range(calls):
        step()
        SEEN.clear()


def _check_flat(step):
    _run(step, 5)  # warm up: rule lookups, cached op entries
    before = _counts()
    _run(step, CALLS)
    after = _counts()
    for key in ("duals", "tensors", "weakrefs", "op cache", "rules", "traced programs"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]} over {CALLS} calls"
    # Python objects: allow a little noise (interned strings, frames), not a per-call leak.
    assert after["objects"] - before["objects"] < CALLS // 4, (before["objects"], after["objects"])


def test_repeated_jvp_leaves_nothing_behind():
    _check_flat(lambda: fwdgrad.jvp(model, (X,), (V,)))


def test_repeated_traced_jvp_leaves_nothing_behind():
    _check_flat(lambda: fwdgrad.jvp(model, (X,), (V,), trace=True))


def test_repeated_hvp_leaves_nothing_behind():
    _check_flat(lambda: fwdgrad.hvp(loss, X, V))


def test_repeated_closure_hvp_leaves_nothing_behind():
    """The closure form swaps live parameters in and out on every call."""
    _check_flat(lambda: fwdgrad.hvp(closure_loss, PARAMS, DIRECTION))
    assert all(type(p) is torch.nn.Parameter and p.grad is None for p in MODEL.parameters())


def test_duals_die_by_reference_counting_alone():
    """With the garbage collector off, every dual made inside f is gone as soon
    as the transform returns: no reference cycle keeps a graph alive."""
    for step in (
        lambda: fwdgrad.jvp(model, (X,), (V,)),
        lambda: fwdgrad.hvp(loss, X, V),
    ):
        SEEN.clear()
        gc.disable()
        try:
            out = step()
            alive = [r for r in SEEN if r() is not None]
        finally:
            gc.enable()
        assert len(SEEN) == 3 and not alive, f"{len(alive)} of {len(SEEN)} duals outlived the call"
        assert all(type(o) is torch.Tensor for o in (out if isinstance(out, tuple) else (out,)))
