"""The long non-training jobs killed with SIGKILL and run again: `vitsam corrupt`, `vitsam analyze
--landscape` and `vitsam study` finish without redoing finished parts, and their output equals
an uninterrupted run's (bit for bit: every job here is deterministic on CPU at a fixed thread
count, so no tolerance is needed).

Each job runs in a real subprocess (``python -c`` around ``vitsam.cli.main``) that stops at a
chosen moment in the middle of its work (the N-th call of one function) and is killed there by
this process with ``os.kill(pid, SIGKILL)``. The re-run happens in this process, where the
functions that do the work are wrapped to count what the re-run computes.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitsam.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT_S = 300  # generous: the machine may be busy with other work

# Runs vitsam.cli.main(argv) with the N-th call of module.attr held (file `marker` then says the
# process is there). half: the held call is np.save(fh, arr), of which half is written first.
DRIVER = r"""
import importlib, io, json, sys, time
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
mod = importlib.import_module(spec["module"])
orig = getattr(mod, spec["attr"])
calls = 0
def held(*args, **kwargs):
    global calls
    calls += 1
    if calls == spec["at"] and spec["after"]:
        orig(*args, **kwargs)
    if calls == spec["at"]:
        if spec["half"]:
            buf = io.BytesIO()
            orig(buf, *args[1:], **kwargs)
            args[0].write(buf.getvalue()[: len(buf.getvalue()) // 2])
            args[0].flush()
        open(spec["marker"], "w").close()
        time.sleep(600)
    return orig(*args, **kwargs)
setattr(mod, spec["attr"], held)
from vitsam.cli import main
sys.exit(main(spec["argv"]))
"""


def kill_at(tmp: Path, argv: list[str], target: str, at: int, after: bool = False,
            half: bool = False, threads: int = 1) -> None:
    """Run ``vitsam argv`` in a subprocess, hold it at call ``at`` of ``target`` (``module:attr``;
    ``after``: once that call returned) and SIGKILL it there."""
    module, attr = target.split(":")
    marker = tmp / f"held-{time.monotonic_ns()}"
    spec = {"module": module, "attr": attr, "at": at, "after": after, "half": half,
            "threads": threads, "marker": str(marker), "argv": argv}
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(threads)}
    log = tmp / f"{marker.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the job never reached call {at} of {target} "
                                     f"(exit {proc.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(TIMEOUT_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def count_calls(monkeypatch, obj, attr: str, calls: list) -> None:
    """Wrap ``obj.attr`` (a module attribute or dict key) to append ``(attr, args)`` to ``calls``."""
    is_dict = isinstance(obj, dict)
    orig = obj[attr] if is_dict else getattr(obj, attr)

    def counted(*args, **kwargs):
        calls.append((attr, args))
        return orig(*args, **kwargs)

    (monkeypatch.setitem if is_dict else monkeypatch.setattr)(obj, attr, counted)


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files anywhere under ``folder`` (a finished job leaves none)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or ".partial" in p.name)


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or damaged file


@pytest.fixture
def one_thread():
    """The subprocesses here compute with one thread; so does this process while it re-runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- vitsam corrupt ----------------------------------------------------------------------------

CORRUPT = ["--data", "digits", "--limit", "16", "--params", "cifar-c", "--corruptions",
           "gaussian_noise,contrast", "--severities", "1,2", "--workers", "0", "--quiet"]


def test_corrupt_killed_while_writing_a_part_resumes_to_the_same_set(tmp_path, monkeypatch,
                                                                     one_thread):
    from vitsam.data import corruptions as cs

    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "set"
    # np.save: clean.npy, labels.npy, then one per part; held half-way through the third part.
    kill_at(tmp_path, ["corrupt", "--out", str(out), *CORRUPT], "numpy:save", at=5, half=True)
    man = json.loads((out / cs.MANIFEST).read_text())
    assert man["complete"] is False and man["corruptions"] == ["gaussian_noise"]
    assert len(list((out / "contrast").glob(".1.npy.*.tmp"))) == 1  # the half-written part

    computed: list = []
    count_calls(monkeypatch, cs, "_corrupt_chunk", computed)
    assert main(["corrupt", "--out", str(out), *CORRUPT]) == 0
    assert [(a[2], a[3]) for _, a in computed] == [("contrast", 1), ("contrast", 2)]
    monkeypatch.undo()

    ref = tmp_path / "reference"
    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))
    assert main(["corrupt", "--out", str(ref), *CORRUPT]) == 0
    got, want = (json.loads((d / cs.MANIFEST).read_text()) for d in (out, ref))
    assert got["complete"] is True and got["parts"] == want["parts"]  # same sha256 per part
    for key in ("clean", "labels"):
        assert got[key] == want[key]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(out) == files(ref) and leftovers(out) == []
    for part in ("gaussian_noise/1.npy", "gaussian_noise/2.npy", "contrast/1.npy", "contrast/2.npy"):
        assert (out / part).read_bytes() == (ref / part).read_bytes(), part
    assert_png(out / "contact_sheet.png")


@pytest.mark.parametrize("figure", ["contact_sheet", "landscape"])
def test_a_figure_interrupted_while_written_leaves_the_old_one(tmp_path, monkeypatch, figure):
    import numpy as np
    from matplotlib.figure import Figure

    from vitsam.analysis import landscape
    from vitsam.data import corruptions as cs

    path = tmp_path / ("contact_sheet.png" if figure == "contact_sheet" else "landscape_1d.png")
    path.write_bytes(b"the figure of the last complete run")

    def interrupted(self, fname, **kwargs):  # half a PNG, then the interruption
        with (open(fname, "wb") if isinstance(fname, (str, Path)) else fname) as fh:
            fh.write(b"\x89PNG\r\n\x1a\n half")
            raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if figure == "contact_sheet":
            cs.contact_sheet(np.zeros((1, 8, 8), np.uint8), path, params="cifar-c",
                             corruptions=["contrast"], severities=[1])
        else:
            landscape.figures({"settings": {"dims": 1}, "x": [0.0, 1.0], "loss": [1.0, 2.0],
                               "accuracy": [0.5, 0.4]}, tmp_path)
    assert path.read_bytes() == b"the figure of the last complete run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- the reference study (also the trained run the landscape test analyses) --------------------

STUDY = ["study", "inside", "--scale", "smoke", "--quiet"]
CELLS = ["vit-vanilla-s0", "vit-sam-s0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``inside`` at smoke scale on two cells, uninterrupted, and the cache it filled."""
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITSAM_CACHE", str(tmp / "cache"))
        old = torch.get_num_threads()
        try:
            assert main([*STUDY, "--out", str(tmp / "study"), "--only", *CELLS]) == 0
        finally:
            torch.set_num_threads(old)
    return tmp


def cell_outputs(study: Path, cell: str) -> dict:
    """What a cell's finished folder holds that a re-run must reproduce (no timings)."""
    final = json.loads((study / cell / "final.json").read_text())
    analysis = json.loads((study / cell / "analysis.json").read_text())
    return {"final": {k: final[k] for k in ("test_acc", "test_loss", "train_acc", "steps")},
            "analysis": {k: (v["result"], v["settings"], v["step"], v["samples"])
                         for k, v in analysis.items()},
            "stages": json.loads((study / cell / "cell.json").read_text())["stages"]}


def table(study: Path) -> list[dict]:
    """The study's CSV table without its status column (a re-run calls finished cells reused)."""
    with open(study / "inside.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "status"} for row in csv.DictReader(fh)]


# -- vitsam analyze --landscape ----------------------------------------------------------------

LANDSCAPE = ["--landscape", "--quiet", "--batches", "1", "--batch-size", "16", "--set",
             "landscape.dims=2", "landscape.steps=4", "landscape.max_batches=1"]


def test_analyze_landscape_killed_mid_row_resumes_the_missing_points(reference, tmp_path,
                                                                     monkeypatch, one_thread):
    from vitsam.analysis import landscape

    monkeypatch.setenv("VITSAM_CACHE", str(reference / "cache"))
    run, ref = tmp_path / "run", tmp_path / "ref"
    for d in (run, ref):
        shutil.copytree(reference / "study" / "vit-vanilla-s0", d)
    # evaluate(): the centre, then 4 x 4 grid points row by row; held on the second point of
    # row 2, so rows 0 and 1 are finished and row 2 is half done.
    kill_at(tmp_path, ["analyze", str(run), *LANDSCAPE], "vitsam.analysis.landscape:evaluate",
            at=1 + 2 * 4 + 2)
    partial = list(run.glob(".landscape-*.partial.json"))
    assert len(partial) == 1 and len(json.loads(partial[0].read_text())["loss"]) == 2
    saved = json.loads((run / "analysis.json").read_text())["landscape"]
    assert saved["settings"]["dims"] == 1  # the study's 1-D curve: nothing half-written over it

    # A changed setting reuses none of those rows, and leaves them for the original setting.
    points: list = []
    count_calls(monkeypatch, landscape, "evaluate", points)
    assert main(["analyze", str(run), *LANDSCAPE, "landscape.seed=1"]) == 0
    assert len(points) == 1 + 16 and partial[0].exists()

    points.clear()
    assert main(["analyze", str(run), *LANDSCAPE]) == 0
    assert len(points) == 1 + 2 * 4  # the centre and rows 2 and 3 only
    monkeypatch.undo()
    monkeypatch.setenv("VITSAM_CACHE", str(reference / "cache"))
    assert main(["analyze", str(ref), *LANDSCAPE]) == 0
    got, want = (json.loads((d / "analysis.json").read_text())["landscape"] for d in (run, ref))
    assert got["result"] == want["result"] and got["settings"] == want["settings"]
    assert got["samples"] == want["samples"] and got["step"] == want["step"]
    assert leftovers(run) == []  # the partial file went once the result was saved
    assert_png(run / "landscape_2d.png")


# -- vitsam study ------------------------------------------------------------------------------

def test_study_killed_in_a_cells_landscape_resumes_only_the_missing_rows(reference, tmp_path,
                                                                         monkeypatch):
    from vitsam.analysis import landscape
    from vitsam.study import stages
    from vitsam.train import engine

    monkeypatch.setenv("VITSAM_CACHE", str(reference / "cache"))
    out = tmp_path / "study"
    argv = [*STUDY, "--out", str(out), "--only", *CELLS]
    # evaluate(): vit-vanilla-s0's landscape is calls 1-4 (centre + 3 points); vit-sam-s0's
    # centre is call 5 and its first point call 6: held on its second point.
    kill_at(tmp_path, argv, "vitsam.analysis.landscape:evaluate", at=7, threads=2)
    assert json.loads((out / "vit-sam-s0" / "cell.json").read_text())["stages"] == [
        "sparsity", "attention"]

    trained, staged, points = [], [], []
    count_calls(monkeypatch, engine, "train", trained)
    for name in stages.STAGE_FUNCS:
        count_calls(monkeypatch, stages.STAGE_FUNCS, name, staged)
    count_calls(monkeypatch, landscape, "evaluate", points)
    assert main(argv) == 0
    assert trained == []
    assert [(Path(a[0]).name, stage) for stage, a in staged] == [("vit-sam-s0", "landscape")]
    assert len(points) == 1 + 2  # the centre and the two points not finished

    rec = json.loads((out / "study-inside.json").read_text())
    assert rec["cells"]["vit-vanilla-s0"]["status"] == "reused"
    assert rec["cells"]["vit-sam-s0"]["ran"] == ["landscape"]
    for cell in CELLS:
        assert cell_outputs(out, cell) == cell_outputs(reference / "study", cell), cell
    assert table(out) == table(reference / "study")
    assert leftovers(out) == []


def test_study_killed_before_a_cells_first_step_trains_it_on_the_re_run(reference, tmp_path,
                                                                        monkeypatch):
    """Killed right after the cell's data.json was written: the folder must still resume."""
    monkeypatch.setenv("VITSAM_CACHE", str(reference / "cache"))
    out = tmp_path / "study"
    argv = [*STUDY, "--out", str(out), "--only", CELLS[0]]
    kill_at(tmp_path, argv, "vitsam.train.engine:save_data_record", at=1, after=True, threads=2)
    assert (out / CELLS[0] / "data.json").exists() and not (out / CELLS[0] / "final.json").exists()
    assert main(argv) == 0
    assert cell_outputs(out, CELLS[0]) == cell_outputs(reference / "study", CELLS[0])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")
def test_study_workers_end_when_the_study_is_killed(tmp_path):
    """SIGKILL reaches the study process only; its workers must not go on writing the cells."""
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": SRC, "VITSAM_CACHE": str(tmp_path / "cache")}
    # Two workers for one cell: the pool starts one, which trains "forever".
    proc = subprocess.Popen([sys.executable, "-m", "vitsam.cli", *STUDY, "--out", str(out),
                             "--workers", "2", "--only", CELLS[0], "train.max_steps=1000000",
                             "train.epochs=100000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                    found.append(int(stat.parent.name))
            except OSError:  # a process that ended meanwhile
                continue
        return found

    def running(pid: int) -> bool:
        try:  # a zombie (state Z) has ended: nobody may be left to reap it
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    workers: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        latest = out / CELLS[0] / "checkpoints" / "latest.json"
        while not latest.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the cell never trained"
            time.sleep(0.1)
        workers = children(proc.pid)
        assert len(workers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT_S)
        deadline = time.monotonic() + 10
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(w) for w in workers), "a worker outlived the killed study"
        # Nothing writes into the cells any more.
        before = latest.read_bytes()
        time.sleep(1.0)
        assert latest.read_bytes() == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)
