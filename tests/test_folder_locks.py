"""One process per output folder, with real processes (docs/reliability.md).

Two ``vitsam prune ... --out DIR`` or two ``vitsam study ... --out DIR`` started at the same
moment (a barrier releases both): the one that takes the folder pauses there (``VITSAM_FAULT``
``pause_at:folder``, just after it took the lock), the other exits 2 at once with one line naming
the folder and the first one's command and pid, having written nothing. After the holder is
killed with SIGKILL, the folder is free again: the next run finishes.

The processes are forked from a forkserver that imported torch and vitsam once (a fresh
interpreter needs seconds for that on a busy machine) and run ``vitsam.cli.main``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from vitsam import cli

TIMEOUT_S = 300  # generous: the test machine may be shared


def _context():
    ctx = mp.get_context("forkserver")
    # Everything `vitsam.cli.main` imports for prune and study.
    ctx.set_forkserver_preload(["torch", "sklearn.datasets", "vitsam.cli", "vitsam.commands",
                                "vitsam.analysis.runner", "vitsam.analysis.prune",
                                "vitsam.data.corruptions", "vitsam.eval.runner",
                                "vitsam.report.command", "vitsam.study.command",
                                "vitsam.study.runner", "vitsam.train.engine"])
    return ctx


CTX = _context()


def _child(argv: list[str], fault: str, log: str, env: dict[str, str], barrier) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    os.environ["VITSAM_FAULT"] = fault
    if barrier is not None:
        barrier.wait(TIMEOUT_S)
    sys.exit(cli.main(argv))


def _last_line(path: Path) -> str:
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else ""


def _race(tmp: Path, argv: list[str], env: dict[str, str]) -> tuple[mp.Process, Path, Path]:
    """Start two ``vitsam argv`` at once; wait until one pauses holding the folder and the other
    has ended. Returns (holder, holder's log, the other's log); the other exited 2."""
    barrier = CTX.Barrier(2)
    logs = [tmp / f"proc-{k}.log" for k in range(2)]
    procs = [CTX.Process(target=_child, args=(argv, "pause_at:folder", str(log), env, barrier))
             for log in logs]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            paused = [k for k in range(2) if logs[k].exists()
                      and "vitsam-fault: paused at folder" in logs[k].read_text()]
            ended = [k for k in range(2) if not procs[k].is_alive()]
            if paused and ended:
                break
            if len(paused) == 2:
                pytest.fail("both processes hold the folder")
            if len(ended) == 2:
                pytest.fail("neither process held the folder:\n" + logs[0].read_text()
                            + logs[1].read_text())
            time.sleep(0.02)
        else:
            pytest.fail("no process paused holding the folder")
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.kill()
        raise
    holder, loser = paused[0], ended[0]
    procs[loser].join(TIMEOUT_S)
    assert procs[loser].exitcode == 2, logs[loser].read_text()
    return procs[holder], logs[holder], logs[loser]


def _stop(proc: mp.Process) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(TIMEOUT_S)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A tiny ViT run folder on the digits (what ``vitsam prune`` reads)."""
    from vitsam.config import ModelConfig, RunConfig, to_dict
    from vitsam.data import DataConfig
    from vitsam.models import create_model, make_spec
    from vitsam.train.checkpoint import save_model_run

    kwargs = {"depth": 1, "embed_dim": 16, "num_heads": 2}
    torch.manual_seed(0)
    model = create_model("vit-t4", 10, 8, 1, **kwargs)
    config = to_dict(RunConfig(data=DataConfig(source="digits", augment="none"),
                               model=ModelConfig("vit-t4", kwargs)))
    return save_model_run(tmp_path_factory.mktemp("src") / "run", model,
                          make_spec("vit-t4", 10, 8, 1, kwargs), config)


def test_two_prunes_never_share_an_out_folder(tmp_path, source_run) -> None:
    out = tmp_path / "pruned"
    argv = ["prune", str(source_run), "--out", str(out), "--calib", "16", "--batch-size", "64",
            "--no-speed"]
    env = {"VITSAM_CACHE": str(tmp_path / "cache")}
    holder, _, loser_log = _race(tmp_path, argv, env)
    try:
        line = _last_line(loser_log)
        assert line.startswith(f"vitsam: error: run folder {out} is in use by another "
                               f"`vitsam prune` (pid {holder.pid} on "), loser_log.read_text()
        assert len(loser_log.read_text().strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [".vitsam-train.lock"]  # nothing written
    finally:
        _stop(holder)
    # The killed holder left only its lock file: the folder counts as empty and is free again.
    log = tmp_path / "after.log"
    p = CTX.Process(target=_child, args=(argv, "", str(log), env, None))
    p.start()
    p.join(TIMEOUT_S)
    assert p.exitcode == 0, log.read_text()
    assert (out / "prune.json").is_file() and (out / "checkpoints" / "final").is_dir()


def test_a_training_in_the_out_folder_names_itself_to_prune(tmp_path, source_run) -> None:
    """The lock is the run folder's, whichever command holds it."""
    from vitsam.analysis.prune import prune_run
    from vitsam.train import runlock

    out = tmp_path / "pruned"
    out.mkdir()
    with runlock.hold(out):
        with pytest.raises(runlock.RunFolderBusy,
                           match=rf"in use by another `vitsam train` \(pid {os.getpid()} on "):
            prune_run(source_run, out, calib=8, measure_speed=False, progress=False)
    assert [p.name for p in out.iterdir()] == [".vitsam-train.lock"]


def test_two_studies_never_share_an_out_folder(tmp_path) -> None:
    out = tmp_path / "study"
    argv = ["study", "main", "--scale", "smoke", "--out", str(out), "--quiet"]
    env = {"VITSAM_CACHE": str(tmp_path / "cache")}
    holder, _, loser_log = _race(tmp_path, argv, env)
    try:
        line = _last_line(loser_log)
        assert line.startswith(f"vitsam: error: study folder {out} is in use by another "
                               f"`vitsam study` (pid {holder.pid} on "), loser_log.read_text()
        assert len(loser_log.read_text().strip().splitlines()) == 1
        assert [p.name for p in out.iterdir()] == [".vitsam-study.lock"]
    finally:
        _stop(holder)
    from vitsam.train import runlock

    with runlock.hold(out, lock_file=runlock.STUDY_LOCK_FILE):  # the kernel dropped the lock
        pass


def test_a_study_that_fails_before_its_work_leaves_no_folder(tmp_path, monkeypatch) -> None:
    from vitsam.study import runner
    from vitsam.study.presets import get_study

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_run", stop)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(get_study("main"), "smoke", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
