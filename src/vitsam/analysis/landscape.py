"""Loss landscapes around trained weights along filter-normalised random directions.

The surface is ``L(w0 + a d1 + b d2)`` (2-D) or ``L(w0 + a d1)`` (1-D) on a grid of ``a, b`` values,
evaluated in eval mode with ``torch.no_grad`` on a fixed subset of the batches passed in (cross
entropy averaged over samples, and top-1 accuracy). The directions are Gaussian and *filter
normalised*: every filter of a direction is rescaled to the norm of the matching filter of ``w0``,
so that the scale of each filter (which normalisation layers make irrelevant) does not distort the
picture and surfaces of different models are comparable.

What a "filter" is, per parameter shape:

* Linear weight ``(out, in)``: one output row. This covers timm's fused ``attn.qkv`` weight
  ``(3*D, D)``: each row belongs to exactly one of q, k, v and one head, so q/k/v blocks and heads
  are never lumped together. It also covers the attention ``proj``, MLP ``fc1``/``fc2``, the
  classifier head and MLP-Mixer's token-mixing Linear (one row per hidden token unit).
* Convolution weight ``(out, in, kh, kw)``: one output channel.
* Token tables of shape ``(1, T, D)``: the position embedding has one filter per token (each
  token's D-vector); the class token ``(1, 1, D)`` (and register tokens) is one filter per token.
  The reference implementation (tomgoldstein/loss-landscape) slices along the first dimension and
  therefore treats ``pos_embed`` and ``cls_token`` each as a single filter; slicing per token
  instead keeps one badly scaled token from setting the step for all others.
* 1-D (and 0-D) parameters, i.e. biases, LayerNorm/GroupNorm/BatchNorm affine parameters and
  layer-scale gammas: left unperturbed (direction zero) by default. With
  ``include_bias_norm=True`` each such parameter is one filter (a Gaussian vector rescaled to the
  parameter's norm; zero-valued parameters therefore stay unperturbed). The reference tool instead
  copies the weights themselves into the direction.

Only trainable parameters are perturbed; buffers (e.g. BatchNorm running statistics) keep their
trained values. The model is perturbed in place with ``torch._foreach`` ops and ``w0`` is restored
bit-exactly from a saved copy at the end, also when the loop is interrupted. With
``LandscapeConfig.state_path`` the finished rows are written atomically to a JSON file after every
row, so an interrupted grid resumes where it stopped; the file holds a fingerprint of the settings,
weights and data, and one of another grid is refused, never reused. ``vitsam analyze`` (and the
studies' landscape stage) keep such a file per distinct grid in the run folder (``resumable``):
a killed analysis re-run with the same arguments evaluates only the rows it had not finished.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..eval.metrics import top1_hits
from ..io import atomic_write_json, remove_stale_temporaries, save_figure
from ..models.modes import eval_mode
from ..progress import progress_bar

Batch = tuple[Tensor, Tensor]


class LandscapeError(ValueError):
    """Invalid landscape settings, data or saved state."""


@dataclass(frozen=True)
class LandscapeConfig:
    """Settings of a loss-landscape grid.

    dims: 1 (curve) or 2 (surface). span: (lo, hi) range of each coordinate, in units of the
    filter-normalised direction (a single number s means (-s, s)). steps: grid points per axis.
    seed: seed of the Gaussian directions. include_bias_norm: also perturb 1-D parameters.
    max_batches: how many of the given batches form the fixed evaluation subset (None: all).
    weight_decay: add the L2 term ``decay_rate / 2 * ||w||^2`` over the parameters the optimiser
    decays to the plotted loss (default: the data loss alone; every figure says which).
    decay_rate: the run's ``optim.weight_decay`` (``vitsam analyze`` fills it in).
    state_path: optional JSON file for resuming an interrupted grid (not part of the result).
    """

    dims: int = 2
    span: tuple[float, float] = (-1.0, 1.0)
    steps: int = 21
    seed: int = 0
    include_bias_norm: bool = False
    max_batches: int | None = 8
    weight_decay: bool = False
    decay_rate: float | None = None
    state_path: str | None = None

    def __post_init__(self) -> None:
        span = self.span
        if isinstance(span, (int, float)):
            span = (-abs(float(span)), abs(float(span)))
        try:
            lo, hi = (float(v) for v in span)
        except (TypeError, ValueError):
            raise LandscapeError(f"span must be (lo, hi) or one number, got {self.span!r}") from None
        object.__setattr__(self, "span", (lo, hi))
        if self.dims not in (1, 2):
            raise LandscapeError(f"dims must be 1 or 2, got {self.dims!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise LandscapeError(f"span must be finite with lo < hi, got {self.span!r}")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise LandscapeError(f"steps must be an integer >= 2, got {self.steps!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise LandscapeError(f"max_batches must be None or an integer >= 1, got {self.max_batches!r}")
        if not isinstance(self.weight_decay, bool):
            raise LandscapeError(f"weight_decay must be true or false, got {self.weight_decay!r}")
        if self.weight_decay and not (isinstance(self.decay_rate, (int, float))
                                      and self.decay_rate >= 0):
            raise LandscapeError("weight_decay=true needs decay_rate >= 0 (the run's "
                                 f"optim.weight_decay), got {self.decay_rate!r}")

    def settings(self) -> dict[str, Any]:
        """The settings that determine the result (everything but ``state_path``)."""
        d = asdict(self)
        d.pop("state_path")
        d["span"] = list(self.span)
        return d


# ----------------------------------------------------------------------------- directions

def landscape_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters a landscape perturbs, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def as_filters(t: Tensor) -> Tensor:
    """View ``t`` as (num_filters, filter_size) following the module docstring's filter rules.

    Token tables (1, T, D) give T filters of size D; other tensors with ndim >= 2 give one filter per
    slice along dim 0; 1-D and 0-D tensors are a single filter.
    """
    if t.ndim <= 1:
        return t.reshape(1, -1)
    if t.ndim == 3 and t.shape[0] == 1:
        return t.reshape(-1, t.shape[-1])
    return t.reshape(t.shape[0], -1)


def filter_normalized_direction(model: nn.Module, generator: torch.Generator,
                                include_bias_norm: bool = False) -> list[Tensor]:
    """One random direction, aligned with ``landscape_parameters(model)``.

    Each tensor has its parameter's shape, dtype and device; every filter (see ``as_filters``)
    has the norm of the matching filter of the current weights. 1-D parameters are zero unless
    ``include_bias_norm``. Draws from ``generator`` (CPU) in parameter order, so a seed fixes it.
    """
    out = []
    for _, p in landscape_parameters(model):
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        if w.ndim <= 1 and not include_bias_norm:
            d.zero_()
        else:
            wf = as_filters(w.float().cpu())
            df = as_filters(d)  # d is fresh and contiguous, so df is a view and scales d in place
            df.mul_(wf.norm(dim=1, keepdim=True) / (df.norm(dim=1, keepdim=True) + 1e-10))
        out.append(d.to(device=w.device, dtype=w.dtype))
    return out


def random_directions(model: nn.Module, cfg: LandscapeConfig) -> list[list[Tensor]]:
    """``cfg.dims`` filter-normalised directions drawn from one generator seeded with ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return [filter_normalized_direction(model, gen, cfg.include_bias_norm) for _ in range(cfg.dims)]


# ----------------------------------------------------------------------------- evaluation

def grid_coordinates(span: tuple[float, float], steps: int) -> list[float]:
    """``steps`` evenly spaced values over ``span``; a value within rounding of 0 is exactly 0."""
    lo, hi = span
    vals = np.linspace(lo, hi, steps)
    tol = 1e-9 * (hi - lo)
    return [0.0 if abs(v) < tol else float(v) for v in vals]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """Mean cross-entropy (nats per sample) and top-1 accuracy (0-1) of ``model`` over ``batches``.

    Far from the centre the logits can overflow: the loss is then NaN or inf (stored as null),
    and the accuracy counts a row holding a NaN as wrong and a tie for the top score as
    1 / number tied when the label is among them (``top1_hits``, as ``vitsam eval`` counts), so
    it never depends on which tied index an argmax returns first.
    """
    loss_sum, correct, n = 0.0, 0.0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum").double())
        correct += top1_hits(logits.float(), y)
        n += int(y.numel())
    return loss_sum / n, correct / n


def l2_penalty(model: nn.Module, rate: float) -> float:
    """``rate / 2 * sum ||w||^2`` over the parameters the optimiser decays (see
    ``vitsam.optim.factory.param_groups``): the L2 term whose gradient step is weight decay."""
    from ..optim.factory import param_groups

    decayed = param_groups(model, rate)[0]["params"]
    return 0.5 * rate * float(sum(p.detach().double().pow(2).sum() for p in decayed))


def _take_batches(model: nn.Module, data: Iterable[Batch], max_batches: int | None) -> list[Batch]:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise LandscapeError("the model has no parameters; nothing to perturb") from None
    batches: list[Batch] = []
    for item in data:
        if max_batches is not None and len(batches) >= max_batches:
            break
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise LandscapeError("data must yield (x, y) batches of normalised images and int labels")
        x, y = item
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise LandscapeError(f"labels must have shape (batch,), got {tuple(y.shape)} for x {tuple(x.shape)}")
        batches.append((x.to(device), y.to(device=device, dtype=torch.long)))
    if not batches:
        raise LandscapeError("data yielded no batches; pass at least one (x, y) batch")
    return batches


def _fingerprint(cfg: LandscapeConfig, params: list[Tensor], batches: list[Batch]) -> str:
    """Hash of settings, weights and data, so a state file is only resumed for the same grid."""
    h = hashlib.sha256(json.dumps(cfg.settings(), sort_keys=True).encode())
    for t in params + [t for b in batches for t in b]:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _load_state(path: Path, fingerprint: str) -> dict[str, list]:
    if not path.exists():
        return {"loss": [], "accuracy": []}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LandscapeError(f"cannot read landscape state {path} ({exc}); delete it to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise LandscapeError(f"landscape state {path} belongs to other settings, weights or data; "
                             "delete it or choose another state_path")
    return {"loss": state["loss"], "accuracy": state["accuracy"]}


def _save_state(path: Path, fingerprint: str, rows: dict[str, list]) -> None:
    # Atomic: a crash leaves either the old or the new complete file.
    atomic_write_json(path, {"fingerprint": fingerprint, **rows})


def resumable(cfg: LandscapeConfig, folder: str | Path,
              context: dict[str, Any]) -> tuple[LandscapeConfig, Path | None]:
    """``cfg`` with a state file in ``folder`` for this grid, and that file (to delete once the
    result is saved); ``cfg`` unchanged and None when it already names its own state file.

    ``context``: what else fixes the grid (checkpoint, data draw, device). The file name hashes
    it with the settings, so a changed setting starts a file of its own instead of meeting the
    refusal of another grid's file; the fingerprint inside still guards weights and data.
    """
    if cfg.state_path is not None:
        return cfg, None
    key = json.dumps({"settings": cfg.settings(), **context}, sort_keys=True, default=str)
    path = Path(folder) / f".landscape-{hashlib.sha256(key.encode()).hexdigest()[:16]}.partial.json"
    return replace(cfg, state_path=str(path)), path


def run(model: nn.Module, data: Iterable[Batch], cfg: LandscapeConfig = LandscapeConfig(),
        on_row: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate the loss/accuracy grid around the current weights of ``model``.

    data: (x float (B,C,H,W) normalised, y int64 (B,)) batches; the first ``cfg.max_batches`` are
    the fixed evaluation set. on_row: called with the row index after each finished (and saved)
    row. Returns ``{"settings", "num_samples", "x", ["y"], "loss", "accuracy", "center_loss",
    "center_accuracy"}`` with loss (nats) and accuracy (0-1) grids shaped (steps,) or
    (steps, steps), indexed ``[i][j]`` for coordinates ``(x[i], y[j])``. The weights are restored
    bit-exactly afterwards.
    """
    if not isinstance(cfg, LandscapeConfig):
        raise LandscapeError(f"cfg must be a LandscapeConfig, got {type(cfg).__name__}")
    batches = _take_batches(model, data, cfg.max_batches)
    named = landscape_parameters(model)
    params = [p for _, p in named]
    dirs = random_directions(model, cfg)
    xs = grid_coordinates(cfg.span, cfg.steps)
    ys = xs if cfg.dims == 2 else [0.0]

    state_path = Path(cfg.state_path) if cfg.state_path else None
    if state_path:
        remove_stale_temporaries(state_path.parent, state_path.name)  # from a write killed half-way
    fingerprint = _fingerprint(cfg, [p.detach() for p in params], batches) if state_path else ""
    rows = _load_state(state_path, fingerprint) if state_path else {"loss": [], "accuracy": []}

    w0 = [p.detach().clone() for p in params]
    total = len(xs) * len(ys)
    bar = progress_bar(total=total, initial=len(rows["loss"]) * len(ys), desc="landscape", disable=None)
    try:
        with eval_mode(model), torch.no_grad():
            center = evaluate(model, batches)
            if cfg.weight_decay:
                center = (center[0] + l2_penalty(model, cfg.decay_rate), center[1])
            for i in range(len(rows["loss"]), len(xs)):
                row_loss, row_acc = [], []
                for b in ys:
                    torch._foreach_copy_(params, w0)
                    if xs[i] != 0.0:
                        torch._foreach_add_(params, dirs[0], alpha=xs[i])
                    if cfg.dims == 2 and b != 0.0:
                        torch._foreach_add_(params, dirs[1], alpha=b)
                    loss, acc = evaluate(model, batches)
                    loss += l2_penalty(model, cfg.decay_rate) if cfg.weight_decay else 0.0
                    row_loss.append(_finite_or_none(loss))
                    row_acc.append(acc)
                    bar.update(1)
                rows["loss"].append(row_loss)
                rows["accuracy"].append(row_acc)
                if state_path:
                    _save_state(state_path, fingerprint, rows)
                if on_row is not None:
                    on_row(i)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
        bar.close()

    loss, acc = rows["loss"], rows["accuracy"]
    if cfg.dims == 1:
        loss, acc = [r[0] for r in loss], [r[0] for r in acc]
    result: dict[str, Any] = {
        "settings": cfg.settings(),
        "num_samples": sum(int(y.numel()) for _, y in batches),
        "num_parameters_perturbed": sum(int(p.numel()) for p, d in zip(params, dirs[0]) if d.any()),
        "x": xs,
        "loss": loss,
        "accuracy": acc,
        "center_loss": center[0],
        "center_accuracy": center[1],
        "weight_decay": "included" if cfg.weight_decay else "excluded",
    }
    if cfg.dims == 2:
        result["y"] = ys
    return result


# ----------------------------------------------------------------------------- figures

def _as_pairs(results: dict | Sequence) -> list[tuple[str, dict]]:
    if isinstance(results, dict):
        return [("model", results)]
    pairs = [(str(r[0]), r[1]) for r in results]
    if not pairs:
        raise LandscapeError("figures needs at least one result")
    return pairs


def _grid(values: list) -> np.ndarray:
    """(Nested) lists with None for non-finite values -> float array with NaN."""
    return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list)
                     else (np.nan if row is None else row) for row in values], dtype=float)


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path,
            zmax: float | None = None) -> list[Path]:
    """Draw the landscapes as PNGs in ``out_dir`` and return their paths.

    2-D results: ``landscape_2d.png`` with one column per model, a 3-D surface on top and a
    contour map below, all with the same axes, z-limits and colour scale. 1-D results:
    ``landscape_1d.png`` with all models' loss and accuracy curves on shared axes. ``zmax`` clips
    the loss axis (default: the largest loss of all models).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    pairs = _as_pairs(results)
    dims = {int(r["settings"]["dims"]) for _, r in pairs}
    if len(dims) != 1:
        raise LandscapeError("cannot draw 1-D and 2-D landscapes together; pass results of one kind")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    losses = [_grid(r["loss"]) for _, r in pairs]
    zlo = float(np.nanmin([np.nanmin(z) for z in losses]))
    zhi = float(zmax if zmax is not None else np.nanmax([np.nanmax(z) for z in losses]))
    if not zhi > zlo:
        zhi = zlo + 1e-6
    terms = {r.get("weight_decay", "excluded") for _, r in pairs}
    l2 = f"L2 term {terms.pop()}" if len(terms) == 1 else "L2 term included for some runs"

    if dims == {1}:
        fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
        for (label, r), z in zip(pairs, losses):
            ax_l.plot(r["x"], z, label=label)
            ax_a.plot(r["x"], r["accuracy"], label=label)
        ax_l.set(xlabel="alpha (filter-normalised direction)", ylabel=f"train loss (nats), {l2}",
                 ylim=(zlo - 0.03 * (zhi - zlo), zhi + 0.03 * (zhi - zlo)), title="Loss")
        ax_a.set(xlabel="alpha (filter-normalised direction)", ylabel="accuracy", ylim=(0, 1),
                 title="Accuracy")
        ax_l.legend()
        path = out / "landscape_1d.png"
    else:
        n = len(pairs)
        fig = plt.figure(figsize=(4.5 * n, 8.5))
        norm = Normalize(vmin=zlo, vmax=zhi)
        levels = np.linspace(zlo, zhi, 25)
        for k, ((label, r), z) in enumerate(zip(pairs, losses)):
            a, b = np.meshgrid(np.asarray(r["x"]), np.asarray(r["y"]), indexing="ij")
            zc = np.clip(z, zlo, zhi)
            ax3 = fig.add_subplot(2, n, k + 1, projection="3d")
            ax3.plot_surface(a, b, zc, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
            ax3.set(zlim=(zlo, zhi), title=label, xlabel="alpha", ylabel="beta")
            ax2 = fig.add_subplot(2, n, n + k + 1)
            cs = ax2.contour(a, b, zc, levels=levels, cmap="viridis", norm=norm)
            ax2.set(xlabel="alpha", ylabel="beta", aspect="equal")
            ax2.plot([0], [0], "k+")
        fig.colorbar(cs, ax=fig.axes[1::2], shrink=0.8, label=f"train loss (nats), {l2}")
        path = out / "landscape_2d.png"
    return [save_figure(fig, path, dpi=120, bbox_inches="tight")]
