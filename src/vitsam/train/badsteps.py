"""Steps with a non-finite loss or gradient: counted in the log, and too many in a row stop the run.

``vitsam.optim.steps.train_step`` skips such a step as if its batch had not been drawn (weights,
optimiser state, BatchNorm statistics and the torch RNG stay as they were; the step counter and
the LR schedule move on, as for an fp16 step the GradScaler skips) and flags it ``nonfinite``.
Each log record counts them (``nonfinite_steps``, next to ``skipped_steps``, which also holds
the GradScaler's own skips), and ``final.json`` holds both totals.

``BadSteps`` follows the streak. After ``train.max_bad_steps`` non-finite steps in a row it
writes the checkpoint of the step just before the streak began, with the state of the run at
that step exactly: the weights and optimiser state, which skipped steps leave alone, and the
scheduler, the learning rates it writes into the optimiser's groups, the GradScaler, the log
interval and the RNG, all saved before every step. It removes the run's own periodic
checkpoints written during the streak (same weights, later position), logs the unfinished
interval and hands back a one-line ``NonFiniteError`` naming the step and the likely causes.
``vitsam train --resume`` then continues from before the fault.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from .checkpoint import _own_step_checkpoints, _prune_old, rng_state, save_checkpoint
from .checkpoint import set_rng_state, step_name


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the run stopped."""


class _Saved:
    """A state dict saved earlier, in the shape ``save_checkpoint`` asks of an optimiser."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


class BadSteps:
    """The streak of non-finite steps of one training process (``limit``: train.max_bad_steps)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak = 0
        self._before: dict[str, Any] | None = None

    def before_step(self, tr: Any, meter: Any) -> None:
        """Save what the next step changes even when it is skipped (while no streak runs)."""
        if self.streak:
            return
        # The scheduler writes each step's learning rate into the optimiser's groups.
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                  for g in tr.optimizer.param_groups]
        self._before = {"groups": groups, "scheduler": copy.deepcopy(tr.scheduler.state_dict()),
                        "scaler": copy.deepcopy(tr.scaler.state_dict()) if tr.scaler is not None else None,
                        "meter": meter.state(), "rng": rng_state()}

    def after_step(self, out: dict[str, float]) -> bool:
        """Count the step just taken; True when the run must stop."""
        self.streak = self.streak + 1 if out.get("nonfinite") else 0
        return self.streak >= self.limit

    def stop(self, tr: Any, run_dir: Path, step: int, meter: Any, cfg_dict: dict[str, Any],
             wall: float) -> NonFiniteError:
        """Log the unfinished interval, leave the checkpoint from before the streak, and return
        the error to raise."""
        tl, cfg = tr.timeline, tr.cfg
        first = step - self.streak + 1
        if meter.count:
            tr.log.write({**meter.flush(), "step": step, "epoch": step / tl.steps_per_epoch})
        saved = self._before
        assert saved is not None  # before_step ran before the streak's first step
        set_rng_state(saved["rng"])
        for group, hyper in zip(tr.optimizer.param_groups, saved["groups"]):
            group.update(hyper)
        at = first - 1
        name = step_name(at)
        if getattr(getattr(tr, "group", None), "is_main", True):  # one writer in a distributed run
            save_checkpoint(run_dir, name, tr.model, tr.spec, cfg_dict, at, at // tl.steps_per_epoch,
                            tr.optimizer, _Saved(saved["scheduler"]),
                            _Saved(saved["scaler"]) if saved["scaler"] is not None else None,
                            extra={"wall_time_s": wall, "meter": saved["meter"]})
            root = Path(run_dir) / "checkpoints"
            for s, later in _own_step_checkpoints(root):
                if s > at:
                    shutil.rmtree(root / later, ignore_errors=True)
            if cfg.train.keep_checkpoints:
                _prune_old(root, cfg.train.keep_checkpoints, protect=name)
        return NonFiniteError(_message(tr, run_dir, step, first, self.limit, name))


def _message(tr: Any, run_dir: Path, step: int, first: int, limit: int, name: str) -> str:
    cfg = tr.cfg
    running = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[tr.step_cfg.autocast_dtype]
    precision = f"train.precision={cfg.train.precision}" + (
        f", running {running}" if cfg.train.precision == "auto" else "")
    causes = [f"too high a learning rate (optim.lr={cfg.optim.lr:g})"]
    if cfg.optim.sam:
        causes.append(f"too large a SAM rho (optim.rho={cfg.optim.rho:g})")
    causes.append(f"too low a precision ({precision}; fp32 is the most robust)" if running != "fp32"
                  else f"non-finite values in the data (the precision is fp32 already: {precision})")
    return (f"training stopped at step {step}: {step - first + 1} steps in a row (from step {first}) "
            f"had a non-finite loss or gradient and were skipped (train.max_bad_steps={limit}); "
            f"likely causes: {', '.join(causes[:-1])} or {causes[-1]}; checkpoint {name} holds the "
            f"run before the fault, which `vitsam train --resume {run_dir}` continues from; a new run "
            f"with a lower optim.lr{' or optim.rho' if cfg.optim.sam else ''} is the usual fix")


def step_counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """``{skipped_steps, nonfinite_steps}`` and, for SAM runs, ``perturbed_steps``: totals over
    a run's training log records."""
    recs = [r for r in records if "skipped_steps" in r]
    out = {"skipped_steps": int(sum(r["skipped_steps"] for r in recs)),
           "nonfinite_steps": int(sum(r.get("nonfinite_steps", 0) for r in recs))}
    if any("perturbed_steps" in r for r in recs):
        out["perturbed_steps"] = int(sum(r.get("perturbed_steps", 0) for r in recs))
    return out
