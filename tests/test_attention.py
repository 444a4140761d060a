"""scaled_dot_product_attention on every path its options select, against the math backend.

The fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no
forward AD and no double backward in PyTorch; its twin on the math backend
(plain aten ops) has both.  For each combination of grouped-query attention
(``enable_gqa``), masks (none, boolean, float, float with a tangent),
``is_causal``, ``scale`` and dropout: ``jvp`` against ``torch.func.jvp`` of the
twin, ``hvp`` (forward over reverse) against double backward of the twin, and
reverse over forward (the gradient of a jvp) against the twin's, all float64.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdgrad

D = torch.float64
B, HQ, L, S, E = 2, 4, 5, 6, 4


def _rand(*shape, gen):
    return torch.randn(*shape, dtype=D, generator=gen)


def _setup(heads_kv, mask, gen):
    q = _rand(B, HQ, L, E, gen=gen)
    k, v = _rand(B, heads_kv, S, E, gen=gen), _rand(B, heads_kv, S, E, gen=gen)
    if mask == "bool":
        m = torch.rand(L, S, generator=gen) > 0.4
        m[:, 0] = True  # no fully masked row
    elif mask in ("float", "float tangent"):
        m = _rand(B, 1, L, S, gen=gen)
    else:
        m = None
    return q, k, v, m


CASES = [
    (heads_kv, mask, causal, None, 0.0)
    for heads_kv, mask, causal in itertools.product((HQ, 2, 1), (None, "bool", "float", "float tangent"), (False, True))
    if not (mask and causal)
] + [
    (2, "float tangent", False, 0.3, 0.0), (1, None, True, 0.3, 0.0),  # an explicit scale
    (HQ, None, False, None, 0.3), (2, "bool", False, None, 0.3),  # dropout (the math path)
]


def _ids(case):
    heads_kv, mask, causal, scale, dropout = case
    return f"kv{heads_kv}-{mask or 'nomask'}-{'causal' if causal else 'full'}-s{scale}-p{dropout}"


def _attention(mask_kind, m, causal, scale, dropout, heads_kv):
    gqa = heads_kv != HQ

    def f(q, k, v, mask=None):
        if mask_kind != "float tangent":
            mask = m
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              dropout_p=dropout, enable_gqa=gqa)

    return f


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_sdpa_jvp_hvp_and_reverse_over_forward(case):
    heads_kv, mask, causal, scale, dropout = case
    gen = torch.Generator().manual_seed(0)
    q, k, v, m = _setup(heads_kv, mask, gen)
    f = _attention(mask, m, causal, scale, dropout, heads_kv)
    primals = (q, k, v) + ((m,) if mask == "float tangent" else ())
    tangents = tuple(_rand(*p.shape, gen=gen) for p in primals)
    w = _rand(B, HQ, L, E, gen=gen)

    def loss(*xs):
        return (w * f(*xs).sin()).sum()

    # jvp
    torch.manual_seed(5)
    out, t = fwdgrad.jvp(f, primals, tangents)
    with sdpa_kernel([SDPBackend.MATH]):
        torch.manual_seed(5)
        ref_out, ref_t = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(t, ref_t)

    # hvp, forward over reverse (the fused kernel's backward rule)
    torch.manual_seed(5)
    hv = fwdgrad.hvp(loss, list(primals), list(tangents))
    with sdpa_kernel([SDPBackend.MATH]):
        torch.manual_seed(5)
        ref_hv = torch.autograd.functional.hvp(loss, primals, tangents)[1]
    for a, b in zip(hv, ref_hv):
        torch.testing.assert_close(a, b)

    # reverse over forward: the gradient of <u, jvp> w.r.t. primals and tangents
    u = _rand(B, HQ, L, E, gen=gen)

    def grads_of_jvp(jvp):
        leaves = [x.clone().requires_grad_() for x in primals + tangents]
        torch.manual_seed(5)
        tangent = jvp(f, tuple(leaves[:len(primals)]), tuple(leaves[len(primals):]))[1]
        return torch.autograd.grad((u * tangent).sum(), leaves)

    ours = grads_of_jvp(fwdgrad.jvp)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = grads_of_jvp(torch.func.jvp)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_gqa_reaches_the_fused_kernel():
    # The cases above exercise the fused kernel's rules only if F.sdpa picks it.
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = _setup(2, None, gen)
    seen = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in seen
