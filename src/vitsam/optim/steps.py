"""One optimisation step: plain, or SAM's two passes, with accumulation, m-sharpness, AMP and DDP.

Adversarial training (``StepConfig.attack``, ``vitsam.optim.adversarial``): the adversarial
batch is made first, at the current weights w, and the step (plain, or SAM's two passes: SAM+AT)
then runs on it in place of the clean batch; its ``loss`` and ``correct`` are the adversarial
batch's, also returned as ``adv_loss`` and ``adv_correct``.

A cheaper SAM variant (``vitsam.optim.variants``) plans each step: its SAM steps run as SAM's,
the others as one forward-backward whose gradient the variant may change before the base step.

The training engine calls :func:`train_step` once per batch and steps the LR scheduler itself.
The criterion must return the *mean* loss over its batch (``reduction="mean"``, as
``nn.CrossEntropyLoss`` and soft-target cross-entropy do): micro-batch and chunk losses are
re-weighted by their share of the batch so every gradient equals the full-batch mean gradient.

Non-finite steps, in every precision: a step whose loss (clean or perturbed) or gradient (clean
or final) holds an inf or NaN is skipped as if its batch had not been drawn: the weights (SAM's
perturbation undone by copying the saved values back), the optimiser state, BatchNorm running
statistics and the torch RNG are left exactly as they were before the step. It is flagged
``skipped`` and, unless it is an fp16 gradient overflow the GradScaler handles by lowering its
scale, ``nonfinite``: the engine counts those and stops a run after too many in a row
(``vitsam.train.badsteps``).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from .adversarial import Attack
from .precision import autocast as _autocast
from .sam import SAM, foreach_cosine, global_norm
from .variants import LookSAM, ScheduledSAM

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class StepConfig:
    """How :func:`train_step` runs a step.

    clip_norm: global L2 clipping of the final gradient (SAM: the second-pass gradient); None = off.
    micro_batch: split the batch into micro-batches of this many samples and accumulate
        gradients (both SAM passes); None = one pass over the whole batch.
    m: m-sharpness on one device: chunks of ``m`` samples, each perturbed with its own gradient;
        the second-pass gradients are averaged over chunks. None = whole batch. SAM only.
    autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` autocast for the forward passes.
    reuse_randomness: the second SAM pass replays the first pass's RNG state, so dropout and
        stochastic depth draw the same masks. Default True: the sharpness estimate
        L(w + eps) - L(w) then compares the *same* sub-network at two weights instead of
        mixing in the loss change between two random sub-networks.
    sync_perturbation: under DistributedDataParallel, False = each worker perturbs with its own
        gradient (the paper's per-device m-sharpness; first backward runs under ``no_sync()``),
        True = perturb with the all-reduced gradient. No effect without DDP.
    attack: adversarial training: each batch is replaced by ``attack.perturb``'s adversarial
        batch (made on the same micro-batches, under the same autocast) before the step.
    """

    clip_norm: float | None = None
    micro_batch: int | None = None
    m: int | None = None
    autocast_dtype: torch.dtype | None = None
    reuse_randomness: bool = True
    sync_perturbation: bool = False
    attack: Attack | None = None

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None (no clipping), got {self.clip_norm}")
        for name in ("micro_batch", "m"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive number of samples or None, got {v!r}")
        if self.attack is not None and not isinstance(self.attack, Attack):
            raise ValueError(f"attack must be a vitsam.optim.adversarial.Attack or None, "
                             f"got {type(self.attack).__name__}")
        if self.autocast_dtype is not None and self.autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, "
                             f"got {self.autocast_dtype}")


def train_step(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None, cfg: StepConfig = StepConfig(),
               key: int = 0) -> dict[str, float]:
    """One optimisation step; SAM (two passes) if ``optimizer`` is a :class:`SAM`, else a plain step.

    x: (B, C, H, W) float inputs. y: (B,) int64 labels or (B, num_classes) float soft targets.
    Returns floats: ``loss`` (clean mean over the batch), ``correct`` (count of argmax(logits) ==
    label or argmax(target); a tie for the top score counts 1 / number tied if the label is
    among them), ``n`` (B), ``grad_norm`` (clean gradient's global L2 norm before
    clipping), ``skipped`` (1.0 if no optimiser step was taken), ``nonfinite`` (1.0 if that was
    because of a non-finite loss or gradient the GradScaler cannot handle), and for SAM also
    ``perturbed_loss``, ``sharpness`` (perturbed_loss - loss), ``eps_norm`` and ``grad_cosine``
    (cosine between the clean and the perturbed gradient), and ``perturbed`` (1.0 on a SAM step
    taken, 0.0 on a skipped one and on a cheaper variant's step without perturbation, where the
    four SAM numbers are NaN: ``vitsam.optim.variants``). With ``cfg.attack`` also
    ``adv_loss`` and ``adv_correct``, the loss and count of the adversarial batch trained on;
    ``key`` picks the attack's random start (the engine passes the step, so a resumed run
    draws the same starts).

    A skipped step leaves the weights, the optimiser state, BatchNorm running statistics and the
    torch RNG exactly as they were (the module docstring says when a step is skipped). With an
    enabled GradScaler a gradient overflow in either pass also skips the step and
    ``scaler.update()`` still runs (and lowers the scale); it counts as ``nonfinite`` only when
    the scale is already at most 1, where lowering it cannot help. A non-finite loss is always
    ``nonfinite``. Under DistributedDataParallel the workers agree on the verdict.
    """
    _check_batch(x, y)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(cfg, StepConfig):
        raise ValueError(f"cfg must be a StepConfig, got {type(cfg).__name__}")
    optimizer.zero_grad(set_to_none=True)
    before = _Untouched.take(model, x.device)
    if cfg.attack is not None:  # at the current weights w, before any SAM perturbation
        x = cfg.attack.perturb(model, criterion, x, y, key=key, micro_batch=cfg.micro_batch,
                               autocast_dtype=cfg.autocast_dtype, scaler=scaler)
    if isinstance(optimizer, SAM) and optimizer.plan_step():
        stats = _sam_step(model, criterion, x, y, optimizer, scaler, cfg)
    elif isinstance(optimizer, ScheduledSAM):  # a cheaper SAM's step without perturbation
        stats = _reuse_step(model, criterion, x, y, optimizer, scaler, cfg)
    else:
        stats = _plain_step(model, criterion, x, y, optimizer, scaler, cfg)
    if stats["skipped"]:
        before.restore()
    if cfg.attack is not None:
        stats["adv_loss"], stats["adv_correct"] = stats["loss"], stats["correct"]
    stats = {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in stats.items()}
    # One host sync for all numbers.
    values = torch.stack([v.detach().float().to(x.device) for v in stats.values()]).cpu().tolist()
    return dict(zip(stats.keys(), values))


# -- the two step kinds ---------------------------------------------------------------------
def _plain_step(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                cfg: StepConfig) -> dict[str, torch.Tensor]:
    use_scaler = scaler is not None and scaler.is_enabled()
    n = x.shape[0]
    loss_sum, correct = _forward_backward(model, criterion, x, y, n, cfg, scaler, sync=True)
    if use_scaler:
        scaler.unscale_(optimizer)
    params = _params_with_grad(optimizer)
    grad_norm = _final_norm(params, cfg.clip_norm)
    bad_loss, bad_grad = _nonfinite(model, [loss_sum], [grad_norm])
    skipped = bad_loss or bad_grad
    nonfinite = bad_loss or (bad_grad and not _scaler_can_help(scaler))
    if not skipped:
        optimizer.step()
    if use_scaler:
        scaler.update()
    return {"loss": loss_sum / n, "correct": correct, "n": torch.tensor(float(n)),
            "grad_norm": grad_norm, "skipped": skipped, "nonfinite": nonfinite}


def _sam_step(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor, opt: SAM,
              scaler: torch.amp.GradScaler | None, cfg: StepConfig) -> dict[str, torch.Tensor]:
    use_scaler = scaler is not None and scaler.is_enabled()
    n, dev = x.shape[0], x.device
    chunks = _spans(n, cfg.m or n)
    multi = len(chunks) > 1
    params = [p for g in opt.param_groups for p in g["params"]]
    clean_sum = torch.zeros((), device=dev)
    pert_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev)
    eps_sum = torch.zeros((), device=dev)
    clean_acc: list[torch.Tensor | None] = [None] * len(params)  # m-chunks: batch-mean clean gradient
    seen, overflow_first = 0, False
    track_cosine = opt.track_cosine
    opt.track_cosine = track_cosine and not multi  # chunks: the cosine uses clean_acc instead
    try:
        for ci, (a, b) in enumerate(chunks):
            xc, yc, nc = x[a:b], y[a:b], b - a
            rng = _rng_snapshot(dev) if cfg.reuse_randomness else None
            # m-chunks: park the accumulated second-pass gradient while this chunk's clean one forms.
            stash = [p.grad for p in params] if multi else []
            for p in params if multi else ():
                p.grad = None
            ls, cor = _forward_backward(model, criterion, xc, yc, nc, cfg, scaler,
                                        sync=cfg.sync_perturbation)
            clean_sum += ls
            correct += cor
            seen += nc
            if use_scaler:
                _unscale_(params, scaler)  # the perturbation needs the true gradient
            if multi:
                _accumulate(clean_acc, params, nc / n)
            opt.first_step()
            if use_scaler and not bool(torch.isfinite(opt.last_grad_norm)):
                opt.cancel()
                overflow_first = True
                break
            eps_sum += opt.last_eps_norm.to(dev) * (nc / n)
            if multi:
                for p, s in zip(params, stash):
                    p.grad = s
            else:
                opt.zero_grad(set_to_none=True)
            with frozen_running_stats(model), _replayed_rng(rng, dev):
                ls2, _ = _forward_backward(model, criterion, xc, yc, n, cfg, scaler,
                                           sync=ci == len(chunks) - 1)
            pert_sum += ls2
            if multi:
                opt.restore()
    finally:
        opt.track_cosine = track_cosine

    nan = torch.full((), float("nan"), device=dev)
    grad_norm = opt.last_grad_norm if not multi else global_norm([g for g in clean_acc if g is not None])
    cosine = nan
    if overflow_first:
        # The first pass overflowed: make the scaler see it too, so update() backs off.
        for p in _params_with_grad(opt):
            p.grad.fill_(float("nan"))
        bad_loss, bad_grad = _nonfinite(model, [clean_sum], [])[0], True
        scaler.unscale_(opt)
        perturbed = nan
    else:
        if use_scaler:
            scaler.unscale_(opt)
        final = _params_with_grad(opt)
        if isinstance(opt, LookSAM):  # before clipping: g_v from the gradients as computed
            _observe(model, opt, cfg, clean_acc if multi else None, params)
        final_norm = _final_norm(final, cfg.clip_norm)
        bad_loss, bad_grad = _nonfinite(model, [clean_sum, pert_sum], [grad_norm, final_norm])
        if bad_loss or bad_grad:
            opt.cancel()  # back to the weights before the perturbation, exactly
        elif multi:
            pairs = [(c, p.grad) for c, p in zip(clean_acc, params) if c is not None and p.grad is not None]
            if track_cosine and pairs:
                cosine = foreach_cosine([c for c, _ in pairs], [g for _, g in pairs])
            opt.base_step()
        else:
            opt.second_step()
            cosine = opt.last_grad_cosine
        perturbed = pert_sum / n
    skipped = bad_loss or bad_grad
    nonfinite = bad_loss or (bad_grad and not _scaler_can_help(scaler))
    if use_scaler:
        scaler.update()
    loss = clean_sum / seen
    return {"loss": loss, "correct": correct, "n": torch.tensor(float(n)), "grad_norm": grad_norm,
            "perturbed_loss": perturbed, "sharpness": perturbed - loss, "eps_norm": nan if overflow_first else eps_sum,
            "grad_cosine": nan if skipped else cosine, "perturbed": torch.tensor(float(not skipped)),
            "skipped": skipped, "nonfinite": nonfinite}


def _reuse_step(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
                opt: ScheduledSAM, scaler: torch.amp.GradScaler | None,
                cfg: StepConfig) -> dict[str, torch.Tensor]:
    """A cheaper SAM's step without perturbation: one pass, ``opt.reuse_gradient`` (LookSAM
    adds its stored direction), clipping of the result, the base optimiser's step. SAM's
    diagnostics are NaN (the engine averages them over the steps that have them)."""
    use_scaler = scaler is not None and scaler.is_enabled()
    n, dev = x.shape[0], x.device
    loss_sum, correct = _forward_backward(model, criterion, x, y, n, cfg, scaler, sync=True)
    if use_scaler:
        scaler.unscale_(opt)
    params = _params_with_grad(opt)
    grad_norm = global_norm([p.grad for p in params])
    opt.reuse_gradient(params, grad_norm)
    final_norm = _final_norm(params, cfg.clip_norm)
    bad_loss, bad_grad = _nonfinite(model, [loss_sum], [grad_norm, final_norm])
    skipped = bad_loss or bad_grad
    nonfinite = bad_loss or (bad_grad and not _scaler_can_help(scaler))
    if not skipped:
        opt.base_step()
    if use_scaler:
        scaler.update()
    nan = torch.full((), float("nan"), device=dev)
    return {"loss": loss_sum / n, "correct": correct, "n": torch.tensor(float(n)), "grad_norm": grad_norm,
            "perturbed_loss": nan, "sharpness": nan, "eps_norm": nan, "grad_cosine": nan,
            "perturbed": torch.zeros(()), "skipped": skipped, "nonfinite": nonfinite}


def _observe(model: nn.Module, opt: LookSAM, cfg: StepConfig, clean_acc: list[torch.Tensor | None] | None,
             params: list[torch.Tensor]) -> None:
    """Give LookSAM this step's clean and perturbed gradients (``clean_acc``: the m-chunks'
    batch-mean clean gradient, aligned with ``params``; None: the copy ``first_step`` kept).
    Under DDP with per-process perturbations each process's g_v differs: they are averaged."""
    if clean_acc is not None:
        triples = [(c, p.grad, p) for c, p in zip(clean_acc, params) if c is not None and p.grad is not None]
    else:
        triples = [(c, p.grad, p) for p, c in opt._clean if p.grad is not None]
    if not triples:
        return
    gv = opt.observe([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    if isinstance(model, DistributedDataParallel) and not cfg.sync_perturbation and \
            dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for t in gv:
            dist.all_reduce(t)
            t.div_(world)


# -- passes ---------------------------------------------------------------------------------
def _forward_backward(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor, denom: int,
                      cfg: StepConfig, scaler: torch.amp.GradScaler | None,
                      sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward over micro-batches of (x, y), gradients adding (n_mb / denom) * mean grad.

    ``sync``: under DDP, all-reduce on the last micro-batch (all others run under ``no_sync``).
    Returns (sum over samples of the loss, correct count), both detached 0-d tensors.
    """
    spans = _spans(x.shape[0], cfg.micro_batch or x.shape[0])
    ddp = isinstance(model, DistributedDataParallel)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for k, (a, b) in enumerate(spans):
        allreduce = sync and k == len(spans) - 1
        ctx: ContextManager = model.no_sync() if ddp and not allreduce else nullcontext()
        with ctx:
            with _autocast(x.device, cfg.autocast_dtype):
                logits = model(x[a:b])
                loss = criterion(logits, y[a:b])
            if loss.ndim != 0:
                raise ValueError(f"criterion must return a scalar mean loss (reduction='mean'), "
                                 f"got shape {tuple(loss.shape)}")
            weighted = loss * ((b - a) / denom)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        target = y[a:b] if y.ndim == 1 else y[a:b].argmax(-1)
        loss_sum += loss.detach().float() * (b - a)
        correct += _top1_hits(logits.detach(), target)
    return loss_sum, correct


def _top1_hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the chance that a random pick among the top-scoring classes is the
    target: argmax accuracy, with ties (common in bf16 logits) counted fairly, not by index
    order; a NaN row counts 0 (``vitsam.eval.metrics.topk_hits`` for k = 1)."""
    tied = logits == logits.amax(-1, keepdim=True)
    return (tied.gather(-1, target[:, None]).squeeze(-1).float() / tied.sum(-1).clamp(min=1)).sum()


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes inside leave BatchNorm running statistics exactly as they were.

    BatchNorm layers in training mode still normalise with batch statistics; only the update of
    running_mean / running_var / num_batches_tracked is suppressed (``track_running_stats`` is
    switched off, so nothing is copied). Other modules holding such buffers are snapshotted and
    restored.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    others = [(buf, buf.clone()) for m in model.modules() if not isinstance(m, _BatchNorm)
              for name, buf in m.named_buffers(recurse=False) if name in _STAT_BUFFERS and buf is not None]
    for m in bns:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in bns:
            m.track_running_stats = True
        with torch.no_grad():
            for buf, saved in others:
                buf.copy_(saved)


# -- non-finite steps -----------------------------------------------------------------------
class _Untouched:
    """What a step changes besides weights and optimiser state, saved so a skipped step can
    put it back: the torch RNG (dropout, drop-path draws) and running-statistics buffers."""

    def __init__(self, device: torch.device, rng: tuple,
                 buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.device, self.rng, self.buffers = device, rng, buffers

    @classmethod
    def take(cls, model: nn.Module, device: torch.device) -> "_Untouched":
        bufs = [(b, b.clone()) for m in model.modules() for name, b in m.named_buffers(recurse=False)
                if name in _STAT_BUFFERS and b is not None]
        return cls(device, _rng_snapshot(device), bufs)

    @torch.no_grad()
    def restore(self) -> None:
        for buf, saved in self.buffers:
            buf.copy_(saved)
        cpu, dev = self.rng
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.get_device_module(self.device.type).set_rng_state(dev[1], dev[0])


def _nonfinite(model: nn.Module, losses: list[torch.Tensor],
               norms: list[torch.Tensor]) -> tuple[bool, bool]:
    """(some loss is not finite, some gradient norm is not finite): one host sync; under DDP the
    flags are all-reduced so every worker skips the same steps."""
    dev = losses[0].device
    flags = torch.stack([~torch.isfinite(torch.stack([v.to(dev).float() for v in vs])).all()
                         if vs else torch.zeros((), dtype=torch.bool, device=dev)
                         for vs in (losses, norms)]).float()
    if isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, bad_grad = flags.tolist()
    return bool(bad_loss), bool(bad_grad)


def _scaler_can_help(scaler: torch.amp.GradScaler | None) -> bool:
    """A gradient overflow is the GradScaler's to handle while its scale is above 1 (update()
    lowers it); at 1 or below the gradients overflow unscaled."""
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() > 1.0


# -- small helpers --------------------------------------------------------------------------
def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a float tensor of shape (B, C, H, W); normalise images before train_step")
    if not isinstance(y, torch.Tensor) or y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (B,) labels or (B, num_classes) soft targets with B={x.shape[0]}, "
                         f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.ndim == 1 and y.is_floating_point():
        raise ValueError("y of shape (B,) must hold integer class labels (int64), got a float tensor")
    if x.shape[0] == 0:
        raise ValueError("train_step got an empty batch")


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _params_with_grad(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]


def _final_norm(params: list[torch.Tensor], clip_norm: float | None) -> torch.Tensor:
    """Global norm of the gradients (before clipping); clips in place when ``clip_norm`` is set."""
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=None)
    return global_norm([p.grad for p in params])


def _unscale_(params: list[torch.Tensor], scaler: torch.amp.GradScaler) -> None:
    """Divide the gradients by the loss scale without recording anything in the scaler."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        scale = scaler.scale(torch.ones((), device=grads[0].device))  # the scale as a tensor, no sync
        torch._foreach_mul_(grads, scale.reciprocal())


def _accumulate(acc: list[torch.Tensor | None], params: list[torch.Tensor], weight: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if acc[i] is None:
                acc[i] = p.grad.detach() * weight
            else:
                acc[i].add_(p.grad, alpha=weight)


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, tuple[int, torch.Tensor] | None]:
    cpu = torch.get_rng_state()
    if device.type == "cpu":
        return cpu, None
    mod = torch.get_device_module(device.type)
    idx = device.index if device.index is not None else mod.current_device()
    return cpu, (idx, mod.get_rng_state(idx))


@contextmanager
def _replayed_rng(snapshot: tuple | None, device: torch.device) -> Iterator[None]:
    """Run the block from ``snapshot``'s RNG state, then resume the RNG where it was on entry."""
    if snapshot is None:
        yield
        return
    cpu, dev = snapshot
    devices = [dev[0]] if dev is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if dev is not None else "cuda"):
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.get_device_module(device.type).set_rng_state(dev[1], dev[0])
        yield
