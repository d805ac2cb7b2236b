"""Run analysis plug-ins on run folders: load the run's model and data, call ``run``, save.

Each plug-in module ``vitsam.analysis.<name>`` has ``run(model, data, cfg) -> dict``, a frozen
config dataclass, and optionally ``figures(results, out_dir)``. Results go to the run folder's
``analysis.json`` (one entry per analysis, with its settings, checkpoint and time), figures next
to it. Keys of a result that start with ``_`` (arrays kept for figures) are not written. A
plug-in may also have ``resumable(cfg, folder, context) -> (cfg, partial file)`` (landscape): its
finished parts then survive a kill in a partial file of the run folder, deleted once the result
is saved.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, apply_overrides, to_dict
from ..data import build_data, eval_batches
from ..data.record import feed_of
from ..data.sample import random_subset
from ..io import merge_json, remove_stale_temporaries, sha256_file
from ..train.checkpoint import load_run

# name -> (config class, split the data comes from)
ANALYSES: dict[str, tuple[str, str]] = {
    "hessian": ("HessianConfig", "train"),
    "ntk": ("NTKConfig", "train"),
    "landscape": ("LandscapeConfig", "train"),
    "sparsity": ("SparsityConfig", "train"),
    "attention": ("AttentionConfig", "test"),
    "trajectory": ("TrajectoryConfig", "train"),
}


@dataclass
class Request:
    """What to analyse and on how much data."""

    names: list[str]
    batches: int = 4
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    checkpoint: str = "last"
    settings: list[str] = field(default_factory=list)  # "hessian.k=5", "landscape.steps=11"


def plugin(name: str) -> Any:
    """The module of analysis ``name``."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    return importlib.import_module(f"vitsam.analysis.{name}")


def plugin_config(name: str, settings: list[str], **defaults: Any) -> Any:
    """The plug-in's config with ``defaults`` and the ``name.key=value`` settings applied.

    Errors name the setting as typed (``hessian.k``), whether the key is unknown, the value does
    not parse, or the config's own check rejects it.
    """
    cls = getattr(plugin(name), ANALYSES[name][0])
    known = {k: v for k, v in defaults.items() if k in cls.__dataclass_fields__}
    mine = [s.split(".", 1)[1] for s in settings if s.startswith(name + ".")]
    try:
        return apply_overrides(cls(**known), mine, prefix=f"{name}.")
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--set {name}.*: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AnalysisError(ValueError):
    """An analysis that could not run on a run folder; the message names the analysis."""


def sample_batches(tensors: Any, mean: Any, std: Any, img_size: int, n: int, batch_size: int,
                   seed: int, device: str, crop_pct: float | None = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` images drawn without replacement (seeded) as normalised evaluation batches."""
    return list(eval_batches(random_subset(tensors, n, seed), batch_size, mean, std, img_size,
                             device, crop_pct=crop_pct))


def analyze(run_dir: str | Path, req: Request, progress: bool = True) -> dict[str, Any]:
    """Run the requested analyses on one run folder; returns ``{name: entry}``.

    Every setting of every requested analysis is checked before the first one starts (a bad
    setting of the last analysis writes nothing), and each finished analysis is written to
    ``analysis.json`` at once, so a later failure never loses an earlier result.
    """
    for s in req.settings:
        if s.split(".", 1)[0] not in ANALYSES or "=" not in s or "." not in s.split("=", 1)[0]:
            raise ConfigError(f"setting {s!r} must look like <analysis>.<key>=<value> with analysis "
                              f"one of {', '.join(ANALYSES)}")
    unused = sorted({s.split(".", 1)[0] for s in req.settings} - set(req.names))
    if unused:
        raise ConfigError(f"--set names {', '.join(unused)} but that analysis is not requested; "
                          f"add {' '.join('--' + n for n in unused)} or drop the setting")
    # Settings first (with the default mean/std), so a typo fails before minutes of work.
    for name in req.names:
        plugin_config(name, req.settings, progress=progress)
    run = load_run(run_dir, req.checkpoint, device=req.device)
    bundle = build_data(run.data_config())
    # The model is fed as its data.json says (an imported checkpoint: its own normalisation).
    mean, std, crop_pct = feed_of(run_dir, bundle)
    # The final configs (with the run's statistics and model spec) before any analysis runs.
    # The run's weight decay: the L2 term that landscapes and trajectories can add.
    decay = run.config.get("optim", {}).get("weight_decay") if isinstance(run.config, dict) else None
    configs = {name: plugin_config(name, req.settings, mean=mean, std=std,
                                   model_spec=run.model_spec, progress=progress,
                                   run_dir=str(run_dir), decay_rate=decay)
               for name in req.names}
    out: dict[str, Any] = {}
    for name, cfg in configs.items():
        split = bundle.train if ANALYSES[name][1] == "train" else bundle.test
        data = sample_batches(split, mean, std, bundle.img_size, req.batches * req.batch_size,
                              req.batch_size, req.seed, req.device, crop_pct)
        # A plug-in that can resume (landscape) keeps its finished parts in a file of the run
        # folder until the result is saved: re-running a killed analysis redoes none of them.
        resumable = getattr(plugin(name), "resumable", None)
        work_cfg, partial = resumable(cfg, run_dir, {
            "checkpoint": run.checkpoint.name, "step": run.step, "seed": req.seed,
            "batches": req.batches, "batch_size": req.batch_size, "device": req.device,
            "state_sha256": sha256_file(run.checkpoint / "state.json")}) if resumable else (cfg, None)
        t0 = time.perf_counter()
        try:
            result = plugin(name).run(run.model, data, work_cfg)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise AnalysisError(f"{name} analysis of {run_dir}: {_first_line(exc)}") from exc
        out[name] = {"result": result, "settings": to_dict(cfg), "checkpoint": run.checkpoint.name,
                     "step": run.step, "samples": sum(len(y) for _, y in data),
                     "time_s": time.perf_counter() - t0}
        save(Path(run_dir), {name: out[name]})
        if partial is not None:
            partial.unlink(missing_ok=True)
    return out


def applicable(result: dict[str, Any]) -> bool:
    """False for a result that says the analysis does not apply to the model (e.g. attention
    maps of a ResNet); such results are saved and summarised but have nothing to draw."""
    return result.get("supported") is not False


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A result without its ``_`` keys (arrays kept only for figures)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def save(run_dir: Path, entries: dict[str, Any]) -> Path:
    """Merge entries into ``run_dir/analysis.json`` (other analyses already there are kept)."""
    path = run_dir / "analysis.json"
    remove_stale_temporaries(run_dir, path.name)  # left by a write killed half-way
    merge_json(path, {name: {**entry, "result": public(entry["result"])}
                      for name, entry in entries.items()}, "analysis file")
    return path


def draw(name: str, labelled: list[tuple[str, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Figures of one analysis for one run or several runs overlaid / side by side.

    Runs whose result is not applicable (``applicable``) are left out; with none left nothing
    is drawn.
    """
    fig = getattr(plugin(name), "figures", None)
    labelled = [(label, r) for label, r in labelled if applicable(r)]
    if fig is None or not labelled:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    arg: Any = labelled[0][1] if len(labelled) == 1 else labelled
    return list(fig(arg, out_dir))


def summarize(name: str, r: dict[str, Any]) -> str:
    """One line of the headline numbers of a result, for the terminal."""
    if not applicable(r):
        return f"not applicable: {r.get('reason', '')}"
    if name == "hessian":
        line = f"lambda_max={r['lambda_max']:.4g}"
        if r.get("lambda_max_is_largest") is False:
            line += " (all found eigenvalues negative: the largest may be missed; use lanczos)"
        if len(r.get("top_eigenvalues", [])) > 1:
            line += " top=" + ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"])
        if "trace" in r:
            line += f" trace={r['trace']['estimate']:.4g}+-{r['trace']['stderr']:.2g}"
        line += f" loss={r['loss']:.4f}"
        if "per_block" in r:
            rows = r["per_block"]["blocks"]
            sharpest = max(rows, key=lambda b: b["lambda_max"])
            line += (f"; sharpest block {sharpest['block']} (lambda_max "
                     f"{sharpest['lambda_max']:.4g}) of {len(rows)}, "
                     f"{r['per_block']['seconds']:.1f} s, {r['per_block']['num_hvps']} HVPs")
        return line
    if name == "ntk":
        line = f"kappa={r['kappa']:.5g} ({r['convention']} convention, {r['num_inputs']} inputs)"
        if "at_init" in r:
            init = r["at_init"]
            line += (f"; at init kappa={init['kappa_mean']:.5g}+-{init['kappa_std']:.3g} "
                     f"over {len(init['seeds'])} seeds")
        return line
    if name == "landscape":
        flat = [v for row in (r["loss"] if isinstance(r["loss"][0], list) else [r["loss"]])
                for v in row if v is not None]
        worst = f"{max(flat):.4g}" if flat else "not finite anywhere"
        return (f"centre loss={r['center_loss']:.4f} acc={r['center_accuracy']:.3f}; "
                f"max loss on grid={worst}")
    if name == "trajectory":
        e1, e2 = r["explained"]
        return (f"{len(r['steps'])} checkpoints (steps {r['steps'][0]}-{r['steps'][-1]}); the "
                f"top-2 directions explain {100 * e1:.1f}% + {100 * e2:.1f}% of the path; loss "
                f"{r['checkpoint_loss'][0]:.4f} -> {r['checkpoint_loss'][-1]:.4f} (L2 term "
                f"{r['weight_decay']})")
    if name == "sparsity":
        return "; ".join(f"{k}: {v['ever_active_pct']:.1f}% ever active, "
                         f"{v['mean_active_pct_per_image']:.1f}% per image"
                         for k, v in r["by_kind"].items())
    if name == "attention":
        per_block = ", ".join(f"{v:.3f}" for v in r["entropy_per_block"])
        line = f"class-token entropy per block (nats, max {r['max_entropy']:.3f}): {per_block}"
        if r.get("entropy_rollout") is not None:  # None when rollout=false
            line += f"; rollout {r['entropy_rollout']:.3f}"
        return line
    return ""
