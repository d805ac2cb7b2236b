"""Curvature per block: the Hessian restricted to one block's parameters.

For a block B of parameters the restricted Hessian is the diagonal block ``H_BB`` of the full
Hessian (second derivatives with respect to B's parameters only, every other parameter held
fixed). Its top eigenvalue says how sharp the loss is along directions that move B alone, and
its trace is B's share of the full trace: the diagonal blocks' traces sum to ``tr(H)`` exactly.
The largest block eigenvalue is at most the full lambda_max (Cauchy interlacing), with equality
when the Hessian is block-diagonal.

The operator is the full Hessian's (``HessianOperator``), built on the block's parameters, so a
product costs a forward pass and a double backward down to the block (the deepest block is the
cheapest to reach: nothing below it is differentiated).

Blocks follow the zoo's layout, in parameter order: ``embed`` (everything before the first
block: patch embedding, class token, position embedding, a ResNet's stem), ``blocks.<i>``
(every transformer or mixer block), ``layer<i>`` (every ResNet stage) and ``head`` (everything
after the last block: the final norm and the classifier).
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterable

import torch
from torch import nn

from vitsam.progress import progress_bar

from .eigen import top_eigenvalues
from .hutchinson import trace
from .operator import Batch, LossFn, _quiet

_BLOCK = re.compile(r"^(?:(blocks|layers|stages)\.(\d+)|(layer\d+))\.")


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names of ``model`` grouped into blocks, in model order.

    Returns {block name: [parameter names]}: ``embed``, then ``blocks.<i>`` / ``layer<i>`` /
    ``stages.<i>`` in the order they first appear, then ``head``. A model without repeated
    blocks gives a single ``embed`` group.
    """
    groups: dict[str, list[str]] = {}
    seen_block = False
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _BLOCK.match(name)
        if m:
            key = m.group(3) or f"{m.group(1)}.{m.group(2)}"
            seen_block = True
        else:
            key = "head" if seen_block else "embed"
        groups.setdefault(key, []).append(name)
    return groups


def per_block(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *, tol: float,
              max_iter: int, trace_probes: int, backend: str = "auto", train_mode: bool = False,
              seed: int = 0, progress: bool | None = None) -> list[dict]:
    """lambda_max (Lanczos, residual test at ``tol``) and, with ``trace_probes`` >= 2, the
    Hutchinson trace of every block's restricted Hessian.

    Returns one dict per block, in model order: ``block``, ``num_params``, ``lambda_max``
    (loss units per parameter unit squared), ``residual``, ``converged``, ``num_hvps``,
    ``seconds`` (the block's cost) and, when asked for, ``trace`` {estimate, stderr, probes}.
    """
    batches = list(batches)
    rows = []
    groups = parameter_blocks(model)
    common = dict(backend=backend, train_mode=train_mode, seed=seed)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for block, names in progress_bar(groups.items(), desc="hessian per block",
                                     disable=_quiet(progress), leave=False, total=len(groups)):
        t0 = time.perf_counter()
        eig = top_eigenvalues(model, loss_fn, batches, k=1, tol=tol, max_iter=max_iter,
                              params=names, **common)
        size = sum(sizes[n] for n in names)
        row = {"block": block, "num_params": size, "lambda_max": eig.eigenvalues[0],
               "residual": eig.residuals[0], "converged": eig.converged,
               "num_hvps": eig.num_hvps}
        if trace_probes >= 2:
            tr = trace(model, loss_fn, batches, probes=trace_probes, params=names, **common)
            row["trace"] = {"estimate": tr.estimate, "stderr": tr.stderr, "probes": tr.probes}
            row["num_hvps"] += tr.probes
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def per_block_table(runs: list[tuple[str, list[dict]]]) -> str:
    """A Markdown table: one row per block (of the first run), lambda_max and, where measured,
    trace per run, then the parameter count; runs: [(label, per_block rows)]."""
    blocks = [r["block"] for r in runs[0][1]]
    by = [(label, {r["block"]: r for r in rows}) for label, rows in runs]
    with_trace = all("trace" in row for _, rows in runs for row in rows)
    head = ["block"] + [f"lambda_max {lab}".strip() for lab, _ in runs]
    if with_trace:
        head += [f"trace {lab}".strip() for lab, _ in runs]
    head.append("parameters")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in blocks:
        cells = [b] + [f"{rows[b]['lambda_max']:.4g}" if b in rows else "-" for _, rows in by]
        if with_trace:
            cells += [f"{rows[b]['trace']['estimate']:.4g} +- {rows[b]['trace']['stderr']:.2g}"
                      if b in rows else "-" for _, rows in by]
        cells.append(f"{runs[0][1][blocks.index(b)]['num_params']:,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_per_block(runs: list[tuple[str, list[dict]]]) -> Any:
    """Bar chart of lambda_max (and trace, if measured) per block; several runs side by side.

    runs: [(label, per_block rows)]; blocks are taken from the first run. Returns the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = [r["block"] for r in runs[0][1]]
    with_trace = all("trace" in row for _, rows in runs for row in rows)
    panels = [("lambda_max", "top eigenvalue of H_BB")] + ([("trace", "trace of H_BB")]
                                                             if with_trace else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(5.0, 0.55 * len(blocks) + 2), 2.8 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(runs)
    x = np.arange(len(blocks))
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        for i, (label, rows) in enumerate(runs):
            by = {r["block"]: r for r in rows}
            vals = [(by[b][key]["estimate"] if key == "trace" else by[b][key]) if b in by
                    else np.nan for b in blocks]
            errs = ([by[b]["trace"]["stderr"] if b in by else 0 for b in blocks]
                    if key == "trace" else None)
            ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, yerr=errs,
                   label=label or None, capsize=2)
        ax.set_ylabel(ylabel)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_xticks(x, blocks, rotation=45, ha="right", fontsize=8)
        if any(lab for lab, _ in runs):
            ax.legend(fontsize=8)
    axes[0, 0].set_title("Hessian restricted to each block (cross-entropy, analysis batches)")
    fig.tight_layout()
    return fig
