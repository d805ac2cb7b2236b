"""What a study does to one cell: train (or resume) its run folder, then run its stages.

Every stage writes into the cell's run folder through the same code as the CLI (``analysis.json``
via the analysis runner, ``eval.json`` via the evaluation runner, ``sharpness.json`` here) and is
recorded in ``cell.json``, the marker written last. A stage already listed there is not run
again, so an interrupted study continues where it stopped and a study folder can hold several
studies' stages on the same cells (``inside`` reuses ``main``'s trained runs).

Stages:
    hessian      lambda_max (cheap Lanczos) on clean training batches and on augmented ones
    ntk          NTK condition number, of the trained model and re-initialised (the paper's)
    sparsity     active MLP units per block
    attention    class-token attention entropy and maps (ViT only; others: not applicable)
    landscape    filter-normalised loss curve around the trained weights
    corruptions  accuracy on the study's shared -C set
    sharpness    lambda_max at every saved checkpoint, next to SAM's logged sharpness
    blocks       lambda_max and trace of the Hessian restricted to each block (and of all of it)
    trajectory   the checkpoints' path on its top-2 principal directions over the loss surface
    transfer     the last checkpoint fine-tuned on another dataset (``vitsam finetune``'s recipe)
    robust       clean and PGD robust test accuracy at the cell's training radius (eval.json)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, to_dict
from ..io import atomic_write_json, merge_json, read_json, read_jsonl
from .presets import Cell, StageSettings

FAST_PATH_DEFAULTS = (("train", "compile", False), ("train", "compile_mode", None),
                      ("train", "compile_backend", "inductor"), ("train", "channels_last", "auto"),
                      ("optim", "fused", "auto"), ("data", "resident", "auto"))
STAGES = ("hessian", "ntk", "sparsity", "attention", "landscape", "corruptions", "sharpness",
          "blocks", "trajectory", "transfer", "robust")
_ADV_KEYS = ("adversarial", "adv_eps", "adv_steps", "adv_step_size")
MARKER = "cell.json"
_VARIANT_KEYS = ("sam_variant", "looksam_k", "looksam_alpha", "sam_prob", "sam_seed")


def fingerprint(cfg: RunConfig) -> str:
    """A hash of everything in a cell's config that changes its results (not its thread count,
    output folder, how many faulty steps in a row stop it, or what to do with unreadable files:
    a finished run is the same either way, and cells trained before those settings existed
    still match). A setting added later with a default that trains as before
    (``train.sync_batchnorm=false``, ``data.label_noise=0``, ``model.init_from=null``; the
    cheaper SAM keys while ``optim.sam_variant=full``, ``optim.looksam_scope`` off LookSAM; the
    ``pretrain`` section while ``pretrain.objective=none``; the adversarial keys while
    ``train.adversarial=none``) is left out at that default, for the same reason. LookSAM cells
    do keep ``looksam_scope``: those trained before it existed used the global scope and must
    not be reused."""
    d = to_dict(replace(cfg, out_dir="", train=replace(cfg.train, threads=None)))
    d["train"].pop("max_bad_steps", None)
    d["data"].pop("bad_files", None)
    if not d["train"].get("sync_batchnorm", False):
        d["train"].pop("sync_batchnorm", None)
    if not d["data"].get("label_noise"):
        d["data"].pop("label_noise", None)
        d["data"].pop("label_noise_kind", None)
    if d["optim"].get("sam_variant", "full") == "full":  # then the variants' keys change nothing
        for key in _VARIANT_KEYS:
            d["optim"].pop(key, None)
    if d["optim"].get("sam_variant") != "looksam":  # LookSAM cells of the global scope retrain
        d["optim"].pop("looksam_scope", None)
    if d["train"].get("adversarial", "none") == "none":  # then the attack's keys change nothing
        for key in _ADV_KEYS:
            d["train"].pop(key, None)
    if d["model"].get("init_from") is None and d["model"].get("init_checkpoint") == "last":
        d["model"].pop("init_from", None)
        d["model"].pop("init_checkpoint", None)
    if d.get("pretrain", {}).get("objective", "none") == "none":  # a supervised run: unused
        d.pop("pretrain", None)
    # Speed settings (vitsam.train.fastpath) at their defaults, likewise.
    for section, key, default in FAST_PATH_DEFAULTS:
        value = d[section].get(key, default)
        if type(value) is type(default) and value == default:  # True is not "auto"
            d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_marker(cell_dir: Path) -> dict[str, Any] | None:
    """The cell's marker, or None when the cell never finished a stage list."""
    path = cell_dir / MARKER
    if not path.exists():
        return None
    try:
        return read_json(path, "study cell marker")
    except ValueError:
        return None  # a damaged marker: the stages are checked again (each is idempotent)


def pending(cell_dir: Path, cfg: RunConfig, stages: tuple[str, ...]) -> list[str]:
    """The stages (``train`` first) still to do for a cell; raises if the folder holds a
    different run."""
    marker = read_marker(cell_dir)
    if marker is not None and marker.get("fingerprint") != fingerprint(cfg):
        raise ValueError(f"cell folder {cell_dir} was made with another configuration; delete "
                         "it, or use another --out for the changed study")
    done = set(marker.get("stages", [])) if marker else set()
    trained = (cell_dir / "final.json").exists()
    return ([] if trained else ["train"]) + [s for s in stages if s not in done]


def run_cell(cell: Cell, cfg: RunConfig, cell_dir: Path, stages: tuple[str, ...],
             settings: StageSettings, shared: dict[str, str], progress: bool = False,
             trainer: Callable[[RunConfig, Path, bool], None] | None = None) -> dict[str, Any]:
    """Train and measure one cell; returns ``{"ran": [stages run], "seconds": ...}``.

    ``trainer(cfg, cell_dir, resume)`` trains it (``vitsam.study.launchers``; default: here,
    in this process)."""
    todo = pending(cell_dir, cfg, stages)
    t0 = time.perf_counter()
    if "train" in todo:
        (trainer or _train_here(progress))(cfg, cell_dir, (cell_dir / "config.json").exists())
    # Stages of other studies on this cell stay listed: the marker is the cell's, not a study's.
    done = list((read_marker(cell_dir) or {}).get("stages", []))
    info = {"name": cell.name, "fingerprint": fingerprint(cfg), "family": cell.family,
            "method": cell.method, "seed": cell.seed, "fraction": cell.fraction}
    for stage in [s for s in todo if s != "train"]:
        STAGE_FUNCS[stage](cell_dir, settings, shared)
        done.append(stage)
        # The marker after each stage: an interruption repeats at most the stage in progress.
        atomic_write_json(cell_dir / MARKER, {**info, "stages": done})
    if not (cell_dir / MARKER).exists():  # a cell whose study has no stages
        atomic_write_json(cell_dir / MARKER, {**info, "stages": done})
    return {"ran": todo, "seconds": time.perf_counter() - t0}


def _train_here(progress: bool) -> Callable[[RunConfig, Path, bool], None]:
    """Training in this process: a new run in ``cell_dir``, or the resume of its run."""
    from ..train.engine import train

    def run(cfg: RunConfig, cell_dir: Path, resume: bool) -> None:
        if resume:
            train(resume=cell_dir, progress=progress)
        else:
            train(cfg, run_dir=cell_dir, progress=progress)
    return run


def _analyze(cell_dir: Path, names: list[str], settings: StageSettings, extra: tuple[str, ...],
             checkpoint: str = "last") -> dict[str, Any]:
    from ..analysis.runner import Request, analyze, draw

    req = Request(names, settings.batches, settings.batch_size, 0, "cpu", checkpoint, list(extra))
    entries = analyze(cell_dir, req, progress=False)
    for name, entry in entries.items():
        if entry["result"].get("supported", True) is not False:  # "not applicable" has no figure
            draw(name, [(cell_dir.name, entry["result"])], cell_dir)
    return entries


def _hessian(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    _analyze(cell_dir, ["hessian"], settings, settings.hessian)
    merge_json(cell_dir / "analysis.json",
               {"hessian_augmented": augmented_hessian(cell_dir, settings)}, "analysis file")


def augmented_hessian(cell_dir: Path, settings: StageSettings, checkpoint: str = "last",
                      run: Any = None, bundle: Any = None) -> dict[str, Any]:
    """lambda_max on pad-crop (+ flip where the source allows it) augmented training batches,
    with their loss and accuracy: curvature off the exact training images, which a run that
    memorised them (clean loss near 0, a collapsed Hessian) cannot hide. ``run``/``bundle``:
    an already loaded checkpoint and its data, to avoid loading them again."""
    from ..analysis import hessian
    from ..analysis.runner import plugin_config, public
    from ..data import build_data, train_batches
    from ..train.checkpoint import load_run

    run = run if run is not None else load_run(cell_dir, checkpoint)
    bundle = bundle if bundle is not None else build_data(run.data_config())
    # Basic augmentation for every run, also one trained without: Mixup's soft targets have no
    # single-label Hessian, and the same perturbation for every cell keeps them comparable.
    aug = "basic"
    batches = []
    for x, y in train_batches(bundle, min(settings.batch_size, len(bundle.train)), epoch=0,
                              seed=12345, augment=aug):
        batches.append((x, y))
        if len(batches) == settings.batches:
            break
    cfg = plugin_config("hessian", list(settings.hessian), progress=False)
    res = public(hessian.run(run.model, batches, cfg))
    res["batch_accuracy"] = _accuracy(run.model, batches)
    res["augment"] = aug
    return {"result": res, "step": run.step, "checkpoint": run.checkpoint.name,
            "samples": sum(len(y) for _, y in batches)}


def _accuracy(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``batches``, a fraction (ties and NaN rows
    counted as ``vitsam eval`` counts them: ``top1_hits``)."""
    from ..eval.metrics import top1_hits
    from ..models.modes import eval_mode

    with eval_mode(model), torch.no_grad():
        correct = sum(top1_hits(model(x).float(), y) for x, y in batches)
    return correct / max(1, sum(len(y) for _, y in batches))


def _simple(name: str, extra: str | None = None) -> Callable[..., None]:
    """A stage that runs one analysis plug-in with the settings field ``extra`` of the scale."""
    def stage(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
        _analyze(cell_dir, [name], settings, getattr(settings, extra) if extra else ())
    return stage


def _ntk(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    # Distinct re-initialisations per training seed, so a row's spread covers them all.
    seed = int(read_json(cell_dir / "config.json", "run config")["train"]["seed"])
    n = settings.ntk_seeds
    seeds = ",".join(str(n * seed + i) for i in range(n))
    _analyze(cell_dir, ["ntk"], settings, (*settings.ntk, f"ntk.seeds=[{seeds}]"))


def _corruptions(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    from ..eval.robustness import heatmap
    from ..eval.runner import EvalRequest, evaluate_run

    if "corruptions" not in shared:
        raise ValueError("the corruptions stage needs the study's shared -C set")
    out = evaluate_run(cell_dir, EvalRequest(corruptions=shared["corruptions"], batch_size=256),
                       progress=False)
    heatmap([(cell_dir.name, out["corruptions"])], cell_dir / "corruption_heatmap.png")


def _sharpness(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    """lambda_max (clean and augmented batches) at each saved checkpoint -> sharpness.json."""
    from ..analysis import hessian
    from ..analysis.runner import plugin_config, public, sample_batches
    from ..data import build_data
    from ..train.checkpoint import list_checkpoints, load_run

    points = []
    bundle = None
    for name in list_checkpoints(cell_dir):
        run = load_run(cell_dir, name)
        if bundle is None:
            bundle = build_data(run.data_config())
        data = sample_batches(bundle.train, bundle.mean, bundle.std, bundle.img_size,
                              settings.batches * settings.batch_size, settings.batch_size, 0,
                              "cpu")
        cfg = plugin_config("hessian", list(settings.hessian), progress=False)
        clean = public(hessian.run(run.model, data, cfg))
        aug = augmented_hessian(cell_dir, settings, name, run, bundle)["result"]
        points.append({"checkpoint": name, "step": run.step,
                       "lambda_max": clean["lambda_max"], "loss": clean["loss"],
                       "batch_accuracy": _accuracy(run.model, data),
                       "lambda_max_augmented": aug["lambda_max"], "loss_augmented": aug["loss"]})
    logged = [{"step": r["step"], "sharpness": r["sharpness"], "loss": r.get("loss")}
              for r in read_jsonl(cell_dir / "metrics.jsonl")
              if "sharpness" in r and r["sharpness"] == r["sharpness"]]
    atomic_write_json(cell_dir / "sharpness.json", {"checkpoints": points, "logged": logged,
                                                    "settings": list(settings.hessian)})


def _transfer(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    """Fine-tune the cell's last checkpoint on ``settings.transfer_data`` into the run folder
    ``transfer-<data>`` inside the cell (resumed if interrupted) -> ``transfer.json``."""
    from ..train.engine import train
    from ..train.finetune import finetune_config

    data = settings.transfer_data
    run_dir = cell_dir / f"transfer-{data}"
    if not (run_dir / "final.json").exists():
        if (run_dir / "config.json").exists():
            train(resume=run_dir, progress=False)
        else:
            cfg = finetune_config(cell_dir, data, overrides=list(settings.transfer))
            train(replace(cfg, name=f"{cell_dir.name}-{data}"), run_dir=run_dir, progress=False)
    final = read_json(run_dir / "final.json", "fine-tuning result")
    atomic_write_json(cell_dir / "transfer.json", {
        "data": data, "run": run_dir.name, "settings": list(settings.transfer),
        **{k: final.get(k) for k in ("test_acc", "train_acc", "steps", "wall_time_s", "init")}})


def _robust(cell_dir: Path, settings: StageSettings, shared: dict[str, str]) -> None:
    """Clean and PGD robust accuracy at the radius the cell trained with -> eval.json."""
    from ..eval.runner import EvalRequest, evaluate_run

    train = read_json(cell_dir / "config.json", "run config")["train"]
    eps = float(train.get("adv_eps", 8 / 255)) if train.get("adversarial", "none") != "none" else 8 / 255
    evaluate_run(cell_dir, EvalRequest(batch_size=256, attack="pgd", attack_eps=eps,
                                       attack_steps=settings.attack_steps,
                                       attack_restarts=settings.attack_restarts,
                                       attack_samples=settings.attack_samples), progress=False)


STAGE_FUNCS = {"hessian": _hessian, "ntk": _ntk, "sparsity": _simple("sparsity"),
               "attention": _simple("attention"), "landscape": _simple("landscape", "landscape"),
               "corruptions": _corruptions,
               "sharpness": _sharpness,
               # The per-block Hessian is the hessian analysis with per_block=true: its result
               # (whole-model lambda_max and trace beside the blocks') is saved as "hessian".
               "blocks": _simple("hessian", "blocks"),
               "trajectory": _simple("trajectory", "trajectory"),
               "transfer": _transfer,
               "robust": _robust}
