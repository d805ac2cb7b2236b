"""Training under faults, with real processes and real signals (docs/reliability.md).

SIGKILL at chosen moments, SIGINT and SIGTERM, a damaged latest checkpoint, a full disk and two
processes on one run folder: each interrupted run, resumed with ``vitsam train --resume``, must
end exactly where the uninterrupted run with the same seed ends (CPU, bit-exact).

The processes are forked from a multiprocessing forkserver that imported torch, vitsam and
sklearn once (a fresh interpreter needs several seconds for that on a busy machine); each runs
``vitsam.cli.main`` in a process of its own, with its own ``VITSAM_FAULT`` (``vitsam.faults``),
and is signalled with ``os.kill``. The full-disk test runs a fresh ``python -m vitsam.cli``.
"""
import errno
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitsam
from vitsam import cli
from vitsam.config import RunConfig, apply_overrides
from vitsam.io import read_jsonl
from vitsam.train import engine, runlock, signals
from vitsam.train.checkpoint import read_checkpoint, resolve_checkpoint

TIMEOUT_S = 300  # generous: the test machine may be shared
# The digits' training split in batches of 64: 22 steps, checkpoints after steps 6, 12, 18 and
# 22, evaluations after 11 and 22, a log record every 2 steps; SAM, dropout and augmentation
# draw from the seeded generators, so a resume that restored them wrongly would not end equal.
STEPS, EVALS = 22, (11, 22)
ARGS = ["data.source=digits", "data.augment=basic", "model.name=vit-t4", "model.kwargs.depth=1",
        "model.kwargs.embed_dim=16", "model.kwargs.num_heads=2", "model.kwargs.patch_size=4",
        "model.kwargs.drop_rate=0.1", "optim.sam=true", "train.epochs=1", "train.batch_size=64",
        "train.warmup_steps=3", "train.ckpt_every_epochs=0.25", "train.eval_every_epochs=0.5",
        "train.log_every_steps=2", "train.train_eval_samples=300", "train.precision=fp32",
        "train.device=cpu", "train.threads=1"]
TIMING = ("images_per_s",)  # the only metrics.jsonl field that differs between equal runs
FINAL_TIMING = ("run_dir", "wall_time_s", "train_images_per_s")


def _context():
    ctx = mp.get_context("forkserver")
    # Everything `vitsam.cli.main` imports (its parser alone pulls in matplotlib and numba).
    ctx.set_forkserver_preload(["torch", "sklearn.datasets", "vitsam.cli", "vitsam.commands",
                                "vitsam.train.engine", "vitsam.analysis.runner",
                                "vitsam.data.corruptions", "vitsam.eval.runner",
                                "vitsam.report.command", "vitsam.study.command"])
    return ctx


CTX = _context()


def _cli_child(argv: list[str], fault: str, log: str, barrier=None) -> None:
    """A forked ``vitsam`` process: stdout and stderr go to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["VITSAM_FAULT"] = fault
    # Ctrl-C as in a terminal, also when the tests run where SIGINT is ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if barrier is not None:
        barrier.wait(TIMEOUT_S)
    sys.exit(cli.main(argv))


class Proc:
    """One ``vitsam`` process started from the forkserver."""

    def __init__(self, log: Path, argv: list[str], fault: str = "", barrier=None) -> None:
        self.log = log
        self.p = CTX.Process(target=_cli_child, args=(argv, fault, str(log), barrier))
        self.p.start()

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_paused(self, count: int = 1) -> str:
        """Wait until the process has reached ``count`` fault pauses; returns the last one."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            paused = [ln for ln in self.text().splitlines() if ln.startswith("vitsam-fault:")]
            if len(paused) >= count:
                return paused[-1]
            if not self.p.is_alive():
                pytest.fail(f"process ended ({self.p.exitcode}) before its pause:\n{self.text()}")
            time.sleep(0.02)
        self.p.kill()
        pytest.fail(f"no pause within {TIMEOUT_S} s:\n{self.text()}")

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self) -> int:
        self.p.join(TIMEOUT_S)
        if self.p.is_alive():
            self.p.kill()
            pytest.fail(f"process still running after {TIMEOUT_S} s:\n{self.text()}")
        return self.p.exitcode


def _vitsam(tmp: Path, argv: list[str], fault: str = "") -> tuple[int, str]:
    """Run ``vitsam`` to the end in a process; (exit status, its output)."""
    k = len(list(tmp.glob("proc-*.log")))
    proc = Proc(tmp / f"proc-{k}.log", argv, fault)
    return proc.wait(), proc.text()


def _new(run: Path) -> list[str]:
    return ["train", "--quiet", "--run-dir", str(run), f"data.cache_dir={run.parent / 'cache'}",
            *ARGS]


def _resume(run: Path) -> list[str]:
    return ["train", "--quiet", "--resume", str(run)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    rc, out = _vitsam(tmp, _new(run))
    assert rc == 0, out
    return run


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(run / "metrics.jsonl")]


def assert_same_run(run: Path, reference: Path) -> None:
    """Final weights and optimiser state bit-identical; every metrics.jsonl record (training
    intervals and evaluations, in order, all fields but images/s) and every final.json field
    but the folder and timings equal."""
    (ck_a, ck_b) = (resolve_checkpoint(r, "last") for r in (run, reference))
    state_a, weights_a, opt_a = read_checkpoint(ck_a)
    state_b, weights_b, opt_b = read_checkpoint(ck_b)
    assert state_a["step"] == state_b["step"] == STEPS
    for got, want in ((weights_a, weights_b), (opt_a, opt_b)):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert state_a["optimizer"] == state_b["optimizer"] and state_a["rng"] == state_b["rng"]
    got, want = _records(run), _records(reference)
    assert [r["step"] for r in want if "loss" in r] == list(range(2, STEPS + 1, 2))
    assert [r["step"] for r in want if "test_acc" in r] == list(EVALS)
    assert got == want
    final_a, final_b = (json.loads((r / "final.json").read_text()) for r in (run, reference))
    for key in FINAL_TIMING:
        final_a.pop(key), final_b.pop(key)
    assert final_a == final_b
    scratch = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert scratch == [], scratch  # no half-written or half-deleted folder left behind


def _latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest.json"
    return json.loads(path.read_text())["name"] if path.exists() else None


# -- SIGKILL -------------------------------------------------------------------------------------

def test_sigkill_at_random_moments_then_resume_ends_as_the_uninterrupted_run(tmp_path,
                                                                              reference) -> None:
    """Seven SIGKILLs in a row, the first in a fresh run, the others in resumed processes; the
    moments are fault pauses whose occurrence (which step, which checkpoint) a seeded generator
    draws: during a step before the first checkpoint, while writing a checkpoint, while resuming
    (old log copied aside, new one not yet written), during an evaluation (11, between
    checkpoints, so steps 7-11 are replayed), during a step just after a resume, during a later
    checkpoint write, during the final evaluation."""
    rng = random.Random(1207)
    run = tmp_path / "run"
    kills = [(None, f"pause_at:step@{rng.randint(2, 5)}"),
             ("resume", "pause_at:ckpt_write@1"),
             ("resume", "pause_at:restore@1"),
             ("resume", "pause_at:eval@1"),
             ("resume", f"pause_at:step@{rng.randint(1, 3)}"),
             ("resume", f"pause_at:ckpt_write@{rng.randint(1, 2)}"),
             ("resume", "pause_at:finish@1")]
    seen = []
    for k, (mode, fault) in enumerate(kills):
        argv = _new(run) if mode is None else _resume(run)
        proc = Proc(tmp_path / f"proc-{k}.log", argv, fault)
        pause = proc.wait_paused()
        proc.kill(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        seen.append((pause.split()[3], _latest(run)))
        if "ckpt_write" in fault:  # killed mid-write: the half-written copy is there ...
            assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
        if "restore" in fault:  # killed between copying the log aside and rewriting it
            aside = sorted(run.glob("metrics.pre-resume-*.jsonl"))[-1]
            assert (run / "metrics.jsonl").read_bytes() == aside.read_bytes()
    # ... and where each kill left the run: no checkpoint before step 6; the kill while writing
    # the first one left none; the evaluation at 11 ran from the checkpoint at 6.
    assert seen[:4] == [("step", None), ("ckpt_write", None), ("restore", None),
                        ("eval", "step-00000006")]
    assert seen[-1] == ("finish", "step-00000022")
    rc, out = _vitsam(tmp_path, _resume(run))
    assert rc == 0, out
    assert_same_run(run, reference)


# -- SIGINT / SIGTERM ----------------------------------------------------------------------------

def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_sigint_and_sigterm_finish_the_step_checkpoint_and_say_how_to_resume(tmp_path,
                                                                             reference) -> None:
    """SIGINT during step 8 (no checkpoint due): step 8 ends, its checkpoint is written, exit
    130. The resumed process gets SIGTERM during the evaluation at step 11: it finishes it,
    trains step 12, checkpoints it and exits 143. The next resume ends as the uninterrupted run."""
    run = tmp_path / "run"
    proc = Proc(tmp_path / "proc-0.log", _new(run), "pause_at:step@8")
    proc.wait_paused()
    proc.kill(signal.SIGINT)
    assert proc.wait() == 130
    assert _last_line(proc.text()) == (f"vitsam: stopped by SIGINT after step 8, checkpoint "
                                       f"step-00000008 written; `vitsam train --resume {run}` "
                                       "continues the run")
    assert "Traceback" not in proc.text()
    assert _latest(run) == "step-00000008"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 4, 6, 8]

    proc = Proc(tmp_path / "proc-1.log", _resume(run), "pause_at:eval@1")
    assert "eval #1" in proc.wait_paused()
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 143
    assert _last_line(proc.text()).startswith("vitsam: stopped by SIGTERM after step 12, "
                                              "checkpoint step-00000012 written;")
    assert _latest(run) == "step-00000012"
    rc, out = _vitsam(tmp_path, _resume(run))
    assert rc == 0, out
    assert_same_run(run, reference)


def test_a_second_signal_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path) -> None:
    """SIGTERM during step 7 asks for a checkpoint of step 7; a second SIGTERM while it is half
    written ends the process at once: step-00000006 stays the latest, whole."""
    run = tmp_path / "run"
    proc = Proc(tmp_path / "proc-0.log", _new(run), "pause_at:step@7,pause_at:ckpt_write@2")
    assert "step #7" in proc.wait_paused()
    proc.kill(signal.SIGTERM)
    assert "ckpt_write #2" in proc.wait_paused(count=2)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 143
    assert "SIGTERM again: stopping now" in _last_line(proc.text())
    assert _latest(run) == "step-00000006"
    assert read_checkpoint(run / "checkpoints" / "step-00000006")[0]["step"] == 6
    assert not (run / "checkpoints" / "step-00000007").exists()


def test_graceful_restores_handlers_and_leaves_ignored_signals_ignored(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.graceful(tmp_path):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is signals._handle
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert signals.requested()
            with pytest.raises(signals.Interrupted) as info:
                signals.stop_if_requested(tmp_path, 5, "step-00000005")
        assert not signals.requested()
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    import pickle  # study workers send it back to the runner whole

    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), str(again), again.status) == (signals.Interrupted, str(info.value), 143)


# -- damaged checkpoints -------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated weights": lambda c: _truncate(c / "model.safetensors"),
          "flipped byte in optimiser state": lambda c: _flip(c / "optim.safetensors"),
          "truncated state.json": lambda c: _truncate(c / "state.json"),
          "weights deleted": lambda c: (c / "model.safetensors").unlink(),
          "state.json deleted": lambda c: (c / "state.json").unlink()}


@pytest.fixture(scope="module")
def killed_at_15(tmp_path_factory) -> Path:
    """A run killed during step 15: checkpoints step-00000006 and step-00000012."""
    tmp = tmp_path_factory.mktemp("killed")
    run = tmp / "run"
    proc = Proc(tmp / "proc-0.log", _new(run), "pause_at:step@15")
    proc.wait_paused()
    proc.kill(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest.json", "step-00000006", "step-00000012"]
    return run


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, reference,
                                                                      killed_at_15, damage):
    run = tmp_path / "run"
    shutil.copytree(killed_at_15, run)
    DAMAGE[damage](run / "checkpoints" / "step-00000012")
    rc, out = _vitsam(tmp_path, _resume(run))
    assert rc == 0, out
    warnings = [ln for ln in out.splitlines() if ln.startswith("vitsam: warning:")]
    assert len(warnings) == 1, out
    assert str(run / "checkpoints" / "step-00000012") in warnings[0]
    assert warnings[0].endswith("resuming from step-00000006 instead")
    assert_same_run(run, reference)  # steps 7 on replayed from the checkpoint of step 6


def test_no_readable_checkpoint_is_one_line_exit_2(tmp_path, killed_at_15, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(killed_at_15, run)
    for name in ("step-00000006", "step-00000012"):
        _truncate(run / "checkpoints" / name / "model.safetensors")
    assert cli.main(_resume(run)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"vitsam: error: no checkpoint of {run} can be read")
    assert "step-00000006" in err and "step-00000012" in err


# -- full disk -----------------------------------------------------------------------------------

def _check_full_disk_outcome(run: Path, rc: int, out: str) -> None:
    """Exit 2 with one line naming the checkpoint, the fact that the previous one is intact and
    how to resume; the previous checkpoint whole and latest; every record logged so far kept."""
    assert rc == 2, out
    assert "Traceback" not in out
    err = _last_line(out)
    assert err.startswith("vitsam: error: cannot write checkpoint step-00000012 in ")
    assert "No space left on device" in err and "previous checkpoint step-00000006 is intact" in err
    assert err.endswith(f"free some space, then `vitsam train --resume {run}` continues from "
                        "the last checkpoint")
    assert _latest(run) == "step-00000006"
    assert read_checkpoint(run / "checkpoints" / "step-00000006")[0]["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json",
                                                                       "step-00000006"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 4, 6, 8, 10, 11, 12]


def test_full_disk_while_writing_a_checkpoint_stops_cleanly(tmp_path, reference) -> None:
    """The second checkpoint's write fails with ENOSPC halfway (weights written)."""
    run = tmp_path / "run"
    rc, out = _vitsam(tmp_path, _new(run), "enospc_at:ckpt_write@2")
    _check_full_disk_outcome(run, rc, out)
    rc, out = _vitsam(tmp_path, _resume(run))
    assert rc == 0, out
    assert_same_run(run, reference)


def _pages(path: Path) -> int:
    return sum(-(-f.stat().st_size // 4096) for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_a_really_full_disk_stops_cleanly(tmp_path, reference) -> None:
    """A fresh ``python -m vitsam.cli train`` on a tmpfs that holds the first checkpoint but not
    the second (a private mount in a user namespace; skipped where those are not allowed)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace for a small tmpfs here")
    ckpt = reference / "checkpoints" / "step-00000022"
    other = sum(_pages(reference / n) for n in ("config.json", "data.json", "metrics.jsonl"))
    size = 4096 * (other + 4 + _pages(ckpt) * 3 // 2)  # + lock file and temporary files
    mnt, out_dir = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir(), out_dir.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" && '
              f'"$2" -m vitsam.cli train --quiet --run-dir "$1/run" '
              f'data.cache_dir="$3/cache" "${{@:5}}"; rc=$?; cp -a "$1/run" "$4/"; exit $rc')
    env = {**os.environ, "PYTHONPATH": str(Path(vitsam.__file__).parents[1])}
    res = subprocess.run(["unshare", "-Urm", "bash", "-c", script, "full-disk", str(mnt),
                          sys.executable, str(tmp_path), str(out_dir), *ARGS],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    run = out_dir / "run"
    out = (res.stdout + res.stderr).replace(str(mnt / "run"), str(run))
    _check_full_disk_outcome(run, res.returncode, out)
    rc, out = _vitsam(tmp_path, _resume(run))
    assert rc == 0, out
    assert_same_run(run, reference)


# -- one process per run folder ------------------------------------------------------------------

def test_two_trainings_never_share_a_run_folder(tmp_path) -> None:
    """Two processes start a run in one folder at the same moment (a barrier releases both):
    one trains (it pauses at its first step, holding the folder), the other exits 2 at once
    naming the folder and the first one's pid; so does a resume of the folder meanwhile. Once
    the first is killed, the folder is free again."""
    run = tmp_path / "run"
    barrier = CTX.Barrier(2)
    procs = [Proc(tmp_path / f"proc-{k}.log", _new(run), "pause_at:step@1", barrier)
             for k in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while (all(p.p.is_alive() for p in procs) and time.monotonic() < deadline
           and not all("vitsam-fault:" in p.text() for p in procs)):
        time.sleep(0.02)
    try:
        loser = next((p for p in procs if not p.p.is_alive()), None)
        assert loser is not None, "both processes train in one folder:\n" + procs[0].text()
        winner = procs[1 - procs.index(loser)]
        assert loser.wait() == 2
        winner.wait_paused()
        busy = (f"vitsam: error: run folder {run} is in use by another `vitsam train` "
                f"(pid {winner.pid} on ")
        assert _last_line(loser.text()).startswith(busy), loser.text()
        rc, out = _vitsam(tmp_path, _resume(run))
        assert rc == 2 and _last_line(out).startswith(busy), out
    finally:
        for p in procs:
            if p.p.is_alive():
                p.kill(signal.SIGKILL)
            p.p.join(TIMEOUT_S)
    with runlock.hold(run):  # the kernel dropped the killed holder's lock
        pass


def test_a_run_folder_is_removed_again_when_the_run_fails_before_writing(tmp_path,
                                                                         monkeypatch) -> None:
    def no_data(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "build", staticmethod(no_data))
    cfg = apply_overrides(RunConfig(), [f"out_dir={tmp_path / 'runs'}", "data.source=digits"])
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "given", progress=False)
    assert not any((tmp_path / "runs").glob("*")) and not (tmp_path / "given").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path) -> None:
    cfg = apply_overrides(RunConfig(), [f"out_dir={tmp_path}"])
    folders = [engine.new_run_dir(cfg) for _ in range(3)]  # the same second (or two)
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)


# -- in-process: the order of a new run's files, a full disk while logging, pruning -------------

def _cfg(tmp: Path):
    return apply_overrides(RunConfig(), [*ARGS, f"data.cache_dir={tmp / 'cache'}"])


def test_a_run_stopped_before_its_data_record_can_be_resumed(tmp_path, monkeypatch,
                                                             reference) -> None:
    """config.json is written first: a folder that holds anything of a run can be resumed."""
    real = engine.save_data_record

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_data_record", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.train(_cfg(tmp_path), run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(engine, "save_data_record", real)
    assert cli.main(_resume(tmp_path / "run")) == 0
    assert_same_run(tmp_path / "run", reference)


def test_full_disk_while_logging_says_how_to_go_on(tmp_path, monkeypatch) -> None:
    real, calls = engine.ScalarLog.write, {"n": 0}

    def write(self, rec):
        calls["n"] += 1
        if calls["n"] == 5:  # the record of step 10
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, rec)

    monkeypatch.setattr(engine.ScalarLog, "write", write)
    run = tmp_path / "run"
    with pytest.raises(OSError) as info:
        engine.train(_cfg(tmp_path), run_dir=run, progress=False)
    assert str(info.value) == ("[Errno 28] No space left on device; free some space, then "
                               f"`vitsam train --resume {run}` continues from the last checkpoint")
    assert _latest(run) == "step-00000006"


def test_pruning_interrupted_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch) -> None:
    """A kill while an old checkpoint is being deleted (keep=2) leaves every checkpoint folder
    whole; the scratch copy goes with the next save of another process."""
    from vitsam.train import checkpoint as ck

    model = torch.nn.Linear(3, 2)
    # A spec of the shape read_checkpoint checks (the model itself is never built here).
    spec = {"name": "linear", "num_classes": 2, "img_size": 1, "in_chans": 3, "kwargs": {}}
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, ck.step_name(step), model, spec, {}, step, 0, keep=2)
    real_rmtree = ck.shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if "step-00000001" in str(path) and (Path(path) / "model.safetensors").exists():
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, ck.step_name(3), model, spec, {}, 3, 0, keep=2)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    for name in ck.list_checkpoints(tmp_path):
        ck.read_checkpoint(tmp_path / "checkpoints" / name)  # whole, or not there
    assert ck.list_checkpoints(tmp_path) == ["step-00000002", "step-00000003"]
    monkeypatch.setattr(ck.os, "getpid", lambda: 1)  # the next process
    ck.save_checkpoint(tmp_path, ck.step_name(4), model, spec, {}, 4, 0, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest.json", "step-00000003", "step-00000004"]
