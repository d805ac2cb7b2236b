"""How a study trains one cell: in its worker process, or as a torchrun job of N processes.

``--nproc 1`` (the default) trains the cell in the worker, as ``vitsam.train.engine.train``.
``--nproc N`` starts, for each cell, the documented multi-process command as a subprocess::

    python -m torch.distributed.run --standalone --nproc_per_node N -m vitsam train --quiet \\
        --config OUT/_shared/launch/<cell>.config.json --run-dir OUT/<cell>

(``--resume OUT/<cell>`` for a cell that holds a config.json already). The N processes train
on one machine, gloo on CPUs and NCCL on GPUs (``vitsam.train.distributed``); the analyses and
evaluations after training run in the worker, in one process. torchrun's output (every rank's)
goes to ``OUT/_shared/launch/<cell>.torchrun.log``; a failure raises ``CellTrainingFailed``
with one line: rank 0's ``vitsam: error:`` line when it wrote one, else the rank that failed
first, its exit status and its last exception line, then the log's path.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..config import ConfigError, RunConfig, to_dict
from ..io import atomic_write_json

# A cell's trainer: (config, run folder, resume?) -> None; raises when training failed.
Trainer = Callable[[RunConfig, Path, bool], None]
STOP_GRACE_S = 120.0  # how long a stopped torchrun job may take to checkpoint and end


class CellTrainingFailed(RuntimeError):
    """A cell's torchrun job ended with a non-zero status."""


def check_nproc(nproc: object) -> int:
    """``nproc`` if it is a positive integer, else a one-line ConfigError."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer (processes per cell), got {nproc!r}")
    return nproc


def check_divisible(cfg: RunConfig, nproc: int) -> None:
    """The one-line error training would give when the global batch does not divide among
    ``nproc`` processes, before any process starts."""
    from ..train.distributed import Group

    if nproc > 1:
        Group(0, nproc).per_rank_batch(cfg.train.batch_size)


def torchrun_command(nproc: int, cell_dir: Path, config_file: Path | None) -> list[str]:
    """The command that trains ``cell_dir`` on ``nproc`` processes: a new run from
    ``config_file``, or (None) a resume of the run in ``cell_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "vitsam", "train", "--quiet"]
    if config_file is None:
        return [*cmd, "--resume", str(cell_dir)]
    return [*cmd, "--config", str(config_file), "--run-dir", str(cell_dir)]


def _child_env() -> dict[str, str]:
    """This environment, with the folder this vitsam is imported from first on PYTHONPATH: the
    ranks import the same code as the study."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and p != src]])
    return env


def _death_signal() -> Callable[[], None] | None:
    """For the torchrun child, before exec: SIGTERM when the worker that started it dies
    (Linux's PR_SET_PDEATHSIG), so a killed study leaves no training behind (torchrun passes
    SIGTERM on to the ranks, which checkpoint and stop). libc is looked up here, in the parent:
    the child between fork and exec only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


def torchrun_trainer(nproc: int, launch_dir: Path) -> Trainer:
    """A trainer that runs each cell as a torchrun job of ``nproc`` processes (module
    docstring); ``launch_dir`` holds the cells' config files and logs."""

    def train(cfg: RunConfig, cell_dir: Path, resume: bool) -> None:
        launch_dir.mkdir(parents=True, exist_ok=True)
        config_file = None
        if not resume:
            config_file = launch_dir / f"{cell_dir.name}.config.json"
            atomic_write_json(config_file, to_dict(cfg))
        log = launch_dir / f"{cell_dir.name}.torchrun.log"
        cmd = torchrun_command(nproc, cell_dir, config_file)
        with open(log, "wb") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(),
                                    stdin=subprocess.DEVNULL, preexec_fn=_death_signal())
            try:
                code = proc.wait()
            except BaseException:  # stopped (Ctrl-C, SIGTERM): let the ranks checkpoint first
                _stop(proc)
                raise
        if code != 0:
            raise CellTrainingFailed(failure_line(log.read_text(errors="replace"), code, nproc)
                                     + f" (log: {log})")

    return train


def _stop(proc: subprocess.Popen) -> None:
    """End a torchrun job: SIGTERM (the ranks checkpoint and stop), SIGKILL after the grace."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")


def failure_line(log: str, code: int, nproc: int) -> str:
    """One line saying why a torchrun job of ``nproc`` processes ended with status ``code``,
    read from its output ``log``."""
    own = [ln[len("vitsam: "):] for ln in log.splitlines() if ln.startswith("vitsam: ")
           and not ln.startswith("vitsam: warning:")]
    if own:  # rank 0 said what went wrong (errors: one line, by vitsam.cli)
        return f"training on {nproc} processes failed: {own[0].removeprefix('error: ')}"
    m = _ROOT_CAUSE.search(log)
    head = log.split("ChildFailedError", 1)[0]
    # The failing rank's own last exception line, not torchrun's traceback of it.
    excs = [ln for ln in head.splitlines() if _EXC_LINE.match(ln)
            and "torch.distributed.elastic" not in ln]
    why = f": {excs[-1]}" if excs else ""
    if m:
        rank, status = int(m.group(1)), int(m.group(2))
        what = (f"killed by {signal.Signals(-status).name}" if status < 0 and
                -status in signal.valid_signals() else f"exited with status {status}")
        return f"training on {nproc} processes failed: rank {rank} {what}{why}"
    return f"training on {nproc} processes failed: torchrun exited with status {code}{why}"
