"""Checks that fwdgrad left nothing behind: plain torch must run untouched.

Used after errors (tests/test_errors.py) and exceptions
(tests/test_exceptions.py).
"""

import gc

import torch
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from fwdgrad.interpreter import Dual


def live_duals():
    """Every ``Dual`` still reachable after a full garbage collection."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Dual]


def assert_plain_torch(grad_enabled=True):
    """No dispatch or function mode is active, grad mode is as expected, and
    plain tensors give plain results with ordinary autograd."""
    assert _get_current_dispatch_mode_stack() == []
    assert _get_current_function_mode_stack() == []
    for key in torch._C._TorchDispatchModeKey.__members__.values():
        assert torch._C._get_dispatch_mode(key) is None
    assert torch.is_grad_enabled() is grad_enabled
    x = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = (x.sin() * 2).sum()
        (g,) = torch.autograd.grad(y, x)
    assert type(y) is torch.Tensor and type(g) is torch.Tensor
    torch.testing.assert_close(g, 2 * x.detach().cos())
    z = torch.ones(3)
    z.add_(1)[1:].mul_(3)
    assert type(z) is torch.Tensor
    assert z.tolist() == [2.0, 6.0, 6.0]


class NoNewDuals:
    """Context manager: no ``Dual`` made inside the block outlives it.

    Duals alive before the block (from other tests) are ignored.
    """

    def __enter__(self):
        self.before = {id(d) for d in live_duals()}
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        new = [d for d in live_duals() if id(d) not in self.before]
        assert not new, f"{len(new)} Dual tensors outlived the call, e.g. {new[0]!r}"
        return False
