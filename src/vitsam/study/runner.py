"""Run a study: the grid's cells in worker processes (or Slurm jobs), finished cells reused,
failures recorded.

``DIR/study-<name>.json`` records the study (scale, seeds, command, every cell's status and, for
a failed cell, its one-line error); each cell is the run folder ``DIR/<cell>``; a study's shared
corruption set lives in ``DIR/_shared/corruptions``. A failing cell never stops the others; the
study then raises ``StudyFailed`` naming the failed cells (the CLI exits non-zero). The study
holds ``DIR/.vitsam-study.lock`` while it runs, so a second study on ``DIR`` stops at once.
Where a cell trains (in its worker, or as a torchrun job of ``nproc`` processes) is
``vitsam.study.launchers``; cells as Slurm jobs (``launcher="slurm"``) are ``vitsam.study.slurm``.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context, parent_process
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError, RunConfig, validate
from ..io import atomic_write_bytes, atomic_write_json
from ..lifeline import exit_with_parent
from ..progress import progress_bar
from ..train import runlock
from ..train.runlock import STUDY_LOCK_FILE
from .launchers import check_divisible, check_nproc, torchrun_trainer
from .presets import SCALE_NOTES, Cell, Study, cell_overrides, describe, study_cells
from .slurm import SLURM_FOLDER, SlurmOptions, check_available, check_options, run_jobs
from .stages import pending, run_cell
from .tables import write_tables

LAUNCHERS = ("local", "slurm")


class StudyFailed(RuntimeError):
    """Some cells of a study failed; the others finished."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _worker(cell: Cell, cfg: RunConfig, cell_dir: str, stages: tuple[str, ...], settings: Any,
            shared: dict[str, str], threads: int | None, nproc: int = 1) -> dict[str, Any]:
    """One cell in a worker process (or a Slurm job): never raises, returns status and (on
    failure) the error. ``nproc`` > 1 trains it as a torchrun job of that many processes."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    trainer = None
    if nproc > 1:
        trainer = torchrun_trainer(nproc, Path(cell_dir).parent / "_shared" / "launch")
    try:
        out = run_cell(cell, cfg, Path(cell_dir), stages, settings, shared, trainer=trainer)
        return {"status": "done", **out}
    except KeyboardInterrupt:
        if parent_process() is not None:
            # A pool worker stopped by a signal (its checkpoint written): end the process rather
            # than return to the pool for another cell, whose parent may be gone.
            os._exit(130)
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing cell is reported, never fatal
        return {"status": "failed", "error": _one_line(exc),
                "traceback": traceback.format_exc(limit=8)}


def _shared_corruptions(out: Path, cells: list[Cell], settings: Any, progress: bool) -> str:
    """The study's -C set, built once from the first cell's test split (all cells share it)."""
    from ..data.corruptions import build_corruption_set
    from ..eval.runner import corruption_source

    dest = out / "_shared" / "corruptions"
    data = cells[0].config.data
    img = data.img_size
    images, labels, desc = corruption_source(data.source, data.root, None, img,
                                             settings.corrupt_limit, 0)
    build_corruption_set(images, labels, dest, params=settings.corrupt_params,
                         corruptions=settings.corruptions, severities=settings.severities,
                         workers=0, progress=progress, source=desc)
    return str(dest)


def run_study(study: Study, scale: str, out: str | Path, seeds: Sequence[int] = (0,),
              workers: int = 1, only: Sequence[str] | None = None,
              overrides: Sequence[str] = (), data: str | None = None, root: str | None = None,
              progress: bool = True, command: str | None = None, nproc: int = 1,
              launcher: str = "local", slurm: SlurmOptions | None = None) -> dict[str, Any]:
    """Run (or continue) ``study`` at ``scale`` into ``out``; returns the study record.

    ``workers`` cells train at once, each in its own process with ``cpu_count // workers``
    torch threads (``workers=1`` runs the cells in this process, one after the other); each
    cell's training is a torchrun job of ``nproc`` processes when ``nproc`` > 1 (the threads
    shared among them). ``launcher="slurm"`` runs every cell as its own Slurm job instead
    (``slurm``: what each job asks for). One process at a time runs a study in ``out``
    (``vitsam.train.runlock``); a second one raises ``RunFolderBusy`` at once, naming the first
    one's pid, before it writes anything.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    check_nproc(nproc)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown --launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if launcher == "slurm":
        slurm = slurm or SlurmOptions()
        if workers != 1:
            raise ConfigError("--workers is for the local launcher; with --launcher slurm every "
                              "cell is its own job, all submitted at once")
        check_options(slurm)
        check_available()
    out = Path(out).expanduser()
    if launcher == "slurm":  # the jobs may start in another working directory
        out = out.absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the study")
    cells = study_cells(study, scale, seeds, only, data, root)
    configs, errors = _configs(cells, overrides, nproc)
    made = not out.exists()
    runlock.raise_if_busy(out, STUDY_LOCK_FILE)  # another study there: say which, create nothing
    out.mkdir(parents=True, exist_ok=True)
    # One study process per folder: two would train the same cells and overwrite each other's
    # record and tables (each cell's run folder is locked as well, by its training).
    with runlock.hold(out, remove_if_unused=made, command="vitsam study",
                      lock_file=STUDY_LOCK_FILE):
        return _run(study, scale, out, cells, configs, errors, seeds, workers, overrides, data,
                    root, progress, command, nproc, slurm if launcher == "slurm" else None)


def _threads(workers: int, nproc: int, slurm: SlurmOptions | None) -> int | None:
    """torch threads of each training process: this machine's cores shared among the cells
    that train at once and their processes; on Slurm, the job's --slurm-cpus-per-cell (None,
    torch's default, when not given)."""
    if slurm is not None:
        return max(1, slurm.cpus_per_cell // nproc) if slurm.cpus_per_cell else None
    return max(1, (os.cpu_count() or 1) // (workers * nproc))


def _run(study: Study, scale: str, out: Path, cells: list[Cell], configs: dict[str, RunConfig],
         errors: dict[str, str], seeds: Sequence[int], workers: int, overrides: Sequence[str],
         data: str | None, root: str | None, progress: bool, command: str | None,
         nproc: int, slurm: SlurmOptions | None) -> dict[str, Any]:
    """``run_study`` in the study folder ``out`` it holds."""
    settings = study.settings(scale)
    threads = _threads(workers, nproc, slurm)
    # The worker's own threads (its stages, one process): all of the cell's share.
    worker_threads = threads * nproc if threads else None
    notes = study.notes.get(scale) or SCALE_NOTES[scale]
    record: dict[str, Any] = {"study": study.name, "description": study.description,
                              "scale": scale, "scale_notes": notes,
                              "seeds": list(seeds), "workers": workers, "nproc": nproc,
                              "launcher": "slurm" if slurm else "local",
                              "overrides": list(overrides), "data": data, "root": root,
                              "command": command, "stages": list(study.stages),
                              "columns": list(study.columns), "grid": describe(cells),
                              "cells": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rec_path = out / f"study-{study.name}.json"
    todo: list[Cell] = []
    for c in cells:
        if c.name in errors:
            record["cells"][c.name] = {"status": "failed", "error": errors[c.name]}
            continue
        cfg = replace(configs[c.name], train=replace(configs[c.name].train, threads=threads))
        configs[c.name] = cfg
        try:
            left = pending(out / c.name, cfg, study.stages)
        except ValueError as exc:
            record["cells"][c.name] = {"status": "failed", "error": _one_line(exc)}
            continue
        if left:
            todo.append(c)
        else:
            record["cells"][c.name] = {"status": "reused"}
    shared: dict[str, str] = {}
    if "corruptions" in study.stages and todo:
        shared["corruptions"] = _shared_corruptions(out, todo, settings, progress)
    elif "corruptions" in study.stages and (out / "_shared" / "corruptions").is_dir():
        shared["corruptions"] = str(out / "_shared" / "corruptions")
    record["shared"] = shared
    atomic_write_json(rec_path, record)

    bar = progress_bar(total=len(cells), initial=len(cells) - len(todo) - len(errors), unit="cell",
                       desc=f"study {study.name} ({scale})", disable=not progress, dynamic_ncols=True)
    args = {c.name: (c, configs[c.name], str(out / c.name), study.stages, settings, shared,
                     worker_threads, nproc) for c in todo}
    t0 = time.perf_counter()

    def finished(name: str, res: dict[str, Any]) -> None:
        entry = {k: v for k, v in res.items() if k != "traceback"}
        record["cells"][name] = entry
        if res["status"] == "failed":
            # Atomic: a study killed here leaves the previous error file or none, never half of one.
            atomic_write_bytes(out / "_shared" / f"{name}.error.txt",
                               res.get("traceback", res["error"]).encode())
        atomic_write_json(rec_path, record)
        bar.update(1)
        failed = sum(1 for e in record["cells"].values() if e["status"] == "failed")
        left = len([n for n in args if n not in record["cells"]])
        if slurm:
            bar.set_postfix(done=len(record["cells"]) - failed, failed=failed, jobs=left)
        else:
            bar.set_postfix(done=len(record["cells"]) - failed, failed=failed,
                            running=min(workers, left), waiting=max(0, left - workers))

    if slurm:
        run_jobs([c.name for c in todo], _worker, args, slurm, out / "_shared" / SLURM_FOLDER,
                 finished, bar.write if progress else lambda line: None)
    elif workers == 1:
        for c in todo:
            bar.set_postfix_str(f"running {c.name}")
            finished(c.name, _worker(*args[c.name]))
    else:
        ctx = get_context("spawn")  # fork would share torch's thread pools and locks
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:  # no orphans after a kill
            futures: dict[Future, str] = {pool.submit(_worker, *args[c.name]): c.name
                                          for c in todo}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    name = futures.pop(f)
                    try:
                        res = f.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        res = {"status": "failed", "error": f"worker died: {_one_line(exc)}"}
                    finished(name, res)
    bar.close()
    record["wall_time_s"] = time.perf_counter() - t0
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_json(rec_path, record)
    write_tables(out, record)
    failed = sorted(n for n, e in record["cells"].items() if e["status"] == "failed")
    if failed:
        first = record["cells"][failed[0]]["error"]
        raise StudyFailed(f"{len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); "
                          f"{failed[0]}: {first}; details in {out / '_shared'}")
    return record


def _configs(cells: list[Cell], overrides: Sequence[str], nproc: int = 1
             ) -> tuple[dict[str, RunConfig], dict[str, str]]:
    """Each cell's config with the overrides, checked as training would check it on ``nproc``
    processes (before any work); an override no cell accepts is a usage error."""
    configs: dict[str, RunConfig] = {}
    errors: dict[str, str] = {}
    for c in cells:
        try:
            cfg = cell_overrides(c, overrides)
            validate(cfg)
            check_divisible(cfg, nproc)
            configs[c.name] = cfg
        except (ConfigError, ValueError, TypeError) as exc:
            errors[c.name] = _one_line(exc)
    if errors and not configs:
        raise ConfigError(next(iter(errors.values())).split(": ", 1)[-1])
    return configs, errors


def print_status(record: dict[str, Any], file: Any = sys.stdout) -> None:
    """The grid's cells with their status, one line each."""
    for name, e in sorted(record["cells"].items()):
        extra = f"  {e['error']}" if e["status"] == "failed" else (
            f"  ({e['seconds']:.0f}s)" if "seconds" in e else "")
        print(f"  {name:<28} {e['status']:<7}{extra}", file=file)
