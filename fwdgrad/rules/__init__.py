"""fwdgrad's JVP rules, one module per op family.  Importing registers them."""

from . import backward, linalg, nn, pointwise, reductions, views  # noqa: F401
