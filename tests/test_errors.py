"""Bad input: each row of the error table gets its exact error type and message.

The error table in docs/errors.rst is generated from ``CASES`` below, so the
documentation shows the messages users really get.  Print it with

    PYTHONPATH=. python tests/test_errors.py

and paste it over the table in docs/errors.rst.

After every error, plain torch must run untouched and no ``Dual`` may survive.
"""

import re
import sys
from pathlib import Path

import pytest
import torch

import fwdgrad
from state_checks import NoNewDuals, assert_plain_torch


@torch.library.custom_op("fwdgrad_errors::no_formula", mutates_args=())
def no_formula(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no autograd formula and no fwdgrad rule."""
    return x * 2


X = torch.linspace(0.0, 1.0, 3)


def _buffer_from_factory(x):
    buf = torch.zeros(3)  # not built from x, so it cannot take a tangent
    buf.copy_(x)
    return buf


def _wrong_signature_rule(tangents):
    return tangents[0]


class Case:
    def __init__(self, what, call, error, message):
        self.what = what
        self.call = call
        self.error = error
        self.message = message  # the full message; "..." stands for any text

    def pattern(self):
        # Where torch.func has its own message for the mistake, fwdgrad adds it at the end.
        torch_func_words = r"( \(in torch\.func's words: [^()]*(\([^()]*\)[^()]*)*\))?"
        return re.compile(".*".join(re.escape(p) for p in self.message.split("...")) + torch_func_words, re.S)


CASES = [
    Case(
        "tangent shape differs from its primal",
        lambda: fwdgrad.jvp(torch.sin, (X,), (torch.ones(4),)),
        fwdgrad.ArgumentValueError,
        "jvp: the tangent of primals[0] has shape (4,) but primals[0] has shape (3,)",
    ),
    Case(
        "tangent dtype differs from its primal",
        lambda: fwdgrad.jvp(torch.sin, (X,), (torch.ones(3, dtype=torch.float64),)),
        fwdgrad.ArgumentValueError,
        "jvp: the tangent of primals[0] has dtype torch.float64 but primals[0] has dtype torch.float32",
    ),
    Case(
        "tangent device differs from its primal",
        lambda: fwdgrad.jvp(torch.sin, (X,), (torch.ones(3, device="meta"),)),
        fwdgrad.ArgumentValueError,
        "jvp: the tangent of primals[0] is on meta but primals[0] is on cpu",
    ),
    Case(
        "tangent shape differs, inside a pytree",
        lambda: fwdgrad.jvp(lambda d: d["w"], ({"w": X},), ({"w": torch.ones(2)},)),
        fwdgrad.ArgumentValueError,
        "jvp: the tangent of primals[0]['w'] has shape (2,) but primals[0]['w'] has shape (3,)",
    ),
    Case(
        "tangent count differs from primals",
        lambda: fwdgrad.jvp(torch.sin, (X,), (X, X)),
        fwdgrad.ArgumentValueError,
        "jvp: got 1 primals but 2 tangents; they must match (the same python structure)",
    ),
    Case(
        "tangent structure differs from primals",
        lambda: fwdgrad.jvp(lambda d: d["w"], ({"w": X},), ({"b": X},)),
        fwdgrad.ArgumentValueError,
        "jvp: tangents must have the same python structure as primals; "
        "primals: ({'w': *},), tangents: ({'b': *},)",
    ),
    Case(
        "primals or tangents not a tuple",
        lambda: fwdgrad.jvp(torch.sin, X, X),
        fwdgrad.ArgumentTypeError,
        "jvp: Expected primals to be a tuple of func's positional arguments, got Tensor",
    ),
    Case(
        "a tangent for an integer primal",
        lambda: fwdgrad.jvp(lambda i: i * 1.0, (torch.arange(3),), (torch.ones(3),)),
        fwdgrad.ArgumentTypeError,
        "jvp: primals[0] has dtype torch.int64, which carries no tangent; "
        "pass None as its tangent (or make it floating point)",
    ),
    Case(
        "a tangent for a bool primal",
        lambda: fwdgrad.jvp(lambda b: b * 1.0, (X > 0,), (torch.ones(3),)),
        fwdgrad.ArgumentTypeError,
        "jvp: primals[0] has dtype torch.bool, which carries no tangent; "
        "pass None as its tangent (or make it floating point)",
    ),
    Case(
        "a tangent that is not a tensor",
        lambda: fwdgrad.jvp(torch.sin, (X,), (1.0,)),
        fwdgrad.ArgumentTypeError,
        "jvp: the tangent of primals[0] is a float; tangents must only contain Tensors (or None for a zero tangent)",
    ),
    Case(
        "a non-tensor primal",
        lambda: fwdgrad.jvp(lambda a: a * 2, (3.0,), (1.0,)),
        fwdgrad.ArgumentTypeError,
        "jvp: primals[0] is a float; primals must only contain Tensors (or "
        "pytrees of tensors); pass non-tensor constants through a closure or keyword argument",
    ),
    Case(
        "a non-tensor argument with a tangent (forward_grad)",
        lambda: fwdgrad.forward_grad(lambda a: a)(3.0, torch.ones(())),
        fwdgrad.ArgumentTypeError,
        "forward_grad: argument 0 is a float; primals must only contain Tensors (or "
        "pytrees of tensors); pass non-tensor constants through a closure or keyword argument",
    ),
    Case(
        "an odd number of arguments to df (forward_grad)",
        lambda: fwdgrad.forward_grad(torch.sin)(X),
        fwdgrad.ArgumentTypeError,
        "forward_grad: df takes (value, tangent) pairs, got 1 positional arguments",
    ),
    Case(
        "tangent shape differs (forward_grad)",
        lambda: fwdgrad.forward_grad(torch.sin)(X, torch.ones(2)),
        fwdgrad.ArgumentValueError,
        "forward_grad: the tangent of argument 0 has shape (2,) but argument 0 has shape (3,)",
    ),
    Case(
        "func is not callable",
        lambda: fwdgrad.jvp("sin", (X,), (X,)),
        fwdgrad.ArgumentTypeError,
        "jvp: func must be callable, got str",
    ),
    Case(
        "func is not callable (forward_grad)",
        lambda: fwdgrad.forward_grad(3),
        fwdgrad.ArgumentTypeError,
        "forward_grad: func must be callable, got int",
    ),
    Case(
        "func returns a non-tensor",
        lambda: fwdgrad.jvp(lambda a: a.sum().item(), (X,), (X,)),
        fwdgrad.ArgumentTypeError,
        "jvp: func must return a tensor or a pytree of tensors, but it returned a float",
    ),
    Case(
        "func returns a pytree with a non-tensor leaf",
        lambda: fwdgrad.jvp(lambda a: {"y": a, "n": "label"}, (X,), (X,)),
        fwdgrad.ArgumentTypeError,
        "jvp: func must return a tensor or a pytree of tensors, but output['n'] is a str",
    ),
    Case(
        "has_aux=True but func returns no (output, aux) pair",
        lambda: fwdgrad.jvp(torch.sin, (X,), (X,), has_aux=True),
        fwdgrad.ArgumentTypeError,
        "jvp: with has_aux=True, func must return a pair (output, aux), got a Tensor",
    ),
    Case(
        "a non-scalar loss for hvp",
        lambda: fwdgrad.hvp(lambda w: w * 2, X, X),
        fwdgrad.ArgumentValueError,
        "hvp: loss must return a scalar tensor (one element), got one of shape (3,); "
        "reduce it first (e.g. .sum() or .mean())",
    ),
    Case(
        "hvp: v's keys differ from params'",
        lambda: fwdgrad.hvp(lambda p: (p["w"] ** 3).sum(), {"w": X}, {"b": X}),
        fwdgrad.ArgumentValueError,
        "hvp: v must have exactly the keys of params; missing ['w'], unexpected ['b']",
    ),
    Case(
        "hvp: a direction's shape differs from its parameter",
        lambda: fwdgrad.hvp(lambda p: (p["w"] ** 3).sum(), {"w": X}, {"w": torch.ones(2)}),
        fwdgrad.ArgumentValueError,
        "hvp: v['w'] has shape (2,) but params['w'] has shape (3,)",
    ),
    Case(
        "hvp: an integer parameter",
        lambda: fwdgrad.hvp(lambda w: w.sum(), torch.arange(3), torch.arange(3)),
        fwdgrad.ArgumentTypeError,
        "hvp: params has dtype torch.int64; only floating-point parameters have a Hessian",
    ),
    Case(
        "grad: a non-scalar output",
        lambda: fwdgrad.grad(lambda a: a * 2)(X),
        fwdgrad.ArgumentValueError,
        "grad: func must return a scalar (0-dim) tensor, got one of shape (3,); "
        "reduce it first (e.g. .sum() or .mean())",
    ),
    Case(
        "grad: argnums out of range",
        lambda: fwdgrad.grad(lambda a, b: (a * b).sum(), argnums=2)(X, X),
        fwdgrad.ArgumentValueError,
        "grad: argnums 2 is out of range: the call has only 2 positional inputs",
    ),
    Case(
        "jacfwd: argnums out of range",
        lambda: fwdgrad.jacfwd(lambda a, b: a * b, argnums=(0, 5))(X, X),
        fwdgrad.ArgumentValueError,
        "jacfwd: argnums 5 is out of range: the call has only 2 positional inputs",
    ),
    Case(
        "hessian: argnums out of range",
        lambda: fwdgrad.hessian(lambda a: (a**3).sum(), argnums=-2)(X),
        fwdgrad.ArgumentValueError,
        "hessian: argnums -2 is out of range: the call has only 1 positional inputs",
    ),
    Case(
        "jacfwd: chunk_size below 1",
        lambda: fwdgrad.jacfwd(torch.sin, chunk_size=0),
        fwdgrad.ArgumentValueError,
        "jacfwd: chunk_size must be at least 1, got 0",
    ),
    Case(
        "linearize: jvp_fn given a tangent of the wrong shape",
        lambda: fwdgrad.linearize(torch.sin, X)[1](torch.ones(2)),
        fwdgrad.ArgumentValueError,
        "linearize: the tangent of primals[0] has shape (2,) but primals[0] has shape (3,)",
    ),
    Case(
        "an op with no rule and no fallback",
        lambda: fwdgrad.jvp(no_formula, (X,), (X,)),
        NotImplementedError,
        "fwdgrad has no JVP rule for fwdgrad_errors.no_formula.default, and its reverse-mode "
        "formula failed (...).  Register one:\n\n"
        "    @fwdgrad.register_jvp(torch.ops.fwdgrad_errors.no_formula.default)\n"
        "    def my_jvp(tangents, ans, *args, **kwargs):\n"
        "        return ...  # the output tangent; tangents[i] belongs to args[i]\n",
    ),
    Case(
        "a rule registered with a wrong signature",
        lambda: fwdgrad.register_jvp(torch.ops.aten.sin.default)(_wrong_signature_rule),
        fwdgrad.ArgumentTypeError,
        "register_jvp(aten.sin.default): the rule _wrong_signature_rule(tangents) cannot be "
        "called as rule(tangents, ans, self): too many positional arguments",
    ),
    Case(
        "register_jvp given an op packet instead of an overload",
        lambda: fwdgrad.register_jvp(torch.ops.aten.sin)(_wrong_signature_rule),
        fwdgrad.ArgumentTypeError,
        "register_jvp needs an op overload such as aten.sin.default, got the packet aten.sin",
    ),
    Case(
        "an in-place write of a tangent into a tensor made by a factory (torch.zeros) inside func",
        lambda: fwdgrad.jvp(_buffer_from_factory, (X,), (X,)),
        RuntimeError,
        "fwdgrad: the in-place op aten.copy_.default writes a value that carries a tangent "
        "into a tensor that has none at this level (one created outside the transformed "
        "function, or by a factory such as torch.zeros).  Build that tensor from the "
        "function's inputs (e.g. torch.zeros_like(x)) or use the out-of-place op.",
    ),
    Case(
        "has_aux=True and func returns a list, not a tuple",
        lambda: fwdgrad.jvp(lambda x: [x, x], (X,), (X,), has_aux=True),
        fwdgrad.ArgumentTypeError,
        "jvp: with has_aux=True, func must return a pair (output, aux), got a list",
    ),
    Case(
        "a non-tensor aux",
        lambda: fwdgrad.jacfwd(lambda x: (x, {"n": 3}), has_aux=True)(X),
        fwdgrad.ArgumentTypeError,
        "jacfwd: with has_aux=True, aux must be a tensor or a pytree of tensors, but aux['n'] is a int",
    ),
    Case(
        "func returns no tensors",
        lambda: fwdgrad.jvp(lambda x: (), (X,), (X,)),
        fwdgrad.ArgumentValueError,
        "jvp: expected func to return at least one tensor, but its output () holds none",
    ),
    Case(
        "a complex input to jacfwd",
        lambda: fwdgrad.jacfwd(torch.sin)(X.to(torch.complex64)),
        fwdgrad.ArgumentTypeError,
        "jacfwd: Expected all inputs to be real, but argument 0 (arg0) is complex (torch.complex64), as "
        "torch.func requires.  Pass the real and imaginary parts as separate real tensors "
        "(torch.view_as_real) if you need that input's derivative",
    ),
    Case(
        "strict=True and an output that does not depend on the inputs",
        lambda: fwdgrad.jvp(lambda x: (x.sin(), torch.ones(2)), (X,), (X,), strict=True),
        fwdgrad.ArgumentValueError,
        "jvp: with strict=True, output[1] does not depend on the inputs (its tangent is zero); "
        "pass strict=False to get zeros",
    ),
]


def _raise(case):
    with pytest.raises(case.error) as info:
        case.call()
    if issubclass(case.error, fwdgrad.Error):  # torch.func users catch RuntimeError
        assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert case.pattern().fullmatch(message), f"got message:\n{message}"


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input(case):
    _raise(case)
    assert_plain_torch()
    # The transforms still work after the error (and sin's rule is intact).
    out, t = fwdgrad.jvp(torch.sin, (X,), (torch.ones(3),))
    torch.testing.assert_close(t, X.cos())


def test_no_dual_outlives_any_error():
    with NoNewDuals():
        for case in CASES:
            _raise(case)


def _error_name(error):
    return f"fwdgrad.{error.__name__}" if issubclass(error, fwdgrad.Error) else error.__name__


def table():
    """The error table in reStructuredText."""
    lines = [
        ".. list-table:: Errors for bad input",
        "   :header-rows: 1",
        "   :widths: 30 15 55",
        "",
        "   * - Bad input",
        "     - Error",
        "     - Message",
    ]
    for c in CASES:
        lines += [f"   * - {c.what}", f"     - ``{_error_name(c.error)}``"]
        msg_lines = c.message.rstrip("\n").split("\n")
        if len(msg_lines) == 1:
            lines.append(f"     - ``{c.message}``")
        else:
            lines += ["     - ::", ""] + [f"         {m}" if m else "" for m in msg_lines] + [""]
    return "\n".join(lines)


def test_documented_table_is_current():
    """docs/errors.rst shows exactly these messages."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "errors.rst").read_text()
    assert table() in page, (
        "docs/errors.rst's error table is out of date; print the current one with "
        "`PYTHONPATH=. python tests/test_errors.py` and paste it over the old one"
    )


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
