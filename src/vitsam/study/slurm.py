"""A study's cells as Slurm jobs, through submitit: ``vitsam study ... --launcher slurm``.

Each cell to do is one job (its own ``sbatch`` script, written by submitit into
``OUT/_shared/slurm/<job id>/``, with the job's logs and pickled result); the job runs the cell
as a local worker would: its training (a torchrun job of ``--nproc`` processes inside the
allocation when that is above 1, e.g. one per GPU of ``--slurm-gpus-per-cell``), then its
stages, in one process. The study process submits every cell at once, polls the jobs (one
``sacct`` call for all of them each ``--slurm-poll`` seconds; a finished job is seen at once by
its result file) and records each as it ends, as the local launcher does. A job that ended
without a result (cancelled, timed out, pre-empted, its node lost) is a failed cell whose
one-line error names the job and its Slurm state; ``--retries K`` submits a failed cell again
up to K times (it resumes from its last checkpoint). Stopping the study (Ctrl-C, SIGTERM)
cancels the jobs still queued or running (``scancel``: the running ones checkpoint and stop),
so a rerun of the same command, which reuses the finished cells, owns every job on its cells.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import ConfigError

SLURM_FOLDER = "slurm"  # under OUT/_shared: one folder per job (%j)


@dataclass(frozen=True)
class SlurmOptions:
    """What each cell's job asks of Slurm, and how the study watches the jobs."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_cell: int = 0
    cpus_per_cell: int | None = None
    account: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # further #SBATCH --key=value lines
    retries: int = 0
    poll_s: float = 30.0


def parse_time(text: str) -> int:
    """Minutes of a Slurm time limit, in sbatch's forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M``, ``D-H:M:S`` (seconds rounded up to a minute)."""
    text = text.strip()
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = rest.split(":")
    if not days.isdigit() or len(parts) > 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--slurm-time {text!r} is not sbatch's MINUTES, H:MM:SS or D-HH:MM; "
                          "e.g. 90 or 1:30:00")
    n = [int(p) for p in parts]
    if dash:
        h, m, sec = (n + [0, 0])[:3]
    else:
        h, m, sec = tuple(n) if len(n) == 3 else (0, n[0], n[1] if len(n) == 2 else 0)
    minutes = int(days) * 1440 + h * 60 + m + (sec > 0)
    if minutes < 1:
        raise ConfigError(f"--slurm-time {text!r} must be at least one minute")
    return minutes


def parse_extra(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``key=value`` pairs of ``--slurm-extra`` (an ``#SBATCH --key=value`` line each)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"--slurm-extra {item!r} must be key=value, e.g. qos=high or "
                              "constraint=a100")
        out.append((key, value))
    return tuple(out)


def check_options(opts: SlurmOptions) -> None:
    """One-line errors for impossible options."""
    if opts.gpus_per_cell < 0 or (opts.cpus_per_cell is not None and opts.cpus_per_cell < 1):
        raise ConfigError("--slurm-gpus-per-cell must be 0 or more and --slurm-cpus-per-cell 1 "
                          "or more")
    if opts.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, got {opts.retries}")
    if not opts.poll_s > 0:
        raise ConfigError(f"--slurm-poll must be a positive number of seconds, got {opts.poll_s}")


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install submitit") from None
    return submitit


def check_available() -> None:
    """One-line errors when this machine cannot submit Slurm jobs through submitit."""
    require_submitit()
    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: no sbatch/srun on PATH; run the study on a Slurm "
                          "cluster's login node, or use --launcher local")


def make_executor(folder: Path, opts: SlurmOptions) -> Any:
    """A submitit SlurmExecutor writing its jobs under ``folder`` (one sub-folder per job)."""
    submitit = require_submitit()
    check_options(opts)
    try:
        ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=0)
    except RuntimeError as exc:  # no srun on PATH
        raise ConfigError(f"--launcher slurm: {str(exc).splitlines()[0]} (no srun on PATH)") from None
    params: dict[str, Any] = {"time": opts.time_min, "nodes": 1, "ntasks_per_node": 1}
    if opts.partition:
        params["partition"] = opts.partition
    if opts.account:
        params["account"] = opts.account
    if opts.gpus_per_cell:
        params["gpus_per_node"] = opts.gpus_per_cell
    if opts.cpus_per_cell:
        params["cpus_per_task"] = opts.cpus_per_cell
    if opts.extra:
        params["additional_parameters"] = dict(opts.extra)
    ex.update_parameters(**params)
    return ex


def _outcome(job: Any) -> dict[str, Any]:
    """The finished job's cell result (the worker's dict), or a failure naming the job."""
    try:
        return job.result()
    except Exception as exc:  # noqa: BLE001 - the job ended without running the cell through
        state = job.state
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return {"status": "failed", "traceback": str(exc),
                "error": f"slurm job {job.job_id} ended {state} without a result: {first}"}


def _pause(seconds: float) -> None:
    """The wait between two looks at the jobs."""
    time.sleep(seconds)


def run_jobs(names: Sequence[str], worker: Callable[..., dict[str, Any]],
             args: dict[str, tuple], opts: SlurmOptions, folder: Path,
             finished: Callable[[str, dict[str, Any]], None], note: Callable[[str], None]) -> None:
    """Run ``worker(*args[name])`` as one Slurm job per cell ``name``, calling ``finished(name,
    result)`` as each ends (after its retries); ``note`` reports submissions."""
    ex = make_executor(folder, opts)

    def submit(name: str) -> Any:
        ex.update_parameters(job_name=f"vitsam-{name}")
        return ex.submit(worker, *args[name])

    jobs: dict[str, tuple[Any, int]] = {}
    try:
        for name in names:
            jobs[name] = (submit(name), 0)
            note(f"{name}: slurm job {jobs[name][0].job_id}")
        while jobs:
            # One sacct call for every job still out; result files are looked at directly.
            next(iter(jobs.values()))[0].watcher.update()
            for name, (job, tries) in list(jobs.items()):
                if not job.done():
                    continue
                res = {**_outcome(job), "job_id": job.job_id, "attempts": tries + 1}
                if res["status"] == "failed" and tries < opts.retries:
                    jobs[name] = (submit(name), tries + 1)
                    note(f"{name}: {res['error']}; submitted again as slurm job "
                         f"{jobs[name][0].job_id}")
                    continue
                del jobs[name]
                finished(name, res)
            if jobs:
                _pause(opts.poll_s)
    except BaseException:
        for job, _ in jobs.values():  # stopped: no job keeps writing into the study's cells
            job.cancel(check=False)
        raise
