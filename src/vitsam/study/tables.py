"""A study's numbers: read cell run folders, aggregate over seeds, mark significant SAM effects.

``collect`` reads only run folders (``final.json``, ``analysis.json``, ``eval.json``,
``sharpness.json``, ``transfer.json``, ``cell.json``); ``aggregate`` groups the cells of one row (family, method,
training fraction) over their seeds into mean, spread (sample standard deviation; 0 for one
seed) and count. A method-minus-baseline difference (SAM - vanilla, a cheaper SAM variant -
full SAM) is *significant* only when both sides have
at least two seeds and the difference exceeds the sum of their spreads.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..runfiles import read_run_file

# column -> (header, format, higher is better)
COLUMNS: dict[str, tuple[str, str, bool | None]] = {
    "params": ("params", "{:.2f}M", None),
    "ntk_kappa_init": ("NTK kappa at init", "{:.4g}", False),
    "lambda_max": ("Hessian lambda_max", "{:.4g}", False),
    "lambda_max_loss": ("loss at lambda_max", "{:.3f}", None),
    "lambda_max_aug": ("lambda_max (augmented)", "{:.4g}", False),
    "test_acc": ("test acc %", "{:.2f}", True),
    "train_acc": ("train acc %", "{:.2f}", None),
    "corrupt_acc": ("corruption acc %", "{:.2f}", True),
    "train_images_per_s": ("train img/s", "{:.0f}", True),
    "lambda_max_last": ("lambda_max, last checkpoint", "{:.4g}", False),
    "lambda_max_matched": ("lambda_max at matched loss", "{:.4g}", False),
    "matched_step": ("step reaching matched loss", "{:.0f}", None),
    "active_pct": ("active MLP units % (block 1)", "{:.1f}", False),
    "attention_entropy": ("class-token entropy (nats)", "{:.3f}", False),
    "noisy_memorised": ("noisy labels memorised %", "{:.1f}", False),
    "noisy_true": ("noisy samples, true class %", "{:.1f}", True),
    "block_lambda_max": ("largest block lambda_max", "{:.4g}", False),
    "trajectory_explained": ("path on top-2 PCs %", "{:.1f}", None),
    "transfer_acc": ("transfer test acc %", "{:.2f}", True),
    "transfer_train_acc": ("transfer train acc %", "{:.2f}", None),
    "probe_acc": ("linear-probe acc %", "{:.2f}", True),
    "knn_acc": ("kNN acc %", "{:.2f}", True),
    "probe_train_acc": ("probe train acc %", "{:.2f}", None),
    "contrastive_loss": ("NT-Xent loss (last log)", "{:.3f}", None),
    "robust_acc": ("PGD robust acc %", "{:.2f}", True),
    "robust_clean_acc": ("clean acc, attacked images %", "{:.2f}", True),
    "adv_train_acc": ("adversarial train acc %", "{:.2f}", None),
}
# method -> the method its difference row compares it with
BASELINES = {"sam": "vanilla", "sam-aug": "aug", "looksam": "sam", "sam-on": "sam", "random": "sam",
             "simclr-sam": "simclr", "sam-at": "at"}
SCALE = {"params": 1e-6, "test_acc": 100.0, "train_acc": 100.0, "corrupt_acc": 100.0,
         "trajectory_explained": 100.0, "noisy_memorised": 100.0, "noisy_true": 100.0,
         "transfer_acc": 100.0, "transfer_train_acc": 100.0,
         "probe_acc": 100.0, "knn_acc": 100.0, "probe_train_acc": 100.0,
         "robust_acc": 100.0, "robust_clean_acc": 100.0, "adv_train_acc": 100.0}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _load(path: Path, kind: str) -> dict[str, Any]:
    """A run file's checked content ({} when absent); a damaged one is a one-line error naming it."""
    return read_run_file(path, kind) if path.exists() else {}


def cell_values(run_dir: Path) -> dict[str, Any]:
    """Every table value one run folder holds (missing ones are left out)."""
    final, ana, ev = (_load(run_dir / f"{n}.json", k) for n, k in
                      (("final", "final"), ("analysis", "analysis"), ("eval", "eval")))
    v: dict[str, Any] = {
        "params": final.get("params"),
        "test_acc": final.get("test_acc"),
        "train_acc": final.get("train_acc"),
        "train_images_per_s": final.get("train_images_per_s"),
        # Every re-initialisation's kappa: a row's spread is over all of its cells' draws.
        "ntk_kappa_init": _get(ana, "ntk", "result", "at_init", "kappas"),
        "ntk_convention": _get(ana, "ntk", "result", "convention"),
        "lambda_max": _get(ana, "hessian", "result", "lambda_max"),
        "lambda_max_loss": _get(ana, "hessian", "result", "loss"),
        "lambda_max_aug": _get(ana, "hessian_augmented", "result", "lambda_max"),
        "lambda_max_aug_loss": _get(ana, "hessian_augmented", "result", "loss"),
        "corrupt_acc": _get(ev, "corruptions", "mean_corruption_accuracy"),
        "noisy_memorised": _get(final, "label_noise", "noisy_memorised"),
        "noisy_true": _get(final, "label_noise", "noisy_true"),
        # pre-training runs (vitsam.pretrain): the linear probe's and kNN's test accuracy
        "probe_acc": final.get("probe_acc"),
        "knn_acc": final.get("knn_acc"),
        "probe_train_acc": _get(final, "probe", "train_acc"),
        "contrastive_loss": final.get("contrastive_loss"),
        "robust_acc": _get(ev, "attack_pgd", "robust_acc"),
        "robust_clean_acc": _get(ev, "attack_pgd", "clean_acc"),
        "adv_train_acc": _get(final, "adversarial", "train_adv_acc"),
    }
    kinds = _get(ana, "sparsity", "result", "layers") or {}
    if kinds:
        first = next(iter(kinds.values()))  # layers are in block order: block 1 first
        v["active_pct"] = first.get("mean_active_pct_per_image")
    att = _get(ana, "attention", "result")
    if att and att.get("supported", True) is not False and att.get("entropy_per_block"):
        v["attention_entropy"] = att["entropy_per_block"][-1]
    blocks = _get(ana, "hessian", "result", "per_block", "blocks")
    if blocks:
        top = max(blocks, key=lambda b: b["lambda_max"])
        v["block_lambda_max"] = top["lambda_max"]
        v["sharpest_block"] = top["block"]
    traj = _get(ana, "trajectory", "result")
    if traj and traj.get("supported", True) is not False:
        v["trajectory_explained"] = sum(traj["explained"])
    transfer = _load(run_dir / "transfer.json", "transfer")
    v["transfer_acc"], v["transfer_train_acc"] = transfer.get("test_acc"), transfer.get("train_acc")
    sharp = _load(run_dir / "sharpness.json", "sharpness").get("checkpoints")
    if sharp:
        v["lambda_max_last"] = sharp[-1]["lambda_max"]
        v["_checkpoints"] = sharp
    return {k: x for k, x in v.items() if x is not None}


def match_losses(rows: list[dict[str, Any]]) -> float | None:
    """Give each row with checkpoint curvature ``lambda_max_matched``: lambda_max at the batch
    loss L*, the lowest loss every such cell reaches, and ``matched_step``, the step there.

    Comparing curvature at equal training loss keeps memorisation (a near-zero loss flattens the
    cross-entropy Hessian) from passing for a flatter minimum. Checkpoints are sparse, so lambda
    and the step are interpolated linearly in log(loss) between the last checkpoint above L* and
    the first at or below it (a checkpoint at exactly L* is read as is). Returns L* (None: no
    cells)."""
    curves = [r["_checkpoints"] for r in rows if r.get("_checkpoints")]
    if not curves:
        return None
    target = max(min(p["loss"] for p in c) for c in curves)
    for r in rows:
        pts = r.get("_checkpoints")
        if not pts:
            continue
        i = next(j for j, p in enumerate(pts) if p["loss"] <= target)
        hi, lo = (pts[i - 1], pts[i]) if i > 0 else (pts[i], pts[i])
        if lo["loss"] == target or hi is lo or not (lo["loss"] > 0 and hi["loss"] > lo["loss"]):
            r["lambda_max_matched"], r["matched_step"] = lo["lambda_max"], lo["step"]
            continue
        t = (math.log(hi["loss"]) - math.log(target)) / (math.log(hi["loss"]) - math.log(lo["loss"]))
        r["lambda_max_matched"] = hi["lambda_max"] + t * (lo["lambda_max"] - hi["lambda_max"])
        r["matched_step"] = hi["step"] + t * (lo["step"] - hi["step"])
    return target


def collect(study_dir: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per grid cell: its coordinates, status and values."""
    rows = []
    for g in record["grid"]:
        status = record["cells"].get(g["name"], {}).get("status", "missing")
        rows.append({**g, "status": status, **cell_values(study_dir / g["name"])})
    return rows


def _stat(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": spread, "n": len(values)}


def aggregate(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows grouped by (family, method, fraction) with {mean, std, n} per column."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["method"], r["fraction"]), []).append(r)
    out = []
    for (fam, meth, frac), members in groups.items():
        agg: dict[str, Any] = {"family": fam, "method": meth, "fraction": frac,
                               "seeds": [m["seed"] for m in members],
                               "failed": [m["name"] for m in members if m["status"] == "failed"]}
        for col in columns:
            raw = [x for m in members for x in (m[col] if isinstance(m.get(col), list)
                                                 else [m.get(col)])]
            vals = [float(x) for x in raw if isinstance(x, (int, float))
                    and not isinstance(x, bool) and math.isfinite(float(x))]
            if vals:
                agg[col] = _stat([x * SCALE.get(col, 1.0) for x in vals])
        out.append(agg)
    return out


def significant(a: dict[str, float] | None, b: dict[str, float] | None) -> bool | None:
    """Whether mean(a) - mean(b) exceeds std(a) + std(b); None without two seeds on each side."""
    if not a or not b or a["n"] < 2 or b["n"] < 2:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def differences(agg: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Each method minus its baseline (``BASELINES``: SAM - vanilla, SAM+AUG - AUG, a cheaper
    SAM variant - full SAM) per family, fraction and column."""
    index = {(r["family"], r["method"], r["fraction"]): r for r in agg}
    out = []
    for (fam, meth, frac), r in index.items():
        base = BASELINES.get(meth)
        if base is None or (fam, base, frac) not in index:
            continue
        b = index[(fam, base, frac)]
        row: dict[str, Any] = {"family": fam, "method": f"{meth} - {base}", "fraction": frac}
        for col in columns:
            if col in r and col in b:
                row[col] = {"diff": r[col]["mean"] - b[col]["mean"],
                            "significant": significant(r[col], b[col])}
        out.append(row)
    return out


def best(agg: list[dict[str, Any]], col: str) -> set[int]:
    """Indices of the rows with the best mean in ``col`` (per COLUMNS' direction)."""
    better = COLUMNS.get(col, ("", "", None))[2]
    vals = [(i, r[col]["mean"]) for i, r in enumerate(agg) if col in r]
    if better is None or not vals:
        return set()
    target = (max if better else min)(v for _, v in vals)
    return {i for i, v in vals if v == target}


def fmt_cell(stat: dict[str, float] | None, col: str) -> str:
    """``mean ± std`` (``mean`` alone for one seed) in the column's format."""
    if not stat:
        return "-"
    f = COLUMNS.get(col, ("", "{:.4g}", None))[1]
    text = f.format(stat["mean"])
    if stat["n"] > 1 and stat["std"] > 0:
        text += " ± " + f.format(stat["std"]).rstrip("M")
    return text


def fmt_diff(d: dict[str, Any] | None, col: str) -> str:
    if not d:
        return "-"
    f = COLUMNS.get(col, ("", "{:.4g}", None))[1]
    sig = {True: " *", False: "", None: " (1 seed)"}[d["significant"]]
    text = f.format(d["diff"])
    return ("+" if d["diff"] >= 0 else "") + text + sig


def row_label(r: dict[str, Any], with_fraction: bool) -> str:
    label = f"{r['family']} {r['method']}"
    return label + (f" @ {r['fraction']:g}" if with_fraction else "")


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Per-cell values as CSV (one line per cell, like timm's results files)."""
    buf = io.StringIO()
    head = ["name", "family", "method", "fraction", "seed", "status", *columns]
    w = csv.DictWriter(buf, fieldnames=head, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (statistics.fmean(r[k]) if isinstance(r.get(k), list) and r[k] else
                        r.get(k, "")) for k in head})
    return buf.getvalue()


def to_markdown(agg: list[dict[str, Any]], diffs: list[dict[str, Any]],
                columns: Sequence[str]) -> str:
    """The aggregated table (best per column in bold) and the SAM differences below it."""
    with_frac = len({r["fraction"] for r in agg}) > 1
    head = ["model"] + [COLUMNS[c][0] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bests = {c: best(agg, c) for c in columns}
    for i, r in enumerate(agg):
        cells = []
        for c in columns:
            t = fmt_cell(r.get(c), c)
            cells.append(f"**{t}**" if i in bests[c] and len(agg) > 1 else t)
        lines.append("| " + " | ".join([row_label(r, with_frac), *cells]) + " |")
    if diffs:
        lines += ["", "| difference | " + " | ".join(COLUMNS[c][0] for c in columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]
        for d in diffs:
            lines.append("| " + " | ".join([row_label(d, with_frac),
                                            *[fmt_diff(d.get(c), c) for c in columns]]) + " |")
        lines.append("")
        lines.append("`*`: the difference exceeds the sum of the two spreads (significant); "
                     "spreads are sample standard deviations over seeds.")
    return "\n".join(lines) + "\n"


def block_tables(study_dir: Path, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per family, lambda_max (and trace) of each block for every cell that has the
    per-block Hessian ("" when none has)."""
    from ..analysis.hessian.blocks import per_block_table

    parts = []
    for fam in sorted({r["family"] for r in rows}):
        runs = []
        for r in rows:
            path = study_dir / r["name"] / "analysis.json"
            if r["family"] != fam or not path.exists():
                continue
            res = _get(read_run_file(path, "analysis"), "hessian", "result")
            if res and "per_block" in res:
                runs.append((f"{r['method']} s{r['seed']}", res["per_block"]["blocks"]))
        if runs:
            parts.append(f"Hessian per block, {fam}:\n\n" + per_block_table(runs))
    return "\n".join(parts)


def study_tables(study_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Per-cell rows, aggregated rows and SAM differences of one study record."""
    columns = record["columns"]
    rows = collect(study_dir, record)
    matched = match_losses(rows)
    agg = aggregate(rows, columns)
    return {"rows": rows, "agg": agg, "diffs": differences(agg, columns), "columns": columns,
            "matched_loss": matched,
            # Only a study that measures the blocks shows them (its cells may carry them anyway).
            "blocks_md": block_tables(study_dir, rows) if "blocks" in (record.get("stages") or ["blocks"]) else ""}


def write_tables(study_dir: Path, record: dict[str, Any]) -> Path:
    """``<study>.md`` and ``<study>.csv`` in the study folder; returns the Markdown path."""
    from ..io import atomic_write_bytes

    t = study_tables(study_dir, record)
    md = study_dir / f"{record['study']}.md"
    text = to_markdown(t["agg"], t["diffs"], t["columns"])
    atomic_write_bytes(md, (text + ("\n" + t["blocks_md"] if t["blocks_md"] else "")).encode())
    atomic_write_bytes(study_dir / f"{record['study']}.csv",
                       to_csv(t["rows"], t["columns"]).encode())
    return md
