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
A ratio whose denominator is zero (within float rounding of the error sums, ``RATIO_TOLERANCE``)
or, for relative CE, negative (the baseline does better on corrupted images than on clean ones)
is undefined: it is reported as None with its reason under ``undefined`` and left out of the
mean, never printed as a huge number.
The baseline is any run the user chooses, or AlexNet's published ImageNet-C errors
(meaningful only for the real ImageNet-C, not for sets regenerated from other images).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.corruptions import (
    ALL_CORRUPTIONS,
    STANDARD,
    iter_corruption_set,
    load_clean_set,
    load_corruption_set,
)
from ..io import save_figure
from ..progress import progress_bar
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
# Errors are fractions summed over at most a few severities: a denominator within this of zero
# is zero up to float rounding (1 - 0.67 and the mean of 1 - 0.83, ..., 1 - 0.46 differ by 2e-16),
# and still far below one image's worth of error on any test set up to 10^8 images.
RATIO_TOLERANCE = 1e-9

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
    with progress_bar(total=n_parts, desc="corruptions", unit="part", disable=not progress) as bar:
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
    for c, s in progress_bar(todo, desc="corruptions", unit="part", disable=not progress):
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

    A CE whose baseline errors sum to 0, or a relative CE whose baseline is not worse under the
    corruption than clean (denominator <= ``RATIO_TOLERANCE``), is undefined: None in ``CE`` /
    ``relative_CE``, its reason in ``undefined[key][corruption]``, left out of the mean. A mean
    with nothing to average is None with its reason in ``undefined["mCE"]`` /
    ``undefined["relative_mCE"]``.
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
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    undefined: dict[str, Any] = {"CE": {}, "relative_CE": {}}
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
        ce[c] = _ratio(r_sum, b_sum, undefined["CE"], c,
                       "the baseline makes no errors under it, so CE (run error / baseline error) has a "
                       "zero denominator")
        if relative:
            denom = b_sum - b_n * baseline_clean_err
            why = ("the baseline's error under it equals its clean error, so relative CE (error increase "
                   "/ baseline's error increase) has a zero denominator" if abs(denom) <= RATIO_TOLERANCE
                   else "the baseline's error under it is below its clean error, so relative CE (error "
                   "increase / baseline's error increase) has a negative denominator")
            rel[c] = _ratio(r_sum - r_n * clean_err, denom, undefined["relative_CE"], c, why)
    out: dict[str, Any] = {
        "mCE": _mean(ce, undefined, "mCE", "no corruption has a defined CE"),
        "CE": ce,
        "relative_mCE": (_mean(rel, undefined, "relative_mCE", "no corruption has a defined relative CE")
                         if relative else None),
        "relative_CE": rel if relative else None,
        "baseline": name,
        "corruptions": used,
        "skipped": [c for c in run_errors if c not in baseline_errors],
        "missing": [c for c in baseline_errors if c not in run_errors],
        "clean_err": clean_err,
        "baseline_clean_err": baseline_clean_err,
        "undefined": undefined,
    }
    if not relative:
        undefined["relative_mCE"] = "relative mCE needs the clean error of both the run and the baseline"
    return out


def _ratio(num: float, denom: float, undefined: dict[str, str], key: str, why: str) -> float | None:
    """num / denom, or None (with ``why`` recorded under ``key``) when denom <= RATIO_TOLERANCE."""
    if denom <= RATIO_TOLERANCE:
        undefined[key] = why
        return None
    return num / denom


def _mean(values: Mapping[str, float | None], undefined: dict[str, Any], key: str, why: str) -> float | None:
    defined = [v for v in values.values() if v is not None]
    if not defined:
        undefined[key] = why
        return None
    return sum(defined) / len(defined)


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

    ``baseline``: a results dict or ``"alexnet"`` to add mCE / relative mCE columns. An
    undefined value prints as ``n/a``, and a note under the table gives each one's reason.
    """
    runs = _as_runs(runs)
    names = [c for c in ALL_CORRUPTIONS if any(c in r["corruption_error"] for _, r in runs)]
    width = max(8, *(len(label) for label, _ in runs))
    head = f"{'run':<{width}} {'clean':>6} {'mCA':>6}"
    if baseline is not None:
        head += f" {'mCE':>6} {'relCE':>6}"
    head += "".join(f" {_ABBREV[c]:>6}" for c in names)
    lines, notes = [head], []
    for label, r in runs:
        clean = _clean_err(r)
        row = f"{label:<{width}} {_pct(clean, ''):>6} {_pct(r['mean_corruption_accuracy']):>6}"
        if baseline is not None:
            m = mce_from_results(r, baseline)
            row += f" {_pct(m['mCE']):>6} {_pct(m['relative_mCE'], 'n/a' if clean is not None else ''):>6}"
            notes += _undefined_notes(label, m)
        row += "".join(f" {100 * r['corruption_error'][c]:>6.1f}" if c in r["corruption_error"] else f" {'':>6}"
                       for c in names)
        lines.append(row)
    params = sorted({str(r.get("params")) for _, r in runs})
    note = f"errors in % (top-1), mCA = mean corruption accuracy %, set: {', '.join(params)}"
    if baseline is not None:
        note += ", mCE vs " + (baseline if isinstance(baseline, str) else "the given baseline run")
    return "\n".join(lines + [note] + notes)


def _pct(v: float | None, missing: str = "n/a") -> str:
    return missing if v is None else f"{100 * v:.1f}"


def _undefined_notes(label: str, m: Mapping[str, Any]) -> list[str]:
    """One line per undefined CE / relative CE of a run: left out of its mean, and why."""
    out = []
    for key, what, mean in (("CE", "CE", "mCE"), ("relative_CE", "relative CE", "relative mCE")):
        for c, why in m.get("undefined", {}).get(key, {}).items():
            out.append(f"{label}: {what} for {c} undefined ({why}); left out of {mean}")
    return out


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
    mca = _pct(results["mean_corruption_accuracy"])
    lines.append(f"mean corruption accuracy {mca}% ({results.get('params')})")
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
        ax.set_title(f"{label}\nmCA {_pct(r['mean_corruption_accuracy'])}% ({r.get('params')})", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="top-1 accuracy (%)", shrink=0.8)
    return save_figure(fig, out_path, dpi=110, bbox_inches="tight")
