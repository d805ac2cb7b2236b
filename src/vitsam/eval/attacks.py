"""Robust accuracy under L-inf attacks: PGD with restarts (ours) and AutoAttack (torchattacks).

Both attack the model in eval mode, in pixel units of the un-normalised [0, 1] image; the
model is fed as in training (normalised with the run's mean/std). Per image, the score is the
tie-fair top-1 hit (``vitsam.eval.metrics.topk_hits``) of the clean image and of each attacked
copy; an image counts as robust by the *smallest* of them (the clean one included), so robust
accuracy never exceeds clean accuracy on the same images.

PGD: ``restarts`` random starts of PGD-``steps`` (``vitsam.optim.adversarial.Attack``, step
2.5 eps / steps unless given), each from its own seeded draw: the worst case over restarts.
AutoAttack: torchattacks' standard version (APGD-CE, APGD-T, FAB-T, Square, Croce & Hein
2020), slow on CPU: ``samples`` caps the number of test images.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.modes import eval_mode
from ..optim.adversarial import Attack
from ..progress import progress_bar
from .metrics import topk_hits

KINDS = ("pgd", "autoattack")


class Normalised(nn.Module):
    """``model`` fed [0, 1] pixels: normalises them by mean/std first (torchattacks' input)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def _hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) float64 tie-fair top-1 hits."""
    labels = F.one_hot(y.detach().long().cpu(), logits.shape[1]).bool()
    return topk_hits(logits.detach().float().cpu(), labels, 1)


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    kind: str, eps: float, mean: Sequence[float], std: Sequence[float],
                    num_classes: int, steps: int = 20, restarts: int = 2,
                    step_size: float | None = None, seed: int = 0, total: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Clean and robust top-1 accuracy of ``model`` on normalised ``batches`` (x, y).

    Returns ``{attack, eps, samples, clean_acc, robust_acc, time_s}`` and, for PGD, ``steps``,
    ``restarts``, ``step_size``; for AutoAttack ``version``. ``total``: images, for the bar.
    """
    if kind not in KINDS:
        raise ValueError(f"--attack must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 <= eps <= 1:
        raise ValueError(f"--attack-eps must be in [0, 1] (pixel units, e.g. 8/255), got {eps}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"--attack-steps and --attack-restarts must be >= 1, got {steps} and {restarts}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"--attack-step-size must be > 0, got {step_size}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    pgd = Attack("pgd", eps, mean, std, steps=steps, step_size=step_size, seed=seed)
    auto = _autoattack(model, eps, mean, std, num_classes, seed) if kind == "autoattack" else None
    criterion = nn.CrossEntropyLoss()
    clean = robust = 0.0
    n, t0 = 0, time.perf_counter()
    bar = progress_bar(total=total, disable=not progress, unit="img", desc=f"attack {kind}",
                       dynamic_ncols=True)
    with eval_mode(model):
        for b, (x, y) in enumerate(batches):
            with torch.no_grad():
                clean_hits = _hits(model(x), y)
            worst = clean_hits.clone()
            if kind == "pgd":
                for r in range(restarts):
                    adv = pgd.perturb(model, criterion, x, y, key=b * restarts + r)
                    with torch.no_grad():
                        worst = torch.minimum(worst, _hits(model(adv), y))
            else:
                shape = (1, -1, 1, 1)
                m = torch.tensor(mean, device=x.device).view(shape)
                s = torch.tensor(std, device=x.device).view(shape)
                pixels = (x.float() * s + m).clamp(0, 1)  # torchattacks checks the range
                adv = auto(pixels, y)
                with torch.no_grad():
                    worst = torch.minimum(worst, _hits(model((adv - m) / s), y))
            clean += float(clean_hits.sum())
            robust += float(worst.sum())
            n += len(y)
            bar.update(len(y))
            bar.set_postfix(clean=f"{clean / n:.3f}", robust=f"{robust / n:.3f}")
    bar.close()
    if n == 0:
        raise ValueError("no test images to attack")
    out: dict[str, Any] = {"attack": kind, "eps": eps, "samples": n, "clean_acc": clean / n,
                           "robust_acc": robust / n, "time_s": time.perf_counter() - t0}
    if kind == "pgd":
        out.update(steps=steps, restarts=restarts, step_size=pgd.alpha, seed=seed)
    else:
        out.update(version="standard", library=f"torchattacks {_torchattacks().__version__}",
                   seed=seed)
    return out


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError:
        raise ValueError("--attack autoattack needs torchattacks: pip install --no-deps "
                         "torchattacks (its pin of requests 2.25 is not needed)") from None
    return torchattacks


def _autoattack(model: nn.Module, eps: float, mean: Sequence[float], std: Sequence[float],
                num_classes: int, seed: int) -> Any:
    """torchattacks' standard AutoAttack on ``model`` fed [0, 1] pixels."""
    if num_classes < 4:
        raise ValueError(f"AutoAttack's targeted attacks need at least 4 classes, the model has "
                         f"{num_classes}; use --attack pgd")
    ta = _torchattacks()
    dev = next(model.parameters()).device
    wrapped = Normalised(model, mean, std).to(dev)
    return ta.AutoAttack(wrapped, norm="Linf", eps=eps, version="standard", n_classes=num_classes,
                         seed=seed)
