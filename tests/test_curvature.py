"""Batched hvp, GGN and Fisher products against dense float64 references.

The references are built independently with torch.func: the Hessian by
``torch.func.hessian``, the GGN as ``J^T H_L J`` from ``jacrev``, the empirical
Fisher from per-sample gradients by ``torch.func.grad``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import fwdgrad

N, C = 6, 3


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    t = torch.randn(N, C, dtype=torch.float64)
    return model, x, y, t


class Flat:
    """Flattening for the dense references (written here, independent of fwdgrad.linops)."""

    def __init__(self, params):
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.flat = torch.cat([p.detach().flatten() for p in params.values()])

    def tree(self, f):
        return dict(zip(self.names, (c.view(s) for c, s in zip(f.split(self.sizes), self.shapes))))

    def batch_tree(self, V):
        return {n: c.unflatten(1, s) for n, c, s in zip(self.names, V.split(self.sizes, 1), self.shapes)}

    def vec(self, tree, batched=False):
        return torch.cat([tree[n].flatten(1 if batched else 0) for n in self.names], -1)


def _references(model, x, y, t):
    params = dict(model.named_parameters())
    fl = Flat(params)
    out = lambda f: functional_call(model, fl.tree(f), (x,))  # noqa: E731
    J = torch.func.jacrev(out)(fl.flat).reshape(N * C, -1)
    z = out(fl.flat)
    H_ce = torch.func.hessian(lambda z: F.cross_entropy(z, y))(z).reshape(N * C, N * C)
    H_mse = torch.func.hessian(lambda z: F.mse_loss(z, t))(z).reshape(N * C, N * C)
    hess = torch.func.hessian(lambda f: F.cross_entropy(out(f), y))(fl.flat)
    per_sample = torch.stack([
        torch.func.grad(lambda f, i=i: F.cross_entropy(out(f)[i:i + 1], y[i:i + 1]))(fl.flat) for i in range(N)
    ])
    return params, fl, {
        "ggn_ce": J.T @ H_ce @ J, "ggn_mse": J.T @ H_mse @ J, "hessian": hess,
        "ef_ce": per_sample.T @ per_sample / N,
    }


def test_references_are_not_trivial():
    model, x, y, t = _setup()
    _, _, ref = _references(model, x, y, t)
    # The GGN is PSD but differs from the (indefinite) Hessian: the test can tell them apart.
    assert torch.linalg.eigvalsh(ref["ggn_ce"]).min() > -1e-10
    assert (ref["ggn_ce"] - ref["hessian"]).abs().max() > 1e-3
    assert (ref["ggn_ce"] - ref["ef_ce"]).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["closure", "pure", "list"])
def test_batched_hvp(form):
    model, x, y, t = _setup()
    params, fl, ref = _references(model, x, y, t)
    V = torch.randn(4, fl.flat.numel(), dtype=torch.float64)
    before = {k: p.detach().clone() for k, p in params.items()}
    if form == "closure":
        out = fwdgrad.hvp(lambda: F.cross_entropy(model(x), y), params, fl.batch_tree(V), batched=True)
    elif form == "pure":
        out = fwdgrad.hvp(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y), params,
                          fl.batch_tree(V), batched=True)
    else:
        names = list(params)
        out = fwdgrad.hvp(
            lambda *ps: F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y),
            list(params.values()), list(fl.batch_tree(V).values()), batched=True,
        )
        out = dict(zip(names, out))
    torch.testing.assert_close(fl.vec(out, batched=True), V @ ref["hessian"].T)
    assert not any(o.requires_grad for o in out.values())
    for k, p in model.named_parameters():
        assert p is params[k] and type(p) is nn.Parameter
        assert torch.equal(p.detach(), before[k])


def test_batched_hvp_single_tensor_matches_unbatched():
    w = torch.randn(5, dtype=torch.float64)
    V = torch.randn(3, 5, dtype=torch.float64)
    loss = lambda w: (w.sin() * w).sum() ** 2  # noqa: E731
    H = torch.func.hessian(loss)(w)
    torch.testing.assert_close(fwdgrad.hvp(loss, w, V, batched=True), V @ H.T)
    torch.testing.assert_close(fwdgrad.hvp(loss, w, V[0]), H @ V[0])


@pytest.mark.parametrize("form", ["closure", "pure"])
@pytest.mark.parametrize("loss", ["ce_closed", "ce_generic", "mse_closed", "mse_generic"])
@pytest.mark.parametrize("batched", [False, True])
def test_ggnvp(form, loss, batched):
    model, x, y, t = _setup()
    params, fl, ref = _references(model, x, y, t)
    loss_fn = {
        "ce_closed": fwdgrad.cross_entropy_loss(y), "ce_generic": lambda z: F.cross_entropy(z, y),
        "mse_closed": fwdgrad.mse_loss(t), "mse_generic": lambda z: F.mse_loss(z, t),
    }[loss]
    G = ref["ggn_ce" if loss.startswith("ce") else "ggn_mse"]
    model_fn = (lambda: model(x)) if form == "closure" else (lambda p: functional_call(model, p, (x,)))
    if batched:
        V = torch.randn(3, fl.flat.numel(), dtype=torch.float64)
        out = fwdgrad.ggnvp(model_fn, loss_fn, params, fl.batch_tree(V), batched=True)
        torch.testing.assert_close(fl.vec(out, batched=True), V @ G.T)
    else:
        v = torch.randn(fl.flat.numel(), dtype=torch.float64)
        out = fwdgrad.ggnvp(model_fn, loss_fn, params, fl.tree(v))
        torch.testing.assert_close(fl.vec(out), G @ v)
    for k, p in model.named_parameters():
        assert p is params[k] and type(p) is nn.Parameter and p.grad is None


@pytest.mark.parametrize("batched", [False, True])
def test_fisher(batched):
    model, x, y, t = _setup()
    params, fl, ref = _references(model, x, y, t)
    L = fwdgrad.cross_entropy_loss(y)
    V = torch.randn(3, fl.flat.numel(), dtype=torch.float64)
    for kind, M in (("empirical", ref["ef_ce"]), ("true", ref["ggn_ce"])):
        if batched:
            out = fwdgrad.fisher_vp(lambda: model(x), L, params, fl.batch_tree(V), kind=kind, batched=True)
            torch.testing.assert_close(fl.vec(out, batched=True), V @ M.T)
        else:
            out = fwdgrad.fisher_vp(lambda: model(x), L, params, fl.tree(V[0]), kind=kind)
            torch.testing.assert_close(fl.vec(out), M @ V[0])


def test_empirical_fisher_mse_sum():
    model, x, y, t = _setup()
    params = dict(model.named_parameters())
    fl = Flat(params)
    out = lambda f: functional_call(model, fl.tree(f), (x,))  # noqa: E731
    g = torch.stack([torch.func.grad(lambda f, i=i: ((out(f)[i] - t[i]) ** 2).sum())(fl.flat) for i in range(N)])
    v = torch.randn(fl.flat.numel(), dtype=torch.float64)
    res = fwdgrad.fisher_vp(lambda: model(x), fwdgrad.mse_loss(t, reduction="sum"), params, fl.tree(v),
                            kind="empirical")
    torch.testing.assert_close(fl.vec(res), g.T @ (g @ v))


def test_closed_form_losses_match_torch():
    z = torch.randn(N, C, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    for red in ("mean", "sum"):
        torch.testing.assert_close(fwdgrad.cross_entropy_loss(y, red, 0.1)(z),
                                   F.cross_entropy(z, y, reduction=red, label_smoothing=0.1))
        torch.testing.assert_close(fwdgrad.mse_loss(z, red)(2 * z), F.mse_loss(2 * z, z, reduction=red))
        u = torch.randn(N, C, dtype=torch.float64)
        L = fwdgrad.cross_entropy_loss(y, red, 0.1)
        torch.testing.assert_close(L.hvp(z, u), torch.autograd.functional.hvp(L, z, u)[1])


def test_errors():
    model, x, y, t = _setup()
    params = dict(model.named_parameters())
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    with pytest.raises(TypeError, match="fisher_vp: loss_fn must be made by fwdgrad.cross_entropy_loss"):
        fwdgrad.fisher_vp(lambda: model(x), lambda z: z.sum(), params, v)
    with pytest.raises(ValueError, match="fisher_vp: kind must be 'true' or 'empirical'"):
        fwdgrad.fisher_vp(lambda: model(x), fwdgrad.cross_entropy_loss(y), params, v, kind="monte-carlo")
    with pytest.raises(ValueError, match=r"cross_entropy_loss: target has shape \(5,\)"):
        fwdgrad.ggnvp(lambda: model(x), fwdgrad.cross_entropy_loss(y[:5]), params, v)
    with pytest.raises(TypeError, match="cross_entropy_loss: target must hold class indices"):
        fwdgrad.cross_entropy_loss(t)
    with pytest.raises(ValueError, match="hvp: with batched=True, every direction needs the same leading batch"):
        bad = {k: torch.zeros(2 + (i == 1), *p.shape) for i, (k, p) in enumerate(params.items())}
        fwdgrad.hvp(lambda: F.cross_entropy(model(x), y), params, bad, batched=True)
    with pytest.raises(ValueError, match=r"ggnvp: v\['0.weight'\] has shape"):
        fwdgrad.ggnvp(lambda: model(x), fwdgrad.mse_loss(t), params, {**v, "0.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="ggnvp: model_fn must return one tensor"):
        fwdgrad.ggnvp(lambda: (model(x),), fwdgrad.mse_loss(t), params, v)


def test_ggnvp_dropout_and_batchnorm_state():
    """The model runs twice (jvp, vjp): both see the same dropout mask, and the
    running statistics and the RNG end as after one plain call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, C)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    params = dict(model.named_parameters())
    fl = Flat(params)
    v = torch.randn(fl.flat.numel(), dtype=torch.float64)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    torch.manual_seed(5)
    out = fwdgrad.ggnvp(lambda: model(x), fwdgrad.cross_entropy_loss(y), params, fl.tree(v))
    after_rng = torch.get_rng_state()
    after_buffers = {k: b.clone() for k, b in model.named_buffers()}
    # One plain call from the same start: the same RNG and buffers afterwards.
    for k, b in model.named_buffers():
        b.copy_(buffers[k])
    torch.manual_seed(5)
    model(x)
    assert torch.equal(torch.get_rng_state(), after_rng)
    for k, b in model.named_buffers():
        assert torch.equal(b, after_buffers[k]), k
    # Reference: J^T H J at the mask of seed 5, from the buffers before the call.
    for k, b in model.named_buffers():
        b.copy_(buffers[k])

    def logits(f):
        torch.manual_seed(5)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        return functional_call(model, fl.tree(f), (x,))

    J = torch.autograd.functional.jacobian(logits, fl.flat).reshape(N * C, -1)  # BN writes buffers: not jacrev
    H = torch.func.hessian(lambda z: F.cross_entropy(z, y))(logits(fl.flat)).reshape(N * C, N * C)
    torch.testing.assert_close(fl.vec(out), J.T @ H @ J @ v)
