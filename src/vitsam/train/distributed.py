"""Training on several processes: torchrun's ranks on DistributedDataParallel (docs/distributed.md).

``torchrun --nproc_per_node N -m vitsam train ...`` starts N processes; each finds its place in
the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins
one process group: NCCL when training on GPUs (process LOCAL_RANK on cuda:LOCAL_RANK), gloo on
CPUs. A single process (WORLD_SIZE unset or 1) trains as before, with no process group.

The contract:

- ``train.batch_size`` is the global batch; each process takes batch_size / world of it (a
  one-line ConfigError when that does not divide). Batch k of an epoch is the same global batch
  for any number of processes, each process reading only its slice (``vitsam.data.loader``,
  ``shard``). A step is one global batch, so a checkpoint's step (with ``samples`` = step x
  batch_size) is the position in the sample sequence, and a run resumed on another number of
  processes continues with the same global batches.
- DDP averages the gradients; SAM is ``vitsam.optim.steps.train_step``'s: each process perturbs
  with its own gradient by default, ``optim.sync_perturbation=true`` all-reduces it first.
  BatchNorm normalises each process's slice with its own statistics (the running statistics are
  rank 0's: DDP broadcasts its buffers at every forward) unless ``train.sync_batchnorm=true``
  (torch's SyncBatchNorm; GPUs only).
- Every step's numbers are reduced across processes (``reduce_step``): counts summed, means
  averaged (equal slices), skip flags agreed. All processes log the same records and stop after
  the same step: a signal reaching any of them stops all, after one checkpoint.
- Evaluation: each process scores a contiguous slice of the test images, without padding; the
  per-image numbers are gathered, so every image counts exactly once (``evaluate``).
- Only rank 0 writes (the run folder, its lock, logs, checkpoints, final.json) and shows a
  progress bar. Checkpoints hold the unwrapped model's weights, so a run resumes on any number
  of processes, and every process's RNG state.
- The global torch RNG (dropout, drop-path): rank 0 keeps the run's seeded stream, rank r > 0 is
  seeded from (seed, r), so processes draw different masks. A resume on the same number of
  processes restores each one's state; on another number, ranks above 0 are seeded from
  (seed, rank, step).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from ..eval.metrics import MetricAccumulator, evaluate as evaluate_batches, model_logits
from ..models.modes import eval_mode
from . import signals
from .checkpoint import rng_state, set_rng_state

_SUM = ("correct", "n")  # per-process counts, added up
_ANY = ("skipped", "nonfinite", "perturbed")  # flags (agreed by train_step), 1 if any process set them
_SAME = ("lr",)  # the same in every process


class FollowerExit(SystemExit):
    """A process other than rank 0 ending quietly, for a reason rank 0 reports itself."""


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True in rank 0 of a distributed run, and in a single process."""
    return world_size() <= 1 or _env_int("RANK", 0) == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be an integer; it is set by torchrun") from None


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (numpy's SeedSequence, as the data loader's)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass
class Group:
    """This process's place among the run's processes; a single process by default."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # for collectives
    shared: bool = False  # rank 0 has told the others the run folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- set-up --------------------------------------------------------------------------------
    def place(self, device: torch.device, name: str) -> torch.device:
        """The training device of this process: cuda:LOCAL_RANK when the run uses GPUs."""
        if not self.active or device.type != "cuda":
            return device
        if ":" in name:
            raise ConfigError(f"train.device={name} names one GPU, but torchrun started "
                              f"{self.world} processes; use train.device=cuda (process "
                              "LOCAL_RANK then trains on cuda:LOCAL_RANK)")
        return torch.device("cuda", self.local_rank)

    def per_rank_batch(self, batch_size: int) -> int:
        """batch_size / world, or a one-line ConfigError when it does not divide."""
        if batch_size % self.world:
            up = (batch_size // self.world + 1) * self.world
            down = batch_size // self.world * self.world
            hint = f"{down} or {up}" if down else f"{up}"
            raise ConfigError(f"train.batch_size={batch_size} (the global batch) does not divide "
                              f"among {self.world} processes; use a multiple of {self.world}, "
                              f"e.g. {hint}")
        return batch_size // self.world

    def batchnorm(self, model: nn.Module, sync: bool, device: torch.device) -> nn.Module:
        """``model`` with SyncBatchNorm layers when ``sync`` (several processes on GPUs)."""
        if not (sync and self.active):
            return model  # one process: its statistics are the whole batch's already
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm does "
                              "not run on CPUs); set it to false: each process then normalises "
                              "with its own slice's statistics")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the optimiser steps drive: ``model`` under DDP when there are several
        processes (its parameters are broadcast from rank 0 here), else ``model`` itself."""
        if not self.active:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None)

    def seed_ranks(self, seed: int) -> None:
        """Give each rank above 0 its own global RNG stream (after the identical model init)."""
        if self.active and self.rank > 0:
            torch.manual_seed(_derived_seed(seed, self.rank))

    # -- agreement -----------------------------------------------------------------------------
    def share_folder(self, run_dir: Path | None) -> Path:
        """Rank 0 passes on its run folder (None: it stopped before having one and reports
        why); the others receive it, or end quietly (``FollowerExit``) when there is none."""
        if not self.active:
            assert run_dir is not None
            return run_dir
        box = [str(run_dir) if self.is_main and run_dir is not None else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        self.shared = True
        if box[0] is None:
            raise FollowerExit(2)
        return Path(box[0])

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value``, in every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def reduce_step(self, out: dict[str, float]) -> dict[str, float]:
        """One step's numbers over all processes (module docstring); also agrees on a stop
        signal. One all-reduce."""
        if not self.active:
            return out
        keys = list(out)
        got = signals.received()
        vec = torch.tensor([float(out[k]) for k in keys] +
                           [float(got == s) for s in signals.SIGNALS],
                           dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        vals = vec.tolist()
        res = {k: v if k in _SUM else float(v > 0) if k in _ANY else out[k] if k in _SAME
               else v / self.world for k, v in zip(keys, vals)}
        for sig, hits in zip(signals.SIGNALS, vals[len(keys):]):
            if hits > 0:
                signals.mark(sig)
                break
        return res

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Any, batches: Callable[[Any], Iterable],
                 device: torch.device) -> dict[str, float | int]:
        """``vitsam.eval.metrics.evaluate`` of ``model`` on ``split``, each process scoring the
        contiguous slice [n r / world, n (r + 1) / world) of its n images (no padding, no
        image twice) and the per-image numbers gathered. ``batches(split)`` yields the batches."""
        if not self.active:
            return evaluate_batches(model, batches(split), device)
        for buf in model.buffers():  # BatchNorm running statistics: rank 0's, as checkpointed
            dist.broadcast(buf, src=0)
        n = len(split)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        acc = MetricAccumulator()
        with eval_mode(model):
            for x, y in batches(split.subset(torch.arange(lo, hi))):
                acc.update(model_logits(model, x.to(device)), y)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (acc.hits, acc.nll_sum, acc.n, acc.conf, acc.correct))
        total = MetricAccumulator()
        for hits, nll_sum, count, conf, correct in parts:  # rank order = the split's order
            for k in total.ks:
                total.hits[k] += hits[k]
            total.nll_sum += nll_sum
            total.n += count
            total.conf.extend(conf)
            total.correct.extend(correct)
        return total.result()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_extra(self, step: int, batch_size: int) -> dict[str, Any]:
        """What a checkpoint records of the processes: their number, the global position in
        the sample sequence, and (several processes) every process's RNG state. Collective."""
        extra: dict[str, Any] = {"world_size": self.world, "samples": step * batch_size}
        if self.active:
            states: list[Any] = [None] * self.world
            dist.all_gather_object(states, rng_state())
            extra["rng_ranks"] = states
        return extra

    def restore_rng(self, extra: dict[str, Any], seed: int, step: int) -> None:
        """After rank 0's RNG state was restored everywhere: each other rank's own state when
        the checkpoint was written by as many processes, else a stream seeded from
        (seed, rank, step)."""
        if not self.active or self.rank == 0:
            return
        states = extra.get("rng_ranks")
        if isinstance(states, list) and len(states) == self.world:
            set_rng_state(states[self.rank])
        else:
            torch.manual_seed(_derived_seed(seed, self.rank, step))


@contextmanager
def processes(cuda: bool) -> Iterator[Group]:
    """This process's ``Group`` for the block: joins torchrun's process group when WORLD_SIZE
    > 1 (NCCL if ``cuda``, else gloo) and leaves it afterwards.

    Rank 0 failing before it passed on the run folder tells the others, which end quietly.
    """
    world = world_size()
    if world <= 1:
        yield Group()
        return
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    owned = not dist.is_initialized()
    if owned and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not; start "
                          "the processes with torchrun (torchrun --nproc_per_node N -m vitsam "
                          "train ...)")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process LOCAL_RANK={local} needs cuda:{local}, but "
                              f"{torch.cuda.device_count()} GPU(s) are visible; start at most "
                              "that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    group = Group(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"))
    try:
        yield group
    except BaseException:
        if group.is_main and not group.shared:
            try:  # the others wait for the run folder: tell them there is none
                group.share_folder(None)
            except FollowerExit:
                pass
        raise
    finally:
        if owned:
            dist.destroy_process_group()


@contextmanager
def reported_by_main(*kinds: type[BaseException]) -> Iterator[None]:
    """Errors of ``kinds`` that every process meets alike end the processes other than rank 0
    quietly (rank 0 reports them once): the same status, no second copy of the message."""
    try:
        yield
    except kinds as exc:
        if is_main_process():
            raise
        raise FollowerExit(getattr(exc, "status", 2)) from exc
