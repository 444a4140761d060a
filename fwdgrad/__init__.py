"""fwdgrad: forward-mode automatic differentiation for PyTorch as higher-order functions."""

from . import rules  # noqa: F401  (registers the JVP rules)
from .registry import register_jvp
from .jacobian import hessian, jacfwd, linearize
from .transforms import forward_grad, jvp

__all__ = ["jvp", "forward_grad", "jacfwd", "linearize", "hessian", "register_jvp"]
__version__ = "0.1.0"
