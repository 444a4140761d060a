"""The state a function may change besides its outputs: random draws and module buffers.

A plain call of ``f`` advances the random-number generators and may write
module buffers in place (BatchNorm's running statistics).  Every transform
must leave both exactly as one plain call of ``f`` per call of the
transform, and as no call at all when it raises.  Two situations break that:

- a transform that evaluates ``f`` several times for one call (``jacfwd`` or
  batched ``jvp`` pushing directions through the eager interpreter, one
  evaluation each; ``linearize``'s ``jvp_fn`` on that path): each extra
  evaluation must see the state from before the first one (so it draws the
  same random numbers, torch.func's ``randomness='same'``, and reads the same
  buffers), and must leave the state as it found it;
- an exception (including ``KeyboardInterrupt``) part-way through ``f``.

``State(func)`` takes a snapshot of the generators and of the buffers of the
modules ``func`` captures (``trace.Captures``: its closure, defaults, the
globals it names, the module of a bound method), and can put it back.
Buffers reached in other ways (through an attribute of a plain object) are
not seen.  Snapshots are taken and restored with dispatch modes off, so a
recording transform around this one does not record them.
"""

import contextlib
import signal
import threading

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .trace import Captures


def rng_state():
    """The state of the CPU generator (and of the CUDA ones, once CUDA is initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _buffers(func):
    """The buffers of the modules that ``func`` captures, each once."""
    seen, out = set(), []
    for obj in Captures(func).objects():
        if isinstance(obj, torch.nn.Module):
            for b in obj.buffers():
                if id(b) not in seen and not b.is_inference():
                    seen.add(id(b))
                    out.append(b)
    return out


def _quiet():
    """No autograd and no dispatch mode (an enclosing recorder) sees the copies."""
    if torch._C._len_torch_dispatch_stack():
        stack = contextlib.ExitStack()
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.no_grad())
        return stack
    return torch.no_grad()


class Deferred:
    """SIGINT (``KeyboardInterrupt``) is held back inside the block and delivered after it.

    For bookkeeping that must not stop half way: the closure form of ``hvp``
    swaps a parameter with its dual in three steps (class, ``__dict__``, the
    C++ tensor), and a snapshot is put back buffer by buffer.  Only the main
    thread receives signals, so elsewhere this does nothing.
    """

    depth = 0  # blocks open now (tests that inject interrupts read it)

    def __enter__(self):
        self.pending = []
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, lambda signum, frame: self.pending.append(frame))
        Deferred.depth += 1
        return self

    def __exit__(self, *exc):
        Deferred.depth -= 1
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            if self.pending and callable(self.old):
                self.old(signal.SIGINT, self.pending[0])
        return False


class _UndoneOnError:
    """``State.undone_on_error``: restore the snapshot if the block raises."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        State.guarding += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        State.guarding -= 1
        if exc_type is not None:
            self.state.restore()  # with SIGINT deferred (State._put)
        return False


class State:
    """A snapshot of the random state and of ``func``'s captured buffers, taken now."""

    def __init__(self, func):
        # Under torch.compile the generators cannot be read (Dynamo skips
        # get_rng_state) and a compiled graph cannot be undone half-way: the
        # snapshot is empty and restoring on error is left to the caller.
        self.compiling = torch.compiler.is_compiling()
        self.buffers = [] if self.compiling else _buffers(func)
        self.saved = None if self.compiling else self._take()

    def _take(self):
        if not self.buffers:
            return rng_state(), []
        with _quiet():
            return rng_state(), [b.clone() for b in self.buffers]

    def _put(self, saved):
        rng, values = saved
        with Deferred():
            set_rng_state(rng)
            if values:
                with _quiet():
                    for b, v in zip(self.buffers, values):
                        b.copy_(v)

    def restore(self):
        """Put the snapshot back."""
        self._put(self.saved)

    @contextlib.contextmanager
    def again(self):
        """Run a further evaluation of ``func`` from the snapshot, then put back the
        state from before it: the evaluation draws what the first one drew, and
        leaves nothing behind."""
        now = self._take()
        self._put(self.saved)
        try:
            yield
        finally:
            self._put(now)

    guarding = 0  # undone_on_error blocks open now (tests that inject interrupts read it)

    def undone_on_error(self):
        """A context manager: restore the snapshot if the block raises (anything,
        KeyboardInterrupt too); the restore itself runs with SIGINT deferred.
        Under torch.compile, nothing (see ``__init__``)."""
        return contextlib.nullcontext() if self.compiling else _UndoneOnError(self)


__all__ = ["Deferred", "State", "rng_state", "set_rng_state"]
