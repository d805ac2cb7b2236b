"""The path of training in the loss landscape (the PCA mode of the loss-landscape tool).

A run's checkpoints w_1 .. w_n (oldest first; w_n the analysed weights) give the differences
``M = [w_i - w_n]`` (n-1, P). Their top-2 right singular vectors d1, d2 (unit vectors in
parameter space, not centred: the final weights are the origin, as in Li et al.'s PCA mode) span
the plane that holds most of the path; checkpoint i sits at ``(M_i . d1, M_i . d2)`` and the
share of the path's squared length that plane explains is ``(s1^2 + s2^2) / sum s^2``. The loss
is evaluated on a grid over that plane, ``L(w_n + a d1 + b d2)``, covering every checkpoint with
a margin, in eval mode on a fixed subset of the batches passed in; the figure draws the path
(each checkpoint labelled with its step) over the contours of that surface.

The coordinates are in parameter units (the directions are unit vectors, not filter
normalised: the path itself sets the scale). Every trainable parameter is included. The signs
of d1 and d2 are fixed so that the first checkpoint has non-positive coordinates. Needs at
least three checkpoints (two differences); keep them with ``train.keep_checkpoints`` and a
``train.ckpt_every_epochs`` that saves several.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..io import save_figure
from ..models.modes import eval_mode
from ..progress import progress_bar
from ..train.checkpoint import list_checkpoints, read_checkpoint
from .landscape import Batch, _take_batches, evaluate, grid_coordinates, l2_penalty


@dataclass(frozen=True)
class TrajectoryConfig:
    """Settings of the trajectory analysis.

    steps: grid points per axis of the loss surface; margin: how far the grid reaches beyond the
    outermost checkpoint, as a fraction of the path's extent on that axis; max_batches: batches
    of the fixed evaluation subset; max_checkpoints: at most this many checkpoints, evenly
    spaced (always the first and the last); weight_decay: add the L2 term
    ``decay_rate / 2 * ||w||^2`` (the parameters the optimiser decays) to the plotted loss.
    run_dir and decay_rate are filled in by ``vitsam analyze`` from the run folder.
    """

    steps: int = 15
    margin: float = 0.25
    max_batches: int | None = 4
    max_checkpoints: int = 50
    weight_decay: bool = False
    run_dir: str | None = None
    decay_rate: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 3:
            raise ValueError(f"steps must be an integer >= 3, got {self.steps!r}")
        if not (isinstance(self.margin, (int, float)) and 0 <= self.margin <= 10):
            raise ValueError(f"margin must be a number in [0, 10], got {self.margin!r}")
        if not isinstance(self.max_checkpoints, int) or self.max_checkpoints < 3:
            raise ValueError(f"max_checkpoints must be an integer >= 3, got {self.max_checkpoints!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int)
                                             or self.max_batches < 1):
            raise ValueError(f"max_batches must be None or an integer >= 1, got {self.max_batches!r}")
        if not isinstance(self.weight_decay, bool):
            raise ValueError(f"weight_decay must be true or false, got {self.weight_decay!r}")


def pca_path(points: Tensor) -> dict[str, Any]:
    """PCA of a path of flat weight vectors ``points`` (n, P), oldest first, about its last point.

    Returns ``directions`` (2, P) float64 unit vectors, ``coords`` (n, 2) float64 (the last
    point at (0, 0)) and ``explained`` (2,): the share of sum_i ||w_i - w_n||^2 along each axis.
    """
    if points.ndim != 2 or points.shape[1] < 2:
        raise ValueError(f"points must be (n, P) flat weight vectors with P >= 2, got "
                         f"{tuple(points.shape)}")
    if points.shape[0] < 3:
        raise ValueError(f"a trajectory needs at least 3 checkpoints, got {points.shape[0]}; keep "
                         "more with train.keep_checkpoints and train.ckpt_every_epochs")
    diffs = (points[:-1] - points[-1]).double()
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    total = float((s ** 2).sum())
    if total == 0.0:
        raise ValueError("all checkpoints hold the same weights: there is no path to draw")
    dirs = vh[:2].clone()  # n - 1 >= 2 differences of P >= 2 weights: two directions
    coords = torch.cat([diffs @ dirs.T, torch.zeros(1, 2, dtype=torch.float64)])
    for k in range(2):  # the first checkpoint on the negative side of each axis
        if coords[0, k] > 0:
            dirs[k], coords[:, k] = -dirs[k], -coords[:, k]
    explained = [float(v) / total for v in (s[:2] ** 2)]
    return {"directions": dirs, "coords": coords, "explained": explained}


def _checkpoint_weights(run_dir: Path, names: Sequence[str],
                        params: list[tuple[str, nn.Parameter]]) -> tuple[Tensor, list[int]]:
    """Flat (n, P) float64 weights of the trainable parameters at each named checkpoint, steps."""
    rows, steps = [], []
    for name in progress_bar(names, desc="trajectory checkpoints", disable=None, leave=False):
        state, weights, _ = read_checkpoint(run_dir / "checkpoints" / name, optimizer=False)
        rows.append(torch.cat([weights[n].reshape(-1).double() for n, _ in params]))
        steps.append(int(state["step"]))
    return torch.stack(rows), steps


def _even(names: list[str], most: int) -> list[str]:
    """At most ``most`` of ``names``, evenly spaced, first and last kept."""
    if len(names) <= most:
        return names
    idx = sorted({round(i * (len(names) - 1) / (most - 1)) for i in range(most)})
    return [names[i] for i in idx]


def run(model: nn.Module, data: Iterable[Batch], cfg: TrajectoryConfig = TrajectoryConfig()) -> dict:
    """Project the checkpoints of ``cfg.run_dir`` on their top-2 principal directions and
    evaluate the loss over that plane around the final checkpoint (the weights of ``model``).

    Returns ``{"supported": False, "reason"}`` for a run with fewer than 3 checkpoints, else
    ``{"settings", "steps", "coords" (n, 2), "explained" (2,), "x", "y", "loss",
    "accuracy" (grids [i][j] at (x[i], y[j])), "checkpoint_loss" (n,), "num_samples"}``; loss in
    nats (plus the L2 term when ``weight_decay``), accuracy 0-1. The weights of ``model`` are
    restored bit-exactly afterwards.
    """
    if cfg.run_dir is None:
        raise ValueError("trajectory needs the run folder (cfg.run_dir); `vitsam analyze` sets it")
    if cfg.weight_decay and cfg.decay_rate is None:
        raise ValueError("weight_decay=true needs decay_rate (the run's optim.weight_decay)")
    run_dir = Path(cfg.run_dir)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    names = _even(list_checkpoints(run_dir), cfg.max_checkpoints)
    if len(names) < 3:  # e.g. `analyze --all` on a run that kept one checkpoint
        return {"supported": False,
                "reason": f"{run_dir} keeps {len(names)} checkpoint(s) and a trajectory needs "
                          "at least 3; train with train.keep_checkpoints=N (and "
                          "train.ckpt_every_epochs) to keep them"}
    path, steps = _checkpoint_weights(run_dir, names, named)
    w0 = torch.cat([p.detach().reshape(-1).double().cpu() for p in params])
    if not torch.equal(path[-1], w0):
        # The analysed weights are the origin; they must be the path's last point.
        raise ValueError(f"the analysed weights are not checkpoint {names[-1]}, the run's newest; "
                         "analyse the last checkpoint (--checkpoint last)")
    pca = pca_path(path)
    coords = pca["coords"].numpy()
    axes = []
    for k in range(2):
        lo, hi = float(coords[:, k].min()), float(coords[:, k].max())
        pad = cfg.margin * max(hi - lo, 1e-12)
        axes.append(grid_coordinates((lo - pad, hi + pad), cfg.steps))
    batches = _take_batches(model, data, cfg.max_batches)
    numels = [p.numel() for p in params]
    dirs = [[t.view_as(p).to(p.device, p.dtype) for t, p in zip(torch.split(d, numels), params)]
            for d in pca["directions"]]
    saved = [p.detach().clone() for p in params]
    rate = cfg.decay_rate if cfg.weight_decay else 0.0

    def loss_at(a: float, b: float) -> tuple[float, float]:
        torch._foreach_copy_(params, saved)
        torch._foreach_add_(params, dirs[0], alpha=a)
        torch._foreach_add_(params, dirs[1], alpha=b)
        loss, acc = evaluate(model, batches)
        return loss + (l2_penalty(model, rate) if rate else 0.0), acc

    grid_loss, grid_acc = [], []
    bar = progress_bar(total=cfg.steps ** 2 + len(steps), desc="trajectory", disable=None)
    try:
        with eval_mode(model), torch.no_grad():
            for a in axes[0]:
                row = [loss_at(a, b) for b in axes[1]]
                bar.update(len(row))
                grid_loss.append([v[0] for v in row])
                grid_acc.append([v[1] for v in row])
            at_ckpt = []
            for a, b in coords:
                at_ckpt.append(loss_at(float(a), float(b))[0])
                bar.update(1)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        bar.close()
    return {
        "settings": {k: v for k, v in asdict(cfg).items() if k != "run_dir"},
        "weight_decay": "included" if rate else "excluded",
        "checkpoints": names, "steps": steps, "coords": coords.tolist(),
        "explained": pca["explained"], "x": axes[0], "y": axes[1],
        "loss": grid_loss, "accuracy": grid_acc, "checkpoint_loss": at_ckpt,
        "num_samples": sum(int(y.numel()) for _, y in batches),
    }


def plot_trajectories(runs: Sequence[tuple[str, dict]]) -> Any:
    """A figure with one panel per (label, result): the path (labelled with steps) over the loss
    contours, with the explained variance of each axis and whether the L2 term is in the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs), 4.4), squeeze=False)
    for ax, (label, r) in zip(axes[0], runs):
        a, b = np.meshgrid(np.asarray(r["x"]), np.asarray(r["y"]), indexing="ij")
        z = np.array(r["loss"], dtype=float)
        cs = ax.contour(a, b, z, levels=20, cmap="viridis")
        ax.clabel(cs, fontsize=6, fmt="%.2f")
        c = np.asarray(r["coords"])
        ax.plot(c[:, 0], c[:, 1], "o-", color="tab:red", ms=3)
        for (u, v), s in zip(c, r["steps"]):
            ax.annotate(str(s), (u, v), fontsize=6, xytext=(2, 2), textcoords="offset points")
        e1, e2 = r["explained"]
        ax.set_xlabel(f"PC 1 ({100 * e1:.1f}% of the path)")
        ax.set_ylabel(f"PC 2 ({100 * e2:.1f}%)")
        ax.set_title(f"{label + ': ' if label else ''}loss, L2 term {r['weight_decay']}",
                     fontsize=9)
    fig.tight_layout()
    return fig


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """``trajectory.png``: ``plot_trajectories`` of every run given."""
    import matplotlib.pyplot as plt

    pairs = [("", results)] if isinstance(results, dict) else list(results)
    fig = plot_trajectories(pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, out / "trajectory.png", dpi=120)]
