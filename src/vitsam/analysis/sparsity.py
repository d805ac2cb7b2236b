"""Activation sparsity: how many hidden neurons ever fire, per layer.

The paper finds SAM-trained ViTs and Mixers sparse inside: in early blocks few MLP neurons are
ever activated. A *neuron* is one hidden unit:

* ViT: a unit of ``blocks.i.mlp`` after the activation, output (B, tokens, H);
* Mixer: a unit of ``blocks.i.mlp_tokens`` (kind ``token``, output (B, channels, H)) and of
  ``blocks.i.mlp_channels`` (kind ``channel``, output (B, tokens, H)), reported separately;
* ResNet (reference): a channel after each ReLU module, output (B, C, height, width).

A unit counts as *activated on an image* when its output exceeds ``threshold`` (0 by the paper's
definition) at one or more positions (token / channel / pixel) of that image. GELU outputs can be
slightly negative; those count as not activated. Per layer we report the percentage of units
activated on at least one image of the data (``ever_active_pct``) and the mean over images of
the percentage of units activated on that image (``mean_active_pct_per_image``).

Measurements use forward hooks on named submodules; the model is not edited and every hook is
removed afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from vitsam.io import save_figure
from vitsam.models.modes import eval_mode
from vitsam.models.surgery import mlp_modules
from vitsam.progress import progress_bar

KIND_ORDER = ("mlp", "token", "channel", "relu")
DEFINITION = ("a unit is activated on an image if its output > threshold at one or more "
              "positions (tokens for ViT, channels for Mixer token-mixing, tokens for Mixer "
              "channel-mixing, pixels for ResNet)")


class SparsityError(ValueError):
    """Invalid settings, or a model without hidden layers this analysis understands."""


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of the sparsity analysis.

    max_batches: stop after this many batches (None: all). threshold: a unit is activated where
    its output is > threshold. progress: show a progress bar.
    """

    max_batches: int | None = None
    threshold: float = 0.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_batches is not None and (not isinstance(self.max_batches, int)
                                             or self.max_batches < 1):
            raise SparsityError(f"max_batches must be a positive integer or None, "
                                f"got {self.max_batches!r}")
        if not isinstance(self.threshold, (int, float)) or self.threshold != self.threshold:
            raise SparsityError(f"threshold must be a number, got {self.threshold!r}")


@dataclass
class UnitStats:
    """Running per-unit statistics of one hidden layer (all tensors (units,), on CPU)."""

    kind: str
    units: int
    channel_first: bool = False
    images: int = 0
    positions: int = 0  # positions seen over all images (tokens x images, ...)
    active_frac_sum: float = 0.0  # sum over images of the fraction of units activated
    ever_active: torch.Tensor = field(default=None)  # type: ignore[assignment]  # bool
    images_active: torch.Tensor = field(default=None)  # type: ignore[assignment]  # int64
    positions_active: torch.Tensor = field(default=None)  # type: ignore[assignment]  # int64
    max_abs: torch.Tensor = field(default=None)  # type: ignore[assignment]  # float64
    sum_abs: torch.Tensor = field(default=None)  # type: ignore[assignment]  # float64

    def __post_init__(self) -> None:
        h = self.units
        self.ever_active = torch.zeros(h, dtype=torch.bool)
        self.images_active = torch.zeros(h, dtype=torch.long)
        self.positions_active = torch.zeros(h, dtype=torch.long)
        self.max_abs = torch.zeros(h, dtype=torch.float64)
        self.sum_abs = torch.zeros(h, dtype=torch.float64)

    def update(self, out: torch.Tensor, threshold: float) -> None:
        """Add one batch of layer outputs: (B, ..., H), or (B, H, ...) when channel-first."""
        a = out.detach()
        if self.channel_first:
            a = a.movedim(1, -1)
        if a.shape[-1] != self.units:
            raise SparsityError(f"layer output has {a.shape[-1]} units, expected {self.units}")
        b = a.shape[0]
        a = a.reshape(b, -1, self.units).to("cpu", torch.float32)
        active = a > threshold  # (B, P, H)
        per_image = active.any(dim=1)  # (B, H)
        self.ever_active |= per_image.any(dim=0)
        self.images_active += per_image.sum(dim=0)
        self.positions_active += active.sum(dim=(0, 1))
        if self.units:
            self.active_frac_sum += float(per_image.double().mean(dim=1).sum())
        mag = a.abs().double()
        self.max_abs = torch.maximum(self.max_abs, mag.amax(dim=(0, 1)))
        self.sum_abs += mag.sum(dim=(0, 1))
        self.images += b
        self.positions += b * a.shape[1]

    def summary(self) -> dict[str, Any]:
        """JSON numbers: kind, units, ever_active_pct, mean_active_pct_per_image."""
        n = max(self.images, 1)
        ever = 100.0 * float(self.ever_active.double().mean()) if self.units else 0.0
        return {"kind": self.kind, "units": self.units,
                "ever_active_pct": ever,
                "mean_active_pct_per_image": 100.0 * self.active_frac_sum / n}


def hidden_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """Hook points ``(name, module, kind, units)`` in forward order.

    MLP models (ViT, Mixer): the ``act`` module of each MLP, units = ``fc1.out_features``. Models
    without such MLPs (ResNets): every ``nn.ReLU`` module, units = channels (found at first use).
    """
    layers: list[tuple[str, nn.Module, str, int]] = []
    for name, mlp in mlp_modules(model):
        leaf = name.rsplit(".", 1)[-1]
        kind = {"mlp_tokens": "token", "mlp_channels": "channel"}.get(leaf, "mlp")
        layers.append((f"{name}.act" if name else "act", mlp.act, kind, mlp.fc1.out_features))
    if layers:
        return layers
    layers = [(n, m, "relu", -1) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    if not layers:
        raise SparsityError(f"{type(model).__name__} has neither timm-style MLPs (fc1/act/fc2) "
                            "nor nn.ReLU modules; activation sparsity needs one of them")
    return layers


@contextmanager
def record_units(model: nn.Module, threshold: float = 0.0) -> Iterator[dict[str, UnitStats]]:
    """Hook every hidden layer of ``model``; yields ``{layer name: UnitStats}`` updated on each
    forward. All hooks are removed on exit. A hook point that runs twice in one forward (a shared
    activation module) raises ``SparsityError``, since its units would be mixed up.
    """
    stats: dict[str, UnitStats] = {}
    calls: dict[str, int] = {}
    handles = []

    def reset(_m: nn.Module, _inputs: tuple) -> None:
        calls.clear()

    handles.append(model.register_forward_pre_hook(reset))
    for name, module, kind, units in hidden_layers(model):
        def hook(_m: nn.Module, _inputs: tuple, out: torch.Tensor, key: str = name,
                 kind: str = kind, units: int = units) -> None:
            calls[key] = calls.get(key, 0) + 1
            if calls[key] > 1:
                raise SparsityError(f"module {key!r} runs more than once per forward; give each "
                                    "activation its own module to measure it")
            if key not in stats:
                conv = kind == "relu" and out.ndim == 4
                n = out.shape[1] if conv else (out.shape[-1] if units < 0 else units)
                stats[key] = UnitStats(kind=kind, units=n, channel_first=conv)
            stats[key].update(out, threshold)

        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def batch_inputs(batch: Any) -> torch.Tensor:
    """The image tensor of a batch given as ``(x, y)``, ``[x, y]`` or plain ``x``."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise SparsityError(f"a batch must be a tensor or an (x, y) pair, got {type(x).__name__}")
    return x


def run(model: nn.Module, data: Iterable[Any], cfg: SparsityConfig | None = None) -> dict:
    """Activation sparsity of every hidden layer of ``model`` over ``data``.

    data: iterable of ``(x, y)`` normalised batches, x float (B, C, H, W). Returns
    ``{"config", "definition", "images", "layers": {name: {kind, units, ever_active_pct,
    mean_active_pct_per_image}}, "by_kind": {kind: mean over its layers}}``; percentages 0-100.
    """
    cfg = cfg or SparsityConfig()
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad(), record_units(model, cfg.threshold) as stats:
        bar = progress_bar(data, desc="sparsity", total=cfg.max_batches, disable=not cfg.progress)
        for i, batch in enumerate(bar):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            model(batch_inputs(batch).to(device))
    if not stats:
        raise SparsityError("no batches were seen; give at least one (x, y) batch")
    layers = {name: st.summary() for name, st in stats.items()}
    by_kind: dict[str, dict[str, float]] = {}
    for kind in KIND_ORDER:
        rows = [r for r in layers.values() if r["kind"] == kind]
        if rows:
            by_kind[kind] = {key: sum(r[key] for r in rows) / len(rows)
                             for key in ("ever_active_pct", "mean_active_pct_per_image")}
    return {"config": asdict(cfg), "definition": DEFINITION,
            "images": next(iter(stats.values())).images, "layers": layers, "by_kind": by_kind}


def _labelled(results: dict | Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    if isinstance(results, dict):
        return [("", results)]
    out = list(results)
    for item in out:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)
                and "layers" in item[1]):
            raise SparsityError("give a sparsity result dict or a list of (label, result) pairs")
    return [(str(label), res) for label, res in out]


def table(results: dict | Sequence[tuple[str, dict]]) -> str:
    """Text table: one row per layer, per run the % ever activated and the mean % per image."""
    runs = _labelled(results)
    names: list[str] = []
    for _, res in runs:
        names += [n for n in res["layers"] if n not in names]
    width = max([len("layer")] + [len(n) for n in names])
    cols = [max(7, len(label) + 6) for label, _ in runs]
    head = f"{'layer':<{width}}  {'kind':<7} {'units':>6}"
    for (label, _), w in zip(runs, cols):
        head += f"  {(label + ' ever%').strip():>{w}} {'img%':>6}"
    lines = [head, "-" * len(head)]
    for name in names:
        first = next(res["layers"][name] for _, res in runs if name in res["layers"])
        row = f"{name:<{width}}  {first['kind']:<7} {first['units']:>6}"
        for (_, res), w in zip(runs, cols):
            rec = res["layers"].get(name)
            if rec is None:
                row += f"  {'-':>{w}} {'-':>6}"
            else:
                ever, img = rec["ever_active_pct"], rec["mean_active_pct_per_image"]
                row += f"  {ever:>{w}.1f} {img:>6.1f}"
        lines.append(row)
    return "\n".join(lines)


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """Per-layer curves of % units ever activated (top) and mean % per image (bottom), one
    column per layer kind, runs overlaid. Writes ``sparsity.png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = _labelled(results)
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k for _, res in runs
                                          for r in res["layers"].values())]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6), squeeze=False)
    titles = {"mlp": "MLP", "token": "token mixing", "channel": "channel mixing",
              "relu": "post-ReLU"}
    for col, kind in enumerate(kinds):
        for label, res in runs:
            rows = [r for r in res["layers"].values() if r["kind"] == kind]
            xs = list(range(len(rows)))
            for row, key in enumerate(("ever_active_pct", "mean_active_pct_per_image")):
                axes[row][col].plot(xs, [r[key] for r in rows], marker="o", ms=3,
                                    label=label or None)
        axes[0][col].set_title(titles[kind])
        axes[0][col].set_ylabel("% units activated on >= 1 image")
        axes[1][col].set_ylabel("mean % units activated per image")
        axes[1][col].set_xlabel("block" if kind != "relu" else "ReLU layer (forward order)")
        for row in range(2):
            axes[row][col].set_ylim(0, 102)
            axes[row][col].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[row][col].grid(alpha=0.3)
    if any(label for label, _ in runs):
        axes[0][0].legend()
    fig.tight_layout()
    return [save_figure(fig, out_dir / "sparsity.png", dpi=120)]
