"""Views, shape ops, indexing, gathering and scattering.

Almost all of these are linear in their data arguments: the tangent is the
same op applied to the tangents.  The exceptions fill or pad with a constant,
which becomes zero in the tangent, and the reducing scatters
(``scatter_reduce``, ``index_reduce``).
"""

import torch

from ..registry import def_linear, defrule, or_scalar_zero, or_zeros

aten = torch.ops.aten

# Views (used directly only when the view's base is not a dual at the op's level).
for _op in (
    aten.view.default,
    aten._unsafe_view.default,
    aten._reshape_alias.default,
    aten.expand.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.as_strided.default,
    aten.diagonal.default,
    aten.unfold.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.alias.default,
    aten.detach.default,
    aten.view.dtype,
    # Copying variants of views.
    aten.view_copy.default,
    aten.permute_copy.default,
    aten.transpose_copy.int,
    aten.t_copy.default,
    aten.select_copy.int,
    aten.slice_copy.Tensor,
    aten.squeeze_copy.dim,
    aten.squeeze_copy.dims,
    aten.unsqueeze_copy.default,
    aten.expand_copy.default,
    aten.as_strided_copy.default,
    aten.diagonal_copy.default,
    aten.unbind_copy.int,
    aten.split_copy.Tensor,
    aten.split_with_sizes_copy.default,
    aten.alias_copy.default,
    aten.unfold_copy.default,
    aten.narrow_copy.default,
    aten.squeeze_copy.default,
    aten.unsafe_split.Tensor,
    aten.unsafe_split_with_sizes.default,
    # Shape ops that copy.
    aten.flip.default,
    aten.roll.default,
    aten.repeat.default,
    aten.rot90.default,
    aten.tril.default,
    aten.triu.default,
    aten.diag_embed.default,
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default,
    aten.channel_shuffle.default,
    aten.im2col.default,
    aten.col2im.default,
    # Indexing and gathering.
    aten.index.Tensor,
    aten.index_select.default,
    aten.gather.default,
    aten.take.default,
    aten.masked_select.default,
    aten.embedding.default,
    # Layout conversions.
    aten._to_sparse.default,
    aten._to_sparse.sparse_dim,
    aten._to_dense.default,
):
    try:
        def_linear(_op)
    except AttributeError:  # pragma: no cover - op missing in this torch build
        pass

def_linear(aten.cat.default, 0)
def_linear(aten.stack.default, 0)
def_linear(aten.block_diag.default, 0)
def_linear(aten.index_put.default, 0, 2)
def_linear(aten._unsafe_index_put.default, 0, 2)
def_linear(aten._unsafe_index.Tensor)
def_linear(aten.scatter.src, 0, 3)
def_linear(aten.scatter_add.default, 0, 3)
def_linear(aten.index_add.default, 0, 3)
def_linear(aten.index_copy.default, 0, 3)
def_linear(aten.masked_scatter.default, 0, 2)
def_linear(aten.select_scatter.default, 0, 1)
def_linear(aten.slice_scatter.default, 0, 1)
def_linear(aten.diagonal_scatter.default, 0, 1)
def_linear(aten.as_strided_scatter.default, 0, 1)
def_linear(aten.put.default, 0, 2)
def_linear(aten.complex.default, 0, 1)
def_linear(aten._unsafe_masked_index_put_accumulate.default, 0, 3)


@defrule(aten._unsafe_masked_index.default)
def _masked_index_jvp(t, ans, x, mask, indices, fill):
    return aten._unsafe_masked_index.default(t[0], mask, indices, 0)


@defrule(aten.constant_pad_nd.default)
def _constant_pad_jvp(t, ans, x, pad, value=0):
    return aten.constant_pad_nd.default(t[0], pad, 0)


@defrule(aten.scatter.value)
def _scatter_value_jvp(t, ans, x, dim, index, value):
    return t[0].scatter(dim, index, 0)


@defrule(aten.scatter.reduce)
def _scatter_reduce_legacy_jvp(t, ans, x, dim, index, src, *, reduce):
    """scatter with reduce="add" or "multiply" (the older API of scatter_reduce)."""
    if reduce == "add":
        return aten.scatter.reduce(or_zeros(t[0], x), dim, index, or_zeros(t[3], src), reduce="add")
    return _scatter_reduce_jvp(t, ans, x, dim, index, src, "prod", True)


@defrule(aten.scatter.value_reduce)
def _scatter_value_reduce_jvp(t, ans, x, dim, index, value, *, reduce):
    # linear in x: adding a constant, or scaling the chosen elements by it
    return t[0] if reduce == "add" else aten.scatter.value_reduce(t[0], dim, index, value, reduce=reduce)


@defrule(aten.index_fill.int_Scalar)
def _index_fill_jvp(t, ans, x, dim, index, value):
    return t[0].index_fill(dim, index, 0)


@defrule(aten.index_fill.int_Tensor)
def _index_fill_tensor_jvp(t, ans, x, dim, index, value):
    return aten.index_fill.int_Tensor(or_zeros(t[0], ans), dim, index, or_scalar_zero(t[3], ans))


@defrule(aten.scatter_reduce.two)
def _scatter_reduce_jvp(t, ans, x, dim, index, src, reduce, include_self=True):
    tx, ts = or_zeros(t[0], x), or_zeros(t[3], src)

    def scatter(into, values, how):
        # ``into`` is what a position keeps when no index reaches it (include_self=False)
        return aten.scatter_reduce.two(into, dim, index, values, how, include_self=include_self)

    if reduce in ("sum", "mean"):
        return scatter(tx, ts, reduce)
    if reduce in ("amax", "amin"):
        # Average the tangents of every element that attains the extreme.
        picked_src = src == ans.gather(dim, index)
        picked_self = x == ans
        count = scatter(picked_self.to(tx.dtype), picked_src.to(tx.dtype), "sum")
        total = scatter(tx * picked_self, ts * picked_src, "sum")
        return torch.where(count > 0, total / count.clamp_min(1), tx)
    if reduce == "prod":
        # Exact with zeros: with none, prod * sum(t / v); with one, t at that zero
        # times the product of the others; with more, 0.
        zero_x, zero_s = x == 0, src == 0
        safe_x, safe_s = torch.where(zero_x, 1, x), torch.where(zero_s, 1, src)
        n_zero = scatter(zero_x.to(tx.dtype), zero_s.to(tx.dtype), "sum")
        others = scatter(safe_x, safe_s, "prod")
        no_zero = scatter(tx / safe_x, ts / safe_s, "sum")
        at_zero = scatter(tx * zero_x, ts * zero_s, "sum")
        return others * torch.where(n_zero == 0, no_zero, torch.where(n_zero == 1, at_zero, 0))
    raise NotImplementedError(f"fwdgrad: scatter_reduce with reduce={reduce!r} has no JVP rule")


@defrule(aten.index_reduce.default)
def _index_reduce_jvp(t, ans, x, dim, index, source, reduce, *, include_self=True):
    """index_reduce is scatter_reduce with the index repeated across the source."""
    dim = dim % max(x.dim(), 1)
    shape = [1] * source.dim()
    if source.dim():
        shape[dim] = -1
    full_index = index.reshape(shape).expand(source.shape)
    return _scatter_reduce_jvp((t[0], None, None, t[3]), ans, x, dim, full_index, source, reduce,
                               include_self)
