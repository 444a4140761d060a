"""Real models on their default paths: jvp and closure hvp against float64 oracles.

Every model of ``tests/zoo_models.py`` (transformers families on each
attention path they support, torchvision classifiers), in float64:

* ``jvp`` w.r.t. the input and w.r.t. all parameters, against central finite
  differences of the plain model;
* the closure form of ``hvp`` on the live model w.r.t. all parameters,
  against central finite differences of plain gradients; afterwards the
  model's parameters, buffers and a plain backward must be as before.

The quick subset runs by default; the whole zoo with ``-m zoo``
(``pytest tests/test_zoo.py -m zoo``).
"""

import importlib.util

import pytest
import torch
from torch.func import functional_call

import fwdgrad
import zoo_models
from expected_failures import ZOO_EXPECTED_FAILURES

QUICK = {("llama", "sdpa"), ("bert", "eager"), ("wav2vec2", "sdpa"), ("regnet", "default")}
STEP = 1e-6
# Models whose hvp oracle is finite differences of plain gradients, and why.
FINITE_DIFFERENCE_HVP = {
    "wav2vec2": "PyTorch's double backward of _weight_norm_interface (its positional convolution) "
                "is wrong, and _ctc_loss_backward has none",
}


def _params(entry):
    family, name, path, build = entry
    if family == "torchvision" and zoo_models.torchvision() is None:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision==0.28.0)")
    if family == "transformers" and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (it is in the test extra)")
    return build(path, torch.float64)


def _cases():
    out = []
    for entry in zoo_models.entries():
        family, name, path, _ = entry
        for check in ("jvp_input", "jvp_params", "hvp"):
            key = f"{name}-{path}-{check}"
            marks = [pytest.mark.zoo] + ([pytest.mark.zoo_quick] if (name, path) in QUICK else [])
            if key in ZOO_EXPECTED_FAILURES:
                marks.append(pytest.mark.xfail(reason=ZOO_EXPECTED_FAILURES[key], strict=True))
            out.append(pytest.param(entry, check, id=key, marks=marks))
    return out


def _close(actual, expected, what):
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= 1e-6 * scale, f"{what}: max error {err:.3g} against max |oracle| {scale:.3g}"


def _direction(like, gen):
    return torch.randn(like.shape, generator=gen, dtype=like.dtype)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _twin(entry):
    """The same weights on the eager attention path, where PyTorch's own derivatives run."""
    family, name, path, build = entry
    return build("eager" if family == "transformers" else path, torch.float64)


def _oracle(native, finite_difference):
    """PyTorch's derivative on the eager twin; central differences where PyTorch has none."""
    try:
        return native()
    except (RuntimeError, NotImplementedError) as e:
        message = str(e).lower()
        if not any(m in message for m in ("derivative", "not implemented", "forward ad")):
            raise
        return finite_difference()


def _fd(fn, step):
    """Central difference of ``fn(h)`` at 0 (float64)."""
    return (fn(step) - fn(-step)) / (2 * step)


@pytest.mark.parametrize("entry, check", _cases())
def test_zoo(entry, check):
    case = _params(entry)
    twin = _twin(entry)
    model, x = case.model, case.x
    gen = torch.Generator().manual_seed(1)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    twin_params = {k: p for k, p in twin.model.named_parameters() if p.requires_grad}
    before = _state(model)
    if check == "jvp_input":
        v = _direction(x, gen)
        with torch.no_grad():
            out, t = fwdgrad.jvp(case.f, (x,), (v,))
            _close(out, case.f(x), "output")
            expected = _oracle(lambda: torch.func.jvp(twin.f, (x,), (v,))[1],
                               lambda: _fd(lambda h: twin.f(x + h * v), STEP))
        _close(t, expected, "jvp w.r.t. the input")
    elif check == "jvp_params":
        v = {k: _direction(p, gen) for k, p in params.items()}

        def at(c, p):
            return functional_call(zoo_models.Call(c.model, c.f), {"model." + k: t for k, t in p.items()}, (c.x,))

        detached = {k: p.detach() for k, p in params.items()}
        twin_detached = {k: p.detach() for k, p in twin_params.items()}
        with torch.no_grad():
            out, t = fwdgrad.jvp(lambda p: at(case, p), (detached,), (v,))
            expected = _oracle(
                lambda: torch.func.jvp(lambda p: at(twin, p), (twin_detached,), (v,))[1],
                lambda: _fd(lambda h: at(twin, {k: p + h * v[k] for k, p in twin_detached.items()}), STEP))
        _close(t, expected, "jvp w.r.t. all parameters")
    else:
        v = {k: _direction(p, gen) for k, p in params.items()}
        hv = fwdgrad.hvp(case.loss, params, v)
        tp = list(twin_params.values())

        def double_backward():
            g = torch.autograd.grad(twin.loss(), tp, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
            dot = sum((gi * v[k]).sum() for gi, k in zip(g, twin_params))
            return torch.autograd.grad(dot, tp, allow_unused=True, materialize_grads=True)

        def grads(shift):
            originals = [p.detach().clone() for p in tp]
            with torch.no_grad():
                for k, p in twin_params.items():
                    p.add_(v[k], alpha=shift)
            try:
                g = torch.autograd.grad(twin.loss(), tp, allow_unused=True, materialize_grads=True)
                return torch.cat([gi.flatten() for gi in g])
            finally:
                with torch.no_grad():
                    for p, o in zip(tp, originals):
                        p.copy_(o)

        if entry[1] in FINITE_DIFFERENCE_HVP:
            expected = _fd(grads, STEP)
        else:
            expected = _oracle(lambda: torch.cat([h.flatten() for h in double_backward()]),
                               lambda: _fd(grads, STEP))
        _close(torch.cat([hv[k].flatten() for k in params]), expected, "hvp")
        # the model came back intact: same parameter objects and values, a plain backward works
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())
        case.loss().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


