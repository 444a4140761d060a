"""Exception safety: whatever ``func`` raises comes out unchanged (the same
object), and afterwards plain torch runs untouched with no dual left alive."""

import pytest
import torch

import fwdgrad
from state_checks import NoNewDuals, assert_plain_torch


class Boom(Exception):
    pass


@torch.library.custom_op("fwdgrad_exceptions::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@scale.register_fake
def _(x):
    return torch.empty_like(x)


RULE_ERROR = {}


@fwdgrad.register_jvp(torch.ops.fwdgrad_exceptions.scale.default)
def _scale_jvp(tangents, ans, x):
    raise RULE_ERROR["error"]


class FailingBackward(torch.autograd.Function):
    """Identity forward whose backward raises the error under test."""

    error = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise FailingBackward.error


def _raise_at_start(error):
    def f(x):
        raise error

    return f


def _raise_after_views_and_inplace(error):
    def f(x):
        y = x.clone()
        v = y[1:]
        v.mul_(x[:-1].sin())
        with torch.no_grad():
            _ = y.exp()
        raise error

    return f


def _raise_inside_a_rule(error):
    def f(x):
        RULE_ERROR["error"] = error
        return scale(x.sin())

    return f


def _raise_in_backward(error):
    """Forward over reverse: the error comes from inside torch.autograd.grad."""

    def f(x):
        FailingBackward.error = error
        with torch.enable_grad():
            x = x.requires_grad_()
            loss = FailingBackward.apply(x.tanh()).sum()
            return torch.autograd.grad(loss, x, create_graph=True)[0]

    return f


def _raise_in_nested_transform(error):
    def f(x):
        def inner(y):
            z = (y * x).cos()
            raise error

        return fwdgrad.jvp(inner, (x,), (torch.ones_like(x),))[1]

    return f


WHERE = {
    "at the start": _raise_at_start,
    "after views and in-place ops": _raise_after_views_and_inplace,
    "inside a JVP rule": _raise_inside_a_rule,
    "inside a backward pass (forward over reverse)": _raise_in_backward,
    "inside a nested jvp": _raise_in_nested_transform,
}

ERRORS = {
    "ValueError": lambda: ValueError("from f"),
    "custom Exception": lambda: Boom("custom"),
    "KeyboardInterrupt": lambda: KeyboardInterrupt(),
    "SystemExit": lambda: SystemExit(3),
}


@pytest.mark.parametrize("error_name", list(ERRORS))
@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("transform", ["jvp", "forward_grad"])
def test_exception_propagates_unchanged_and_leaves_nothing(transform, where, error_name):
    error = ERRORS[error_name]()
    f = WHERE[where](error)
    x = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    v = torch.ones_like(x)
    with NoNewDuals():
        caught = None
        try:
            if transform == "jvp":
                fwdgrad.jvp(f, (x,), (v,))
            else:
                fwdgrad.forward_grad(f)(x, v)
        except BaseException as e:  # noqa: BLE001 - that is the point
            caught = e
        assert caught is error, f"got {type(caught).__name__}: {caught!r}"
        # Drop every reference to the error (its traceback's frames hold the
        # duals; f's closure holds the error) before counting duals.
        caught = error = f = None
        RULE_ERROR.clear()
        FailingBackward.error = None
    assert_plain_torch()
    assert not x.requires_grad and x._base is None
    # The transforms work again afterwards.
    out, t = fwdgrad.jvp(torch.sin, (x,), (v,))
    torch.testing.assert_close(t, x.cos())


@pytest.mark.parametrize("inner", ["enable_grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_grad_mode_is_unchanged_after_an_exception(grad_enabled, inner):
    def f(x):
        with getattr(torch, inner)():
            y = x.exp()
            raise Boom()

    x = torch.ones(3)
    with torch.set_grad_enabled(grad_enabled):
        with pytest.raises(Boom):
            fwdgrad.jvp(f, (x,), (x,))
        assert torch.is_grad_enabled() is grad_enabled
        assert not torch.is_inference_mode_enabled()
    assert_plain_torch()


def test_primal_and_tangent_inputs_are_not_modified():
    x = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    v = torch.ones_like(x)
    x0, v0 = x.clone(), v.clone()

    def f(x):
        x.mul_(2)  # in place on the input dual: the caller's tensor x changes, as with torch.func
        raise Boom()

    with pytest.raises(Boom):
        fwdgrad.jvp(f, (x,), (v,))
    # The tangent the caller passed is never written (fwdgrad copies before writing).
    assert torch.equal(v, v0)
    ref_x = x0.clone()
    with pytest.raises(Boom):
        torch.func.jvp(f, (ref_x,), (v0.clone(),))
    assert torch.equal(x, ref_x)
