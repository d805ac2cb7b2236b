"""The training loop: plain or SAM optimisation of any zoo model on any data source.

All durations (epochs, warm-up, evaluation and checkpoint intervals) are converted to optimiser
steps once, in ``Timeline``; logging, evaluation and checkpoints are gated by ``is_time``.
Each log record holds the means over the steps since the previous record, the learning rate
the last of them used, and images/s over training time only (steps and input pipeline; not
logging, checkpoint writing or evaluation).

A pre-training run (``pretrain.objective``, ``vitsam pretrain``) is this loop with the hooks of
``vitsam.pretrain.objective.Pretraining``: its model, its two-view batches, kNN accuracy at
eval times and a linear probe at the end.
"""
from __future__ import annotations

import errno
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import faults
from ..config import ConfigError, RunConfig, TrainConfig, check_device, from_dict, to_dict, validate
from ..data import DataBundle, build_data, eval_batches, steps_per_epoch, train_batches
from ..data.record import save_data_record
from ..data.errors import DataError
from ..data.sample import random_subset
from ..exact import Rounding, scaled
from ..eval.metrics import evaluate
from ..io import atomic_write_bytes, atomic_write_json, read_json, read_jsonl
from ..models import check_forward, count_params, create_model, make_spec
from ..models.zoo import model_family
from ..optim.adversarial import training_attack
from ..optim.factory import build_optimizer
from ..optim.schedule import build_scheduler
from ..optim.steps import StepConfig
from ..optim.steps import train_step as optim_train_step
from ..progress import progress_bar
from . import runlock, signals
from .badsteps import BadSteps, NonFiniteError, step_counts
from .checkpoint import CheckpointError, CheckpointWriteError, list_checkpoints, read_latest_good
from .checkpoint import save_checkpoint, set_rng_state, step_name, unflatten_state
from .distributed import Group, processes, reported_by_main
from .fastpath import compile_model, resident_bundle, use_channels_last, use_resident
from .scalars import ScalarLog, check_tensorboard


@dataclass(frozen=True)
class Timeline:
    """Every duration of a run, in optimiser steps.

    The run lasts ceil(epochs * steps_per_epoch) steps (at least the epochs asked for); warm-up,
    evaluation and checkpoint intervals are the nearest whole number of steps (halves to even,
    Python's ``round``), intervals at least 1. All products are exact (``vitsam.exact.scaled``:
    epochs 1.1 at 100 steps per epoch is 110 steps, not the float product's ceil, 111).
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    ckpt_every: int
    log_every: int

    @classmethod
    def from_config(cls, t: TrainConfig, steps_per_epoch: int) -> "Timeline":
        def steps(epochs: float, rounding: Rounding = round) -> int:
            return scaled(epochs, steps_per_epoch, rounding)

        total = max(1, steps(t.epochs, math.ceil))
        if t.max_steps is not None:
            total = min(total, t.max_steps)
        warm = t.warmup_steps if t.warmup_steps is not None else steps(t.warmup_epochs)
        return cls(steps_per_epoch, total, min(warm, total), max(1, steps(t.eval_every_epochs)),
                   max(1, steps(t.ckpt_every_epochs)), max(1, t.log_every_steps))


def is_time(step: int, every: int, total: int) -> bool:
    """True after optimiser step ``step`` (1-based) when an interval ends, and at the last step."""
    return step == total or step % every == 0


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a one-line error for unusable names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name, key))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting ('auto' = bf16 on GPU, fp32 on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               step_cfg: StepConfig, key: int = 0) -> dict[str, float]:
    """One optimiser step (two passes with SAM) followed by one scheduler step.

    ``key`` picks an adversarial attack's random start (a pure function of the run's seed and
    the key: the loop passes step * processes + rank, which a resumed run repeats).

    The result's ``lr`` is the learning rate this step used (first param group), read before
    the scheduler moves on to the next step's. A skipped step (GradScaler overflow, non-finite
    loss or gradient) still counts as a step of the schedule, so torch's warning about a
    scheduler step without an optimiser step (a skipped first step) is silenced.
    """
    lr = scheduler.get_last_lr()[0]
    out = optim_train_step(model, criterion, x, y, optimizer, scaler=scaler, cfg=step_cfg, key=key)
    faults.point("step")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                r"before `optimizer\.step\(\)`")
        scheduler.step()
    return {**out, "lr": lr}


class _Meter:
    """Sums step signals between two log records, and the training time they took.

    ``images_per_s`` = images of the interval's steps / seconds between ``start`` and ``stop``:
    the optimiser steps and the input pipeline feeding them. Logging, checkpoint writing and
    evaluation (also the evaluation a resumed run repeats) fall outside, so the rate measures
    training alone. ``lr`` is the learning rate of the interval's last step, not an average.

    SAM's diagnostics are NaN on a step the GradScaler skipped (fp16 overflow); they are
    averaged over the steps where they are finite, so one skipped step does not blank the
    interval. A step skipped for a non-finite loss or gradient (``nonfinite``) is counted
    (``nonfinite_steps``) and its images count for images/s; its loss, accuracy and
    diagnostics are left out (NaN when every step of the interval was one).

    ``state``/``load`` carry an unfinished interval through a checkpoint (JSON; floats round-trip
    exactly), so a resumed run logs the same records as an uninterrupted one.
    """

    DIAGNOSTICS = ("grad_norm", "perturbed_loss", "sharpness", "eps_norm", "grad_cosine")
    LAST = ("lr",)

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock if clock is not None else time.perf_counter
        self._since: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.seconds = 0.0

    def start(self) -> None:
        """Training time runs from here ..."""
        self._since = self.clock()

    def stop(self) -> None:
        """... to here."""
        if self._since is not None:
            self.seconds += self.clock() - self._since
            self._since = None

    def add(self, out: dict[str, float]) -> None:
        if out.get("nonfinite"):
            out = {"skipped": out["skipped"], "nonfinite": 1.0, "n_bad": out["n"],
                   **{k: out[k] for k in self.LAST if k in out}}
        for k, v in out.items():
            v = float(v)
            if k in self.LAST:
                self.sums[k], self.counts[k] = v, 1
                continue
            if k in self.DIAGNOSTICS and not math.isfinite(v):
                self.counts.setdefault(k, 0)
                self.sums.setdefault(k, 0.0)
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def flush(self) -> dict[str, float]:
        s = self.sums
        rec = {k: (v / self.counts[k] if self.counts[k] else float("nan"))
               for k, v in s.items() if k not in ("correct", "n", "skipped", "nonfinite", "n_bad",
                                                   "perturbed")}
        rec.setdefault("loss", float("nan"))
        rec["acc"] = s.get("correct", 0.0) / max(s["n"], 1.0) if "n" in s else float("nan")
        if "adv_correct" in s:  # adversarial training: accuracy on the adversarial batches
            rec.pop("adv_correct")
            rec["adv_acc"] = s["adv_correct"] / max(s["n"], 1.0)
        rec["skipped_steps"] = s.get("skipped", 0.0)
        rec["nonfinite_steps"] = s.get("nonfinite", 0.0)
        if "perturbed" in s:  # SAM: how many of the interval's steps perturbed (the variants' cost)
            rec["perturbed_steps"] = s["perturbed"]
        rec["images_per_s"] = (s.get("n", 0.0) + s.get("n_bad", 0.0)) / max(self.seconds, 1e-9)
        self._reset()
        return rec

    def state(self) -> dict[str, Any]:
        """The unfinished interval, JSON-ready (non-finite sums are written as null)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts), "count": self.count,
                "seconds": self.seconds}

    def load(self, state: dict[str, Any]) -> None:
        """Continue the interval that ``state`` saved."""
        self.sums = {k: float("nan") if v is None else float(v) for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.count, self.seconds = int(state["count"]), float(state["seconds"])


def new_run_dir(cfg: RunConfig) -> Path:
    """``<out_dir>/<name>-<timestamp>``, made unique and created (two runs started in the same
    second each get their own)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out_dir).expanduser() / f"{cfg.name}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, i = base, 1
    while True:
        try:
            path.mkdir()  # atomic: exactly one process creates a given name
            return path
        except FileExistsError:
            path, i = Path(f"{base}-{i}"), i + 1


@dataclass
class Trainer:
    """Everything a run's loop touches, built from its config."""

    cfg: RunConfig
    bundle: DataBundle
    timeline: Timeline
    spec: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    criterion: nn.Module
    step_cfg: StepConfig
    device: torch.device
    group: Group = field(default_factory=Group)  # this process's place in a distributed run
    net: nn.Module | None = None  # what the steps drive: the model, under DDP across processes
    log: ScalarLog | None = None  # set once the run folder exists
    last_eval: tuple[int, dict[str, float]] | None = None  # (step, test metrics) of the last evaluation
    init: dict[str, Any] | None = None  # what model.init_from carried over (finetune.py)
    channels_last: bool = False  # model and inputs in NHWC order (vitsam.train.fastpath)
    pretrain: Any = None  # the hooks of a pre-training run (vitsam.pretrain.objective)

    @classmethod
    def build(cls, cfg: RunConfig, group: Group | None = None) -> "Trainer":
        validate(cfg)
        t, group = cfg.train, group or Group()
        if t.threads:
            torch.set_num_threads(t.threads)
        device = group.place(pick_device(t.device), t.device)
        group.per_rank_batch(t.batch_size)
        amp = autocast_dtype(t.precision, device)
        bundle = build_data(cfg.data)
        if use_resident(cfg.data.resident, bundle, device):
            bundle = resident_bundle(bundle, device)
        timeline = Timeline.from_config(t, steps_per_epoch(bundle, t.batch_size))
        torch.manual_seed(t.seed)
        spec = make_spec(cfg.model.name, bundle.num_classes, bundle.img_size, bundle.in_chans,
                         dict(cfg.model.kwargs))
        init, pre = None, None
        if cfg.pretrain.objective != "none":  # the encoder and projection head (vitsam.pretrain)
            from ..pretrain.objective import Pretraining

            pre = Pretraining.create(cfg, bundle.hflip, group.rank)
            spec = pre.spec(spec)
            model = pre.model(spec, device)
        elif cfg.model.init_from:  # fine-tuning: the source run's weights, adapted to this data
            from .finetune import initialised_model

            spec, model, init = initialised_model(cfg.model, spec, list(bundle.classes))
            model = model.to(device)
        else:
            model = create_model(spec["name"], spec["num_classes"], spec["img_size"],
                                 spec["in_chans"], **spec["kwargs"]).to(device)
        if pre is None:
            check_forward(model, spec["name"], spec["num_classes"], spec["img_size"],
                          spec["in_chans"])
        model = group.batchnorm(model, t.sync_batchnorm, device)
        nhwc = use_channels_last(t.channels_last, model_family(spec["name"]), device)
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        group.seed_ranks(t.seed)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, timeline.total_steps, timeline.warmup_steps,
                                    t.decay)
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        # Adversarial training attacks the model in training mode, as it is during the step:
        # BatchNorm then normalises with the batch's own statistics and dropout draws the step's
        # masks, so the attack maximises the loss of the very function the step differentiates
        # (eval mode would attack a network with lagging running statistics, another function
        # early in training). The attack's passes leave the running statistics untouched.
        step_cfg = StepConfig(clip_norm=t.clip_norm, micro_batch=t.micro_batch, m=cfg.optim.m,
                              autocast_dtype=amp, reuse_randomness=cfg.optim.reuse_randomness,
                              sync_perturbation=cfg.optim.sync_perturbation,
                              attack=training_attack(t, bundle.mean, bundle.std))
        # The steps drive the compiled module; checkpoints and evaluation the plain one.
        net = group.wrap(compile_model(model, t) if t.compile else model, device)
        return cls(cfg, bundle, timeline, spec, model, optimizer, scheduler, scaler,
                   nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), step_cfg, device,
                   group, net, init=init, channels_last=nhwc, pretrain=pre)

    def test_batches(self, split: Any = None) -> Any:
        b = self.bundle
        return eval_batches(b.test if split is None else split, 256, b.mean, b.std, b.img_size,
                            self.device)

    def evaluate(self, split: Any = None) -> dict[str, Any]:
        """Top-1/top-5/ECE/NLL on ``split`` (default: the test split), shared among processes."""
        split = self.bundle.test if split is None else split
        if not self.group.active:
            return evaluate(self.model, self.test_batches(split), self.device)
        return self.group.evaluate(self.model, split, self.test_batches, self.device)

    def checkpoint(self, run_dir: Path, step: int, extra: dict[str, Any],
                   cfg_dict: dict[str, Any]) -> None:
        """The periodic checkpoint after ``step`` (written by rank 0 only)."""
        extra = {**extra, **self.group.checkpoint_extra(step, self.cfg.train.batch_size)}
        if self.group.is_main:
            save_checkpoint(run_dir, step_name(step), self.model, self.spec, cfg_dict, step,
                            step // self.timeline.steps_per_epoch, self.optimizer, self.scheduler,
                            self.scaler, keep=self.cfg.train.keep_checkpoints, extra=extra)


def train(cfg: RunConfig | None = None, run_dir: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a run (or continue ``resume``, a run folder) and return its ``final.json`` record.

    One process at a time trains in a run folder (``runlock``); SIGINT and SIGTERM stop the
    loop after a checkpoint (``signals``). Under torchrun, every process calls this; rank 0
    chooses and holds the folder (``vitsam.train.distributed``).
    """
    if resume is not None:
        run_dir = Path(resume)
        with reported_by_main(ValueError):
            cfg = _saved_config(run_dir)  # its refusals write nothing, not even a lock file
    if cfg is None:
        raise ValueError("train() needs a config or a run folder to resume")
    validate(cfg)  # before any folder is made: a bad name could even point outside out_dir
    with processes(pick_device(cfg.train.device).type == "cuda") as group:
        if not group.is_main:
            with reported_by_main(ConfigError, signals.Interrupted, NonFiniteError):
                return _train(cfg, group.share_folder(None), resume, False, group)
        return _train_main(cfg, run_dir, resume, progress, group)


def _train_main(cfg: RunConfig, run_dir: str | Path | None, resume: str | Path | None,
                progress: bool, group: Group) -> dict[str, Any]:
    """``train`` in the process that owns the run folder."""
    if resume is not None:
        run_dir = Path(resume)
        with runlock.hold(run_dir):
            return _train(cfg, run_dir, resume, progress, group)
    if run_dir is None:
        run_dir, made = new_run_dir(cfg), True
    else:
        run_dir, made = Path(run_dir), not Path(run_dir).exists()
        runlock.raise_if_busy(run_dir)  # another process filling it: say which
        _check_fresh(run_dir)  # before writing anything into the folder
        run_dir.mkdir(parents=True, exist_ok=True)
    with runlock.hold(run_dir, remove_if_unused=made):
        _check_fresh(run_dir)  # again, holding the folder: no other process writes there now
        return _train(cfg, run_dir, None, progress, group)


def _train(cfg: RunConfig, run_dir: Path, resume: str | Path | None,
           progress: bool, group: Group) -> dict[str, Any]:
    """``train`` in the folder it holds (rank 0) or that rank 0 holds (the others)."""
    if group.is_main:
        group.share_folder(run_dir)
    main = group.is_main
    if resume is None and cfg.data.root:
        # The saved config must find the data from any working directory (eval, analyze).
        root = str(Path(cfg.data.root).expanduser().resolve())
        cfg = replace(cfg, data=replace(cfg.data, root=root))
    if resume is None and cfg.model.init_from:  # likewise the run it starts from
        src = str(Path(cfg.model.init_from).expanduser().resolve())
        cfg = replace(cfg, model=replace(cfg.model, init_from=src))
    if cfg.train.tensorboard:
        check_tensorboard()
    tr = Trainer.build(cfg, group) if group.active else Trainer.build(cfg)
    tl, cfg_dict = tr.timeline, to_dict(cfg)
    if resume is None and main:  # first: a folder with config.json can always be resumed
        atomic_write_json(run_dir / "config.json", cfg_dict)
    if main:  # data.json: the mean/std and preprocessing eval feeds the model with
        save_data_record(run_dir, tr.bundle)
    metrics_path = run_dir / "metrics.jsonl"
    step, wall_before, meter = 0, 0.0, _Meter()
    if resume is not None:
        step, wall_before = _restore(run_dir, tr, metrics_path, meter)
    tr.log = ScalarLog(run_dir, cfg.train.tensorboard, purge_step=step if resume else None,
                       enabled=main)
    t0 = time.perf_counter() - wall_before
    if resume is not None and step > 0 and is_time(step, tl.eval_every, tl.total_steps) and \
            not group.agree(main and any(r.get("step") == step and EVAL_KEYS & set(r)
                                         for r in read_jsonl(metrics_path))):
        _evaluate_into(metrics_path, tr, step)  # interrupted between checkpoint and evaluation
    bar = progress_bar(total=tl.total_steps, initial=step, disable=not progress, unit="step",
                       desc=cfg.name, dynamic_ncols=True)
    tr.model.train()
    try:
        with signals.graceful(run_dir):
            step = _loop(tr, run_dir, metrics_path, step, t0, meter, bar, cfg_dict)
        bar.close()
        return _finish(run_dir, tr, step, time.perf_counter() - t0, metrics_path)
    except DataError as exc:  # e.g. an unreadable image met mid-epoch: say how to go on
        raise DataError(f"{str(exc).splitlines()[0]}; then `vitsam train --resume {run_dir}` "
                        "continues from the last checkpoint") from exc
    except OSError as exc:  # a checkpoint not written, a full disk: say how to go on
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or isinstance(exc, CheckpointWriteError)):
            raise
        raise type(exc)(f"{str(exc).splitlines()[0]}; {'free some space, ' if full else ''}"
                        f"then `vitsam train --resume {run_dir}` continues from the last "
                        "checkpoint") from exc
    finally:
        tr.log.close()


def _loop(tr: Trainer, run_dir: Path, metrics_path: Path, step: int, t0: float, meter: _Meter,
          bar: Any, cfg_dict: dict[str, Any]) -> int:
    """Optimiser steps from ``step`` to the end, with logging, checkpoints and evaluation."""
    cfg, tl = tr.cfg, tr.timeline
    bad = BadSteps(cfg.train.max_bad_steps)
    meter.start()
    while step < tl.total_steps:
        epoch, skip = divmod(step, tl.steps_per_epoch)
        # Resuming mid-epoch skips the batches already seen (the epoch's order is seeded).
        for x, y in train_batches(tr.bundle, cfg.train.batch_size, epoch=epoch,
                                  seed=cfg.train.seed, device=tr.device, start_batch=skip,
                                  shard=(tr.group.rank, tr.group.world)):
            bad.before_step(tr, meter)
            if tr.pretrain is not None:  # N images -> their 2N views and the positive pairs
                x, y = tr.pretrain.batch(x, y, step, tr.bundle)
            if tr.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = train_step(tr.net, tr.criterion, x, y, tr.optimizer, tr.scheduler, tr.scaler,
                             tr.step_cfg, key=step * tr.group.world + tr.group.rank)
            out = tr.group.reduce_step(out)  # the global batch's numbers, in every process
            meter.add(out)
            step += 1
            bar.update(1)
            meter.stop()  # what follows is not training time
            if bad.after_step(out):
                bar.close()  # its last line before the error's
                raise bad.stop(tr, run_dir, step, meter, cfg_dict, time.perf_counter() - t0)
            if is_time(step, tl.log_every, tl.total_steps):
                rec = {**meter.flush(), "step": step, "epoch": step / tl.steps_per_epoch}
                tr.log.write(rec)
                bar.set_postfix(epoch=f"{rec['epoch']:.2f}", loss=f"{rec['loss']:.3f}",
                                acc=f"{rec['acc']:.3f}", img_s=f"{rec['images_per_s']:.0f}")
            # Checkpoint before evaluating: a failure or an interruption during evaluation
            # then costs no training (the resumed run evaluates that step again).
            if is_time(step, tl.ckpt_every, tl.total_steps) or signals.requested():
                tr.checkpoint(run_dir, step, {"wall_time_s": time.perf_counter() - t0,
                                              "meter": meter.state()}, cfg_dict)
            signals.stop_if_requested(run_dir, step, step_name(step))
            if is_time(step, tl.eval_every, tl.total_steps):
                _evaluate_into(metrics_path, tr, step)
            meter.start()
            if step >= tl.total_steps:
                break
    return step


EVAL_KEYS = {"test_acc", "knn_acc"}  # what an evaluation record holds (supervised, pre-training)


def _evaluate_into(metrics_path: Path, tr: Trainer, step: int) -> None:
    """Test loss and accuracy at ``step`` (pre-training: kNN accuracy), appended to the log."""
    faults.point("eval")
    if tr.pretrain is not None:
        rec = tr.pretrain.evaluate(tr)
        tr.last_eval = (step, rec)
        tr.log.write({"step": step, "epoch": step / tr.timeline.steps_per_epoch, **rec})
        return
    ev = tr.evaluate()
    tr.last_eval = (step, ev)
    tr.log.write({"step": step, "epoch": step / tr.timeline.steps_per_epoch,
                  "test_loss": ev["nll"], "test_acc": ev["top1"], **_noise_fit(tr)})


def _noise_fit(tr: Trainer) -> dict[str, float]:
    """On the training samples whose labels ``data.label_noise`` replaced: the share the model
    predicts with the given (wrong) label, i.e. has memorised, and with the true one ({} when
    the run has no label noise)."""
    noisy = tr.bundle.noisy
    if noisy is None or len(noisy.index) == 0:
        return {}
    given = tr.bundle.train.subset(noisy.index)
    true = replace(given, labels=noisy.true.clone())
    return {"noisy_memorised": tr.evaluate(given)["top1"], "noisy_true": tr.evaluate(true)["top1"]}


def _saved_config(run_dir: Path) -> RunConfig:
    """The config of the run folder ``run_dir`` to resume (config.json, else the newest
    checkpoint's copy of it); refuses finished runs."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; give the folder that "
                              "`vitsam train` printed")
    if (run_dir / "final.json").exists():
        raise CheckpointError(f"{run_dir} already finished (final.json exists); "
                              "start a new run instead of resuming")
    source = run_dir / "config.json"
    try:
        saved = read_json(source, "run config")
    except (FileNotFoundError, ValueError) as exc:
        if not list_checkpoints(run_dir):
            raise CheckpointError(f"{str(exc).splitlines()[0]}; {run_dir} is not a vitsam run "
                                  "folder that can be resumed") from None
        # The checkpoint's state.json holds the same config.
        ckpt, state, _, _, _ = read_latest_good(run_dir)
        source, saved = ckpt / "state.json", state["config"]
    try:
        return from_dict(RunConfig, saved)
    except ConfigError as exc:  # e.g. a hand-edited "epochs": "3"
        raise ConfigError(f"{exc} (in {source}; correct it there)") from None


def _check_fresh(run_dir: Path) -> None:
    """A new run never writes into a folder that already holds a run (or anything else)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} is a file; give a folder for the run")
    if run_dir.is_dir() and any(p.name != runlock.LOCK_FILE for p in run_dir.iterdir()):
        hint = (f"`vitsam train --resume {run_dir}` continues it, or choose"
                if (run_dir / "config.json").exists() else "choose")
        raise CheckpointError(f"run folder {run_dir} is not empty; {hint} a new --run-dir")


def _restore(run_dir: Path, tr: Trainer, metrics_path: Path, meter: _Meter) -> tuple[int, float]:
    """Load the latest checkpoint of ``run_dir`` into the training objects and ``meter`` (the
    log interval it was in); returns (step, wall).

    A run interrupted before its first checkpoint starts again from step 0 (every draw is
    seeded, so that is the same run). A damaged latest checkpoint is reported by name and the
    newest older one that reads back whole is used: the run replays the steps between.
    """
    step, wall = 0, 0.0
    ckpts = run_dir / "checkpoints"
    if any(p.is_dir() and not p.name.startswith(".") for p in ckpts.glob("*")):
        ckpt, state, weights, opt_tensors, problems = read_latest_good(run_dir)
        if problems and tr.group.is_main:
            print(f"vitsam: warning: {'; '.join(problems)}; resuming from {ckpt.name} instead",
                  file=sys.stderr)
        tr.model.load_state_dict(weights)
        tr.optimizer.load_state_dict(unflatten_state(state["optimizer"], opt_tensors))
        tr.scheduler.load_state_dict(unflatten_state(state["scheduler"], opt_tensors))
        if tr.scaler is not None and "scaler" in state:
            tr.scaler.load_state_dict(unflatten_state(state["scaler"], opt_tensors))
        set_rng_state(state["rng"])
        step = int(state["step"])
        tr.group.restore_rng(state.get("extra", {}), tr.cfg.train.seed, step)
        wall = float(state.get("extra", {}).get("wall_time_s", 0.0))
        if "meter" in state.get("extra", {}):
            meter.load(state["extra"]["meter"])
    if metrics_path.exists() and tr.group.is_main:  # keep the interrupted log, but continue a clean one
        records = list(read_jsonl(metrics_path))
        k = 0
        while (aside := run_dir / f"metrics.pre-resume-{k}.jsonl").exists():
            k += 1
        # A copy aside, then the log replaced whole: a kill at any moment loses no record.
        atomic_write_bytes(aside, metrics_path.read_bytes())
        faults.point("restore")
        atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in records
                                                 if r.get("step", 0) <= step).encode())
    return step, wall


def _finish(run_dir: Path, tr: Trainer, step: int, wall: float,
            metrics_path: Path) -> dict[str, Any]:
    """Final test and clean train accuracy, throughput, and ``final.json``."""
    cfg = tr.cfg
    faults.point("finish")
    if tr.pretrain is not None:  # the linear probe's accuracies, kNN's (vitsam.pretrain)
        scores = tr.pretrain.final(tr)
    else:
        # The loop's evaluation at the last step saw these very weights: not a second pass.
        test = tr.last_eval[1] if tr.last_eval and tr.last_eval[0] == step else tr.evaluate()
        train_acc = tr.evaluate(random_subset(tr.bundle.train, cfg.train.train_eval_samples,
                                              cfg.train.seed))
        scores = {"test_acc": test["top1"], "test_top5": test["top5"], "test_loss": test["nll"],
                  "test_ece": test["ece"], "train_acc": train_acc["top1"]}
    records = list(read_jsonl(metrics_path)) if tr.group.is_main else []
    if tr.pretrain is not None:  # the NT-Xent loss of the last log interval
        losses = [r["loss"] for r in records if "loss" in r]
        scores["contrastive_loss"] = losses[-1] if losses else None
    final = {"run_dir": str(run_dir), "name": cfg.name, "model": cfg.model.name,
             "params": count_params(tr.model), "sam": cfg.optim.sam, "rho": cfg.optim.rho,
             **({"sam_variant": cfg.optim.sam_variant} if cfg.optim.sam else {}),
             "steps": step, "epochs": step / tr.timeline.steps_per_epoch, **scores,
             "wall_time_s": wall,
             "train_images_per_s": overall_rate(records), **step_counts(records),
             "device": str(tr.device), "processes": tr.group.world}
    if tr.bundle.noisy is not None:
        final["label_noise"] = {"rate": tr.bundle.noisy.rate, "kind": tr.bundle.noisy.kind,
                                "num_noisy": len(tr.bundle.noisy.index), **_noise_fit(tr)}
    if tr.init is not None:
        final["init"] = tr.init
    if tr.step_cfg.attack is not None:
        final["adversarial"] = adversarial_summary(tr, records)
    if tr.group.is_main:
        atomic_write_json(run_dir / "final.json", final)
    return final


def overall_rate(records: list[dict[str, Any]]) -> float | None:
    """Training images/s over the whole run from the logged per-interval rates.

    Each log record covers the steps since the previous one (same batch size), so the run's
    rate is total steps over total time: sum(steps_i) / sum(steps_i / rate_i), not the plain
    mean of the rates (which over-weights short, fast intervals).
    """
    steps = time_units = 0.0
    prev = 0
    for r in records:
        if "images_per_s" not in r:
            continue
        span = int(r["step"]) - prev
        prev = int(r["step"])
        if span > 0 and r["images_per_s"]:
            steps += span
            time_units += span / float(r["images_per_s"])
    return steps / time_units if time_units > 0 else None


def adversarial_summary(tr: Trainer, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What adversarial training did: the attack with its settings in use, and the loss and
    accuracy on the adversarial training batches over the last epoch's log records (weighted
    by their steps; None when no record has them)."""
    atk, t = tr.step_cfg.attack, tr.cfg.train
    last = [r for r in records if "adv_acc" in r]
    total = last[-1]["step"] if last else 0
    start = total - tr.timeline.steps_per_epoch
    acc = loss = weight = 0.0
    prev = 0
    for r in last:
        span, prev = int(r["step"]) - prev, int(r["step"])
        if r["step"] > start and math.isfinite(r["adv_acc"]) and math.isfinite(r.get("adv_loss", math.nan)):
            acc, loss, weight = acc + span * r["adv_acc"], loss + span * r["adv_loss"], weight + span
    return {"attack": t.adversarial, "eps": atk.eps, "step_size": atk.alpha,
            "steps": atk.iterations, "random_start": atk.random_start,
            "train_adv_acc": acc / weight if weight else None,
            "train_adv_loss": loss / weight if weight else None,
            "sam": tr.cfg.optim.sam}
