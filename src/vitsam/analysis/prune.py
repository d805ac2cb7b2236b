"""Structured pruning of MLP hidden units that a model leaves idle.

SAM-trained ViTs and Mixers have many MLP units that never fire; removing them shrinks ``fc1``
and ``fc2`` physically (smaller ``nn.Linear`` layers, not masks), so parameters, FLOPs and time
drop.

Which units are "dead" (removed without changing the function)
    A unit is dead when ``|activation output| <= tol`` at every image and position of the
    calibration set. This, not "output <= 0", is the criterion because GELU is negative for
    negative inputs: a unit that never *activates* in the paper's sense (output > 0) can still
    add up to -0.17 x its ``fc2`` column to every token, and removing it would move the logits.
    Removing dead units changes each MLP output coordinate by at most ``tol`` x (sum of the
    removed units' ``|fc2|`` weights in that row) on the calibration set; with ReLU, dead units are
    exactly 0 and the change is exactly 0. GELU output is within ``tol=1e-6`` of zero only for
    pre-activations below about -5.05, so each such unit moves the MLP output by at most
    1e-6 x its fc2 weights.
    The report gives the measured largest logit change on the calibration set.

Least-active units (optional ``ratio``)
    Units are ranked dead first, then by activation frequency (the fraction of calibration
    (image, position) pairs with output > 0, the paper's notion of activity), ties broken by the
    mean magnitude of the unit's contribution ``mean|a_j| * ||fc2[:, j]||``; ranking is global over
    all MLPs (a SAM model's sparse early blocks give up more units). ``criterion="contribution"``
    ranks by that contribution alone. Equal keys keep network order (MLP order, then unit index),
    so the choice never depends on the sort; a unit with a NaN statistic ranks as most active.

Ties and NaN in the reported numbers
    Accuracies count a tie for the top score as 1 / number tied when the label is among them and
    a row with a NaN logit as wrong (``vitsam.eval.metrics.top1_hits``, as ``vitsam eval``
    does); the argmax agreement compares the sets of top-scoring classes (``same_top1``); the
    largest logit change is NaN (null in JSON) when a logit is NaN, never a smaller number.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vitsam.analysis.sparsity import UnitStats, batch_inputs, record_units
from vitsam.eval.metrics import same_top1, top1_hits
from vitsam.exact import scaled
from vitsam.io import save_figure
from vitsam.models import count_params
from vitsam.models.attention import math_attention
from vitsam.models.modes import eval_mode, restore_modes
from vitsam.models.surgery import mlp_hidden_sizes, mlp_modules, shrink_mlp
from vitsam.progress import progress_bar

CRITERIA = ("frequency", "contribution")
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class PruneError(ValueError):
    """Invalid pruning settings, or a model without prunable MLPs."""


def _check_settings(ratio: float | None, tol: float, criterion: str, min_keep: int) -> None:
    if ratio is not None and not (0.0 <= float(ratio) <= 1.0):
        raise PruneError(f"ratio must be in [0, 1] (the fraction of MLP units to remove), "
                         f"got {ratio!r}")
    if not tol >= 0:
        raise PruneError(f"tol must be >= 0, got {tol!r}")
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if not isinstance(min_keep, int) or min_keep < 0:
        raise PruneError(f"min_keep must be an integer >= 0, got {min_keep!r}")


def _bar_off(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows bars only on a terminal."""
    return None if progress is None else not progress


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[Any], progress: bool | None = False
              ) -> tuple[dict[str, UnitStats], list[torch.Tensor]]:
    """Per-unit statistics of every MLP ``{mlp path: UnitStats}`` and the logits per batch.

    batches: ``(x, y)`` pairs or images, x float (B, C, H, W). The model runs in eval mode.
    """
    if not mlp_modules(model):
        raise PruneError(f"{type(model).__name__} has no timm-style MLPs (fc1/act/fc2); only "
                         "ViT and Mixer MLP units can be pruned")
    device = _param_device(model)
    logits: list[torch.Tensor] = []
    with eval_mode(model), record_units(model) as stats:
        for batch in progress_bar(batches, desc="calibrate", disable=_bar_off(progress)):
            logits.append(model(batch_inputs(batch).to(device)).float().cpu())
    if not logits:
        raise PruneError("the calibration set is empty; give at least one batch")
    return {name.removesuffix(".act"): st for name, st in stats.items()}, logits


def _unit_table(model: nn.Module, stats: dict[str, UnitStats], tol: float) -> list[dict[str, Any]]:
    """One row per MLP: path, kind, dead mask, activation frequency, mean contribution."""
    rows = []
    for path, mlp in mlp_modules(model):
        st = stats[path]
        col_norm = mlp.fc2.weight.detach().double().cpu().norm(dim=0)  # (H,)
        pos = max(st.positions, 1)
        rows.append({"path": path, "kind": st.kind, "units": st.units,
                     "dead": (st.max_abs <= tol).numpy(),
                     "freq": (st.positions_active.double() / pos).numpy(),
                     "contrib": (st.sum_abs / pos * col_norm).numpy(),
                     "ever_active_pct": st.summary()["ever_active_pct"]})
    return rows


def _plan(rows: list[dict[str, Any]], n_remove: int, criterion: str, min_keep: int
          ) -> dict[str, np.ndarray]:
    """Indices of the units each MLP keeps after removing ``n_remove`` units, least active
    first, never leaving an MLP with fewer than ``min_keep`` units. The order is deterministic:
    ties in every key go in network order, a NaN statistic counts as the most active."""
    mlp_id = np.concatenate([np.full(r["units"], i) for i, r in enumerate(rows)])
    unit = np.concatenate([np.arange(r["units"]) for r in rows])
    dead = np.concatenate([r["dead"] for r in rows])
    freq = np.concatenate([r["freq"] for r in rows])
    contrib = np.concatenate([r["contrib"] for r in rows])
    # A NaN statistic (NaN activations or fc2 weights) ranks as most active: such a unit is
    # never removed before a finite one. Ties keep network order (MLP order, then unit index):
    # np.lexsort is stable and sorts by the last key first.
    freq = np.where(np.isnan(freq), np.inf, freq)
    contrib = np.where(np.isnan(contrib), np.inf, contrib)
    order = (np.lexsort((contrib, freq, ~dead)) if criterion == "frequency"
             else np.lexsort((contrib, ~dead)))
    left = np.array([r["units"] for r in rows])
    removed = np.zeros(len(unit), dtype=bool)
    count = 0
    for k in order:
        if count >= n_remove:
            break
        if left[mlp_id[k]] > min_keep:
            removed[k] = True
            left[mlp_id[k]] -= 1
            count += 1
    return {r["path"]: unit[(mlp_id == i) & ~removed] for i, r in enumerate(rows)}


def _apply(model: nn.Module, keep: dict[str, np.ndarray]) -> nn.Module:
    pruned = copy.deepcopy(model)
    for path, idx in keep.items():
        mlp = pruned.get_submodule(path)
        if len(idx) != mlp.fc1.out_features:
            shrink_mlp(mlp, torch.as_tensor(idx, dtype=torch.long))
    return pruned


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int, in_chans: int) -> int:
    """FLOPs of one forward pass on one (1, in_chans, img_size, img_size) image, as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2). Attention runs on the explicit path so
    its matrix products are counted."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_chans, img_size, img_size, device=_param_device(model))
    with eval_mode(model), math_attention(model), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _worst(worst: float, a: torch.Tensor, b: torch.Tensor) -> float:
    """max(worst, largest |a - b|), NaN as soon as either holds a NaN: ``max(0.0, nan)`` would
    silently keep 0.0, reporting a model with NaN logits as unchanged."""
    d = float((a - b).abs().max()) if a.numel() else 0.0
    return math.nan if math.isnan(d) or math.isnan(worst) else max(worst, d)


@torch.no_grad()
def _logit_change(model: nn.Module, batches: Sequence[Any], ref: list[torch.Tensor]
                  ) -> tuple[float, float]:
    """(largest |logit - ref|, NaN if a logit is NaN; fraction of images whose top-1 prediction
    is unchanged, ``same_top1``: ties compared as sets, NaN rows never agree)."""
    device = _param_device(model)
    worst, same, n = 0.0, 0, 0
    with eval_mode(model):
        for batch, r in zip(batches, ref):
            out = model(batch_inputs(batch).to(device)).float().cpu()
            worst = _worst(worst, out, r)
            same += int(same_top1(out, r).sum())
            n += r.shape[0]
    return worst, same / max(n, 1)


def prune_model(model: nn.Module, calib_batches: Iterable[Any], ratio: float | None = None,
                tol: float = 1e-6, criterion: str = "frequency", min_keep: int = 1,
                progress: bool | None = False) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` (ViT / Mixer) and a report; ``model`` itself is not changed.

    calib_batches: ``(x, y)`` or x batches, x float (B, C, H, W) normalised. Removes every dead
    unit (``|output| <= tol`` on all calibration images and positions; see the module docstring),
    and with ``ratio`` the least active units until ``round(ratio x units)`` of all MLP units are
    gone (exact product, halves to even; at least the dead ones). Each MLP keeps at least
    ``min_keep`` units. The report holds per-MLP unit counts, parameters before/after, the largest
    logit change and the argmax agreement on the calibration set.
    """
    _check_settings(ratio, tol, criterion, min_keep)
    batches = list(calib_batches)
    stats, ref = calibrate(model, batches, progress)
    rows = _unit_table(model, stats, tol)
    total = sum(r["units"] for r in rows)
    n_dead = int(sum(r["dead"].sum() for r in rows))
    target = n_dead if ratio is None else max(n_dead, scaled(ratio, total, round))
    keep = _plan(rows, target, criterion, min_keep)
    pruned = _apply(model, keep)
    worst, agree = _logit_change(pruned, batches, ref)
    removed = total - sum(len(k) for k in keep.values())
    layers = {r["path"]: {"kind": r["kind"], "units_before": r["units"],
                          "units_after": int(len(keep[r["path"]])), "dead": int(r["dead"].sum()),
                          "ever_active_pct": r["ever_active_pct"]} for r in rows}
    report = {"ratio": ratio, "tol": tol, "criterion": criterion, "min_keep": min_keep,
              "calib_images": int(sum(x.shape[0] for x in ref)),
              "units_before": total, "units_after": total - removed, "removed": removed,
              "dead_units": n_dead, "removed_fraction": removed / max(total, 1),
              "params_before": count_params(model), "params_after": count_params(pruned),
              "max_abs_logit_change_calib": worst, "argmax_agreement_calib": agree,
              "layers": layers, "mlp_hidden": mlp_hidden_sizes(pruned)}
    return pruned, report


def _accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Top-1 accuracy as ``vitsam eval`` counts it (``top1_hits``: ties fairly, NaN rows wrong)."""
    device = _param_device(model)
    correct, n = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            correct += top1_hits(model(x.to(device)).float(), y)
            n += int(y.numel())
    if n == 0:
        raise PruneError("the evaluation set is empty; give at least one (x, y) batch")
    return correct / n


def prune_curve(model: nn.Module, calib_batches: Iterable[Any],
                eval_batches: Iterable[Any] | Callable[[], Iterable[Any]],
                ratios: Sequence[float] = DEFAULT_RATIOS, tol: float = 1e-6,
                criterion: str = "frequency", min_keep: int = 1, progress: bool | None = False
                ) -> dict[str, Any]:
    """Accuracy against the fraction of MLP units removed, least active first, no retraining.

    For each ratio r exactly round(r x units) units are removed (exact product: 0.35 of 90 units
    is 31.5, so 32; halves to even; fewer only where ``min_keep`` forbids), so r = 0 is the
    unpruned model. eval_batches: ``(x, y)`` batches, or a function returning a fresh iterator of
    them (to avoid holding a large set in memory).
    """
    for r in ratios:
        _check_settings(r, tol, criterion, min_keep)
    batches = list(calib_batches)
    stats, _ = calibrate(model, batches, progress)
    rows = _unit_table(model, stats, tol)
    total = sum(r["units"] for r in rows)
    cached = None if callable(eval_batches) else list(eval_batches)

    def evals() -> Iterable[Any]:
        return eval_batches() if cached is None else cached  # type: ignore[operator]

    n_dead = int(sum(r["dead"].sum() for r in rows))
    out: dict[str, Any] = {"ratios": [], "removed_fraction": [], "accuracy": [], "params": [],
                           "criterion": criterion, "tol": tol, "units": total,
                           "dead_fraction": n_dead / max(total, 1),
                           "base_accuracy": _accuracy(model, evals()),
                           "base_params": count_params(model)}
    for r in progress_bar(ratios, desc="prune curve", disable=_bar_off(progress)):
        keep = _plan(rows, scaled(r, total, round), criterion, min_keep)
        pruned = _apply(model, keep)
        kept = sum(len(k) for k in keep.values())
        out["ratios"].append(float(r))
        out["removed_fraction"].append((total - kept) / max(total, 1))
        out["accuracy"].append(_accuracy(pruned, evals()))
        out["params"].append(count_params(pruned))
    return out


def figures(curves: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """Accuracy against fraction of MLP units removed, several runs overlaid (e.g. ViT vs
    ViT-SAM). ``curves``: a ``prune_curve`` result or a list of (label, result). Writes
    ``prune_curve.png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", curves)] if isinstance(curves, dict) else list(curves)
    if not runs or not all(isinstance(c, dict) and "accuracy" in c for _, c in runs):
        raise PruneError("give a prune_curve result or a list of (label, prune_curve result)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, c in runs:
        ax.plot([100 * f for f in c["removed_fraction"]], [100 * a for a in c["accuracy"]],
                marker="o", ms=3, label=label or None)
    ax.set_xlabel("% of MLP hidden units removed (least active first)")
    ax.set_ylabel("test accuracy % (no retraining)")
    ax.grid(alpha=0.3)
    if any(label for label, _ in runs):
        ax.legend()
    fig.tight_layout()
    return [save_figure(fig, out_dir / "prune_curve.png", dpi=120)]


# -- whole runs ----------------------------------------------------------------------------------

def _compare(full: nn.Module, pruned: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Test accuracy of both models, their top-1 agreement and largest logit change, one pass
    (ties and NaN as in ``_accuracy`` and ``_logit_change``)."""
    dev_f, dev_p = _param_device(full), _param_device(pruned)
    c_full = c_pruned = 0.0
    same = n = 0
    worst = 0.0
    with eval_mode(full, pruned), torch.no_grad():
        for x, y in batches:
            a = full(x.to(dev_f)).float().cpu()
            b = pruned(x.to(dev_p)).float().cpu()
            y = y.cpu()
            c_full += top1_hits(a, y)
            c_pruned += top1_hits(b, y)
            same += int(same_top1(a, b).sum())
            worst = _worst(worst, a, b)
            n += int(y.numel())
    n = max(n, 1)
    return {"test_acc_before": c_full / n, "test_acc_after": c_pruned / n,
            "test_argmax_agreement": same / n, "test_max_abs_logit_change": worst}


MAX_BAD_FINETUNE_STEPS = 3


def _finetune(model: nn.Module, bundle: Any, steps: int, batch_size: int, lr: float, seed: int,
              device: str | torch.device, progress: bool | None) -> tuple[list[float], int]:
    """A few AdamW steps on the training set (its usual augmentation) in train mode; every
    module's mode is restored afterwards. Returns (the loss of every step, NaN where it was not
    finite; the number of steps skipped).

    A step whose loss or gradient norm is not finite is skipped as the trainer skips it: no
    update, the optimiser state untouched, the step still counted. ``MAX_BAD_FINETUNE_STEPS`` such
    steps in a row (or all of them, when fewer are asked for) stop with a ``PruneError`` naming
    the step and the likely causes, rather than writing a model whose weights may be NaN.
    """
    from vitsam.data import train_batches

    batch_size = min(batch_size, len(bundle.train))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    skipped = streak = 0
    bar = progress_bar(total=steps, desc="fine-tune", disable=_bar_off(progress))
    epoch = 0
    with restore_modes(model):
        model.train()
        while len(losses) < steps:
            for x, y in train_batches(bundle, batch_size, epoch=epoch, seed=seed, device=device):
                # Mixup gives soft targets (B, classes); cross_entropy takes them as
                # probabilities.
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # NaN/inf if any grad is
                if torch.isfinite(loss) and torch.isfinite(norm):
                    opt.step()
                    losses.append(loss.item())
                    streak = 0
                else:  # clipping scaled the bad gradients, but nothing was applied
                    opt.zero_grad(set_to_none=True)
                    losses.append(float("nan"))
                    skipped += 1
                    streak += 1
                    if streak >= min(MAX_BAD_FINETUNE_STEPS, steps):
                        bar.close()
                        what = "loss" if not torch.isfinite(loss) else "gradient"
                        raise PruneError(
                            f"fine-tuning step {len(losses)} of {steps} had a non-finite {what} "
                            f"({streak} in a row, nothing written); likely causes: a learning "
                            f"rate too high (finetune_lr={lr:g}), or a pruned model whose outputs "
                            "are already non-finite (check test_acc_after); try a smaller "
                            "learning rate or --finetune-steps 0")
                bar.update(1)
                if len(losses) >= steps:
                    break
            epoch += 1
    bar.close()
    return losses, skipped


def prune_run(run_dir: str | Path, out_dir: str | Path, calib: int = 256,
              ratio: float | None = None, finetune_steps: int = 0, batch_size: int = 128,
              device: str = "cpu", tol: float = 1e-6, criterion: str = "frequency",
              finetune_lr: float = 1e-4, seed: int = 0, measure_speed: bool = True,
              curve_ratios: Sequence[float] | None = None, progress: bool | None = None
              ) -> dict[str, Any]:
    """Prune a trained run's MLPs and write the pruned model as a new run folder ``out_dir``.

    Calibrates on ``calib`` training images drawn with ``seed``, prunes (see ``prune_model``),
    compares test accuracy before/after (no retraining), parameters, FLOPs per image and
    measured inference images/s, optionally fine-tunes ``finetune_steps`` AdamW steps (non-finite
    steps skipped and counted, too many in a row stop it: see ``_finetune``), and writes
    ``out_dir`` (loadable by every command; its model spec carries ``mlp_hidden``) with
    ``prune.json`` holding the returned report. ``curve_ratios`` adds an accuracy-vs-ratio curve
    on the test set (``prune_curve``) and its figure. The process holds ``out_dir``
    (``vitsam.train.runlock``) from its first check to its last write; another process there
    stops it at once with ``RunFolderBusy`` naming that process.
    """
    from vitsam.train import runlock
    from vitsam.train.checkpoint import check_new_run_dir

    _check_settings(ratio, tol, criterion, 1)
    if not isinstance(calib, int) or calib < 1:
        raise PruneError(f"calib must be a positive number of images, got {calib!r}")
    if not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise PruneError(f"finetune_steps must be an integer >= 0, got {finetune_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if Path(out_dir).resolve() == Path(run_dir).resolve():
        raise PruneError("out_dir must differ from run_dir; the pruned model is a new run folder")
    out = check_new_run_dir(out_dir)  # before the work, not after it
    made = not out.exists()
    runlock.raise_if_busy(out)  # another process writing there: say which
    out.mkdir(parents=True, exist_ok=True)
    # Held from the check to the last write: two prunes (or a prune and a training) on one
    # folder cannot both find it free and then overwrite each other's files.
    with runlock.hold(out, remove_if_unused=made, command="vitsam prune"):
        check_new_run_dir(out)  # again, holding the folder
        return _prune_into(run_dir, out, calib, ratio, finetune_steps, batch_size, device, tol,
                           criterion, finetune_lr, seed, measure_speed, curve_ratios, progress)


def _prune_into(run_dir: str | Path, out_dir: Path, calib: int, ratio: float | None,
                finetune_steps: int, batch_size: int, device: str, tol: float, criterion: str,
                finetune_lr: float, seed: int, measure_speed: bool,
                curve_ratios: Sequence[float] | None, progress: bool | None) -> dict[str, Any]:
    """``prune_run``'s work, in the folder ``out_dir`` it holds."""
    from vitsam.config import from_dict
    from vitsam.data import DataConfig, build_data, eval_batches
    from vitsam.data.record import feed_of
    from vitsam.io import atomic_write_json
    from vitsam.train.checkpoint import load_run, save_model_run

    run = load_run(run_dir, device=device)
    spec = run.model_spec
    img_size, in_chans = int(spec["img_size"]), int(spec["in_chans"])
    if not isinstance(run.config.get("data"), dict):
        raise PruneError(f"{run_dir}/config.json has no 'data' section; prune needs the run's "
                         "data set for calibration and test accuracy")
    data_cfg = replace(from_dict(DataConfig, run.config["data"]), img_size=img_size)
    bundle = build_data(data_cfg, progress=progress)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(bundle.train), generator=gen)[:calib]
    mean, std, crop_pct = feed_of(run_dir, bundle)  # as data.json says (imported models' own)
    calib_set = list(eval_batches(bundle.train.subset(idx), batch_size, mean, std, img_size,
                                  device, crop_pct=crop_pct))

    def test_batches() -> Iterable[Any]:
        return eval_batches(bundle.test, batch_size, mean, std, img_size, device,
                            crop_pct=crop_pct)

    pruned, report = prune_model(run.model, calib_set, ratio=ratio, tol=tol, criterion=criterion,
                                 progress=progress)
    report.update(_compare(run.model, pruned, test_batches()))
    report["flops_before"] = count_flops(run.model, img_size, in_chans)
    report["flops_after"] = count_flops(pruned, img_size, in_chans)
    if measure_speed:
        from vitsam.eval.throughput import inference_throughput

        for key, m in (("before", run.model), ("after", pruned)):
            speed = inference_throughput(m, batch_size, img_size, in_chans, device=device)
            report[f"images_per_s_{key}"] = float(speed["images_per_s"])
    if finetune_steps:
        losses, skipped = _finetune(pruned, bundle, finetune_steps, batch_size, finetune_lr,
                                    seed, device, progress)
        finite = [v for v in losses if math.isfinite(v)]
        report["finetune"] = {"steps": finetune_steps, "lr": finetune_lr, "optimizer": "AdamW",
                              "first_loss": finite[0], "last_loss": finite[-1],
                              "nonfinite_steps": skipped,
                              "test_acc": _accuracy(pruned, test_batches())}
    if curve_ratios is not None:
        report["curve"] = prune_curve(run.model, calib_set, test_batches, curve_ratios, tol=tol,
                                      criterion=criterion, progress=progress)
    report.update({"source_run": str(run.run_dir), "source_checkpoint": str(run.checkpoint),
                   "calib_seed": seed, "batch_size": batch_size, "device": str(device)})
    new_spec = {**spec, "mlp_hidden": mlp_hidden_sizes(pruned)}
    out = save_model_run(out_dir, pruned, new_spec, run.config,
                         extra={"pruned_from": str(run.run_dir), "prune": {
                             k: report[k] for k in ("ratio", "tol", "criterion", "removed",
                                                    "units_before", "calib_images")}},
                         step=run.step, data_from=run.run_dir)
    if curve_ratios is not None:
        report["figures"] = [str(p) for p in figures(report["curve"], out)]
    report["out_dir"] = str(out)
    atomic_write_json(out / "prune.json", report)
    return report
