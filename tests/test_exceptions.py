"""Exception safety: whatever ``func`` raises comes out unchanged (the same
object), and afterwards plain torch runs untouched with no dual left alive."""

import weakref

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


# The error under test.  Functions read it from here rather than closing over
# it, so that dropping it here drops the last reference the test holds.
ERROR = {}


@fwdgrad.register_jvp(torch.ops.fwdgrad_exceptions.scale.default)
def _scale_jvp(tangents, ans, x):
    raise ERROR["error"]


class FailingBackward(torch.autograd.Function):
    """Identity forward whose backward raises the error under test."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ERROR["error"]


def _raise_at_start(x):
    raise ERROR["error"]


def _raise_after_views_and_inplace(x):
    y = x.clone()
    v = y[1:]
    v.mul_(x[:-1].sin())
    with torch.no_grad():
        _ = y.exp()
    raise ERROR["error"]


def _raise_inside_a_rule(x):
    return scale(x.sin())


def _raise_in_backward(x):
    """Forward over reverse: the error comes from inside torch.autograd.grad."""
    with torch.enable_grad():
        x = x.requires_grad_()
        loss = FailingBackward.apply(x.tanh()).sum()
        return torch.autograd.grad(loss, x, create_graph=True)[0]


def _raise_in_nested_transform(x):
    def inner(y):
        z = (y * x).cos()
        raise ERROR["error"]

    return fwdgrad.jvp(inner, (x,), (torch.ones_like(x),))[1]


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


SEEN = []  # weak references to the duals f receives


def _call(transform, f, x, v, error):
    """Run the transform on ``f``, which raises ``error``; return what came out."""
    ERROR["error"] = error
    del error

    def tracked(x):
        SEEN.append(weakref.ref(x))
        return f(x)

    try:
        if transform == "jvp":
            fwdgrad.jvp(tracked, (x,), (v,))
        else:
            fwdgrad.forward_grad(tracked)(x, v)
    except BaseException as e:  # noqa: BLE001 - that is the point
        return e
    return None


def _forget_errors():
    ERROR.clear()


@pytest.mark.parametrize("error_name", list(ERRORS))
@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("transform", ["jvp", "forward_grad"])
def test_exception_propagates_unchanged_and_leaves_nothing(transform, where, error_name):
    error = ERRORS[error_name]()
    x = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    v = torch.ones_like(x)
    SEEN.clear()
    caught = _call(transform, WHERE[where], x, v, error)
    assert caught is error, f"got {type(caught).__name__}: {caught!r}"
    # Once the error is dropped (its traceback's frames hold the duals), the
    # duals die by reference counting alone: nothing else holds them.
    caught = error = None
    _forget_errors()
    assert SEEN and all(r() is None for r in SEEN), "a dual outlived the error"
    assert_plain_torch()
    assert not x.requires_grad and x._base is None
    # The transforms work again afterwards.
    out, t = fwdgrad.jvp(torch.sin, (x,), (v,))
    torch.testing.assert_close(t, x.cos())


def test_no_dual_outlives_any_exception():
    """The same, counting every live dual after a full garbage collection."""
    x = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    with NoNewDuals():
        for where in WHERE.values():
            for make_error in ERRORS.values():
                error = make_error()
                assert _call("jvp", where, x, torch.ones_like(x), error) is error
        error = None
        _forget_errors()
        SEEN.clear()


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


# ---- hvp: errors in the loss and in the backward pass, pure and closure forms ----------------


def _hvp_loss_raising(where, model, x):
    def loss_body(out):
        if where == "in the loss":
            raise ERROR["error"]
        return FailingBackward.apply(out).sum()  # raises inside torch.autograd.grad

    def closure():
        return loss_body(model(x).tanh())

    def pure(params):
        return loss_body(torch.func.functional_call(model, params, (x,)).tanh())

    return closure, pure


@pytest.mark.parametrize("error_name", ["ValueError", "KeyboardInterrupt"])
@pytest.mark.parametrize("where", ["in the loss", "in the backward pass"])
@pytest.mark.parametrize("form", ["pure", "closure"])
def test_hvp_exception_propagates_and_restores_the_parameters(form, where, error_name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    params = dict(model.named_parameters())
    before = {k: (id(p), p.detach().clone()) for k, p in params.items()}
    v = {k: torch.ones_like(p) for k, p in params.items()}
    closure, pure = _hvp_loss_raising(where, model, x)
    error = ERRORS[error_name]()
    ERROR["error"] = error
    try:
        fwdgrad.hvp(closure if form == "closure" else pure, params, v)
    except BaseException as e:  # noqa: BLE001 - that is the point
        caught = e
    else:
        caught = None
    assert caught is error
    caught = error = None
    _forget_errors()
    # The live parameters are the same objects, plain Parameters, with their values.
    for k, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter and p.requires_grad and p.grad is None
        assert id(p) == before[k][0] and torch.equal(p.detach(), before[k][1])
    assert_plain_torch()
    # The module and hvp work again afterwards.
    out = model(x)
    assert type(out) is torch.Tensor and out.grad_fn is not None
    del out  # a live graph that saved the weight would (rightly) block the closure form
    hv = fwdgrad.hvp(lambda: model(x).tanh().pow(2).sum(), params, v)
    ref = torch.autograd.functional.hvp(
        lambda w, b: torch.func.functional_call(model, {"weight": w, "bias": b}, (x,)).tanh().pow(2).sum(),
        (model.weight.detach(), model.bias.detach()),
        (v["weight"], v["bias"]),
    )[1]
    torch.testing.assert_close(tuple(hv.values()), ref)


def test_no_dual_outlives_any_hvp_exception():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    params = dict(model.named_parameters())
    v = {k: torch.ones_like(p) for k, p in params.items()}
    with NoNewDuals():
        for where in ("in the loss", "in the backward pass"):
            closure, pure = _hvp_loss_raising(where, model, x)
            for loss in (closure, pure):
                for make_error in ERRORS.values():
                    error = ERROR["error"] = make_error()
                    try:
                        fwdgrad.hvp(loss, params, v)
                    except BaseException as e:  # noqa: BLE001
                        assert e is error
                    else:
                        raise AssertionError("hvp did not raise")
                    error = None
                    _forget_errors()
