"""Collectives (``torch.distributed``): the tangent takes the primal's collective.

Sums, averages, gathers, scatters and broadcasts are linear, so the tangent
goes through the same collective.  The primal and the tangent travel in one
collective (stacked, or concatenated for lists), and the rule runs on every
call (the "collective" kind of the interpreter): a rank whose tangent is zero
sends zeros, so every rank issues the same collectives and none waits forever.
Every decision that could refuse a call depends on the op and its arguments'
structure, which all ranks share, never on tangent values.

Left out (a clear error on every rank): send/recv, scatter/gather to one
rank, the list forms ``allgather_``/``reduce_scatter_``, max/min/product in
reduce-scatters and in the in-place ``torch.distributed`` API.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (defines _wrap_tensor_autograd)

from ..registry import def_collective

_f = torch.ops._c10d_functional
_c = torch.ops.c10d
_LINEAR = ("sum", "avg")


def _zeros(t, p):
    return torch.zeros_like(p) if t is None else t


def _pair(p, t):
    """``p`` and its tangent stacked along a new first dimension (0-dim tensors become 1-dim)."""
    if p.dim() == 0:
        p = p.reshape(1)
        t = None if t is None else t.reshape(1)
    return torch.stack([p, _zeros(t, p)])


def _linear_op(name, reduce_op):
    if reduce_op not in _LINEAR:
        raise NotImplementedError(
            f"fwdgrad: {name} with reduce_op={reduce_op!r} has no JVP rule here; sum and avg "
            f"are linear, and all_reduce also takes max and min"
        )


@def_collective(_f.all_reduce.default)
def all_reduce(t, x, reduce_op, group_name):
    if reduce_op in ("max", "min"):
        return _all_reduce_extreme(t, x, reduce_op, group_name)
    _linear_op("all_reduce", reduce_op)
    out = _f.wait_tensor.default(_f.all_reduce.default(_pair(x, t[0]), reduce_op, group_name))
    return out[0].view(x.shape), out[1].view(x.shape)


def _all_reduce_extreme(t, x, reduce_op, group_name):
    """The ranks holding the extreme share its tangent equally (the convention for ties)."""
    ans = _f.wait_tensor.default(_f.all_reduce.default(x, reduce_op, group_name))
    mask = (x == ans).to(x.dtype)
    sums = _f.wait_tensor.default(_f.all_reduce.default(_pair(_zeros(t[0], x) * mask, mask), "sum", group_name))
    return ans, (sums[0] / sums[1]).view(x.shape)


@def_collective(_f.all_reduce_coalesced.default)
def all_reduce_coalesced(t, xs, reduce_op, group_name):
    _linear_op("all_reduce_coalesced", reduce_op)
    ts = t[0] or [None] * len(xs)
    flat = torch.cat([p.reshape(-1) for p in xs] + [_zeros(g, p).reshape(-1) for p, g in zip(xs, ts)])
    out = _f.wait_tensor.default(_f.all_reduce.default(flat, reduce_op, group_name))
    sizes = [p.numel() for p in xs]
    parts = out.split(sizes * 2)
    n = len(xs)
    return (
        [q.view(p.shape) for q, p in zip(parts[:n], xs)],
        [q.view(p.shape) for q, p in zip(parts[n:], xs)],
    )


@def_collective(_f.all_gather_into_tensor.default)
def all_gather_into_tensor(t, x, group_size, group_name):
    pair = _pair(x, t[0])  # (2, n, ...): rank r's piece of the result is [p_r; t_r]
    out = _f.wait_tensor.default(_f.all_gather_into_tensor.default(pair, group_size, group_name))
    out = out.view(group_size, 2, *pair.shape[1:])
    shape = (group_size * pair.shape[1], *pair.shape[2:])
    return out[:, 0].reshape(shape), out[:, 1].reshape(shape)


@def_collective(_f.reduce_scatter_tensor.default)
def reduce_scatter_tensor(t, x, reduce_op, group_size, group_name):
    _linear_op("reduce_scatter_tensor", reduce_op)
    rest = x.shape[1:]
    m = x.shape[0] // group_size
    pair = torch.stack([x.view(group_size, m, *rest), _zeros(t[0], x).view(group_size, m, *rest)], 1)
    out = _f.wait_tensor.default(
        _f.reduce_scatter_tensor.default(pair.reshape(group_size * 2 * m, *rest), reduce_op, group_size, group_name)
    )
    out = out.view(2, m, *rest)
    return out[0], out[1]


@def_collective(_f.broadcast.default)
def broadcast(t, x, src, group_name):
    out = _f.wait_tensor.default(_f.broadcast.default(_pair(x, t[0]), src, group_name))
    return out[0].view(x.shape), out[1].view(x.shape)


def _in_place(op, functional):
    """The rule of ``op``, which writes into its first argument what ``functional`` returns."""

    def rule(t, x, *args):
        ans, dx = functional(t, x, *args)
        x.copy_(ans)
        return x, {0: dx}

    def_collective(op)(rule)


_in_place(_f.all_reduce_.default, all_reduce)
_in_place(_f.broadcast_.default, broadcast)


@def_collective(_f.all_to_all_single.default)
def all_to_all_single(t, x, output_split_sizes, input_split_sizes, group_name):
    # Uneven splits along dim 0 do not stack; two collectives, on every rank.
    ans = _f.wait_tensor.default(_f.all_to_all_single.default(x, output_split_sizes, input_split_sizes, group_name))
    dx = _f.wait_tensor.default(
        _f.all_to_all_single.default(_zeros(t[0], x), output_split_sizes, input_split_sizes, group_name)
    )
    return ans, dx


@def_collective(_f.wait_tensor.default)
def wait_tensor(t, x):
    # The rules above wait for their own collectives; waiting again is harmless.
    return _f.wait_tensor.default(x), t[0]


@def_collective(_f._wrap_tensor_autograd.default)
def wrap_tensor_autograd(t, x):
    # Wraps a result as an AsyncCollectiveTensor to wait on later; the rules
    # above have waited already, so the dual keeps the plain result.
    return x, t[0]


# --------------------------------------------------------------------------
# The in-place torch.distributed API (dist.all_reduce, dist.broadcast, ...).


_LINEAR_OPS = (int(dist.ReduceOp.SUM), int(dist.ReduceOp.AVG))


def _check_linear(name, reduce_op):
    op = reduce_op.op()  # a ScriptObject; op() is the RedOpType as an int
    if op not in _LINEAR_OPS:
        raise NotImplementedError(
            f"fwdgrad: {name} with {dist.ReduceOp.RedOpType(op)} has no JVP rule here (sum and avg are linear); use "
            f"torch.distributed._functional_collectives.all_reduce for max and min"
        )


def _flat_pairs(xs, ts):
    ts = ts or [None] * len(xs)
    return torch.cat([p.reshape(-1) for p in xs] + [_zeros(g, p).reshape(-1) for p, g in zip(xs, ts)])


def _unflatten_into(flat, xs):
    sizes = [p.numel() for p in xs]
    parts = flat.split(sizes * 2)
    n = len(xs)
    for p, q in zip(xs, parts[:n]):
        p.copy_(q.view(p.shape))
    return {(0, i): q.view(p.shape) for i, (p, q) in enumerate(zip(xs, parts[n:]))}


@def_collective(_c.allreduce_.default)
def c10d_allreduce_(t, tensors, process_group, reduce_op, sparse_indices, async_op=True, timeout=-1):
    _check_linear("torch.distributed.all_reduce", reduce_op)
    flat = _flat_pairs(tensors, t[0])
    _, work = _c.allreduce_.default([flat], process_group, reduce_op, sparse_indices, async_op, timeout)
    work.wait()
    return (tensors, work), _unflatten_into(flat, tensors)


@def_collective(_c.broadcast_.default)
def c10d_broadcast_(t, tensors, process_group, root_rank, root_tensor, async_op=True, timeout=-1):
    if len(tensors) != 1:
        raise NotImplementedError("fwdgrad: torch.distributed broadcast of several tensors has no JVP rule")
    flat = _flat_pairs(tensors, t[0])
    _, work = _c.broadcast_.default([flat], process_group, root_rank, 0, async_op, timeout)
    work.wait()
    return (tensors, work), _unflatten_into(flat, tensors)


@def_collective(_c._allgather_base_.default)
def c10d_allgather_base_(t, output, x, process_group, async_op=True, timeout=-1):
    pair = _pair(x, t[1])
    world = output.shape[0] // pair.shape[1] if output.dim() else output.numel()
    buf = pair.new_empty((world * 2, *pair.shape[1:]))
    _, work = _c._allgather_base_.default(buf, pair, process_group, async_op, timeout)
    work.wait()
    buf = buf.view(world, 2, *pair.shape[1:])
    output.copy_(buf[:, 0].reshape(output.shape))
    return (output, work), {0: buf[:, 1].reshape(output.shape)}


@def_collective(_c._reduce_scatter_base_.default)
def c10d_reduce_scatter_base_(t, output, x, process_group, reduce_op, async_op=True, timeout=-1):
    _check_linear("torch.distributed.reduce_scatter_tensor", reduce_op)
    world = x.shape[0] // output.shape[0]
    m, rest = output.shape[0], output.shape[1:]
    pair = torch.stack([x.view(world, m, *rest), _zeros(t[1], x).view(world, m, *rest)], 1)
    buf = output.new_empty((2 * m, *rest))
    _, work = _c._reduce_scatter_base_.default(
        buf, pair.reshape(world * 2 * m, *rest), process_group, reduce_op, async_op, timeout
    )
    work.wait()
    buf = buf.view(2, m, *rest)
    output.copy_(buf[0])
    return (output, work), {0: buf[1]}
