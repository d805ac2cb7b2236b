"""``vitsam study NAME --scale S --out DIR``."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds lists no seeds; give e.g. 0,1")
    return seeds


def _slurm_options(args: argparse.Namespace) -> Any:
    """The Slurm options of the command line (None for the local launcher, which refuses them)."""
    from .slurm import SlurmOptions, parse_extra, parse_time

    given = [f"--{k.replace('_', '-')}" for k in ("slurm_partition", "slurm_cpus_per_cell",
                                                   "slurm_account") if getattr(args, k)]
    given += ["--slurm-extra"] * bool(args.slurm_extra) + ["--retries"] * bool(args.retries)
    given += ["--slurm-gpus-per-cell"] * bool(args.slurm_gpus_per_cell)
    if args.launcher != "slurm":
        if given:
            raise ConfigError(f"{given[0]} is for --launcher slurm")
        return None
    return SlurmOptions(partition=args.slurm_partition, time_min=parse_time(args.slurm_time),
                        gpus_per_cell=args.slurm_gpus_per_cell,
                        cpus_per_cell=args.slurm_cpus_per_cell, account=args.slurm_account,
                        extra=parse_extra(args.slurm_extra), retries=args.retries,
                        poll_s=args.slurm_poll)


def add_study(sub: Any) -> None:
    from .presets import SCALES, STUDIES

    s = sub.add_parser("study", help="run one of the paper's comparisons as a grid of runs",
                       description="Train every cell of a study (a grid of run presets), run its "
                                   "analyses and evaluations, and write its tables. Finished "
                                   "cells are reused; failed cells are reported. Studies: "
                                   + "; ".join(f"{k}: {v.description}" for k, v in STUDIES.items()))
    s.add_argument("name", metavar="NAME", help=f"one of {', '.join(STUDIES)}")
    s.add_argument("--scale", default="smoke", choices=SCALES,
                   help="smoke (seconds), cpu (2 cores, about an hour), gpu, paper")
    s.add_argument("--out", help="study folder (one run folder per cell); required unless --list")
    s.add_argument("--data", help="data source for every cell (as data.source)")
    s.add_argument("--root", help="data root for every cell (as data.root)")
    s.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    s.add_argument("--workers", type=int, default=1,
                   help="cells trained at once, each in its own process with cores/N threads")
    s.add_argument("--nproc", type=int, default=None,
                   help="train each cell as a torchrun job of N processes on one machine (gloo "
                        "on CPUs, NCCL on GPUs); the stages after training run in one process. "
                        "Default 1, or --slurm-gpus-per-cell with --launcher slurm")
    s.add_argument("--launcher", default="local", help="local (worker processes, the default) "
                                                       "or slurm (each cell one job, via submitit)")
    g = s.add_argument_group("slurm (with --launcher slurm)")
    g.add_argument("--slurm-partition", help="partition of every cell's job")
    g.add_argument("--slurm-time", default="60", help="time limit of a cell's job: MINUTES, "
                                                      "H:MM:SS or D-HH:MM (default 60)")
    g.add_argument("--slurm-gpus-per-cell", type=int, default=0, help="GPUs per cell (default 0)")
    g.add_argument("--slurm-cpus-per-cell", type=int, help="CPU cores per cell (its torch threads)")
    g.add_argument("--slurm-account", help="account charged for the jobs")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a further #SBATCH --KEY=VALUE line, e.g. qos=high (repeatable)")
    g.add_argument("--slurm-poll", type=float, default=30.0,
                   help="seconds between looks at the jobs' state (default 30)")
    g.add_argument("--retries", type=int, default=0,
                   help="submit a failed cell's job again up to N times (it resumes from its "
                        "last checkpoint; default 0: a rerun of the command resubmits it)")
    s.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells")
    s.add_argument("--list", action="store_true", help="list the cells and exit")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("overrides", nargs="*", help="key=value applied to every cell")
    s.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> None:
    from .presets import get_study, study_cells
    from .runner import StudyFailed, print_status, run_study

    study = get_study(args.name)
    seeds = _seeds(args.seeds)
    if args.only:  # `--only A B key=value`: the list stops at the first override
        args.overrides = [*[o for o in args.only if "=" in o], *args.overrides]
        args.only = [o for o in args.only if "=" not in o] or None
    if args.list:
        for c in study_cells(study, args.scale, seeds, args.only, args.data,
                             args.root):
            print(f"{c.name:<28} {c.config.model.name} {dict(c.config.model.kwargs)} "
                  f"fraction={c.config.data.train_fraction:g} sam={c.config.optim.sam}")
        return
    if not args.out:
        raise ConfigError("--out is required: the study folder that holds one run folder per cell")
    command = "vitsam " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    slurm = _slurm_options(args)
    nproc = args.nproc if args.nproc is not None else (
        max(1, slurm.gpus_per_cell) if slurm is not None else 1)
    failure = None
    try:
        record = run_study(study, args.scale, args.out, seeds, args.workers, args.only,
                           args.overrides, args.data, args.root, progress=not args.quiet,
                           command=command, nproc=nproc, launcher=args.launcher, slurm=slurm)
    except StudyFailed as exc:
        failure = exc
        from ..io import read_json

        record = read_json(Path(args.out) / f"study-{study.name}.json", "study record")
    print(f"\nstudy {study.name} at {args.scale} scale -> {args.out}")
    print_status(record)
    md = Path(args.out) / f"{study.name}.md"
    print("\n" + md.read_text())
    print(f"tables -> {md} (and .csv); full report: vitsam report {args.out}")
    if failure is not None:
        raise failure
