"""fwdgrad's JVP rules, one module per op family.  Importing registers them."""

import torch

from .. import slicing
from ..registry import RULES
from . import backward, linalg, nn, pointwise, reductions, views  # noqa: F401

# Activations and unary math whose tangent formulas build several temporaries
# the size of the input: evaluated in slices on large tensors (fwdgrad/slicing.py),
# which keeps the peak memory of jvp and hvp near that of the values themselves.
_aten = torch.ops.aten
for _op in (
    _aten.tanh.default,
    _aten.sigmoid.default,
    _aten.gelu.default,
    _aten.silu.default,
    _aten.mish.default,
    _aten.elu.default,
    _aten.celu.default,
    _aten.softplus.default,
    _aten.hardswish.default,
    _aten.hardsigmoid.default,
    _aten.leaky_relu.default,
    _aten.hardtanh.default,
    _aten.relu.default,
    _aten.threshold.default,
    _aten.exp.default,
    _aten.log.default,
    _aten.sin.default,
    _aten.cos.default,
    _aten.erf.default,
    _aten.sqrt.default,
    _aten.rsqrt.default,
    _aten.pow.Tensor_Scalar,
):
    if _op in RULES:
        RULES[_op] = slicing.sliced_unary(RULES[_op])

# Real activations take one fused kernel for the tangent, and other unary math
# an in-place formula when nothing records it (no temporaries to slice); complex
# tensors and recorded programs keep the sliced formulas.
pointwise.install_fast_rules(RULES)
