"""The report's own figures, drawn from run folders: training curves, lambda_max per cell,
SAM's gain against training-set size, curvature over training, sparsity per block.

Each function takes the per-cell rows of ``study.tables.collect`` (plus the study folder) and
writes one PNG, returning its path, or None when the folders hold nothing to draw.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import read_jsonl, save_figure  # noqa: E402
from ..runfiles import read_run_file  # noqa: E402

COLORS = {"vanilla": "tab:blue", "sam": "tab:red", "aug": "tab:green", "sam-aug": "tab:purple",
          "looksam": "tab:orange", "sam-on": "tab:brown", "random": "tab:pink"}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _result(study_dir: Path, row: dict[str, Any], analysis: str) -> dict[str, Any] | None:
    """A cell's saved result of one analysis (None when it has none)."""
    path = study_dir / row["name"] / "analysis.json"
    if not path.exists():
        return None
    return read_run_file(path, "analysis").get(analysis, {}).get("result")


def _families(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({r["family"] for r in rows})


def training_curves(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and test accuracy against epochs, one panel pair per family."""
    fams = _families(rows)
    if not fams:
        return None
    fig, axes = plt.subplots(2, len(fams), figsize=(3.6 * len(fams), 5.2), squeeze=False)
    drawn = False
    for j, fam in enumerate(fams):
        for r in rows:
            if r["family"] != fam or r.get("fraction", 1.0) != max(
                    x.get("fraction", 1.0) for x in rows if x["family"] == fam):
                continue
            log = study_dir / r["name"] / "metrics.jsonl"
            if not log.exists():
                continue
            recs = [x for x in read_jsonl(log) if isinstance(x, dict) and "epoch" in x]
            tr = [(x["epoch"], x["loss"]) for x in recs if "loss" in x]
            te = [(x["epoch"], 100 * x["test_acc"]) for x in recs if "test_acc" in x]
            style = dict(color=COLORS.get(r["method"], "k"), alpha=0.8, lw=1.2,
                         label=f"{r['method']} s{r['seed']}")
            if tr:
                axes[0, j].plot(*zip(*tr), **style)
                drawn = True
            if te:
                axes[1, j].plot(*zip(*te), marker=".", **style)
        axes[0, j].set_title(fam)
        axes[0, j].set_ylabel("training loss")
        axes[1, j].set_ylabel("test accuracy %")
        axes[1, j].set_xlabel("epoch")
        axes[0, j].legend(fontsize=7)
    return _save(fig, path) if drawn else (plt.close(fig) or None)


def lambda_bars(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """lambda_max per cell on clean and augmented batches (log scale), with the batch loss."""
    cells = [r for r in rows if "lambda_max" in r]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(cells) + 1.5), 3.6))
    xs = range(len(cells))
    ax.bar([x - 0.2 for x in xs], [max(r["lambda_max"], 1e-6) for r in cells], width=0.4,
           color=[COLORS.get(r["method"], "grey") for r in cells], label="clean batches")
    aug = [max(r.get("lambda_max_aug", 0.0), 1e-6) for r in cells]
    ax.bar([x + 0.2 for x in xs], aug, width=0.4, color="lightgrey", edgecolor="k",
           label="augmented batches")
    for x, r in zip(xs, cells):
        if "lambda_max_loss" in r:
            ax.annotate(f"L={r['lambda_max_loss']:.2f}", (x - 0.2, r["lambda_max"]), fontsize=6,
                        ha="center", va="bottom", rotation=90)
    ax.set_xticks(list(xs), [r["name"] for r in cells], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("Hessian lambda_max")
    ax.legend(fontsize=7)
    return _save(fig, path)


def gain_vs_size(agg: Sequence[dict[str, Any]], path: Path, col: str = "test_acc") -> Path | None:
    """SAM's accuracy gain over vanilla (and SAM+AUG over AUG) against the training fraction."""
    index = {(r["family"], r["method"], r["fraction"]): r for r in agg}
    fracs = sorted({r["fraction"] for r in agg})
    if len(fracs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    drawn = False
    for fam in sorted({r["family"] for r in agg}):
        for meth, base, ls in (("sam", "vanilla", "-"), ("sam-aug", "aug", "--")):
            pts = []
            for fr in fracs:
                a, b = index.get((fam, meth, fr)), index.get((fam, base, fr))
                if a and b and col in a and col in b:
                    spread = a[col]["std"] + b[col]["std"]
                    pts.append((fr, a[col]["mean"] - b[col]["mean"], spread))
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, ls=ls, marker="o", capsize=3,
                            label=f"{fam}: {meth} - {base}")
                drawn = True
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xticks(fracs, [f"{f:g}" for f in fracs])
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("accuracy gain (points)")
    ax.legend(fontsize=7)
    return _save(fig, path) if drawn else (plt.close(fig) or None)


def sharpness_curves(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """lambda_max at every checkpoint (top) and SAM's logged sharpness (bottom) against steps."""
    runs = [(r, study_dir / r["name"] / "sharpness.json") for r in rows]
    runs = [(r, read_run_file(p, "sharpness")) for r, p in runs if p.exists()]
    if not runs:
        return None
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(5.6, 6.0), sharex=True)
    for r, s in runs:
        pts = s["checkpoints"]
        style = dict(color=COLORS.get(r["method"], "k"),
                     ls="-" if r["family"] == "vit" else ":", marker="o", ms=3)
        if pts:
            a1.plot([p["step"] for p in pts], [p["lambda_max"] for p in pts],
                    label=f"{r['family']} {r['method']} s{r['seed']}", **style)
        if s["logged"]:
            a2.plot([p["step"] for p in s["logged"]], [p["sharpness"] for p in s["logged"]],
                    label=f"{r['family']} {r['method']}", color=style["color"], ls=style["ls"])
    a1.set_yscale("log")
    a1.set_ylabel("Hessian lambda_max")
    a1.legend(fontsize=7)
    a2.set_ylabel("SAM sharpness (L(w+e) - L(w))")
    a2.set_xlabel("training step")
    return _save(fig, path)


def sparsity_per_block(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Mean active MLP units per image, per block, one line per cell."""
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    drawn = False
    for r in rows:
        layers = (_result(study_dir, r, "sparsity") or {}).get("layers")
        if not layers:
            continue
        for kind in sorted({v["kind"] for v in layers.values()}):
            vals = [v["mean_active_pct_per_image"] for v in layers.values() if v["kind"] == kind]
            ax.plot(range(1, len(vals) + 1), vals, marker="o", color=COLORS.get(r["method"], "k"),
                    ls="-" if kind in ("mlp", "channel") else "--",
                    label=f"{r['family']} {r['method']} s{r['seed']} ({kind})")
            drawn = True
    ax.set_xlabel("block")
    ax.set_ylabel("active units per image %")
    if drawn:
        ax.legend(fontsize=6)
    return _save(fig, path) if drawn else (plt.close(fig) or None)


def corruption_matrix(labelled: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path | None:
    """Accuracy per corruption (mean over severities) for every cell: one row per cell, the
    clean and mean corruption accuracy in the first two columns."""
    import numpy as np

    if not labelled:
        return None
    names = list(labelled[0][1]["corruption_accuracy"])
    rows = []
    for _, r in labelled:
        clean = (r.get("clean") or {}).get("top1", float("nan"))
        rows.append([clean, r["mean_corruption_accuracy"],
                     *[r["corruption_accuracy"].get(c, float("nan")) for c in names]])
    data = 100 * np.array(rows, dtype=float)
    cols = ["clean", "mean", *names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(cols), 1.0 + 0.32 * len(labelled)))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0, vmax=max(1.0, np.nanmax(data)))
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=6,
                    color="w" if data[i, j] < 0.6 * np.nanmax(data) else "k")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labelled)), [lab for lab, _ in labelled], fontsize=7)
    ax.axvline(1.5, color="w", lw=1.5)
    fig.colorbar(im, ax=ax, label="accuracy %", fraction=0.03)
    return _save(fig, path)


def attention_entropy(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Class-token attention entropy per block, one line per cell (lower: more focused)."""
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    top = None
    for r in rows:
        res = _result(study_dir, r, "attention")
        if not res or res.get("supported", True) is False or not res.get("entropy_per_block"):
            continue
        ent = res["entropy_per_block"]
        top = res.get("max_entropy", top)
        ax.plot(range(1, len(ent) + 1), ent, marker="o", color=COLORS.get(r["method"], "k"),
                label=f"{r['family']} {r['method']} s{r['seed']}")
    if top is None:
        plt.close(fig)
        return None
    ax.axhline(top, color="grey", ls=":", lw=1, label="uniform")
    ax.set_xlabel("block")
    ax.set_ylabel("class-token attention entropy (nats)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _labelled(study_dir: Path, rows: Sequence[dict[str, Any]], analysis: str
              ) -> list[tuple[str, dict[str, Any]]]:
    """(``method s<seed>``, saved result) of each cell that has ``analysis`` and supports it."""
    out = []
    for r in rows:
        res = _result(study_dir, r, analysis)
        if res and res.get("supported", True) is not False:
            out.append((f"{r['method']} s{r['seed']}", res))
    return out


def blocks_bars(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The per-block Hessian bar chart of the cells (one family) that measured it."""
    from ..analysis.hessian.blocks import plot_per_block

    runs = [(lab, r["per_block"]["blocks"]) for lab, r in _labelled(study_dir, rows, "hessian")
            if "per_block" in r]
    return _save(plot_per_block(runs), path) if runs else None


def trajectories(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The trajectory figure of the cells (one family) that have one, side by side."""
    from ..analysis import trajectory

    runs = _labelled(study_dir, rows, "trajectory")
    if not runs:
        return None
    return _save(trajectory.plot_trajectories(runs), path)


def memorisation_curves(study_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Per family: the share of noisy training labels memorised (solid) and of noisy samples
    still classified correctly (dashed) against epochs, from the runs' evaluation logs."""
    fams = [f for f in _families(rows) if any(r["family"] == f and "noisy_memorised" in r
                                              for r in rows)]
    if not fams:
        return None
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for r in rows:
            log = study_dir / r["name"] / "metrics.jsonl"
            if r["family"] != fam or not log.exists():
                continue
            recs = [x for x in read_jsonl(log) if isinstance(x, dict) and "noisy_memorised" in x]
            ep = [x["epoch"] for x in recs]
            c = COLORS.get(r["method"], "k")
            ax.plot(ep, [100 * x["noisy_memorised"] for x in recs], color=c,
                    label=f"{r['method']} s{r['seed']}: memorised")
            ax.plot(ep, [100 * x["noisy_true"] for x in recs], color=c, ls="--",
                    label=f"{r['method']} s{r['seed']}: true class")
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(-3, 103)
    axes[0, 0].set_ylabel("% of the noisy training samples")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)
