"""Curvature products: batched ``hvp``, generalised Gauss-Newton and Fisher products.

All of them are built from three pieces that fwdgrad already has:

- the R-op ``J v`` of the model (forward mode: one ``jvp``, or a batched
  ``jvp`` for many directions, which shares one primal pass);
- the Hessian of the loss on the model's outputs, in closed form for the
  losses made by :func:`cross_entropy_loss` and :func:`mse_loss`, and by
  ``hvp`` on the outputs for any other loss;
- one ``vjp`` ``J^T u`` (``torch.autograd.grad``, batched with
  ``is_grads_batched`` when many directions come at once).

The jvp runs without autograd recording (so it costs about one forward in
memory), and the vjp is an ordinary forward plus backward; the peak is that of
one gradient computation.

A model given as a closure ``model_fn()`` that reads its parameters where they
live is turned into a pure function of the parameters by swapping the live
parameter objects with the given tensors for the duration of one call (the
swap that the closure form of ``hvp`` uses).
"""

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import fsdp
from .arguments import check_callable, check_outside_functorch, check_scalar_output, leading_batch_size
from .distributed import check_group, ddp_holding, watch_forwards, weighted_mean
from .errors import ArgumentTypeError, ArgumentValueError
from .jacobian import batched_jvp
from .reverse import _flatten_params, _is_closure, check_swappable, detach_keeping_tangents, grad, run_swapped
from .reverse import hvp as _hvp
from .state import State
from .transforms import jvp


# --------------------------------------------------------------------------
# Parameters and directions.


def _pure_args(params, leaves):
    """The arguments a pure function of ``params`` takes: ``f(*params)`` for a sequence, else ``f(params)``."""
    return list(leaves) if isinstance(params, (list, tuple)) else [params]


def _first_direction(params, V, name):
    """One direction of the batch ``V`` (for the structure checks) and the batch size ``k``."""
    leaves, spec = pytree.tree_flatten(V)
    k = None
    for path, t in pytree.tree_flatten_with_path(V)[0]:
        where = "v" + pytree.keystr(path)
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name}: {where} is a {type(t).__name__}, expected a tensor")
        k = leading_batch_size(name, where, t, k, "direction")
    if k is None:
        raise ArgumentValueError(f"{name}: v is empty")
    first = pytree.tree_unflatten([t[0] if k else t.new_empty(t.shape[1:]) for t in leaves], spec)
    return first, k


def _checked(params, v, batched, name):
    """``(p_leaves, v_leaves, rebuild, k)``: ``v`` checked against ``params`` (``k`` is None unbatched)."""
    if batched:
        first, k = _first_direction(params, v, name)
        _, p_leaves, _, rebuild = _flatten_params(params, first, name)
        fsdp.refuse(p_leaves, name)
        return p_leaves, _leaves_like(params, v), rebuild, k
    _, p_leaves, v_leaves, rebuild = _flatten_params(params, v, name)
    fsdp.refuse(p_leaves, name)
    return p_leaves, v_leaves, rebuild, None


def _leaves_like(params, v):
    """``v``'s leaves in the order of ``params``' leaves (``_flatten_params``'s order)."""
    if isinstance(params, dict):
        return [v[key] for key in params]
    if isinstance(params, torch.Tensor):
        return [v]
    return list(v)


class _Swapped:
    """A closure over live parameters, as a pure function of replacement tensors.

    ``self(*tensors)`` swaps each live parameter object with its replacement,
    runs ``body(params)`` and swaps back (also on an exception or an
    interrupt, with ``reverse``'s machinery for the closure form of ``hvp``),
    so that autograd and fwdgrad's duals see the replacements where the
    closure reads the parameters.  Identity, class and values of the
    parameters come back intact.
    """

    def __init__(self, params, body, name, held=frozenset()):
        check_swappable(["a parameter"] * len(params), params, name, held)
        self.params, self.body, self.name, self.held = params, body, name, held

    def __call__(self, *replacements):
        return run_swapped(self.params, replacements, lambda: self.body(self.params), self.name, self.held)


def _fresh(p):
    """A new tensor object with ``p``'s values (shared storage) that can be swapped in and out."""
    return p.detach().requires_grad_(p.requires_grad)


# --------------------------------------------------------------------------
# Batched hvp.


def _grads_of_closure(loss, name):
    def body(params):
        with torch.enable_grad():
            out = loss()
            check_scalar_output(out, name, "loss", any_shape=True)
            if not out.requires_grad:
                return tuple(torch.zeros_like(p) for p in params)
            return torch.autograd.grad(out.reshape(()), params, allow_unused=True, materialize_grads=True)

    return body


def _batched_hvp(loss, params, V, name):
    check_callable(loss, name, "loss")
    check_outside_functorch(name)
    p_leaves, v_leaves, rebuild, k = _checked(params, V, True, name)
    pure_args = _pure_args(params, p_leaves)
    if _is_closure(loss, pure_args):
        if any(p._use_count() > 1 for p in p_leaves) and ddp_holding(p_leaves) is not None:
            raise NotImplementedError(
                f"{name}: batched=True cannot take the closure form over a DistributedDataParallel "
                f"model's parameters (its reducer holds them); call the wrapped model.module in the "
                f"loss with process_group=model.process_group, or use batched=False"
            )
        fresh = [_fresh(p).requires_grad_() for p in p_leaves]
        grad_fn = _Swapped(p_leaves, _grads_of_closure(loss, name), name)
        _, out = batched_jvp(grad_fn, tuple(fresh), tuple(v_leaves), False, name)
        return rebuild(list(out))
    # Outside grad mode, grad() builds no graph of the backward pass (hvp is not differentiable).
    with torch.no_grad():
        if isinstance(params, (list, tuple)):
            argnums = tuple(range(len(p_leaves)))
            _, out = batched_jvp(grad(_scalar(loss, name), argnums), tuple(p_leaves), tuple(v_leaves), False, name)
            out = list(out)
        else:
            _, out = batched_jvp(grad(_scalar(loss, name)), (params,), (V,), False, name)
            out = _leaves_like(params, out)
    return rebuild([detach_keeping_tangents(t) for t in out])


def _scalar(loss, name):
    def scalar_loss(*args):
        out = loss(*args)
        check_scalar_output(out, name, "loss", any_shape=True)
        return out.reshape(())

    return scalar_loss


def hvp(loss, params, v, *, batched=False, process_group=None, weight=None):
    """Hessian-vector product ``H v`` of a scalar ``loss``, forward over reverse, in one pass.

    ``params`` is a tensor, a list/tuple of tensors or a dict of tensors, and
    ``v`` matches it exactly (structure, shapes and dtypes).  ``loss`` is either

    * pure: ``loss(params)`` for a tensor or dict, ``loss(*params)`` for a sequence, or
    * a closure ``loss()`` that reads the parameters where they live, e.g.
      ``hvp(lambda: F.cross_entropy(model(x), y), dict(model.named_parameters()), v)``.
      The parameters stay the same objects with the same values; ``.grad`` is
      not touched.

    Returns ``H v`` in the structure of ``params``.  It is not differentiable;
    compose :func:`fwdgrad.jvp` and :func:`fwdgrad.grad` for higher derivatives.

    ``batched=True``: every leaf of ``v`` has a leading dimension ``k`` (``k``
    directions); the result has it too.  The loss and its gradient are
    computed once and the ``k`` tangents go through one vectorised
    (``torch.vmap``) replay of the recorded tangent program.

    Data parallel: with ``process_group=`` each rank passes its own shard's
    loss and the result is the Hessian of the mean of the ranks' losses,
    weighted by each rank's ``weight=`` (default 1), from one all-reduce.  The
    closure form over a DistributedDataParallel model's parameters reduces
    over the model's group by itself (unbatched; see :doc:`distributed`).

    >>> import torch, fwdgrad
    >>> w = torch.tensor([1.0, 2.0])
    >>> fwdgrad.hvp(lambda w: (w ** 3).sum(), w, torch.tensor([1.0, 0.0]))
    tensor([6., 0.])
    >>> fwdgrad.hvp(lambda w: (w ** 3).sum(), w, torch.eye(2), batched=True)
    tensor([[ 6.,  0.],
            [ 0., 12.]])
    """
    if batched:
        group, weight = check_group(process_group, weight, "hvp")
        out = _batched_hvp(loss, params, v, "hvp")
        if group is None:
            return out
        leaves, spec = pytree.tree_flatten(out)
        return pytree.tree_unflatten(weighted_mean(leaves, group, weight, "hvp"), spec)
    return _hvp(loss, params, v, process_group=process_group, weight=weight)


# --------------------------------------------------------------------------
# Losses with a closed-form Hessian on the model's output.


class OutputLoss:
    """A loss of the model's output whose Hessian (and per-sample gradient) on that output is known.

    Calling it gives the loss value.  ``hvp(z, u)`` is ``H_L u`` at the output
    ``z``; ``u`` has ``z``'s shape, or a leading batch dimension more.  The loss
    is ``scale * sum_n l_n`` over the samples (the first dimension of ``z``);
    ``sample_grads(z)`` are the ``dl_n/dz_n``, which give the empirical Fisher.
    """

    name = "loss"

    def __init__(self, target, reduction):
        if reduction not in ("mean", "sum"):
            raise ArgumentValueError(f"{self.name}: reduction must be 'mean' or 'sum', got {reduction!r}")
        if not isinstance(target, torch.Tensor):
            raise ArgumentTypeError(f"{self.name}: target must be a tensor, got {type(target).__name__}")
        self.target, self.reduction = target, reduction

    def check_output(self, z):
        raise NotImplementedError

    def scale(self, z):
        """The factor ``c`` in ``loss = c * sum_n l_n``."""
        raise NotImplementedError

    def sample_start(self, z):
        """The first dimension of ``z`` within one sample (0: ``z`` is one sample)."""
        raise NotImplementedError


def _per_sample_dot(r, jv, start):
    """``r_n . (J v)_n`` per sample, kept broadcastable: sums over ``r``'s dimensions from ``start`` on.

    ``jv`` may have leading batch dimensions (directions) that ``r`` lacks.
    """
    dims = tuple(range(jv.dim() - r.dim() + start, jv.dim()))
    return (r * jv).sum(dims, keepdim=True) if dims else r * jv


class CrossEntropyLoss(OutputLoss):
    """``F.cross_entropy(z, target, reduction=..., label_smoothing=...)`` on logits ``z`` of shape ``(N, C)`` or ``(C,)``.

    Its Hessian on the logits is ``scale * (diag(p) - p p^T)`` per sample,
    with ``p = softmax(z)``; it does not depend on the target.
    """

    name = "cross_entropy_loss"

    def __init__(self, target, reduction="mean", label_smoothing=0.0):
        super().__init__(target, reduction)
        if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
            raise ArgumentTypeError(
                f"{self.name}: target must hold class indices (an integer tensor), got dtype {target.dtype}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ArgumentValueError(f"{self.name}: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def check_output(self, z):
        if z.dim() not in (1, 2):
            raise ArgumentValueError(
                f"{self.name}: the model's output must be logits of shape (N, C) or (C,), got shape "
                f"{tuple(z.shape)}; reshape it in model_fn (e.g. logits.flatten(0, -2) with "
                f"target.flatten())"
            )
        if self.target.shape != z.shape[:-1]:
            raise ArgumentValueError(
                f"{self.name}: target has shape {tuple(self.target.shape)} but the logits have shape "
                f"{tuple(z.shape)}; it needs shape {tuple(z.shape[:-1])}"
            )

    def __call__(self, z):
        self.check_output(z)
        return F.cross_entropy(
            z, self.target.long(), reduction=self.reduction, label_smoothing=self.label_smoothing
        )

    def scale(self, z):
        return 1.0 / z.shape[0] if self.reduction == "mean" and z.dim() == 2 else 1.0

    def sample_start(self, z):
        return 1 if z.dim() == 2 else 0

    def hvp(self, z, u):
        self.check_output(z)
        p = torch.softmax(z.detach(), -1)
        return self.scale(z) * p * (u - (p * u).sum(-1, keepdim=True))

    def sample_grads(self, z):
        self.check_output(z)
        p = torch.softmax(z.detach(), -1)
        classes = z.shape[-1]
        q = F.one_hot(self.target.long(), classes).to(p.dtype)
        if self.label_smoothing:
            q = (1 - self.label_smoothing) * q + self.label_smoothing / classes
        return p - q


class MSELoss(OutputLoss):
    """``F.mse_loss(z, target, reduction=...)``: its Hessian on ``z`` is ``2 / numel`` (mean) or ``2`` (sum) times the identity.

    For the empirical Fisher the samples are ``z``'s first dimension, and
    ``l_n`` is the sum (``sum``) or mean (``mean``) of squared errors of sample ``n``.
    """

    name = "mse_loss"

    def check_output(self, z):
        if self.target.shape != z.shape:
            raise ArgumentValueError(
                f"{self.name}: target has shape {tuple(self.target.shape)} but the model's output has "
                f"shape {tuple(z.shape)}; they must match"
            )

    def __call__(self, z):
        self.check_output(z)
        return F.mse_loss(z, self.target, reduction=self.reduction)

    def _per_sample_factor(self, z):
        return 1.0 / max(z[0].numel(), 1) if self.reduction == "mean" and z.dim() >= 1 else 1.0

    def scale(self, z):
        return 1.0 / z.shape[0] if self.reduction == "mean" and z.dim() >= 1 else 1.0

    def sample_start(self, z):
        return 1 if z.dim() >= 1 else 0

    def hvp(self, z, u):
        self.check_output(z)
        return (2.0 / z.numel() if self.reduction == "mean" else 2.0) * u

    def sample_grads(self, z):
        self.check_output(z)
        return 2.0 * self._per_sample_factor(z) * (z.detach() - self.target)


def cross_entropy_loss(target, reduction="mean", label_smoothing=0.0):
    """A cross-entropy loss of the logits with a closed-form Hessian, for :func:`ggnvp` and :func:`fisher_vp`.

    ``loss(z)`` equals ``F.cross_entropy(z, target, reduction=reduction,
    label_smoothing=label_smoothing)``; logits have shape ``(N, C)`` or ``(C,)``.

    >>> import torch, fwdgrad
    >>> loss = fwdgrad.cross_entropy_loss(torch.tensor([0]))
    >>> z = torch.zeros(1, 2)
    >>> float(loss(z)), loss.hvp(z, torch.tensor([[1.0, 0.0]]))   # (diag(p) - p p^T) u
    (0.6931471824645996, tensor([[ 0.2500, -0.2500]]))
    """
    return CrossEntropyLoss(target, reduction, label_smoothing)


def mse_loss(target, reduction="mean"):
    """A mean-squared-error loss with a closed-form Hessian, for :func:`ggnvp` and :func:`fisher_vp`.

    ``loss(z)`` equals ``F.mse_loss(z, target, reduction=reduction)``.

    >>> import torch, fwdgrad
    >>> loss = fwdgrad.mse_loss(torch.zeros(2))
    >>> float(loss(torch.tensor([1.0, 3.0]))), loss.hvp(torch.zeros(2), torch.ones(2))
    (5.0, tensor([1., 1.]))
    """
    return MSELoss(target, reduction)


# --------------------------------------------------------------------------
# GGN and Fisher products: jvp, the loss's curvature on the output, vjp.


class _Model:
    """``model_fn`` as a function of the flat parameter leaves, pure or closure form alike.

    ``within(leaves, body)`` runs ``body(xs)`` where the model sees ``leaves``
    as its parameters; ``xs`` are the tensors to differentiate with respect to
    (the leaves themselves in the pure form, the live parameter objects, then
    holding the leaves, in the closure form).  ``output(xs)`` calls the model.
    """

    def __init__(self, model_fn, params, p_leaves, rebuild, name):
        check_callable(model_fn, name, "model_fn")
        self.model_fn, self.params, self.p_leaves, self.rebuild, self.name = (
            model_fn, params, p_leaves, rebuild, name
        )
        self.closure = _is_closure(model_fn, _pure_args(params, p_leaves))
        # A DDP model's parameters: its reducer's references are expected (see reverse.hvp).
        self.ddp = ddp_holding(p_leaves) if self.closure and any(p._use_count() > 1 for p in p_leaves) else None
        self.held = frozenset(id(p) for p in p_leaves) if self.ddp is not None else frozenset()

    def output(self, xs):
        if self.closure:
            out = self.model_fn()
        elif isinstance(self.params, (list, tuple)):
            out = self.model_fn(*xs)
        else:
            out = self.model_fn(self.rebuild(list(xs)))
        if not isinstance(out, torch.Tensor):
            raise ArgumentTypeError(
                f"{self.name}: model_fn must return one tensor (the output the loss reads), got "
                f"{type(out).__name__}"
            )
        return out

    def within(self, leaves, body):
        if self.closure:
            return _Swapped(self.p_leaves, body, self.name, self.held)(*leaves)
        return body(list(leaves))

    def primals(self):
        """Tensors to call the model at: new objects in the closure form (they are swapped in)."""
        return [_fresh(p) for p in self.p_leaves] if self.closure else list(self.p_leaves)

    def jvp(self, v_leaves, batched):
        """``(z, J v)``, without autograd recording; ``J v`` has a leading batch dimension if ``batched``."""
        def f(*leaves):
            return self.within(leaves, self.output)

        with torch.no_grad():
            if batched:
                z, jv = batched_jvp(f, tuple(self.primals()), tuple(v_leaves), False, self.name)
            else:
                z, jv = jvp(f, tuple(self.primals()), tuple(v_leaves))
        return z, jv

    def vjp(self, u, batched):
        """``J^T u`` as flat leaves (a leading batch dimension if ``batched``)."""
        leaves = [_fresh(p).requires_grad_() for p in self.p_leaves]

        def body(xs):
            with torch.enable_grad():
                z = self.output(xs)
                if not z.requires_grad:
                    shape = (u.shape[0],) if batched else ()
                    return [x.new_zeros(shape + x.shape) for x in xs]
                if batched:
                    try:
                        return list(torch.autograd.grad(
                            z, xs, u, is_grads_batched=True, allow_unused=True, materialize_grads=True
                        ))
                    except (RuntimeError, NotImplementedError):
                        pass  # an op without a vmap rule in its backward: one column at a time
                    cols = [
                        torch.autograd.grad(z, xs, u[j], retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
                        for j in range(u.shape[0])
                    ]
                    return [torch.stack(c) for c in zip(*cols)]
                return list(torch.autograd.grad(z, xs, u, allow_unused=True, materialize_grads=True))

        return self.within(leaves, body)


def _output_hvp(loss_fn, z, u, batched, name):
    """``H_L u`` at the output ``z``: closed form for an ``OutputLoss``, else ``hvp`` of ``loss_fn`` on ``z``."""
    if isinstance(loss_fn, OutputLoss):
        return loss_fn.hvp(z, u)
    if batched:
        return _batched_hvp(_scalar(loss_fn, name), z, u, name)
    return _hvp(_scalar(loss_fn, name), z, u)


def _curvature_product(model_fn, loss_fn, params, v, batched, name, output_curvature, process_group, weight):
    check_callable(loss_fn, name, "loss_fn")
    check_outside_functorch(name)
    p_leaves, v_leaves, rebuild, k = _checked(params, v, batched, name)
    model = _Model(model_fn, params, p_leaves, rebuild, name)
    if process_group is None and model.ddp is not None:
        process_group = model.ddp.process_group
    group, weight = check_group(process_group, weight, name)
    if batched and k == 0:
        return rebuild([p.new_zeros((0, *p.shape)) for p in p_leaves])
    # The model runs twice (jvp, then vjp).  The second run starts from the state
    # the first one started from (same random draws, e.g. dropout masks, and the
    # same buffers) and leaves the state as one plain call leaves it.
    state = State(model_fn)
    # DDP forwards run as under no_sync (DDP's own later steps stay right); the
    # product is then reduced over the group, or refused as shard-local.
    with state.undone_on_error(), watch_forwards() as ddps:
        z, jv = model.jvp(v_leaves, batched)
        u = output_curvature(z, jv)
        if u.shape != jv.shape:
            raise RuntimeError(
                f"{name}: the loss's curvature on the output has shape {tuple(u.shape)}, expected {tuple(jv.shape)}"
            )
        with state.again():
            out = model.vjp(u.detach(), batched)
    if ddps is not None:
        ddps.check_reduced(group, name)
    if group is not None:
        out = weighted_mean(out, group, weight, name)
    return rebuild(out)


def ggnvp(model_fn, loss_fn, params, v, *, batched=False, process_group=None, weight=None):
    """The generalised Gauss-Newton product ``G v = J^T H_L J v``.

    ``J`` is the Jacobian of the model's output ``z`` with respect to
    ``params`` and ``H_L`` the Hessian of ``loss_fn`` at ``z`` (Schraudolph
    2002; Martens 2010).  ``model_fn`` is pure (``model_fn(params)``, or
    ``model_fn(*params)`` for a sequence) or a closure ``model_fn()`` over a
    live model; ``loss_fn(z)`` returns a scalar.  For the losses made by
    :func:`cross_entropy_loss` and :func:`mse_loss` ``H_L`` is applied in
    closed form; any other ``loss_fn`` gets ``hvp`` on the output.

    Cost: one jvp of the model (forward mode, no autograd recording) and one
    forward plus backward for ``J^T``.  ``batched=True``: ``v``'s leaves have
    a leading dimension ``k``; one batched jvp and one batched backward.

    Data parallel: with ``process_group=`` each rank passes its own shard and
    the result is the GGN of the ranks' losses' mean, weighted by ``weight=``
    (as :func:`hvp`), from one all-reduce; a closure over a
    DistributedDataParallel model's parameters reduces over its group.

    >>> import torch, fwdgrad
    >>> W = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    >>> x = torch.tensor([1.0, 1.0])
    >>> loss = fwdgrad.mse_loss(torch.zeros(2), reduction="sum")
    >>> fwdgrad.ggnvp(lambda W: W @ x, loss, W, torch.ones(2, 2))   # 2 x x^T-weighted
    tensor([[4., 4.],
            [4., 4.]])
    """
    name = "ggnvp"

    def curvature(z, jv):
        return _output_hvp(loss_fn, z, jv, batched, name)

    return _curvature_product(model_fn, loss_fn, params, v, batched, name, curvature, process_group, weight)


def fisher_vp(model_fn, loss_fn, params, v, *, kind="true", batched=False, process_group=None, weight=None):
    """The Fisher information product ``F v``, from the same pieces as :func:`ggnvp`.

    ``loss_fn`` must be made by :func:`cross_entropy_loss` or :func:`mse_loss`
    (its samples are the first dimension of the output; the loss is
    ``c * sum_n l_n`` with ``c = 1/N`` for ``reduction="mean"``):

    * ``kind="true"``: ``c * sum_n E_y[g_n g_n^T]`` with ``y`` drawn from the
      model's predictive distribution ``p(y | z_n) ~ exp(-l_n)``.  For these
      two losses it equals the GGN exactly, so it is computed as such
      (no sampling).
    * ``kind="empirical"``: ``c * sum_n g_n g_n^T`` with ``g_n`` the gradient
      of ``l_n`` at the given targets: ``J^T (r (r . J v))`` with ``r_n = dl_n/dz_n``.

    ``batched=True``, ``process_group=`` and ``weight=`` as in :func:`ggnvp`.

    >>> import torch, fwdgrad
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])            # two samples
    >>> loss = fwdgrad.mse_loss(torch.zeros(2), reduction="sum")
    >>> w = torch.tensor([1.0, 2.0])
    >>> fwdgrad.fisher_vp(lambda w: x @ w, loss, w, torch.ones(2), kind="empirical")
    tensor([ 4., 16.])
    """
    name = "fisher_vp"
    if kind not in ("true", "empirical"):
        raise ArgumentValueError(f"{name}: kind must be 'true' or 'empirical', got {kind!r}")
    if not isinstance(loss_fn, OutputLoss):
        raise ArgumentTypeError(
            f"{name}: loss_fn must be made by fwdgrad.cross_entropy_loss or fwdgrad.mse_loss (the Fisher "
            f"needs the loss's likelihood and per-sample gradients), got {type(loss_fn).__name__}; "
            f"use ggnvp for the Gauss-Newton product of any loss"
        )

    def curvature(z, jv):
        if kind == "true":
            return loss_fn.hvp(z, jv)
        r = loss_fn.sample_grads(z)
        return loss_fn.scale(z) * r * _per_sample_dot(r, jv, loss_fn.sample_start(z))

    return _curvature_product(model_fn, loss_fn, params, v, batched, name, curvature, process_group, weight)


__all__ = [
    "hvp", "ggnvp", "fisher_vp", "cross_entropy_loss", "mse_loss",
    "OutputLoss", "CrossEntropyLoss", "MSELoss",
]
