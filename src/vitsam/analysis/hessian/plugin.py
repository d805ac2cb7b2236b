"""The Hessian analysis plug-in of ``vitsam analyze``: settings, ``run`` and ``figures``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from torch import nn

from vitsam.analysis.state import analysis_state

from vitsam.io import atomic_write_bytes, save_figure

from .blocks import per_block, per_block_table, plot_per_block
from .density import check_density, plot_density, spectral_density
from .eigen import _validate, top_eigenvalues
from .hutchinson import trace
from .operator import BACKENDS, Batch, HessianOperator, _check_batches


@dataclass(frozen=True)
class HessianConfig:
    """Settings of the Hessian analysis (loss: cross-entropy on the given batches).

    k eigenvalues by ``method`` (``"lanczos"``: the k largest; ``"block-lanczos"``: the k
    largest, ``block_size`` vectors per batched operator pass; ``"power"``: the k largest in
    magnitude) to tolerance ``tol`` under the ``stop`` test (``"residual"`` or ``"change"``,
    see ``top_eigenvalues``) within ``max_iter`` HVPs;
    ``trace_probes`` Hutchinson probes (0 skips the trace); ``density`` runs SLQ with
    ``density_steps`` Lanczos steps; ``train_mode`` uses batch statistics in normalisation;
    ``per_block`` adds lambda_max (and, with ``trace_probes``, the trace) of the Hessian
    restricted to each block's parameters (see ``blocks``), at the same ``tol`` and ``max_iter``.
    """

    k: int = 1
    method: str = "lanczos"
    tol: float = 1e-3
    stop: str = "residual"
    max_iter: int = 100
    trace_probes: int = 20
    density: bool = False
    density_steps: int = 80
    train_mode: bool = False
    seed: int = 0
    backend: str = "auto"
    per_block: bool = False
    block_size: int = 4

    def __post_init__(self) -> None:
        # Every setting is checked when given, before a run and its data are loaded and before
        # any analysis starts (a bad density setting must not cost the eigenvalues first).
        _validate(self.k, self.tol, self.max_iter, self.method, self.stop, self.block_size)
        if not (isinstance(self.trace_probes, int) and (self.trace_probes == 0
                                                        or self.trace_probes >= 2)):
            raise ValueError(f"trace_probes must be 0 (skip) or an integer >= 2 (a standard "
                             f"error needs two), got {self.trace_probes!r}")
        check_density(self.density_steps)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown HVP backend {self.backend!r}; choose one of {BACKENDS}")
        if self.backend == "func" and self.train_mode:
            raise ValueError("backend='func' cannot run train-mode statistics; use "
                             "backend='autograd' or 'auto'")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.per_block, bool):
            raise ValueError(f"per_block must be true or false, got {self.per_block!r}")


def run(model: nn.Module, data: Iterable[Batch], cfg: HessianConfig = HessianConfig()) -> dict:
    """Top eigenvalues (and trace, density) of the cross-entropy Hessian over all of ``data``.

    data: list of (x (B, C, H, W) normalised float, y (B,) int64) batches, treated as one
    dataset. Returns a JSON-serialisable dict with the settings next to the numbers:
    ``top_eigenvalues`` sorted by value, largest first, ``selection`` naming which k they are
    (``"largest_algebraic"`` or ``"largest_magnitude"``), ``lambda_max`` (the largest of them)
    and ``lambda_max_is_largest`` (whether it is known to be the Hessian's largest eigenvalue).
    """
    batches = _check_batches(data)
    loss_fn = nn.CrossEntropyLoss()
    common = dict(backend=cfg.backend, train_mode=cfg.train_mode, seed=cfg.seed)
    eig = top_eigenvalues(model, loss_fn, batches, k=cfg.k, method=cfg.method, tol=cfg.tol,
                          stop=cfg.stop, max_iter=cfg.max_iter, block_size=cfg.block_size,
                          progress=None, **common)
    with analysis_state(model, cfg.train_mode):
        op = HessianOperator(model, loss_fn, batches, "autograd", cache_graph=False)
        loss = op.loss()
    out: dict = {
        "analysis": "hessian",
        "config": asdict(cfg),
        "loss_fn": "cross_entropy(mean)",
        "num_samples": op.num_samples,
        "num_params": op.size,
        "loss": loss,
        "top_eigenvalues": eig.eigenvalues,  # sorted by value, largest first
        "selection": eig.selection,  # which k: largest_algebraic (lanczos) / _magnitude (power)
        "lambda_max": eig.eigenvalues[0],  # the largest eigenvalue found
        "lambda_max_is_largest": eig.lambda_max_is_largest,
        "residuals": eig.residuals,
        "converged": eig.converged,
        "num_hvps": eig.num_hvps,
        "block_size": eig.block_size,  # vectors per operator pass (1 unless block-lanczos)
        "backend": eig.backend,
        "seconds": eig.seconds,
    }
    if cfg.trace_probes > 0:
        tr = trace(model, loss_fn, batches, probes=cfg.trace_probes, progress=None, **common)
        out["trace"] = {"estimate": tr.estimate, "stderr": tr.stderr, "probes": tr.probes,
                        "probe_distribution": "rademacher"}
    if cfg.density:
        dens = spectral_density(model, loss_fn, batches, steps=cfg.density_steps,
                                progress=None, **common)
        out["density"] = asdict(dens)
    if cfg.per_block:
        rows = per_block(model, loss_fn, batches, tol=cfg.tol, max_iter=cfg.max_iter,
                         trace_probes=cfg.trace_probes, **common)
        out["per_block"] = {"blocks": rows, "num_hvps": sum(r["num_hvps"] for r in rows),
                            "seconds": sum(r["seconds"] for r in rows)}
    return out


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """Spectral density (if computed) and top-eigenvalue plots, and with ``per_block`` a bar
    chart and a Markdown table (``hessian_per_block.md``) of the blocks; a list of
    (label, result) overlays several runs. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", results)] if isinstance(results, dict) else list(results)
    out_dir = Path(out_dir)
    paths: list[Path] = []
    with_density = [(lab, r["density"]) for lab, r in runs if "density" in r]
    if with_density:
        paths.append(plot_density(with_density, out_dir / "hessian_density.png"))
    with_blocks = [(lab, r["per_block"]["blocks"]) for lab, r in runs if "per_block" in r]
    if with_blocks:
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = plot_per_block(with_blocks)
        p = save_figure(fig, out_dir / "hessian_per_block.png", dpi=130)
        atomic_write_bytes(out_dir / "hessian_per_block.md", per_block_table(with_blocks).encode())
        paths.append(p)
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for i, (lab, r) in enumerate(runs):
        vals = r["top_eigenvalues"]
        ax.plot(range(1, len(vals) + 1), vals, "o-", label=lab or None)
    ax.set_xlabel("rank")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_yscale("symlog")
    ax.set_title("Top Hessian eigenvalues")
    if any(lab for lab, _ in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths.append(save_figure(fig, out_dir / "hessian_top_eigenvalues.png", dpi=130))
    return paths
