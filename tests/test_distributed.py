"""Data-parallel hvp/grad, DDP and collectives on 2 and 4 gloo processes.

Every rank checks its results against a single-process float64 reference on
the full batch (``torch.autograd.functional.hvp`` and ``torch.autograd.grad``),
which each rank computes itself.  Each test spawns its processes once and runs
several scenarios in them (spawning dominates the time).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol
from torch.func import functional_call
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed_util
import fwdgrad

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

N = 11  # samples in the full batch: uneven shards on 2 and 4 ranks


class _WithSpare(nn.Module):
    """The model plus a layer that forward never calls (find_unused_parameters)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.spare = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.net(x)


def _model(unused=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return _WithSpare(m) if unused else m


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=g, dtype=torch.double), torch.randn(N, 2, generator=g, dtype=torch.double)


def _direction(params):
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


def _reference(model, x, y, v):
    """Loss, gradient and H v of the full batch's mean loss, in one process."""
    names = [k for k, _ in model.named_parameters()]
    p0 = tuple(p.detach() for _, p in model.named_parameters())

    def loss(*ps):
        return F.mse_loss(functional_call(model, dict(zip(names, ps)), (x,)), y)

    value, hv = torch.autograd.functional.hvp(loss, p0, tuple(v[k] for k in names))
    ps = [p.clone().requires_grad_() for p in p0]
    g = torch.autograd.grad(loss(*ps), ps)
    return value, dict(zip(names, g)), dict(zip(names, hv))


def _reference_ggn(model, x, y, v):
    """The full batch's Gauss-Newton product for the mean squared error: J^T (2/numel) J v."""
    names = [k for k, _ in model.named_parameters()]
    p0 = tuple(p.detach() for _, p in model.named_parameters())

    def out(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    _, jv = torch.func.jvp(out, p0, tuple(v[k] for k in names))
    _, vjp = torch.func.vjp(out, *p0)
    return dict(zip(names, vjp(2.0 / y.numel() * jv)))


def _close(got, want, what):
    """``got`` matches ``want`` (names may carry ``_WithSpare``'s prefix; its spare layer's are 0)."""
    assert {k.removeprefix("net.") for k in got if not k.startswith("spare")} == set(want), what
    for k, t in got.items():
        w = want.get(k.removeprefix("net."), torch.zeros_like(t))
        torch.testing.assert_close(t, w, msg=lambda m: f"{what}[{k}]: {m}")


def _shard(rank, world, uneven=True):
    x, y = _data()
    if not uneven:
        n = N - N % world
        x, y = x[:n], y[:n]
    return x, y, torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]


def scenarios_data_parallel(rank, world):
    group = dist.group.WORLD
    model = _model()
    x, y, xr, yr = _shard(rank, world)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    v = _direction(params)
    value, g, hv = _reference(model, x, y, v)

    # Pure form, uneven shards: weight = the local batch size.
    def loss(p):
        return F.mse_loss(functional_call(model, p, (xr,)), yr)

    val, gr, h = fwdgrad.value_grad_and_hvp(loss, params, v, process_group=group, weight=len(xr))
    torch.testing.assert_close(val, value)
    _close(gr, g, "grad")
    _close(h, hv, "hvp")
    _close(fwdgrad.hvp(loss, params, v, process_group=group, weight=len(xr)), hv, "hvp")
    # Gauss-Newton products: the global mean loss's (uneven shards weighted).
    ggn = _reference_ggn(model, x, y, v)
    mse = fwdgrad.mse_loss(yr)
    _close(fwdgrad.ggnvp(lambda p: functional_call(model, p, (xr,)), mse, params, v,
                         process_group=group, weight=len(xr)), ggn, "ggnvp")
    _close(fwdgrad.fisher_vp(lambda: model(xr), mse, dict(model.named_parameters()), v,
                             process_group=group, weight=len(xr)), ggn, "fisher_vp (true: the GGN)")
    # Batched: two directions (v and 2 v) in one call, one all-reduce.
    V = {k: torch.stack([t, 2 * t]) for k, t in v.items()}
    batched = fwdgrad.hvp(loss, params, V, batched=True, process_group=group, weight=len(xr))
    _close({k: t[0] for k, t in batched.items()}, hv, "batched hvp[0]")
    _close({k: t[1] for k, t in batched.items()}, {k: 2 * t for k, t in hv.items()}, "batched hvp[1]")
    _close(fwdgrad.grad(loss, process_group=group, weight=len(xr))(params), g, "grad")
    val2, gr2 = fwdgrad.value_and_grad(loss, process_group=group, weight=len(xr))(params)
    torch.testing.assert_close(val2, value)
    _close(gr2, g, "value_and_grad")
    # Closure form on a plain (not DDP) model with an explicit group.
    _close(
        fwdgrad.hvp(lambda: F.mse_loss(model(xr), yr), dict(model.named_parameters()), v,
                    process_group=group, weight=len(xr)),
        hv, "closure hvp",
    )
    # Forward over a data-parallel gradient: the in-place all-reduce's rule.
    names = list(params)
    _, hv_fwd = fwdgrad.jvp(
        lambda *ps: tuple(fwdgrad.grad(loss, process_group=group, weight=len(xr))(dict(zip(names, ps))).values()),
        tuple(params.values()), tuple(v.values()),
    )
    _close(dict(zip(names, hv_fwd)), hv, "jvp of grad")
    with pytest.raises(ValueError, match="weight"):
        fwdgrad.hvp(loss, params, v, weight=2.0)
    with pytest.raises(TypeError, match="process_group"):
        fwdgrad.hvp(loss, params, v, process_group="world")


def _ddp_backward_matches(ddp, xr, yr, g, what):
    ddp.zero_grad(set_to_none=True)
    F.mse_loss(ddp(xr), yr).backward()
    got = {k: p.grad for k, p in ddp.module.named_parameters() if p.grad is not None}
    assert all(not k.startswith("spare") for k in got), what
    for k, t in got.items():
        torch.testing.assert_close(t, g[k.removeprefix("net.")], msg=lambda m: f"{what}[{k}]: {m}")


def scenarios_ddp(rank, world):
    x, y, xr, yr = _shard(rank, world, uneven=False)  # DDP averages equal shards
    for kwargs in ({}, {"static_graph": True}, {"find_unused_parameters": True}):
        model = _model(unused="find_unused_parameters" in kwargs)
        ref_model = _model()
        params = dict(ref_model.named_parameters())
        v0 = _direction(params)
        value, g, hv = _reference(ref_model, x, y, v0)
        ggn = _reference_ggn(ref_model, x, y, v0)
        ddp = DDP(model, **kwargs)
        mparams = dict(ddp.module.named_parameters())
        v = {k: v0.get(k.removeprefix("net."), torch.zeros_like(p)) for k, p in mparams.items()}
        before = {k: p.detach().clone() for k, p in mparams.items()}
        for step in range(2):
            # Closure form: recognised as DDP, reduced over its group.
            val, gr, h = fwdgrad.value_grad_and_hvp(lambda: F.mse_loss(ddp(xr), yr), mparams, v)
            torch.testing.assert_close(val, value, msg=f"ddp {kwargs} step {step}: value")
            _close(gr, g, f"ddp {kwargs} grad")
            _close(h, hv, f"ddp {kwargs} hvp")
            # DDP's own backward afterwards is still right (static graph too).
            _ddp_backward_matches(ddp, xr, yr, g, f"ddp {kwargs} backward after hvp")
        for k, p in mparams.items():
            assert torch.equal(p.detach(), before[k]), f"{k} changed"
        with ddp.no_sync():
            _close(fwdgrad.hvp(lambda: F.mse_loss(ddp(xr), yr), mparams, v), hv, "hvp in no_sync")
        # Gauss-Newton through DDP's forward: closure form reduces over its group.
        _close(fwdgrad.ggnvp(lambda: ddp(xr), fwdgrad.mse_loss(yr), mparams, v), ggn, "ddp ggnvp")
        _ddp_backward_matches(ddp, xr, yr, g, f"ddp {kwargs} backward after ggnvp")
        # Pure form through DDP's forward: shard-local unless a group is given.
        pure = {k: p.detach().clone() for k, p in mparams.items()}

        def loss(p):
            return F.mse_loss(functional_call(ddp, {"module." + k: t for k, t in p.items()}, (xr,)), yr)

        with pytest.raises(RuntimeError, match="process_group=model.process_group"):
            fwdgrad.hvp(loss, pure, v)
        with pytest.raises(RuntimeError, match="process_group=model.process_group"):
            fwdgrad.grad(loss)(pure)
        ddp_out = lambda p: functional_call(ddp, {"module." + k: t for k, t in p.items()}, (xr,))  # noqa: E731
        with pytest.raises(RuntimeError, match="process_group=model.process_group"):
            fwdgrad.ggnvp(ddp_out, fwdgrad.mse_loss(yr), pure, v)
        _close(fwdgrad.ggnvp(ddp_out, fwdgrad.mse_loss(yr), pure, v, process_group=ddp.process_group),
               ggn, "pure ggnvp through DDP")
        _close(fwdgrad.hvp(loss, pure, v, process_group=ddp.process_group), hv, "pure hvp through DDP")
        _ddp_backward_matches(ddp, xr, yr, g, f"ddp {kwargs} backward at the end")


def scenarios_collectives(rank, world):
    group = dist.group.WORLD
    x = torch.arange(3, dtype=torch.double) + rank
    t = torch.ones(3, dtype=torch.double) * (rank + 1)
    total_x = sum(torch.arange(3, dtype=torch.double) + r for r in range(world))

    def f(x):
        return funcol.all_reduce(x.sin() * 2, "sum", group)

    # A tangent on rank 0 only: every rank still issues the same collectives.
    tangent = t if rank == 0 else None
    out, dout = fwdgrad.jvp(f, (x,), (tangent,))
    xs = [torch.arange(3, dtype=torch.double) + r for r in range(world)]
    torch.testing.assert_close(out, sum(2 * xr.sin() for xr in xs))
    torch.testing.assert_close(dout, 2 * xs[0].cos() * torch.ones(3, dtype=torch.double))
    # Every rank's tangent.
    out, dout = fwdgrad.jvp(f, (x,), (t,))
    torch.testing.assert_close(dout, sum(2 * xr.cos() * (r + 1) for r, xr in enumerate(xs)))

    def g(x):  # in place, the torch.distributed API
        y = x * 3
        dist.all_reduce(y, group=group)
        return y

    out, dout = fwdgrad.jvp(g, (x,), (tangent,))
    torch.testing.assert_close(out, 3 * total_x)
    torch.testing.assert_close(dout, 3 * t if rank == 0 else 3 * torch.ones(3, dtype=torch.double))

    # max: the ranks holding the extreme share its tangent (no ties here: the last rank wins).
    out, dout = fwdgrad.jvp(lambda x: funcol.all_reduce(x, "max", group), (x,), (t,))
    torch.testing.assert_close(out, xs[-1])
    torch.testing.assert_close(dout, t * 0 + world)

    def k(x):  # the in-place API: gather, reduce-scatter, broadcast
        full = x.new_zeros(world * 3)  # a dual (of zero tangent) to write into
        dist.all_gather_into_tensor(full, x * x, group=group)
        piece = x.new_zeros(3)
        dist.reduce_scatter_tensor(piece, full.repeat(world)[: world * 3], group=group)
        dist.broadcast(piece, src=0, group=group)
        return piece

    out, dout = fwdgrad.jvp(k, (x,), (t,))
    full = torch.cat([xr * xr for xr in xs])
    dfull = torch.cat([2 * xr * (r + 1) for r, xr in enumerate(xs)])
    torch.testing.assert_close(out, world * full[:3])
    torch.testing.assert_close(dout, world * dfull[:3])

    def h(x):  # gather, then a reduce-scatter back to this rank's piece
        full = funcol.all_gather_single(x * x, 0, group)
        return funcol.reduce_scatter_tensor(full.repeat(world), "sum", 0, group)

    out, dout = fwdgrad.jvp(h, (x,), (t,))
    full = torch.cat([xr * xr for xr in xs]).repeat(world)
    dfull = torch.cat([2 * xr * (r + 1) for r, xr in enumerate(xs)]).repeat(world)
    n = full.numel() // world
    torch.testing.assert_close(out, world * full[rank * n:(rank + 1) * n])
    torch.testing.assert_close(dout, world * dfull[rank * n:(rank + 1) * n])


def scenarios_dtensor(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    w, v = (torch.randn(4 * world, generator=g, dtype=torch.double) for _ in range(2))
    a = torch.randn(3, 4 * world, generator=g, dtype=torch.double)

    def f(w):
        return (w.sin() * w).sum()

    ref_value, ref_hv = torch.autograd.functional.hvp(f, w, v)
    ref_out, ref_dout = torch.autograd.functional.jvp(lambda w: (w ** 3).sum(), w, v)
    for placement in (Shard(0), Replicate()):
        wd, vd = distribute_tensor(w, mesh, [placement]), distribute_tensor(v, mesh, [placement])
        out, dout = fwdgrad.jvp(lambda w: (w ** 3).sum(), (wd,), (vd,))
        torch.testing.assert_close(out.full_tensor(), ref_out)
        torch.testing.assert_close(dout.full_tensor(), ref_dout)
        hv = fwdgrad.hvp(f, wd, vd)
        assert hv.placements == wd.placements, "Hv comes back laid out like the parameter"
        torch.testing.assert_close(hv.full_tensor(), ref_hv)
        # A DTensor times a constant DTensor, either order.
        ad = distribute_tensor(a, mesh, [Replicate()])
        for fn in (lambda w: ad @ w, lambda w: w @ ad.T):
            out, dout = fwdgrad.jvp(fn, (wd,), (vd,))
            torch.testing.assert_close(dout.full_tensor(), fn(vd).full_tensor())
        with pytest.raises(TypeError, match="DTensor"):
            fwdgrad.jvp(f, (wd,), (v,))
        with pytest.raises(TypeError, match="DTensor"):
            fwdgrad.hvp(f, wd, v)
    with pytest.raises(ValueError, match="placements"):
        fwdgrad.jvp(f, (distribute_tensor(w, mesh, [Shard(0)]),), (distribute_tensor(v, mesh, [Replicate()]),))


def _fsdp_model(**kw):
    """``_model()`` sharded by FSDP2: its first layer, then the whole (nested units)."""
    model = _model()
    fully_shard(model[0], **kw)
    return fully_shard(model, **kw)


def scenarios_fsdp(rank, world):
    group = dist.group.WORLD
    plain = _model()
    x, y, xr, yr = _shard(rank, world)
    names = [k for k, _ in plain.named_parameters()]
    p0 = {k: p.detach() for k, p in plain.named_parameters()}
    v = _direction(p0)
    value, g, hv = _reference(plain, x, y, v)
    out_ref, jv_ref = torch.func.jvp(lambda p: functional_call(plain, p, (xr,)), (p0,), (v,))

    model = _fsdp_model()
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    before = {k: p.full_tensor() for k, p in params.items()}
    vd = {k: distribute_tensor(v[k], p.device_mesh, p.placements) for k, p in params.items()}
    detached = {k: p.detach() for k, p in params.items()}

    # jvp and forward_grad w.r.t. the sharded parameters: this rank's output and its tangent.
    out, jv = fwdgrad.jvp(lambda p: functional_call(model, p, (xr,)), (detached,), (vd,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jv, jv_ref)
    r, dr = fwdgrad.forward_grad(lambda p: functional_call(model, p, (xr,)))(detached, vd)
    torch.testing.assert_close(dr, jv_ref)

    def sharded_like_params(result, want, what):
        for k in names:
            assert isinstance(result[k], DTensor), f"{what}[{k}] is not a DTensor"
            assert result[k].placements == params[k].placements, f"{what}[{k}] is not laid out like the parameter"
            torch.testing.assert_close(result[k].full_tensor(), want[k], msg=lambda m: f"{what}[{k}]: {m}")

    # hvp: the Hessian of the global loss (uneven shards: weight = local batch size), sharded back.
    def pure(p):
        return F.mse_loss(functional_call(model, p, (xr,)), yr)

    sharded_like_params(fwdgrad.hvp(pure, detached, vd, weight=len(xr)), hv, "pure hvp")
    val, gr, h = fwdgrad.value_grad_and_hvp(lambda: F.mse_loss(model(xr), yr), params, vd, weight=len(xr))
    torch.testing.assert_close(val, value)
    sharded_like_params(gr, g, "closure grad")
    sharded_like_params(h, hv, "closure hvp")
    sharded_like_params(
        fwdgrad.hvp(pure, detached, vd, process_group=group, weight=len(xr)), hv, "hvp with process_group="
    )
    sharded_like_params(fwdgrad.grad(pure, weight=len(xr))(detached), g, "grad")
    val, gr = fwdgrad.value_and_grad(pure, weight=len(xr))(params)
    torch.testing.assert_close(val, value)
    sharded_like_params(gr, g, "value_and_grad")

    # The model is as it was: sharded parameters with their values, and FSDP's own step works.
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for k, p in model.named_parameters():
        assert p is params[k]
        torch.testing.assert_close(p.full_tensor(), before[k])
    F.mse_loss(model(xr), yr).backward()  # FSDP averages the ranks' gradients
    shard_grads = []
    for j in range(world):
        xj, yj = torch.tensor_split(x, world)[j], torch.tensor_split(y, world)[j]
        ps = [p.clone().requires_grad_() for p in p0.values()]
        shard_grads.append(torch.autograd.grad(F.mse_loss(functional_call(plain, dict(zip(names, ps)), (xj,)), yj), ps))
    for k, *gs in zip(names, *shard_grads):
        torch.testing.assert_close(model.get_parameter(k).grad.full_tensor(), sum(gs) / world)

    # What cannot be right is refused, naming the fix.
    with pytest.raises(TypeError, match="DTensor"):
        fwdgrad.hvp(pure, detached, v)
    replicated = {k: distribute_tensor(v[k], p.device_mesh, [Replicate()]) for k, p in params.items()}
    with pytest.raises(ValueError, match="placements"):
        fwdgrad.jvp(lambda p: functional_call(model, p, (xr,)), (detached,), (replicated,))
    with pytest.raises(NotImplementedError, match="FSDP2"):
        fwdgrad.jvp(lambda x: model(x), (xr,), (torch.ones_like(xr),))  # its parameters not among the inputs
    with pytest.raises(NotImplementedError, match="FSDP2"):
        fwdgrad.jacfwd(lambda p: functional_call(model, p, (xr,)))(detached)
    with pytest.raises(NotImplementedError, match="FSDP2"):
        fwdgrad.hvp(pure, detached, {k: t.unsqueeze(0) for k, t in vd.items()}, batched=True)
    mixed = _fsdp_model(mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    mp = {k: p.detach() for k, p in mixed.named_parameters()}
    with pytest.raises(NotImplementedError, match="mixed-precision"):
        fwdgrad.jvp(lambda p: functional_call(mixed, p, (xr,)), (mp,), (mp,))


def scenarios_all(rank, world):
    scenarios_data_parallel(rank, world)
    scenarios_ddp(rank, world)
    scenarios_collectives(rank, world)
    scenarios_dtensor(rank, world)
    scenarios_fsdp(rank, world)


def test_two_processes():
    distributed_util.run(scenarios_all, 2)


@pytest.mark.heavy
def test_four_processes():
    distributed_util.run(scenarios_all, 4)
