"""Evaluate run folders and build corruption sets from a run's or a source's test split.

``evaluate_run`` writes ``eval.json`` in the run folder (merged with what is there: each key is
one evaluation, with its settings), so robustness numbers for several sets can live together.

Whatever it is evaluated on (its own test split, ``--data``, a folder, a corruption set), a
model is fed as it was trained: normalised with the run's own mean/std and preprocessed with its
``crop_pct``, both read from the run's ``data.json`` (``vitsam.data.record``). Runs from before
that file existed get them recomputed from the run's own data config (with a one-line warning),
or, if that data is gone, from ``--data``'s training split.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import from_dict
from ..data import DataConfig, DataError, ImageFiles, build_data, eval_batches, eval_view, load_data_record
from ..data.preprocess import describe, resize_side
from ..data.record import RECORD_FILE
from ..data.sample import random_subset
from ..data.tensors import DataBundle
from ..io import merge_json
from ..train.checkpoint import load_run, run_labels
from .metrics import evaluate


@dataclass
class EvalRequest:
    """What ``evaluate_run`` measures besides test accuracy (paths are optional)."""

    data: str | None = None
    root: str | None = None
    corruptions: str | None = None
    folder: str | None = None
    mapped_folder: str | None = None
    mapping: str | None = None
    real: str | None = None
    real_images: str | None = None
    throughput: bool = False
    batch_size: int = 256
    device: str = "cpu"
    checkpoint: str = "last"
    bad_files: str | None = None  # error | skip; None: the run's own data.bad_files
    attack: str | None = None  # pgd | autoattack: robust accuracy (vitsam.eval.attacks)
    attack_eps: float = 8 / 255  # L-inf radius, pixel units of [0, 1] images
    attack_steps: int = 20  # PGD iterations
    attack_restarts: int = 2  # PGD random starts (worst case over them)
    attack_step_size: float | None = None  # None: 2.5 eps / steps
    attack_samples: int | None = None  # a seeded subset of this many test images; None: all
    attack_seed: int = 0  # the subset's and the random starts' seed


def _data_config(run: Any, req: EvalRequest) -> DataConfig:
    cfg = run.data_config()
    if req.bad_files is not None:
        cfg = replace(cfg, bad_files=req.bad_files)
    # Only the test split of another source is used: the run's training subset does not apply.
    return replace(cfg, source=req.data, root=req.root, train_fraction=1.0) if req.data else cfg


def _bad_files(run_dir: Path, req: EvalRequest, policy: str, kind: str) -> Any:
    """How an evaluation folder's unreadable files are handled (``shifts.BadFiles``): as
    ``--bad-files`` says, else as the run's ``data.bad_files``; the full list goes into the run
    folder as ``eval-bad-files-<kind>.txt``."""
    from .shifts import BadFiles

    return BadFiles(policy, run_dir / f"eval-bad-files-{kind}.txt", "pass --bad-files skip",
                    "--bad-files skip" if req.bad_files else "the run's data.bad_files=skip")


def _listed(entry: dict[str, Any], how: Any) -> dict[str, Any]:
    """``entry`` with the list of the files it left out, when it left any out."""
    if entry.get("skipped_files"):
        entry["bad_files_list"] = str(how.list_path)
    return entry


def _warn(msg: str) -> None:
    print(f"vitsam: warning: {msg}", file=sys.stderr)


def run_inputs(run: Any, bundle: DataBundle | None = None, data: str | None = None) -> dict[str, Any]:
    """How the run's model is fed: ``{mean, std, crop_pct, classes, from}``, from its ``data.json``.

    A run folder without one (trained before it was written) gets them from its own data config,
    rebuilt now (``bundle`` when that is the run's own data, i.e. ``data`` is None), else from
    ``bundle`` (the ``--data`` source), each with a one-line warning on stderr.
    """
    rec = load_data_record(run.run_dir)
    if rec is not None:
        return {"mean": [float(v) for v in rec["mean"]], "std": [float(v) for v in rec["std"]],
                "crop_pct": float(rec["preprocessing"]["crop_pct"]), "from": RECORD_FILE,
                "classes": [str(c) for c in rec["classes"]] if isinstance(rec.get("classes"), list) else None}
    own = bundle if data is None else None
    if own is None:
        try:
            own = build_data(run.data_config(), progress=False)
        except DataError:
            own = None
    src = own if own is not None else bundle
    if src is None:
        raise DataError(f"{run.run_dir} has no {RECORD_FILE} and its data cannot be read; "
                        "restore the run's data set or train the run again")
    what = "its own data config" if own is not None else f"the training split of --data {data}"
    _warn(f"{run.run_dir} has no {RECORD_FILE} (trained before runs recorded their statistics); "
          f"normalising with mean/std recomputed from {what}")
    return {"mean": list(src.mean), "std": list(src.std), "crop_pct": float(src.crop_pct),
            "from": "recomputed from the run's data config" if own is not None else f"recomputed from --data {data}",
            "classes": list(own.classes) if own is not None else None}


def _align_classes(bundle: DataBundle, run_classes: list[str] | None) -> None:
    """Relabel ``bundle``'s test split to the run's class order when both name the same classes
    in another order (the model's output k is the run's class k); refuse other class sets."""
    if run_classes is None or list(bundle.classes) == run_classes:
        return
    if sorted(bundle.classes) != sorted(run_classes):
        only = sorted(set(bundle.classes) - set(run_classes))[:3]
        raise ValueError(f"the evaluation data names classes the run was not trained on ({', '.join(only)}, ...); "
                         f"evaluate on data with the run's classes ({', '.join(run_classes[:5])}, ...)")
    where = torch.tensor([run_classes.index(c) for c in bundle.classes])
    bundle.test.labels = where[bundle.test.labels]
    bundle.classes = list(run_classes)


def evaluate_run(run_dir: str | Path, req: EvalRequest, progress: bool = True) -> dict[str, Any]:
    """Evaluate one run folder as ``req`` asks; returns and saves the new ``eval.json`` entries."""
    from . import robustness, shifts, throughput

    run = load_run(run_dir, req.checkpoint, device=req.device)
    spec, model = run.model_spec, run.model
    dcfg = _data_config(run, req)
    bundle = build_data(dcfg)
    if bundle.num_classes != spec["num_classes"]:
        raise ValueError(f"--data has {bundle.num_classes} classes but the model predicts "
                         f"{spec['num_classes']}; evaluate on data with the training classes")
    if bundle.in_chans != spec["in_chans"]:
        raise ValueError(f"--data has {bundle.in_chans}-channel images but the model takes "
                         f"{spec['in_chans']}; evaluate on data like the training images")
    feed = run_inputs(run, bundle, req.data)
    _align_classes(bundle, feed["classes"])
    mean, std, crop_pct, img_size = feed["mean"], feed["std"], feed["crop_pct"], bundle.img_size
    if len(mean) != spec["in_chans"]:
        raise ValueError(f"the run's {RECORD_FILE} has {len(mean)} channel statistics but the model "
                         f"takes {spec['in_chans']} channels; delete {RECORD_FILE} to recompute them")
    common = {"mean": mean, "std": std, "img_size": img_size,
              "batch_size": req.batch_size, "device": req.device}
    shift_kw = {**common, "in_chans": spec["in_chans"], "crop_pct": crop_pct, "progress": progress}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    test = evaluate(model, eval_batches(bundle.test, req.batch_size, mean, std, img_size, req.device,
                                        crop_pct=crop_pct), req.device)
    out["test"] = {**test, "data": bundle.description, "checkpoint": run.checkpoint.name,
                   "normalisation": {"mean": mean, "std": std, "from": feed["from"]},
                   "preprocessing": describe(img_size, crop_pct)}
    if req.attack:
        out[f"attack_{req.attack}"] = _attack(model, bundle, req, mean, std, img_size, crop_pct,
                                             spec["num_classes"], progress)
    if req.corruptions:
        out["corruptions"] = robustness.evaluate_corruptions(
            model, req.corruptions, mean, std, img_size, req.batch_size,
            req.device, progress=progress, crop_pct=crop_pct)
        out["corruptions"]["set_dir"] = str(Path(req.corruptions).resolve())
    if req.folder:
        how = _bad_files(Path(run_dir), req, dcfg.bad_files, "folder")
        out["folder"] = _listed(shifts.evaluate_folder(model, req.folder, bundle.classes,
                                                       bad_files=how, **shift_kw), how)
    if req.mapped_folder:
        how = _bad_files(Path(run_dir), req, dcfg.bad_files, "mapped-folder")
        out["class_mapped"] = _listed(shifts.evaluate_class_mapped(
            model, req.mapped_folder, req.mapping, bundle.classes, bad_files=how, **shift_kw), how)
    if req.real:
        # Without --real-images: the test split itself, whose ids are the same relative paths.
        source: Any = req.real_images if req.real_images is not None else bundle.test
        how = _bad_files(Path(run_dir), req, dcfg.bad_files, "real-images")
        out["real"] = _listed(shifts.evaluate_real_labels(model, source, req.real, bad_files=how,
                                                          **shift_kw), how)
    if req.throughput:
        from ..optim.factory import OptimConfig

        ocfg = from_dict(OptimConfig, run.config.get("optim", {}))
        base = torch.optim.AdamW if ocfg.name == "adamw" else torch.optim.SGD

        def factory(params: Any) -> torch.optim.Optimizer:
            return base(params, lr=ocfg.lr)

        bs = min(req.batch_size, 64)  # training steps hold activations for backward
        out["throughput"] = {
            "inference": throughput.inference_throughput(model, req.batch_size, img_size,
                                                         spec["in_chans"], req.device),
            "training": throughput.sam_overhead(model, factory, bs, img_size,
                                                spec["in_chans"], device=req.device,
                                                num_classes=spec["num_classes"]),
        }
    out["time_s"] = time.perf_counter() - t0
    merge_json(Path(run_dir) / "eval.json", {k: v for k, v in out.items() if k != "time_s"},
               "evaluation file")
    return out


def _attack(model: Any, bundle: DataBundle, req: EvalRequest, mean: list[float], std: list[float],
            img_size: int, crop_pct: float, num_classes: int, progress: bool) -> dict[str, Any]:
    """Clean and robust accuracy on the test split (or a seeded subset of it)."""
    from .attacks import robust_accuracy

    if req.attack_samples is not None and req.attack_samples < 1:
        raise ValueError(f"--attack-samples must be >= 1, got {req.attack_samples}")
    test = bundle.test if req.attack_samples is None else random_subset(
        bundle.test, req.attack_samples, req.attack_seed)
    batches = eval_batches(test, req.batch_size, mean, std, img_size, req.device, crop_pct=crop_pct)
    return robust_accuracy(model, batches, req.attack, req.attack_eps, mean, std, num_classes,
                           steps=req.attack_steps, restarts=req.attack_restarts,
                           step_size=req.attack_step_size, seed=req.attack_seed, total=len(test),
                           progress=progress)


def attack_table(results: dict[str, dict[str, Any]]) -> str:
    """Clean and robust accuracy side by side, one line per run and attack ("" when none)."""
    lines = []
    for run, r in results.items():
        for key in sorted(k for k in r if k.startswith("attack_")):
            a = r[key]
            how = (f"PGD-{a['steps']} x{a['restarts']}" if a["attack"] == "pgd"
                   else f"AutoAttack ({a['version']})")
            lines.append(f"{Path(run).name:<40} {how:<22} {a['eps'] * 255:>7.2f} {a['samples']:>7} "
                         f"{a['clean_acc'] * 100:>6.2f}% {a['robust_acc'] * 100:>6.2f}%")
    if not lines:
        return ""
    head = f"{'run':<40} {'attack':<22} {'eps*255':>7} {'images':>7} {'clean':>7} {'robust':>7}"
    return "\n".join([head, *lines])


def report(results: dict[str, dict[str, Any]], req: EvalRequest, baseline: str | None = None,
           out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Print tables for evaluated runs; corruption tables, mCE and heatmaps when present."""
    from . import robustness

    print(f"\n{'run':<40} {'top-1':>7} {'top-5':>7} {'ECE':>6} {'NLL':>7}")
    for run, r in results.items():
        t = r["test"]
        top5 = f"{t['top5'] * 100:6.2f}%" if t.get("top5") is not None else "     -"
        print(f"{Path(run).name:<40} {t['top1'] * 100:6.2f}% {top5} {t['ece']:6.3f} {t['nll']:7.4f}")
    for key, label in (("folder", "second test folder"), ("class_mapped", "class-mapped folder"),
                       ("real", "ReaL labels")):
        for run, r in results.items():
            if key in r:
                top5 = r[key].get("top5")
                left = r[key].get("skipped_files")
                print(f"{label}: {Path(run).name}: top-1 {r[key]['top1'] * 100:.2f}%"
                      + (f", top-5 {top5 * 100:.2f}%" if top5 is not None else "")
                      + (f" ({left} unreadable files left out)" if left else ""))
    for run, r in results.items():
        if "throughput" in r:
            inf, tr = r["throughput"]["inference"], r["throughput"]["training"]
            print(f"throughput: {Path(run).name}: inference {inf['images_per_s']:.1f} img/s "
                  f"({inf['images_per_s_per_core']:.1f} per core); training "
                  f"{tr['plain']['images_per_s']:.1f} img/s, with SAM "
                  f"{tr['sam']['images_per_s']:.1f} img/s ({tr['slowdown']:.2f}x slower)")
    table = attack_table(results)
    if table:
        print("\n" + table)
    summary: dict[str, Any] = {}
    if req.corruptions:
        base: Any = None
        if baseline == "alexnet":
            base = "alexnet"
        elif baseline:
            base = evaluate_run(baseline, replace(req, folder=None, mapped_folder=None,
                                                  real=None, throughput=False),
                                progress)["corruptions"]
        runs = [(label, r["corruptions"])
                for label, r in zip(run_labels(list(results)), results.values())]
        print(f"\ncorruption set {req.corruptions} ({runs[0][1].get('params')} parameters)")
        print(robustness.corruption_errors_table(runs, base))
        for run, r in results.items():
            robustness.heatmap([(Path(run).name, r["corruptions"])],
                               Path(run) / "corruption_heatmap.png")
            if base is not None:
                summary[run] = robustness.mce_from_results(r["corruptions"], base)
                merge_json(Path(run) / "eval.json",
                           {"mce": {**summary[run], "baseline": baseline}}, "evaluation file")
        if len(runs) > 1:
            dest = Path(out) if out else Path(next(iter(results))).parent / "compare"
            dest.mkdir(parents=True, exist_ok=True)
            print(f"heatmap -> {robustness.heatmap(runs, dest / 'corruption_heatmap.png')}")
    return summary


def corruption_source(data: str, root: str | None, run_dir: str | None, img_size: int | None,
                      limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Test images uint8 (N, C, S, S), labels, and a description, for ``build_corruption_set``.

    The images are the model's views of the test files: the run's (or the source's) preprocessing
    (``vitsam.data.preprocess.eval_view``) at ``img_size`` (default: the run's model size, else
    the source's), exactly what evaluation feeds the model for the clean test split.
    """
    if run_dir:
        run = load_run(run_dir)
        cfg = replace(run.data_config(), img_size=img_size or int(run.model_spec["img_size"]))
    else:
        run, cfg = None, DataConfig(source=data, root=root, img_size=img_size)
    bundle = build_data(cfg)
    crop_pct = run_inputs(run, bundle)["crop_pct"] if run is not None else bundle.crop_pct
    size = bundle.img_size
    test = random_subset(bundle.test, limit, seed) if limit else bundle.test
    if isinstance(test, ImageFiles):
        from .shifts import decode_for_eval

        images = torch.from_numpy(np.stack([decode_for_eval(p, size, bundle.in_chans, crop_pct)
                                            for p in test.paths]))
    else:
        images = eval_view(test.images, size, crop_pct)
    desc = (f"{bundle.description}; preprocessing: shorter side to {resize_side(size, crop_pct)} px, "
            f"centre crop {size} px")
    return images, test.labels, desc
