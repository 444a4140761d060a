"""Matrix products and linear algebra.

Products are multilinear: the tangent is the sum over factors of the product
with that one factor replaced by its tangent.  Decompositions use the standard
perturbation formulas (Giles, "An extended collection of matrix derivative
results", 2008), reusing the factorisation the primal returned (an LU, a
Cholesky factor) instead of factorising again.  Outputs that exist only for the
backward pass (the LU of ``solve`` and ``det``) get their tangents too, so that
forward over reverse through these ops is right.
"""

import torch

from ..fallback import linearized
from ..registry import def_linear, def_multilinear, defrule, tsub
from ..slicing import in_place_ok
from .pointwise import _gelu_jvp

aten = torch.ops.aten

for _op in (aten.dot.default, aten.vdot.default, aten.linalg_cross.default):
    def_multilinear(_op, 0, 1)
def_multilinear(aten._trilinear.default, 0, 1, 2)

# Discrete Fourier transforms are (real-)linear maps.
for _op in (aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default):
    def_linear(_op)

# mm, bmm and mv are multilinear too, with their two products built in one tensor.
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
        out = None if t[0] is None else product(t[0], b)
        return out if t[1] is None else _accumulate_product(out, product, a, t[1])

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
        # CUDA's cuBLASLt epilogue is the tanh approximation; the CPU kernel
        # applies the exact GELU.
        approximate = "none" if ans.device.type == "cpu" else "tanh"
        z = torch.addmm(s, a, b, beta=beta, alpha=alpha)
        if z.is_complex():
            return _gelu_jvp(pre, ans, z, approximate)
        return aten.gelu_backward.default(pre, z, approximate=approximate)  # one fused kernel
    if ans.is_complex():
        return pre.where(ans > 0, 0)
    return aten.threshold_backward.default(pre, ans, 0)


def _tr(x):
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


def _eye_like(x):
    return torch.eye(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)


# ---- inverses and solves --------------------------------------------------------


@defrule(aten.linalg_inv_ex.default)
def _inv_jvp(t, ans, a, *, check_errors=False):
    inv = ans[0]
    return -inv @ t[0] @ inv, None


def _lu_tangent(lu, pivots, da):
    """The tangent of the packed LU factorisation P L U = A of a square A along dA.

    With X = L^{-1} P^T dA U^{-1} = L^{-1} dL + dU U^{-1}, the first term is
    strictly lower and the second upper triangular, so dL = L tril(X, -1) and
    dU = triu(X) U; the packed tangent is their sum."""
    p, l, u = torch.lu_unpack(lu, pivots)
    x = torch.linalg.solve_triangular(l, p.mT @ da, upper=False, unitriangular=True)
    x = torch.linalg.solve_triangular(u, x, upper=True, left=False)
    return l @ x.tril(-1) + x.triu() @ u


def _lu_product_tangent(lu, pivots, dlu):
    """dA = P (dL U + L dU) for the packed tangent ``dlu`` of the LU of a square A."""
    p, l, u = torch.lu_unpack(lu, pivots)
    return p @ (dlu.tril(-1) @ u + l @ dlu.triu())


def _solve_is_vector(a, b, left):
    """linalg.solve's rule for a right-hand side that is a (batch of) vector(s)."""
    return left and (b.dim() == 1 or (b.dim() == a.dim() - 1 and b.shape == a.shape[:-1]))


def _solve_rhs_tangent(x, ta, tb, left, adjoint=False):
    """dB - dA X (left) or dB - X dA (right), with dA^H for adjoint solves."""
    if ta is None:
        return tb
    ta = ta.mH if adjoint else ta
    return tsub(tb, ta @ x if left else x @ ta)


@defrule(aten._linalg_solve_ex.default)
def _solve_jvp(t, ans, a, b, *, left=True, check_errors=False):
    x, lu, pivots, info = ans
    ta, tb = t[0], t[1]
    vector = _solve_is_vector(a, b, left)
    xm = x.unsqueeze(-1) if vector else x
    rhs = _solve_rhs_tangent(xm, ta, None if tb is None else (tb.unsqueeze(-1) if vector else tb), left)
    dx = torch.linalg.lu_solve(lu, pivots, rhs, left=left)
    if vector:
        dx = dx.squeeze(-1)
    return dx, None if ta is None else _lu_tangent(lu, pivots, ta), None, None


@defrule(aten.linalg_lu_factor_ex.default)
def _lu_factor_jvp(t, ans, a, *, pivot=True, check_errors=False):
    lu, pivots, info = ans
    if a.shape[-1] != a.shape[-2]:
        return _linalg_fallback(aten.linalg_lu_factor_ex.default)(t, ans, a, pivot=pivot, check_errors=check_errors)
    return _lu_tangent(lu, pivots, t[0]), None, None


@defrule(aten.linalg_lu.default)
def _lu_jvp(t, ans, a, *, pivot=True):
    if a.shape[-1] != a.shape[-2]:
        return _linalg_fallback(aten.linalg_lu.default)(t, ans, a, pivot=pivot)
    p, l, u = ans
    x = torch.linalg.solve_triangular(l, p.mT @ t[0], upper=False, unitriangular=True)
    x = torch.linalg.solve_triangular(u, x, upper=True, left=False)
    return None, l @ x.tril(-1), x.triu() @ u


@defrule(aten.lu_unpack.default)
def _lu_unpack_jvp(t, ans, lu, pivots, unpack_data=True, unpack_pivots=True):
    if not unpack_data or t[0] is None:
        return None, None, None
    k = min(lu.shape[-2], lu.shape[-1])
    return None, t[0][..., :, :k].tril(-1), t[0][..., :k, :].triu()


@defrule(aten.linalg_lu_solve.default)
def _lu_solve_jvp(t, ans, lu, pivots, b, *, left=True, adjoint=False):
    da = None if t[0] is None else _lu_product_tangent(lu, pivots, t[0])
    rhs = _solve_rhs_tangent(ans, da, t[2], left, adjoint)
    return torch.linalg.lu_solve(lu, pivots, rhs, left=left, adjoint=adjoint)


def _triangle(da, upper, unitriangular):
    """The part of dA that a triangular solve reads."""
    da = da.triu() if upper else da.tril()
    if unitriangular:
        da = da - torch.diag_embed(da.diagonal(dim1=-2, dim2=-1))
    return da


@defrule(aten.linalg_solve_triangular.default)
def _solve_triangular_jvp(t, ans, a, b, *, upper, left=True, unitriangular=False):
    ta = None if t[0] is None else _triangle(t[0], upper, unitriangular)
    rhs = _solve_rhs_tangent(ans, ta, t[1], left)
    return torch.linalg.solve_triangular(a, rhs, upper=upper, left=left, unitriangular=unitriangular)


@defrule(aten.triangular_solve.default)
def _triangular_solve_jvp(t, ans, b, a, upper=True, transpose=False, unitriangular=False):
    x = ans[0]
    ta = None if t[1] is None else _triangle(t[1], upper, unitriangular)
    rhs = _solve_rhs_tangent(x, None if ta is None else (ta.mT if transpose else ta), t[0], True)
    dx = torch.triangular_solve(rhs, a, upper=upper, transpose=transpose, unitriangular=unitriangular)[0]
    return dx, t[1]


# ---- Cholesky ---------------------------------------------------------------------


def _cholesky_tangent(l, da):
    """dL = L Phi(L^{-1} dA L^{-H}), Phi = the lower triangle with a halved diagonal."""
    m = torch.linalg.solve_triangular(l, da, upper=False)
    m = torch.linalg.solve_triangular(l.mH, m, upper=True, left=False)
    phi = m.tril() - 0.5 * torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))
    return l @ phi


@defrule(aten.linalg_cholesky_ex.default)
def _cholesky_ex_jvp(t, ans, a, *, upper=False, check_errors=False):
    l = ans[0].mH if upper else ans[0]
    dl = _cholesky_tangent(l, t[0])
    return (dl.mH if upper else dl), None


@defrule(aten.cholesky.default)
def _cholesky_jvp(t, ans, a, upper=False):
    return _cholesky_ex_jvp(t, (ans, None), a, upper=upper)[0]


def _gram_tangent(l, dl, upper):
    """The tangent of A = L L^H (or U^H U) from the triangle of dL the op reads."""
    if upper:
        du = dl.triu()
        prod = du.mH @ l
    else:
        dl = dl.tril()
        prod = dl @ l.mH
    return prod + prod.mH


@defrule(aten.cholesky_solve.default)
def _cholesky_solve_jvp(t, ans, b, l, upper=False):
    rhs = t[0] if t[1] is None else tsub(t[0], _gram_tangent(l, t[1], upper) @ ans)
    return torch.cholesky_solve(rhs, l, upper=upper)


@defrule(aten.cholesky_inverse.default)
def _cholesky_inverse_jvp(t, ans, l, upper=False):
    # X = (L L^H)^{-1}.  (For complex L, LAPACK's potri treats a non-real diagonal
    # in its own way; a Cholesky factor's diagonal is real, and this is the
    # derivative of the formula along every direction that keeps it so.)
    return -ans @ _gram_tangent(l, t[0], upper) @ ans


# ---- determinants -------------------------------------------------------------------


def _det_trace_term(a, lu, pivots, det, da):
    """tr(adj(A) dA): det * tr(A^{-1} dA) through the saved LU where A is
    invertible; through the SVD, whose adjugate stays finite, where det = 0."""
    out = det * _tr(torch.linalg.lu_solve(lu, pivots, da))
    singular = det == 0
    if bool(singular.any()):
        u, s, vh = torch.linalg.svd(a)
        left = torch.cat([torch.ones_like(s[..., :1]), s[..., :-1].cumprod(-1)], -1)
        right = torch.cat([s.flip(-1)[..., :-1].cumprod(-1).flip(-1), torch.ones_like(s[..., :1])], -1)
        others = (left * right).to(a.dtype)  # prod_{j != i} s_j
        adj = torch.linalg.det(u @ vh).unsqueeze(-1).unsqueeze(-1) * (vh.mH * others.unsqueeze(-2)) @ u.mH
        out = torch.where(singular, _tr(adj @ da), out)
    return out


def _factored(a, da):
    """The matrix (and its tangent) whose LU ``det`` and ``slogdet`` return: ATen
    factors A^T, which is column-major, when A is real and contiguous."""
    if a.is_contiguous() and not a.is_complex():
        return a.mT, da.mT
    return a, da


@defrule(aten._linalg_det.default)
def _det_jvp(t, ans, a):
    det, lu, pivots = ans
    a, da = _factored(a, t[0])
    return _det_trace_term(a, lu, pivots, det, da), _lu_tangent(lu, pivots, da), None


@defrule(aten._linalg_slogdet.default)
def _slogdet_jvp(t, ans, a):
    sign, logabsdet, lu, pivots = ans
    a, da = _factored(a, t[0])
    tr = _tr(torch.linalg.lu_solve(lu, pivots, da))
    dlu = _lu_tangent(lu, pivots, da)
    if a.is_complex():
        return sign * 1j * tr.imag, tr.real, dlu, None
    return None, tr, dlu, None


# ---- eigen- and singular value decompositions ------------------------------------------


def _off_diagonal_inverse(diff):
    """1 / diff off the diagonal, 0 on it (and where eigenvalues repeat)."""
    return torch.where(diff == 0, 0.0, 1 / diff)


@defrule(aten._linalg_eigh.default)
def _eigh_jvp(t, ans, a, UPLO="L", compute_v=True):
    # dA is used as given; a Hermitian A has Hermitian tangents (as in torch.func).
    w, v = ans
    vh_da_v = v.mH @ t[0] @ v
    dw = vh_da_v.diagonal(dim1=-2, dim2=-1).real
    if not compute_v:
        return dw, None
    f = _off_diagonal_inverse(w.unsqueeze(-2) - w.unsqueeze(-1))
    return dw, v @ (f.to(vh_da_v.dtype) * vh_da_v)


@defrule(aten.linalg_eig.default)
def _eig_jvp(t, ans, a):
    """dL = diag(V^{-1} dA V); dV = V (F o V^{-1} dA V), then the change of each
    column's norm is taken out, since eig returns unit eigenvectors."""
    w, v = ans
    da = t[0].to(v.dtype)
    m = torch.linalg.solve(v, da @ v)
    dw = m.diagonal(dim1=-2, dim2=-1)
    f = _off_diagonal_inverse(w.unsqueeze(-2) - w.unsqueeze(-1))
    dv = v @ (f * m)
    dv = dv - v * (v.conj() * dv).sum(-2, keepdim=True).real
    return dw, dv


@defrule(aten._linalg_svd.default)
def _svd_jvp(t, ans, a, full_matrices=False, compute_uv=True, *, driver=None):
    """A = U S V^H with dP = U^H dA V: dS = Re diag(dP); off the diagonal
    U^H dU = F o (dP S + S dP^H) and V^H dV = F o (S dP + dP^H S) with
    F = 1 / (s_j^2 - s_i^2); the phase freedom of complex singular vectors is
    fixed as in torch.func: i Im(dP_ii) / s_i is split evenly between the diagonals
    of U^H dU and -V^H dV.
    Rectangular A adds the components outside the span of U (or V)."""
    m, n = a.shape[-2:]
    k = min(m, n)
    if full_matrices and m != n and compute_uv:
        return _linalg_fallback(aten._linalg_svd.default)(t, ans, a, full_matrices, compute_uv, driver=driver)
    u, s, vh = ans
    if not compute_uv:
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
    da = t[0]
    u, vh = u[..., :, :k], vh[..., :k, :]
    v = vh.mH
    dp = u.mH @ da @ v
    ds = dp.diagonal(dim1=-2, dim2=-1).real
    if not compute_uv:
        return None, ds, None
    sc = s.to(dp.dtype)
    f = _off_diagonal_inverse(s.unsqueeze(-2).square() - s.unsqueeze(-1).square()).to(dp.dtype)
    omega_u = f * (dp * sc.unsqueeze(-2) + sc.unsqueeze(-1) * dp.mH)
    omega_v = f * (sc.unsqueeze(-1) * dp + dp.mH * sc.unsqueeze(-2))
    if a.is_complex():
        phase = torch.diag_embed(0.5j * dp.diagonal(dim1=-2, dim2=-1).imag / s)
        omega_u, omega_v = omega_u + phase, omega_v - phase
    du = u @ omega_u
    dv = v @ omega_v
    if m > k:
        du = du + (da @ v - u @ dp) / sc.unsqueeze(-2)
    if n > k:
        dv = dv + (da.mH @ u - v @ dp.mH) / sc.unsqueeze(-2)
    return du, ds, dv.mH


@defrule(aten.linalg_qr.default)
def _qr_jvp(t, ans, a, mode="reduced"):
    """A = QR: C = Q^H dA R^{-1} = Q^H dQ + dR R^{-1}; the first term is skew-Hermitian,
    the second upper triangular (with a real diagonal), which splits C.  A wide A
    = Q [R1 R2] takes dQ from its square part and dR2 = Q^H (dA2 - dQ R2)."""
    m, n = a.shape[-2:]
    if mode == "r" or (mode == "complete" and m > n):
        return _linalg_fallback(aten.linalg_qr.default)(t, ans, a, mode)
    q, r = ans
    da = t[0]
    k = min(m, n)
    r1, da1 = r[..., :, :k], da[..., :, :k]
    y = torch.linalg.solve_triangular(r1, da1, upper=True, left=False)  # dA R^{-1}
    c = q.mH @ y
    low = c.tril(-1)
    omega = low - low.mH
    if a.is_complex():
        omega = omega + torch.diag_embed(1j * c.diagonal(dim1=-2, dim2=-1).imag)
    dr1 = (c - omega) @ r1
    dq = q @ omega
    if m > k:
        dq = dq + y - q @ c
    if n > k:
        dr2 = q.mH @ (da[..., :, k:] - dq @ r[..., :, k:])
        dr1 = torch.cat([dr1, dr2], -1)
    return dq, dr1


@defrule(aten.linalg_pinv.atol_rtol_tensor)
def _pinv_jvp(t, ans, a, *, atol=None, rtol=None, hermitian=False):
    """Where the rank is locally constant (Golub and Pereyra, 1973):
    dA+ = -A+ dA A+ + A+ A+^H dA^H (I - A A+) + (I - A+ A) dA^H A+^H A+."""
    p, da = ans, t[0]
    dah = da.mH
    out = -p @ da @ p
    out = out + (p @ p.mH) @ (dah - dah @ a @ p)
    out = out + (dah - p @ a @ dah) @ (p.mH @ p)
    return out


@defrule(aten.linalg_matrix_exp.default)
def _matrix_exp_jvp(t, ans, a):
    """The upper right block of exp([[A, dA], [0, A]]) is the Frechet derivative."""
    n = a.shape[-1]
    block = torch.cat([torch.cat([a, t[0]], -1), torch.cat([torch.zeros_like(a), a], -1)], -2)
    return torch.linalg.matrix_exp(block)[..., :n, n:]


def _linalg_fallback(op):
    """Linearization through the op's reverse-mode formula, for the rare cases
    (rectangular LU, non-unique complete QR or full SVD) the closed forms skip."""
    return linearized(op)
