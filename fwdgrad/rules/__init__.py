"""fwdgrad's JVP rules, one module per op family.  Importing registers them.

=============  ==============================================================
module         ops
=============  ==============================================================
pointwise      unary math, binary arithmetic, activations, casts, clamps,
               comparisons' selections, random draws
reductions     sums, means, extremes, norms, variances, softmax, products,
               segment reductions
views          views, reshapes, indexing, gathers and scatters, padding, cat
linalg         matrix products, FFTs, factorizations and solves
nn             convolution, normalization, pooling, attention, distances,
               embeddings, losses
backward       the backward ops that autograd runs (forward over reverse)
collectives    torch.distributed collectives (all-reduce, all-gather, ...)
=============  ==============================================================

``python -m fwdgrad.rules where aten.tanh`` prints where an op's rule is declared.
"""

from .. import fallback  # noqa: F401  (installs the fallback chain for ops without a rule)
import torch

from . import backward, linalg, nn, pointwise, reductions, views  # noqa: F401

if torch.distributed.is_available():
    from . import collectives  # noqa: F401
