"""Accuracy under corruptions, mean corruption error (mCE), tables and heatmaps.

``evaluate_corruptions`` scores a model on a set built by ``vitsam.data.corruptions`` (images at
the model's size used as they are, others given the run's preprocessing, ``eval.metrics.preprocess``;
then /255 and normalised by the training mean/std) and reports
accuracy per corruption and severity, the mean corruption accuracy (the number the paper
reports for ImageNet-C: mean over the 15 corruptions of the mean over 5 severities) and the
per-corruption error; ``evaluate_corruption_folders`` does the same for the published
ImageNet-C folder tree ``root/<corruption>/<severity>/<class>/<image>``.

``mce`` implements Hendrycks & Dietterich (2019): CE_c = sum_s E_{s,c} / sum_s E^base_{s,c},
mCE = mean_c CE_c; relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean).
The baseline is any run the user chooses, or AlexNet's published ImageNet-C errors
(meaningful only for the real ImageNet-C, not for sets regenerated from other images).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.corruptions import (
    ALL_CORRUPTIONS,
    STANDARD,
    iter_corruption_set,
    load_clean_set,
    load_corruption_set,
)
from .metrics import evaluate, uint8_batches
from .shifts import evaluate_folder

# AlexNet's ImageNet-C top-1 error per corruption, averaged over the 5 severities (fractions).
# Source: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
# and Perturbations", ICLR 2019 (the mCE normaliser, github.com/hendrycks/robustness); the
# six-digit values are those the AugMix reference code (github.com/google-research/augmix,
# imagenet.py, ALEXNET_ERR) takes from that repository, and agree with the paper's rounded table.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet's clean ImageNet top-1 error: the torchvision weights the ImageNet-C code evaluates
# reach 56.522% top-1 (torchvision AlexNet_Weights.IMAGENET1K_V1 metadata); the paper's 43.5%.
ALEXNET_CLEAN_ERROR = 1 - 0.56522
N_SEVERITIES = 5

_ABBREV = {
    "gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
    "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
    "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
    "pixelate": "pixel", "jpeg_compression": "jpeg", "speckle_noise": "speck", "gaussian_blur": "gblur",
    "spatter": "spatt", "saturate": "satur",
}

ErrorTable = Mapping[str, float | Mapping[Any, float]]
Runs = Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]]


def _summarise(parts: dict[str, dict[int, dict[str, Any]]], clean: dict[str, Any] | None,
               meta: dict[str, Any]) -> dict[str, Any]:
    """Assemble the JSON result from per-part metrics ``{corruption: {severity: metrics}}``."""
    names = [c for c in ALL_CORRUPTIONS if c in parts]
    accuracy = {c: {str(s): parts[c][s]["top1"] for s in sorted(parts[c])} for c in names}
    corr_acc = {c: sum(v.values()) / len(v) for c, v in accuracy.items()}
    standard = [c for c in names if c in STANDARD]
    base = standard or names
    return {
        "kind": "corruptions",
        **meta,
        "corruptions": names,
        "severities": sorted({s for c in names for s in parts[c]}),
        "accuracy": accuracy,
        "metrics": {c: {str(s): parts[c][s] for s in sorted(parts[c])} for c in names},
        "corruption_accuracy": corr_acc,
        "corruption_error": {c: 1 - a for c, a in corr_acc.items()},
        "mean_corruption_accuracy": sum(corr_acc[c] for c in base) / len(base) if base else None,
        "mean_corruption_accuracy_all": sum(corr_acc.values()) / len(corr_acc) if corr_acc else None,
        "complete_standard": len(standard) == len(STANDARD)
        and all(len(parts[c]) == N_SEVERITIES for c in standard),
        "clean": clean,
    }


def evaluate_corruptions(
    model: nn.Module,
    corruption_dir: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int | None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    clean: bool = True,
    verify: bool = True,
    crop_pct: float = 1.0,
) -> dict[str, Any]:
    """Evaluate ``model`` on every part of a corruption set folder; JSON-serialisable dict.

    Keys: ``accuracy`` {corruption: {severity: top-1}}, ``metrics`` (top1/top5/ece/nll/n per
    part), ``corruption_accuracy`` / ``corruption_error`` (mean over severities),
    ``mean_corruption_accuracy`` (over the standard corruptions present: the paper's
    ImageNet-C number), ``clean`` (the same images uncorrupted, if ``clean``), and the set's
    ``params``, ``seed``, ``library`` and ``source``. Accuracies are fractions. A set whose
    manifest is not complete (a build interrupted or still running) is refused with a one-line
    error rather than evaluated on the parts that happen to exist.
    """
    man = load_corruption_set(corruption_dir, complete=True)
    parts: dict[str, dict[int, dict[str, Any]]] = {}
    n_parts = sum(len(v) for v in man["parts"].values())
    with tqdm(total=n_parts, desc="corruptions", unit="part", disable=not progress) as bar:
        for corruption, severity, images, labels in iter_corruption_set(corruption_dir, verify=verify,
                                                                        manifest=man):
            batches = uint8_batches(images, labels, batch_size, mean, std, img_size, device, crop_pct)
            parts.setdefault(corruption, {})[severity] = evaluate(model, batches, device)
            bar.update(1)
    clean_metrics = None
    if clean:
        images, labels = load_clean_set(corruption_dir, verify=verify)
        clean_metrics = evaluate(model, uint8_batches(images, labels, batch_size, mean, std, img_size, device,
                                                      crop_pct), device)
    meta = {"params": man["params"], "seed": man["seed"], "library": man["library"],
            "source": man["source"]["description"], "corruption_dir": str(corruption_dir), "n": man["n"],
            "settings": {"img_size": img_size, "batch_size": batch_size, "crop_pct": crop_pct,
                         "mean": [float(v) for v in mean], "std": [float(v) for v in std]}}
    return _summarise(parts, clean_metrics, meta)


def evaluate_corruption_folders(
    model: nn.Module,
    root: str | Path,
    train_classes: Sequence[str] | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    clean_dir: str | Path | None = None,
    corruptions: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    in_chans: int = 3,
    crop_pct: float = 1.0,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate on a published-layout tree ``root/<corruption>/<severity>/<class>/<image>`` (ImageNet-C).

    Class folders are matched to ``train_classes`` by name (ImageNet wnids) or read as indices.
    ``clean_dir`` (an ImageFolder of the clean test set) adds ``clean`` metrics. Same result
    keys as ``evaluate_corruptions``, with ``params`` = ``"folders"``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"corruption folder {root} does not exist; expected {root}/<corruption>/<severity>/<class>/")
    names = [c for c in ALL_CORRUPTIONS if (root / c).is_dir() and (corruptions is None or c in corruptions)]
    if not names:
        raise ValueError(f"{root} has no corruption sub-folders named like {ALL_CORRUPTIONS[0]!r}")
    common = {"mean": mean, "std": std, "img_size": img_size, "batch_size": batch_size, "device": device,
              "in_chans": in_chans, "crop_pct": crop_pct, "workers": workers, "progress": False}
    parts: dict[str, dict[int, dict[str, Any]]] = {}
    todo = [(c, s) for c in names for s in range(1, N_SEVERITIES + 1) if (root / c / str(s)).is_dir()]
    if not todo:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(f"the corruption folders of {root} ({shown}) have no severity sub-folders "
                         f"1..{N_SEVERITIES}; expected {root}/<corruption>/<severity>/<class>/<image>")
    for c, s in tqdm(todo, desc="corruptions", unit="part", disable=not progress):
        res = evaluate_folder(model, root / c / str(s), train_classes, **common)
        parts.setdefault(c, {})[s] = {k: res[k] for k in ("top1", "top5", "ece", "nll", "n")}
    clean_metrics = None
    if clean_dir is not None:
        res = evaluate_folder(model, clean_dir, train_classes, **common)
        clean_metrics = {k: res[k] for k in ("top1", "top5", "ece", "nll", "n")}
    n = next(iter(next(iter(parts.values())).values()))["n"]
    meta = {"params": "folders", "seed": None, "library": None, "source": str(root), "corruption_dir": str(root),
            "n": n, "settings": {"img_size": img_size, "batch_size": batch_size, "crop_pct": crop_pct,
                                 "mean": [float(v) for v in mean], "std": [float(v) for v in std]}}
    return _summarise(parts, clean_metrics, meta)


# ---------------------------------------------------------------- mCE

def errors_from_results(results: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """``{corruption: {severity: top-1 error}}`` from an ``evaluate_corruptions`` result."""
    if "accuracy" not in results:
        raise ValueError("results lack 'accuracy'; pass the dict returned by evaluate_corruptions")
    return {c: {int(s): 1 - a for s, a in v.items()} for c, v in results["accuracy"].items()}


def _sum_count(entry: float | Mapping[Any, float], corruption: str, what: str) -> tuple[float, int, set[int] | None]:
    """(sum of errors, number of severities, severities or None for a pre-averaged float)."""
    if isinstance(entry, Mapping):
        errs = {int(s): float(e) for s, e in entry.items()}
        if not errs:
            raise ValueError(f"{what}[{corruption!r}] has no severities")
    else:
        errs = {0: float(entry)}
    bad = [e for e in errs.values() if not 0 <= e <= 1]
    if bad:
        raise ValueError(f"{what}[{corruption!r}] has error {bad[0]} outside [0, 1]; give fractions, not percent")
    if isinstance(entry, Mapping):
        return sum(errs.values()), len(errs), set(errs)
    return errs[0] * N_SEVERITIES, N_SEVERITIES, None  # an average over the 5 standard severities


def mce(
    run_errors: ErrorTable,
    baseline_errors: ErrorTable | str,
    clean_err: float | None = None,
    baseline_clean_err: float | None = None,
) -> dict[str, Any]:
    """mCE and relative mCE of a run against a baseline (Hendrycks & Dietterich, 2019).

    ``run_errors`` / ``baseline_errors``: ``{corruption: {severity: error}}`` or
    ``{corruption: error averaged over the 5 severities}``, errors as fractions;
    ``baseline_errors="alexnet"`` uses AlexNet's published ImageNet-C errors (and its clean error
    when ``baseline_clean_err`` is None). Both tables must cover the same severities per
    corruption. Corruptions missing from the baseline are listed in ``skipped``; baseline ones the
    run lacks in ``missing`` (then mCE is not comparable with the published one). Results are
    ratios (1.0 = as bad as the baseline; x100 for the usual percent); relative values need both
    clean errors and are None otherwise.
    """
    name = "custom"
    if isinstance(baseline_errors, str):
        if baseline_errors.lower() != "alexnet":
            raise ValueError(f"unknown built-in baseline {baseline_errors!r}; use 'alexnet' or pass an error table")
        name, baseline_errors = "alexnet", ALEXNET_ERRORS
        if baseline_clean_err is None:
            baseline_clean_err = ALEXNET_CLEAN_ERROR
    if not run_errors:
        raise ValueError("run_errors is empty; pass {corruption: {severity: error}}")
    for what, v in (("clean_err", clean_err), ("baseline_clean_err", baseline_clean_err)):
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"{what} must be a fraction in [0, 1], got {v}")
    used = [c for c in run_errors if c in baseline_errors]
    if not used:
        raise ValueError("the run and the baseline share no corruption names; check the names")
    ce: dict[str, float] = {}
    rel: dict[str, float] = {}
    relative = clean_err is not None and baseline_clean_err is not None
    for c in used:
        r_sum, r_n, r_sev = _sum_count(run_errors[c], c, "run_errors")
        b_sum, b_n, b_sev = _sum_count(baseline_errors[c], c, "baseline_errors")
        if r_sev is not None and b_sev is not None and r_sev != b_sev:
            raise ValueError(f"{c}: the run has severities {sorted(r_sev)} but the baseline {sorted(b_sev)}; "
                             "compare the same severities")
        if r_n != b_n:
            raise ValueError(f"{c}: the baseline is an average over {b_n} severities but the run has {r_n}; "
                             "evaluate all 5 severities")
        if b_sum <= 0:
            raise ValueError(f"{c}: the baseline's errors sum to 0, so CE is undefined; choose another baseline")
        ce[c] = r_sum / b_sum
        if relative:
            denom = b_sum - b_n * baseline_clean_err
            rel[c] = (r_sum - r_n * clean_err) / denom if denom != 0 else float("nan")
    out: dict[str, Any] = {
        "mCE": sum(ce.values()) / len(ce),
        "CE": ce,
        "relative_mCE": sum(rel.values()) / len(rel) if relative else None,
        "relative_CE": rel if relative else None,
        "baseline": name,
        "corruptions": used,
        "skipped": [c for c in run_errors if c not in baseline_errors],
        "missing": [c for c in baseline_errors if c not in run_errors],
        "clean_err": clean_err,
        "baseline_clean_err": baseline_clean_err,
    }
    return out


def _clean_err(results: Mapping[str, Any]) -> float | None:
    clean = results.get("clean")
    return None if not clean else 1 - clean["top1"]


def mce_from_results(results: Mapping[str, Any], baseline: Mapping[str, Any] | str = "alexnet") -> dict[str, Any]:
    """``mce`` between two ``evaluate_corruptions`` results (or a result and ``"alexnet"``).

    Uses the standard corruptions only, and the clean errors when both results have them.
    """
    run = {c: e for c, e in errors_from_results(results).items() if c in STANDARD}
    if isinstance(baseline, str):
        if baseline.lower() == "alexnet" and results.get("params") == "cifar-c":
            raise ValueError("AlexNet's errors are for ImageNet-C; for a CIFAR-C set pass a baseline run's results")
        out = mce(run, baseline, _clean_err(results))
    else:
        base = {c: e for c, e in errors_from_results(baseline).items() if c in STANDARD}
        if baseline.get("params") != results.get("params"):
            raise ValueError(f"the run was evaluated on a {results.get('params')!r} set but the baseline on "
                             f"{baseline.get('params')!r}; compare runs on the same set")
        clean_b = _clean_err(baseline)
        out = mce(run, base, _clean_err(results) if clean_b is not None else None, clean_b)
    out["params"] = results.get("params")
    return out


# ---------------------------------------------------------------- tables and figures

def _as_runs(runs: Runs) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(runs, Mapping):
        return [("run", runs)]
    out = list(runs)
    if not out or not all(isinstance(r, tuple) and len(r) == 2 for r in out):
        raise ValueError("pass one results dict or a non-empty list of (label, results) pairs")
    return out


def corruption_errors_table(runs: Runs, baseline: Mapping[str, Any] | str | None = None) -> str:
    """Text table, one row per run: clean error, mean corruption accuracy, mCE, error per corruption (%).

    ``baseline``: a results dict or ``"alexnet"`` to add mCE / relative mCE columns.
    """
    runs = _as_runs(runs)
    names = [c for c in ALL_CORRUPTIONS if any(c in r["corruption_error"] for _, r in runs)]
    width = max(8, *(len(label) for label, _ in runs))
    head = f"{'run':<{width}} {'clean':>6} {'mCA':>6}"
    if baseline is not None:
        head += f" {'mCE':>6} {'relCE':>6}"
    head += "".join(f" {_ABBREV[c]:>6}" for c in names)
    lines = [head]
    for label, r in runs:
        clean = _clean_err(r)
        row = f"{label:<{width}} {'' if clean is None else f'{100 * clean:.1f}':>6}"
        row += f" {100 * r['mean_corruption_accuracy']:>6.1f}"
        if baseline is not None:
            m = mce_from_results(r, baseline)
            rel = m["relative_mCE"]
            row += f" {100 * m['mCE']:>6.1f} {'' if rel is None else f'{100 * rel:.1f}':>6}"
        row += "".join(f" {100 * r['corruption_error'][c]:>6.1f}" if c in r["corruption_error"] else f" {'':>6}"
                       for c in names)
        lines.append(row)
    params = sorted({str(r.get("params")) for _, r in runs})
    note = f"errors in % (top-1), mCA = mean corruption accuracy %, set: {', '.join(params)}"
    if baseline is not None:
        note += ", mCE vs " + (baseline if isinstance(baseline, str) else "the given baseline run")
    return "\n".join(lines + [note])


def severity_table(results: Mapping[str, Any]) -> str:
    """Text table of one run's top-1 accuracy (%): corruptions as rows, severities as columns."""
    sev = [str(s) for s in results["severities"]]
    lines = [f"{'corruption':<18}" + "".join(f" {'s' + s:>6}" for s in sev) + f" {'mean':>6}"]
    for c in results["corruptions"]:
        acc = results["accuracy"][c]
        lines.append(f"{c:<18}" + "".join(f" {100 * acc[s]:>6.1f}" if s in acc else f" {'':>6}" for s in sev)
                     + f" {100 * results['corruption_accuracy'][c]:>6.1f}")
    if results.get("clean"):
        lines.append(f"{'clean':<18} {100 * results['clean']['top1']:>6.1f}")
    lines.append(f"mean corruption accuracy {100 * results['mean_corruption_accuracy']:.1f}% ({results.get('params')})")
    return "\n".join(lines)


def heatmap(runs: Runs, out_path: str | Path) -> Path:
    """PNG: corruption x severity top-1 accuracy (%) per run, side by side, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = _as_runs(runs)
    names = [c for c in ALL_CORRUPTIONS if any(c in r["accuracy"] for _, r in runs)]
    sev = sorted({int(s) for _, r in runs for s in r["severities"]})
    fig, axes = plt.subplots(1, len(runs), figsize=(1.0 + 0.55 * len(sev) * len(runs) + 1.4 * len(runs),
                                                    0.8 + 0.32 * len(names)), squeeze=False)
    im = None
    for ax, (label, r) in zip(axes[0], runs):
        grid = np.full((len(names), len(sev)), np.nan)
        for i, c in enumerate(names):
            for j, s in enumerate(sev):
                if str(s) in r["accuracy"].get(c, {}):
                    grid[i, j] = 100 * r["accuracy"][c][str(s)]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i in range(len(names)):
            for j in range(len(sev)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < 50 else "black")
        ax.set_xticks(range(len(sev)), [str(s) for s in sev], fontsize=7)
        ax.set_yticks(range(len(names)), names if ax is axes[0, 0] else [""] * len(names), fontsize=7)
        ax.set_xlabel("severity", fontsize=7)
        ax.set_title(f"{label}\nmCA {100 * r['mean_corruption_accuracy']:.1f}% ({r.get('params')})", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="top-1 accuracy (%)", shrink=0.8)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
