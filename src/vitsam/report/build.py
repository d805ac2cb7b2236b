"""``build_report``: a study folder (or run folders) -> ``report.html`` + ``report.md`` + CSV.

It reads run folders and study records and nothing else: every number comes from a file a run
or a study stage wrote. The HTML embeds its figures as data URIs; the Markdown twin holds the
same tables and links the same PNGs (saved under ``figures/``).
"""
from __future__ import annotations

import base64
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ..io import DamagedFileError, atomic_write_bytes
from ..runfiles import read_run_file
from ..study import tables
from . import figures
from .template import HTML


@dataclass
class Figure:
    """A PNG with its title and a caption naming its settings and the command that made it."""

    title: str
    path: Path
    caption: str


def _records(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, study record) pairs: each study-*.json of a study folder, or one synthetic record
    for a set of run folders."""
    out = []
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{d} is not a folder; give a study folder or run folders")
        order = ["main", "augment", "inside", "sharpness", "geometry", "noise", "sam-variants",
                 "adversarial"]
        studies = sorted(d.glob("study-*.json"),
                         key=lambda p: (order.index(p.stem[6:]) if p.stem[6:] in order else 99, p.stem))
        if studies:
            for p in studies:
                rec = read_run_file(p, "study")
                unknown = [c for c in rec["columns"] if c not in tables.COLUMNS]
                if unknown:
                    raise DamagedFileError(f"{p} names unknown table columns ({', '.join(unknown[:3])}); "
                                           "it is damaged or from another version: run the study again")
                out.append((d, rec))
        elif (d / "final.json").exists():
            runs.append(d)
        else:
            raise ValueError(f"{d} holds neither a study (study-*.json) nor a finished run "
                             "(final.json); give a study folder or run folders")
    if runs:
        out.append(_runs_record(runs))
    return out


def _runs_record(runs: list[Path]) -> tuple[Path, dict[str, Any]]:
    """A study record for loose run folders (family, method and seed from each config)."""
    from ..models import MODELS

    parent = runs[0].parent
    grid, cells = [], {}
    for r in runs:
        cfg = read_run_file(r / "config.json", "config")
        name = cfg["model"]["name"]
        fam = MODELS[name].family if name in MODELS else name
        sam = cfg["optim"].get("sam", False)
        aug = cfg["data"].get("augment") == "strong"
        method = {(False, False): "vanilla", (True, False): "sam", (False, True): "aug",
                  (True, True): "sam-aug"}[(bool(sam), aug)]
        variant = cfg["optim"].get("sam_variant", "full")
        if sam and variant != "full":  # a cheaper SAM (vitsam.optim.variants) by its own name
            method = variant + ("-aug" if aug else "")
        rel = r.resolve().relative_to(parent.resolve()) if r.resolve().is_relative_to(
            parent.resolve()) else r.resolve()
        grid.append({"name": str(rel), "family": fam, "method": method,
                     "seed": cfg["train"].get("seed", 0),
                     "fraction": cfg["data"].get("train_fraction", 1.0)})
        cells[str(rel)] = {"status": "done"}
    cols = ["params", "lambda_max", "ntk_kappa_init", "test_acc", "train_acc", "corrupt_acc",
            "train_images_per_s", "active_pct", "attention_entropy"]
    return parent, {"study": "runs", "description": f"{len(runs)} run folders", "scale": "-",
                    "seeds": sorted({g["seed"] for g in grid}), "grid": grid, "cells": cells,
                    "columns": cols, "command": None}


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _study_view(folder: Path, rec: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """The template's view of one study: formatted cells, best marks, significance marks."""
    cols = [c for c in t["columns"] if any(c in r for r in t["agg"])] or list(t["columns"])
    with_frac = len({r["fraction"] for r in t["agg"]}) > 1
    bests = {c: tables.best(t["agg"], c) for c in cols}
    rows = [{"label": tables.row_label(r, with_frac),
             "cells": [{"text": tables.fmt_cell(r.get(c), c),
                        "best": i in bests[c] and len(t["agg"]) > 1} for c in cols]}
            for i, r in enumerate(t["agg"])]
    diffs = [{"label": tables.row_label(d, with_frac),
              "cells": [{"text": tables.fmt_diff(d.get(c), c),
                         "sig": bool(d.get(c, {}).get("significant"))} for c in cols]}
             for d in t["diffs"]]
    failed = [n for n, e in rec["cells"].items() if e.get("status") == "failed"]
    wall = rec.get("wall_time_s")
    return {"name": rec["study"], "description": rec["description"], "scale": rec["scale"],
            "seeds": ", ".join(str(s) for s in rec["seeds"]), "n_cells": len(rec["grid"]),
            "command": rec.get("command"), "failed": ", ".join(failed),
            "wall": f"{wall / 60:.1f} min" if wall else None,
            "scale_notes": rec.get("scale_notes", ""),
            "headers": [tables.COLUMNS[c][0] for c in cols], "columns": cols,
            "rows": rows, "diffs": diffs,
            "note": (f"Matched loss L* = {t['matched_loss']:.4f}: the lowest training-batch loss "
                     "that every cell reaches at one of its checkpoints."
                     if t.get("matched_loss") is not None else "")}


def _figures(folder: Path, rec: dict[str, Any], t: dict[str, Any], fig_dir: Path) -> list[Figure]:
    """The report's figures for one study, drawn from its cells' folders."""
    name, cmd = rec["study"], rec.get("command") or f"vitsam report {folder}"
    rows = [r for r in t["rows"] if (folder / r["name"]).is_dir()]
    made: list[Figure] = []
    # A study folder can hold several studies' stages on shared cells: each study shows the
    # figures of its own stages (loose run folders show everything they have).
    stages = set(rec.get("stages") or ["hessian", "sparsity", "attention", "landscape",
                                       "corruptions", "sharpness", "blocks", "trajectory"])

    def add(title: str, path: Path | None, caption: str) -> None:
        if path is not None and path.exists():
            made.append(Figure(title, path, f"{caption} Made by: {cmd}"))

    add(f"{name}: training curves", figures.training_curves(
        folder, rows, fig_dir / f"{name}_training.png"),
        "Training loss (logged per interval) and test accuracy against epochs.")
    add(f"{name}: Hessian lambda_max per cell", "hessian" in stages and figures.lambda_bars(
        rows, fig_dir / f"{name}_lambda_max.png") or None,
        "Dominant Hessian eigenvalue of the training cross-entropy on clean training batches "
        "(coloured) and on crop + flip augmented ones (grey); L = loss on the clean batches. "
        f"Settings: {' '.join(_hessian_settings(folder, rows))}.")
    add(f"{name}: SAM's gain against training-set size", figures.gain_vs_size(
        t["agg"], fig_dir / f"{name}_gain_vs_size.png"),
        "Test-accuracy difference SAM - vanilla (solid) and SAM+AUG - AUG (dashed); error bars "
        "are the sum of the two spreads over seeds.")
    add(f"{name}: curvature over training", "sharpness" in stages and figures.sharpness_curves(
        folder, rows, fig_dir / f"{name}_sharpness.png") or None,
        "lambda_max at every saved checkpoint (top) and SAM's logged sharpness "
        "L(w + eps) - L(w) (bottom) against optimiser steps.")
    add(f"{name}: active MLP units per block", "sparsity" in stages and figures.sparsity_per_block(
        folder, rows, fig_dir / f"{name}_sparsity.png") or None,
        "Mean share of MLP hidden units active (> 0 after the activation) per image, per block.")
    add(f"{name}: class-token attention entropy per block", "attention" in stages and
        figures.attention_entropy(folder, rows, fig_dir / f"{name}_attention_entropy.png") or None,
        "Entropy of the class token's attention over patches, averaged over heads and images, per "
        "block; the dotted line is uniform attention.")
    add(f"{name}: memorisation of the noisy labels", figures.memorisation_curves(
        folder, rows, fig_dir / f"{name}_memorisation.png"),
        "Share of the training samples with a replaced label that the model predicts with that "
        "wrong label (solid: memorised) and with their true class (dashed), at every evaluation.")
    for fam in sorted({r["family"] for r in rows}):
        fam_rows = [r for r in rows if r["family"] == fam]
        add(f"{name}: Hessian per block, {fam}", "blocks" in stages and figures.blocks_bars(
            folder, fam_rows, fig_dir / f"{name}_blocks_{fam}.png") or None,
            "lambda_max (and trace, with its standard error) of the training loss's Hessian "
            "restricted to each block's parameters, every cell side by side (symlog axis).")
        add(f"{name}: training trajectory, {fam}", "trajectory" in stages and
            figures.trajectories(folder, fam_rows, fig_dir / f"{name}_trajectory_{fam}.png")
            or None,
            "The checkpoints (labelled with their step) projected on the top-2 principal "
            "directions of their differences from the final weights, over the training loss "
            "on that plane; the axes give each direction's share of the path.")
    made += _plugin_figures(folder, rows, fig_dir, name, cmd, stages)
    return made


def _hessian_settings(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    for r in rows:
        p = folder / r["name"] / "analysis.json"
        if p.exists():
            h = read_run_file(p, "analysis").get("hessian")
            if h:
                s = h.get("settings", {})
                return [f"k={s.get('k')}", f"tol={s.get('tol')}", f"method={s.get('method')}",
                        f"samples={h.get('samples')}"]
    return []


def _plugin_figures(folder: Path, rows: list[dict[str, Any]], fig_dir: Path, name: str,
                    cmd: str, stages: set[str]) -> list[Figure]:
    """Comparison figures of the analysis plug-ins and the corruption heatmap, from the saved
    results of every cell that has them."""
    from ..analysis.runner import draw
    made = []
    per: dict[str, list[tuple[str, dict]]] = {}
    corr: list[tuple[str, dict]] = []
    for r in rows:
        d = folder / r["name"]
        ana = read_run_file(d / "analysis.json", "analysis") if (d / "analysis.json").exists() else {}
        for key in ("landscape", "attention"):
            res = ana.get(key, {}).get("result") if key in stages else None
            if res and res.get("supported", True) is not False:
                per.setdefault(key, []).append((r["name"], res))
        ev = read_run_file(d / "eval.json", "eval") if (d / "eval.json").exists() else {}
        if "corruptions" in ev and "corruptions" in stages:
            corr.append((r["name"], ev["corruptions"]))
    captions = {"landscape": "Filter-normalised loss along a random direction around the "
                             "trained weights (Li et al., 2018), on fixed training batches.",
                "attention": "Class-token attention: last block and rollout maps, and the "
                             "entropy per block (lower: more focused)."}
    for key, labelled in per.items():
        sub = fig_dir / f"{name}_{key}"
        try:
            paths = draw(key, labelled, sub)
        except (ValueError, KeyError, TypeError):
            # Saved results hold no images for side-by-side maps: show each seed-0 cell's own.
            paths = [folder / lab / f"attention_{kind}.png" for lab, _ in labelled
                     if lab.endswith("-s0") for kind in ("last", "rollout")]
            paths = [p for p in paths if p.exists()]
        for p in paths:
            title = p.stem.replace("_", " ") + (f" ({p.parent.name})" if p.parent != sub else "")
            made.append(Figure(f"{name}: {title}", p,
                               f"{captions[key]} Made by: {cmd}"))
    if corr:
        p = figures.corruption_matrix(corr, fig_dir / f"{name}_corruptions.png")
        made.append(Figure(f"{name}: corruption accuracy", p,
                           "Accuracy % per corruption (mean over severities), with the clean "
                           "accuracy of the same images and the mean over corruptions, on the "
                           "study's shared -C set "
                           f"({corr[0][1].get('params')} parameters, {corr[0][1].get('n')} images)."
                           f" Made by: {cmd}"))
    return made


def build_report(dirs: list[Path], out: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and ``figures/``, ``<study>.csv``)."""
    recs = _records(dirs)
    out = out or (dirs[0] if len(dirs) == 1 and list(dirs[0].glob("study-*.json")) else Path("report"))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the report")
    tabs = [tables.study_tables(folder, rec) for folder, rec in recs]  # every file read before writing
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    views, figs, md = [], [], []
    import torch

    meta = (f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} "
            f"{platform.system()}, Python {platform.python_version()}, torch {torch.__version__}. "
            "All numbers are read from the run folders listed in each table.")
    for (folder, rec), t in zip(recs, tabs):
        v = _study_view(folder, rec, t)
        views.append(v)
        atomic_write_bytes(out / f"{rec['study']}.csv", tables.to_csv(t["rows"], t["columns"]).encode())
        md += [f"## {v['name']}: {v['description']}", "",
               f"scale {v['scale']}; seeds {v['seeds']}; {v['n_cells']} cells"
               + (f"; wall time {v['wall']}" if v["wall"] else "") + ".", ""]
        if v["scale_notes"]:
            md += [v["scale_notes"][0].upper() + v["scale_notes"][1:] + ".", ""]
        if v["command"]:
            md += [f"Command: `{v['command']}`", ""]
        if v["failed"]:
            md += [f"Failed cells: {v['failed']}", ""]
        md.append(tables.to_markdown(t["agg"], t["diffs"], v["columns"]))
        if v["note"]:
            md += [v["note"], ""]
        if t["blocks_md"] and "blocks" in (rec.get("stages") or ["blocks"]):  # loose runs: all
            md += [t["blocks_md"], ""]
        figs += _figures(folder, rec, t, fig_dir)
    title = "vitsam report: " + ", ".join(v["name"] for v in views)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(HTML).render(
        title=title, meta=meta, studies=views,
        figures=[{"title": f.title, "caption": f.caption, "data": _png(f.path)} for f in figs])
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_bytes(html_path, html.encode())
    md += ["## Figures", ""]
    for f in figs:
        md += [f"### {f.title}", "", f"![{f.title}]({Path(os.path.relpath(f.path, out)).as_posix()})", "",
               f.caption, ""]
    atomic_write_bytes(md_path, ("# " + title + "\n\n" + meta + "\n\n" + "\n".join(md)).encode())
    return html_path, md_path
