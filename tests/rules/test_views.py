"""Focused checks of the JVP rules for gathers and scatters (fwdgrad/rules/views.py).

Everything runs in float64 on CPU against central finite differences of the
primal function or torch.func; each aten-level case also asserts that the op
is served by an explicit rule, not by the fallback.
"""

import itertools

import pytest
import torch

from oracles import assert_jvp_matches_fd, uses_rule, rand

aten = torch.ops.aten
D = torch.float64


def test_embedding():
    uses_rule(aten.embedding.default)
    idx = torch.tensor([[0, 2, 2], [4, 1, 0]])
    assert_jvp_matches_fd(lambda w: aten.embedding.default(w, idx, 1), rand(5, 3))


@pytest.mark.parametrize("reduce,include_self", list(itertools.product(["prod", "mean", "amax", "amin"], [True, False])))
def test_index_reduce_with_zeros_and_repeats(reduce, include_self):
    uses_rule(aten.index_reduce.default)
    x, src = rand(5, 4), rand(6, 4)
    x[1, 2] = src[0, 0] = src[2, 3] = src[4, 3] = 0.0  # one and two zeros per slot
    idx = torch.tensor([0, 1, 1, 3, 0, 1])
    assert_jvp_matches_fd(lambda a, b: a.index_reduce(0, idx, b, reduce, include_self=include_self), x, src)


@pytest.mark.parametrize("reduce,include_self", list(itertools.product(["prod", "sum", "mean", "amax", "amin"],
                                                                       [True, False])))
def test_scatter_reduce(reduce, include_self):
    x, src = rand(5, 4), rand(6, 4)
    x[1, 2] = src[0, 0] = src[2, 3] = 0.0
    idx = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(1))
    assert_jvp_matches_fd(lambda a, b: a.scatter_reduce(0, idx, b, reduce, include_self=include_self), x, src)
