"""Matrix products and linear algebra.

Products are multilinear: the tangent is the sum over factors of the product
with that one factor replaced by its tangent.  Decompositions use the standard
perturbation formulas (Giles, "An extended collection of matrix derivative
results", 2008).
"""

import torch

from ..registry import def_multilinear, defrule
from ..slicing import in_place_ok

aten = torch.ops.aten

for _op in (aten.mm.default, aten.bmm.default, aten.mv.default, aten.dot.default,
            aten.vdot.default):
    def_multilinear(_op, 0, 1)

# Accumulating a second product into the first in place (``out.addmm_(a, b)``)
# makes one output-sized tensor instead of three; a product's output is not
# saved by its backward, so this is safe under autograd too (but not under a
# tracer: see ``slicing.in_place_ok``).
_ACCUMULATE = {
    torch.mm: torch.Tensor.addmm_,
    torch.bmm: torch.Tensor.baddbmm_,
    torch.mv: torch.Tensor.addmv_,
    torch.outer: torch.Tensor.addr_,
}


def _accumulate_product(out, product, a, b):
    """``out += product(a, b)``, in place; ``out`` is a fresh tensor of the output's shape."""
    if out is None:
        return product(a, b)
    if not in_place_ok():
        return out + product(a, b)
    accumulate = _ACCUMULATE.get(product)
    return accumulate(out, a, b) if accumulate is not None else out.add_(product(a, b))


def _product_rule(product):
    """``ta @ b + a @ tb`` for a matrix product, built in one tensor."""

    def rule(t, ans, a, b):
        out = None
        if t[0] is not None:
            out = product(t[0], b)
        if t[1] is not None:
            out = _accumulate_product(out, product, a, t[1])
        return out

    return rule


for _op, _product in ((aten.mm.default, torch.mm), (aten.bmm.default, torch.bmm), (aten.mv.default, torch.mv)):
    defrule(_op)(_product_rule(_product))


def _affine_product(product):
    """Rules for ``beta * self + alpha * product(a, b)`` ops (addmm, baddbmm, addmv, addr, addbmm).

    The products' tangents are accumulated in place into one fresh tensor of
    the output's shape, which then takes the (broadcasting) tangent of ``self``.
    """
    pair = _product_rule(product)

    def rule(t, ans, s, a, b, *, beta=1, alpha=1):
        out = pair((t[1], t[2]), None, a, b)
        inplace = in_place_ok()
        if out is not None and alpha != 1:
            out = out.mul_(alpha) if inplace else out * alpha
        if t[0] is not None and beta != 0:
            if out is None:
                return t[0] if beta == 1 else t[0] * beta
            out = out.add_(t[0], alpha=beta) if inplace else torch.add(out, t[0], alpha=beta)
        return out

    return rule


_addmm_tangent = _affine_product(torch.mm)
defrule(aten.addmm.default)(_addmm_tangent)
defrule(aten.baddbmm.default)(_affine_product(torch.bmm))
defrule(aten.addmv.default)(_affine_product(torch.mv))
defrule(aten.addr.default)(_affine_product(torch.outer))
defrule(aten.addbmm.default)(_affine_product(lambda a, b: torch.bmm(a, b).sum(0)))


@defrule(aten._addmm_activation.default)
def _addmm_activation_jvp(t, ans, s, a, b, *, beta=1, alpha=1, use_gelu=False):
    pre = _addmm_tangent(t, None, s, a, b, beta=beta, alpha=alpha)
    if pre is None:
        return None
    if use_gelu:
        from .pointwise import _gelu_jvp

        z = torch.addmm(s, a, b, beta=beta, alpha=alpha)
        return _gelu_jvp(pre, ans, z, "tanh")
    return pre * (ans > 0)


@defrule(aten.linalg_inv_ex.default)
def _inv_jvp(t, ans, a, *, check_errors=False):
    inv = ans[0]
    return -inv @ t[0] @ inv, None


@defrule(aten.linalg_solve_ex.default)
def _solve_jvp(t, ans, a, b, *, left=True, check_errors=False):
    x = ans[0]
    vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and left)
    xm = x.unsqueeze(-1) if vector else x
    rhs = None
    if t[1] is not None:
        rhs = t[1].unsqueeze(-1) if vector else t[1]
    if t[0] is not None:
        c = -(t[0] @ xm) if left else -(xm @ t[0])
        rhs = c if rhs is None else rhs + c
    dx = torch.linalg.solve(a, rhs, left=left)
    if vector:
        dx = dx.squeeze(-1)
    return dx, None, None, None


@defrule(aten._linalg_det.default)
def _det_jvp(t, ans, a):
    det, lu, pivots = ans
    # d det = det * tr(A^{-1} dA), computed by a solve; singular A falls back to the adjugate.
    sol = torch.linalg.solve(a, t[0])
    return det * sol.diagonal(dim1=-2, dim2=-1).sum(-1), None, None


@defrule(aten._linalg_slogdet.default)
def _slogdet_jvp(t, ans, a):
    sign, logabsdet, lu, pivots = ans
    tr = torch.linalg.solve(a, t[0]).diagonal(dim1=-2, dim2=-1).sum(-1)
    if a.is_complex():
        return sign * 1j * tr.imag, tr.real, None, None
    return None, tr, None, None


@defrule(aten.linalg_cholesky_ex.default)
def _cholesky_jvp(t, ans, a, *, upper=False, check_errors=False):
    L = ans[0]
    if upper:
        L = L.mH
    # dL = L Phi(L^{-1} dA L^{-H}), Phi = lower triangle with halved diagonal
    linv_da = torch.linalg.solve_triangular(L, t[0], upper=False)
    m = torch.linalg.solve_triangular(L, linv_da.mH, upper=False).mH
    phi = m.tril()
    phi = phi - 0.5 * torch.diag_embed(phi.diagonal(dim1=-2, dim2=-1))
    dL = L @ phi
    return (dL.mH if upper else dL), None


@defrule(aten._linalg_eigh.default)
def _eigh_jvp(t, ans, a, UPLO="L", compute_v=True):
    w, v = ans
    da = t[0]
    # Only the stated triangle of A is read; symmetrise the tangent accordingly.
    vh_da_v = v.mH @ da @ v
    dw = vh_da_v.diagonal(dim1=-2, dim2=-1).real
    if not compute_v:
        return dw, None
    diff = w.unsqueeze(-2) - w.unsqueeze(-1)
    f = torch.where(diff == 0, torch.zeros_like(diff), 1 / diff)
    dv = v @ (f.to(vh_da_v.dtype) * vh_da_v)
    return dw, dv
