"""Training on several processes (vitsam.train.distributed): 2 real gloo processes on the CPU.

The processes are forked from the test (no second import of torch) and find each other as under
torchrun, through RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; one test starts
them through torchrun itself. Reference results come from
one process training the same global batches.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vitsam.config import ConfigError, apply_overrides
from vitsam.data import build_data, train_batches
from vitsam.data.config import DataConfig
from vitsam.data.loader import eval_batches
from vitsam.data.tensors import ImageTensors
from vitsam.eval.metrics import evaluate
from vitsam.io import read_jsonl
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.checkpoint import resolve_checkpoint
from vitsam.train.distributed import Group

SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.skipif(not dist.is_available() or "fork" not in mp.get_all_start_methods(),
                                reason="needs torch.distributed and fork")

# One global batch of 16 split in two slices of 8 reaches the weights of one process on the
# whole batch up to float32 rounding (the two half-batch means are averaged instead of one
# mean taken): measured 1.8e-6 after 6 AdamW steps of this model (weights of order 0.1-1).
ATOL = 2e-5


def _cfg(out: Path, *extra: str):
    """A tiny ViT with SAM on 144 sklearn digits at 8 px: 9 global batches of 16 per epoch,
    6 steps, a checkpoint every 2."""
    cfg = get_preset("mnist-vit-sam", smoke_size=True)
    return apply_overrides(cfg, [
        f"out_dir={out}", "data.source=digits", "data.img_size=8", "data.train_fraction=0.1",
        "model.kwargs.patch_size=4", "train.epochs=1", "train.max_steps=6", "train.batch_size=16",
        "train.ckpt_every_epochs=0.23", "train.log_every_steps=1", "train.threads=1",
        "train.train_eval_samples=50", "train.warmup_steps=1", *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _entry(rank: int, world: int, port: int, tmp: Path, job, args: tuple) -> None:
    """One forked rank: its own empty working folder (a stray write would land there), the
    torchrun environment, then ``job``; its exception, if any, goes to ``exc-<rank>.txt``."""
    os.environ.update(_rank_env(rank, world, port))
    cwd = tmp / f"cwd-{rank}"
    cwd.mkdir(exist_ok=True)
    os.chdir(cwd)
    if os.environ.get("VITSAM_TEST_STDERR"):  # for a test that waits for a fault point's line
        fd = os.open(os.environ["VITSAM_TEST_STDERR"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 2)
    try:
        job(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        (tmp / f"exc-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        os._exit(3)
    os._exit(0)


def _run_ranks(tmp: Path, job, *args, world: int = 2, timeout: float = 60,
               env: dict[int, dict[str, str]] | None = None, until=None) -> list[int | None]:
    """Run ``job(*args)`` in ``world`` forked ranks; their exit codes. ``until(procs)``, if
    given, is polled while they run and may end them."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = []
    for rank in range(world):
        saved = dict(os.environ)
        os.environ.update((env or {}).get(rank, {}))
        try:
            p = ctx.Process(target=_entry, args=(rank, world, port, tmp, job, args))
            p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        procs.append(p)
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if until is not None:
            until(procs)
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


def _train_job(out: Path, run_dir: Path | None, extra: tuple[str, ...]) -> None:
    engine.train(_cfg(out, *extra), run_dir=run_dir, progress=False)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run_dir, "last") / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-rank runs (synchronised and per-rank perturbation; the synchronised one in a folder
    rank 0 names) and their one-process references."""
    tmp = tmp_path_factory.mktemp("ddp")
    assert _run_ranks(tmp, _train_job, tmp / "two-sync", None,
                      ("optim.sync_perturbation=true", "name=two-sync")) == [0, 0]
    assert _run_ranks(tmp, _train_job, tmp, tmp / "two-local", ()) == [0, 0]
    (two_sync,) = (tmp / "two-sync").iterdir()
    engine.train(_cfg(tmp), run_dir=tmp / "one", progress=False)
    engine.train(_cfg(tmp, "optim.m=8"), run_dir=tmp / "one-m8", progress=False)
    return {"tmp": tmp, "two-sync": two_sync, "two-local": tmp / "two-local",
            "one": tmp / "one", "one-m8": tmp / "one-m8"}


def test_synchronised_perturbation_on_two_ranks_equals_one_process_on_the_whole_batch(runs):
    two, one = _weights(runs["two-sync"]), _weights(runs["one"])
    assert _max_diff(two, one) < ATOL
    # Not vacuous: per-rank perturbation (another step) is far outside the tolerance.
    assert _max_diff(_weights(runs["two-local"]), one) > 100 * ATOL
    # The logged numbers are the global batch's: same loss and accuracy as one process.
    logs2 = [r for r in read_jsonl(runs["two-sync"] / "metrics.jsonl") if "loss" in r]
    logs1 = [r for r in read_jsonl(runs["one"] / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs2] == [r["step"] for r in logs1] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(logs2, logs1):
        assert a["acc"] == pytest.approx(b["acc"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_per_rank_perturbation_equals_m_sharpness_with_the_per_rank_batch(runs):
    # Each rank perturbs with its own 8 images' gradient: one process with optim.m=8 does the
    # same arithmetic (measured bit-identical here; float32 rounding is the tolerance).
    assert _max_diff(_weights(runs["two-local"]), _weights(runs["one-m8"])) < ATOL
    assert _max_diff(_weights(runs["two-local"]), _weights(runs["one"])) > 100 * ATOL


def test_only_rank_0_writes(runs):
    tmp, two, one = runs["tmp"], runs["two-sync"], runs["one"]
    assert not any((tmp / "cwd-1").iterdir()) and not any((tmp / "cwd-0").iterdir())
    assert _files(two) == _files(one)  # the same files as one process: none twice, none extra
    for name in ("metrics.jsonl",):
        assert len(list(read_jsonl(two / name))) == len(list(read_jsonl(one / name)))
    final = json.loads((two / "final.json").read_text())
    assert final["processes"] == 2 and final["run_dir"] == str(two)
    assert json.loads((one / "final.json").read_text())["processes"] == 1
    state = json.loads((resolve_checkpoint(two) / "state.json").read_text())
    assert state["extra"]["world_size"] == 2 and state["extra"]["samples"] == 6 * 16
    # Every rank's own RNG stream (dropout masks differ between ranks), rank 0's the run's.
    rng0, rng1 = state["extra"]["rng_ranks"]
    assert rng0 == state["rng"] and rng1["torch"] != rng0["torch"]


def test_two_rank_run_killed_then_resumed_on_one_process_ends_as_uninterrupted(runs, tmp_path):
    """SIGKILL both ranks while step 5 is in progress (checkpoint step-4 written), resume on one
    process: the weights equal the uninterrupted two-rank run's (synchronised perturbation,
    so one process on the whole batch is the same computation up to float rounding)."""
    run_dir = tmp_path / "run"
    paused = {0: {"VITSAM_FAULT": "pause_at:step@5"}}

    def kill_when_paused(procs):
        if (run_dir / "checkpoints" / "step-00000004").is_dir() and \
                json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 4:
            time.sleep(0.3)  # rank 0 now waits at step 5, rank 1 for it
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)

    codes = _run_ranks(tmp_path, _train_job, tmp_path, run_dir,
                       ("optim.sync_perturbation=true",), env=paused, until=kill_when_paused)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    assert not (run_dir / "final.json").exists()
    final = engine.train(resume=run_dir, progress=False)
    assert final["steps"] == 6 and final["processes"] == 1
    assert _max_diff(_weights(run_dir), _weights(runs["two-sync"])) < ATOL
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_signal_to_one_rank_stops_both_after_the_same_step_and_resumes_on_two(runs, tmp_path):
    """SIGTERM reaches rank 1 alone (paused in step 3): both ranks finish step 3, rank 0 writes
    its checkpoint and reports the stop, rank 1 ends quietly with the same status; resumed on
    two ranks (each its own RNG state back), the run ends as the uninterrupted one, exactly."""
    run_dir = tmp_path / "run"
    sent = []

    def term_rank_1(procs):
        if not sent and "paused" in _read(tmp_path / "err-1.txt"):
            os.kill(procs[1].pid, signal.SIGTERM)
            sent.append(True)

    env = {1: {"VITSAM_FAULT": "pause_at:step@3", "VITSAM_TEST_STDERR": str(tmp_path / "err-1.txt")}}
    assert _run_ranks(tmp_path, _train_job, tmp_path, run_dir, (), env=env,
                      until=term_rank_1) == [3, 3]
    assert _read(tmp_path / "exc-0.txt").startswith("Interrupted: stopped by SIGTERM after step 3")
    assert _read(tmp_path / "exc-1.txt") == "FollowerExit: 143"
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert _run_ranks(tmp_path, _resume_job, run_dir) == [0, 0]
    assert _max_diff(_weights(run_dir), _weights(runs["two-local"])) == 0.0


def _resume_job(run_dir: Path) -> None:
    engine.train(resume=run_dir, progress=False)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _eval_job(out: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    split = _odd_split()
    group = Group(int(os.environ["RANK"]), 2)
    dist.init_process_group("gloo")
    seen: list[int] = []

    def batches(shard):
        seen.extend(shard.ids)
        return eval_batches(shard, 2, (0.5,), (0.25,), 4)

    res = group.evaluate(model, split, batches, torch.device("cpu"))
    dist.destroy_process_group()
    torch.save({"result": res, "seen": seen}, out / f"eval-{group.rank}.pt")


def _odd_split() -> ImageTensors:
    g = torch.Generator().manual_seed(1)
    return ImageTensors(torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=g),
                        torch.tensor([0, 1, 2, 0, 1, 2, 0]), [f"img{i}" for i in range(7)])


def test_sharded_evaluation_counts_every_test_image_once(tmp_path):
    assert _run_ranks(tmp_path, _eval_job, tmp_path) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"eval-{r}.pt") for r in (0, 1))
    # Contiguous slices, no padding: 3 + 4 images, each exactly once.
    assert r0["seen"] == ["img0", "img1", "img2"] and r1["seen"] == [f"img{i}" for i in range(3, 7)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    want = evaluate(model, eval_batches(_odd_split(), 2, (0.5,), (0.25,), 4))
    for got in (r0["result"], r1["result"]):
        assert got["n"] == want["n"] == 7
        assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
        # float32 logits of a batch of 1 and of 2 may round differently (another kernel)
        for key in ("nll", "ece"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_indivisible_global_batch_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.batch_size=31 \(the global batch\) does not "
                                          r"divide among 2 processes; use a multiple of 2, e.g. 30 or 32$"):
        Group(0, 2).per_rank_batch(31)
    assert Group(1, 4).per_rank_batch(32) == 8
    with pytest.raises(ConfigError, match=r"e\.g\. 3$"):
        Group(0, 3).per_rank_batch(2)
    # In real processes: rank 0 raises it before any step, the other rank ends quietly.
    codes = _run_ranks(tmp_path, _train_job, tmp_path, tmp_path / "run", ("train.batch_size=31",))
    assert codes == [3, 3]
    assert (tmp_path / "exc-0.txt").read_text().startswith("ConfigError: train.batch_size=31")
    assert (tmp_path / "exc-1.txt").read_text().startswith("FollowerExit: 2")
    assert not (tmp_path / "run").exists()  # the folder rank 0 made is removed again


def test_shards_of_a_global_batch_are_the_one_process_batch(tmp_path):
    """Crops (pad-and-crop) and order: the ranks' slices, put together, are the batch one
    process sees, for every world size that divides the batch, resumed mid-epoch too."""
    bundle = build_data(DataConfig(source="digits", train_fraction=0.1, augment="basic",
                                   cache_dir=str(tmp_path)))
    for flips in (False, True):
        bundle = replace(bundle, hflip=flips)
        whole = list(train_batches(bundle, 12, epoch=3, seed=5, start_batch=2))
        for world in (2, 3, 4):
            parts = [list(train_batches(bundle, 12, epoch=3, seed=5, start_batch=2,
                                        shard=(r, world))) for r in range(world)]
            for k, (x, y) in enumerate(whole):
                assert all(p[k][0].shape[0] == 12 // world for p in parts)
                assert torch.equal(torch.cat([p[k][0] for p in parts]), x)
                assert torch.equal(torch.cat([p[k][1] for p in parts]), y)


@pytest.mark.slow
def test_torchrun_starts_vitsam_train_with_one_bar_one_table_and_rank_0_files(tmp_path):
    """The documented command, ``torchrun --nproc_per_node 2 -m vitsam train ...``: one
    progress bar, one result table, every file in rank 0's run folder (three interpreters
    importing torch: the slowest test here)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "VITSAM_CACHE": str(tmp_path / "cache"),
           "VITSAM_PROGRESS_INTERVAL": "1000"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "vitsam", "train", "--preset", "mnist-vit",
           "--smoke", "data.source=digits", "data.img_size=8", "model.kwargs.patch_size=4",
           "out_dir=runs", "train.max_steps=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "final.json").read_text())["processes"] == 2
    assert out.stdout.count("mnist-vit-smoke ") == 1  # the table's row, once
    starts = [line for line in out.stderr.splitlines() if line.startswith("mnist-vit-smoke:")
              and " 0% " in line]
    assert len(starts) == 1, out.stderr  # one bar (a log bar: its first line at 0%)
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "runs"}  # nothing else written


def test_sync_batchnorm_is_for_several_processes_on_gpus():
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))

    model = net()
    assert Group().batchnorm(model, True, torch.device("cpu")) is model  # one process: as is
    assert Group(0, 2).batchnorm(model, False, torch.device("cpu")) is model  # per rank: default
    with pytest.raises(ConfigError, match=r"^train\.sync_batchnorm=true needs GPUs"):
        Group(0, 2).batchnorm(model, True, torch.device("cpu"))
    synced = Group(0, 2).batchnorm(net(), True, torch.device("cuda", 0))  # converted, not run
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    assert synced.state_dict().keys() == model.state_dict().keys()  # checkpoints load either way
    assert apply_overrides(_cfg(Path("runs")), ["train.sync_batchnorm=true"]).train.sync_batchnorm


def test_each_rank_decodes_only_its_own_image_files(tmp_path, monkeypatch):
    """ImageFolder data too large to cache: a rank opens only the files of its slice, and the
    slices (Inception crops, flips) put together are the one-process batch."""
    import numpy as np
    from PIL import Image

    from vitsam.data import lazy

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "big" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(
                    tmp_path / "big" / split / cls / f"{i}.png")
    bundle = build_data(DataConfig(source="imagefolder", root=str(tmp_path / "big"), img_size=16,
                                   workers=0, cache_dir=str(tmp_path / "c"), augment="basic"))
    opened: list[str] = []
    real = lazy.load_pil
    monkeypatch.setattr(lazy, "load_pil", lambda path, mode: opened.append(path) or real(path, mode))
    (x, y), = list(train_batches(bundle, 8, epoch=1, seed=3))
    per_rank = []
    parts = []
    for rank in (0, 1):
        opened.clear()
        parts.append(list(train_batches(bundle, 8, epoch=1, seed=3, shard=(rank, 2)))[0])
        per_rank.append(set(opened))
    assert len(per_rank[0]) == len(per_rank[1]) == 4 and not per_rank[0] & per_rank[1]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
