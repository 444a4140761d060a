"""fwdgrad: forward-mode automatic differentiation for PyTorch as higher-order functions."""

from . import rules  # noqa: F401  (registers the JVP rules and the fallback chain)
from .curvature import cross_entropy_loss, fisher_vp, ggnvp, hvp, mse_loss
from .errors import ArgumentTypeError, ArgumentValueError, Error
from .jacobian import hessian, jacfwd, linearize
from .registry import register_jvp
from .reverse import grad, value_and_grad, value_grad_and_hvp
from .transforms import forward_grad, jvp

__all__ = [
    "jvp", "forward_grad", "jacfwd", "linearize", "hessian", "register_jvp",
    "grad", "value_and_grad", "hvp", "value_grad_and_hvp",
    "ggnvp", "fisher_vp", "cross_entropy_loss", "mse_loss",
    "Error", "ArgumentTypeError", "ArgumentValueError",
]
__version__ = "0.1.0"
