"""Training engine: timeline, end-to-end smoke runs, exact resume, run-folder contents."""
import json
import math
import shutil
import warnings

import pytest
import torch

from vitsam.config import TrainConfig, apply_overrides
from vitsam.io import read_jsonl
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.checkpoint import list_checkpoints, load_run


def test_timeline_converts_every_duration_to_steps() -> None:
    t = TrainConfig(epochs=2.5, warmup_epochs=0.5, eval_every_epochs=1, ckpt_every_epochs=0.5,
                    log_every_steps=7)
    tl = engine.Timeline.from_config(t, steps_per_epoch=10)
    assert (tl.total_steps, tl.warmup_steps, tl.eval_every, tl.ckpt_every, tl.log_every) == \
        (25, 5, 10, 5, 7)
    assert engine.Timeline.from_config(TrainConfig(epochs=3, max_steps=4, warmup_steps=9), 10) \
        .total_steps == 4
    assert [s for s in range(1, 26) if engine.is_time(s, 10, 25)] == [10, 20, 25]


@pytest.mark.parametrize("epochs, per_epoch, want", [(1.1, 100, 110), (4.9, 100, 490),
                                                     (0.7, 10, 7), (2.3, 1000, 2300)])
def test_timeline_takes_decimal_epochs_exactly(epochs, per_epoch, want) -> None:
    t = TrainConfig(epochs=epochs, warmup_epochs=epochs, eval_every_epochs=epochs,
                    ckpt_every_epochs=epochs)
    tl = engine.Timeline.from_config(t, per_epoch)
    assert (tl.total_steps, tl.warmup_steps, tl.eval_every, tl.ckpt_every) == (want,) * 4


def test_timeline_matches_integer_arithmetic_on_many_decimals() -> None:
    """Every duration written with up to three decimals, against exact integer arithmetic:
    the run is ceil(epochs * steps), intervals the nearest step count (halves to even)."""
    def nearest(num: int, den: int) -> int:
        q, r = divmod(num, den)
        return q + (2 * r > den or (2 * r == den and q % 2 == 1))

    for per_epoch in (1, 3, 7, 10, 100, 128, 390):
        for milli in range(1, 5001, 7):
            text = f"{milli // 1000}.{milli % 1000:03d}"
            d = float(text)
            tl = engine.Timeline.from_config(
                TrainConfig(epochs=d, warmup_epochs=d, eval_every_epochs=d, ckpt_every_epochs=d),
                per_epoch)
            num = milli * per_epoch
            ceil, near = -(-num // 1000), nearest(num, 1000)
            assert tl.total_steps == max(1, ceil), (text, per_epoch)
            assert tl.warmup_steps == min(near, tl.total_steps), (text, per_epoch)
            assert tl.eval_every == tl.ckpt_every == max(1, near), (text, per_epoch)


def _tiny(tmp_path, *extra: str):
    cfg = get_preset("mnist-vit-sam", smoke_size=True)
    return apply_overrides(cfg, [f"out_dir={tmp_path}", "train.max_steps=none", "train.epochs=2",
                                 "train.ckpt_every_epochs=0.5", "model.kwargs.drop_rate=0.1",
                                 "train.log_every_steps=2", *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted tiny SAM run (12 steps, checkpoints every 3, evaluation every 6)."""
    tmp = tmp_path_factory.mktemp("full")
    final = engine.train(_tiny(tmp), run_dir=tmp / "full", progress=False)
    return tmp / "full", final


def _same_weights(a_dir, b_dir) -> None:
    a, b = load_run(a_dir).model, load_run(b_dir).model
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                  full_run) -> None:
    cfg = _tiny(tmp_path)
    full = full_run[1]
    real_step, calls = engine.train_step, {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    assert load_run(tmp_path / "cut").step == 3  # checkpoints every half epoch (3 steps)
    ckpts = tmp_path / "cut" / "checkpoints"
    for copy in ("best-step3", "step-3-copy"):  # a user's copies survive keep=2 pruning
        shutil.copytree(ckpts / "step-00000003", ckpts / copy)
    resumed = engine.train(resume=tmp_path / "cut", progress=False)
    _same_weights(full_run[0], tmp_path / "cut")
    assert resumed["test_acc"] == full["test_acc"] and resumed["steps"] == full["steps"] == 12
    assert sorted(p.name for p in ckpts.iterdir()) == \
        ["best-step3", "latest.json", "step-00000009", "step-00000012", "step-3-copy"]
    # The interrupted log is kept aside; the continued log has each step exactly once.
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and (tmp_path / "cut" / "metrics.pre-resume-0.jsonl").exists()


def _log(run_dir) -> list[dict]:
    """The training log records without their timing."""
    return [{k: v for k, v in r.items() if k != "images_per_s"}
            for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_mid_log_interval_logs_what_the_uninterrupted_run_logs(tmp_path, monkeypatch,
                                                                      full_run) -> None:
    """Checkpoint at step 3, records every 2 steps: the record at step 4 spans steps 3 and 4,
    one before and one after the resume."""
    real_step, calls = engine.train_step, {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        engine.train(_tiny(tmp_path), run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    engine.train(resume=tmp_path / "cut", progress=False)
    want, got = _log(full_run[0]), _log(tmp_path / "cut")
    assert [r["step"] for r in got] == [2, 4, 6, 8, 10, 12]
    assert got == want


def test_logged_lr_is_the_one_each_step_used(tmp_path) -> None:
    """Against linear warm-up then cosine to 0, written out: step s (1-based) of T with W
    warm-up steps uses peak * s / W, then peak * (1 + cos(pi * (s - 1 - W) / (T - W))) / 2."""
    cfg = _tiny(tmp_path, "train.log_every_steps=1", "train.warmup_steps=4")
    engine.train(cfg, run_dir=tmp_path / "run", progress=False)
    logs = _log(tmp_path / "run")
    peak, total, warm = cfg.optim.lr, 12, 4
    want = [peak * s / warm if s <= warm else
            peak * 0.5 * (1 + math.cos(math.pi * (s - 1 - warm) / (total - warm)))
            for s in range(1, total + 1)]
    assert [r["step"] for r in logs] == list(range(1, total + 1))
    assert [r["lr"] for r in logs] == pytest.approx(want, rel=1e-12, abs=0)
    assert logs[0]["lr"] == pytest.approx(peak / 4) and logs[-1]["lr"] > 0


class _FakeTime:
    """Stands in for the ``time`` module in the engine: the clock moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def slow(self, fn, seconds: float):
        def wrapped(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)
        return wrapped


def test_images_per_s_leaves_out_checkpoints_and_evaluation_also_after_a_resume(
        tmp_path, monkeypatch) -> None:
    """Each step takes 1 s, each checkpoint 20 s, each evaluation 50 s. The first evaluation
    (step 6, just after a checkpoint) fails; the resumed run evaluates step 6 again."""
    clock = _FakeTime()
    monkeypatch.setattr(engine, "time", clock)
    monkeypatch.setattr(engine, "train_step", clock.slow(engine.train_step, 1.0))
    monkeypatch.setattr(engine, "save_checkpoint", clock.slow(engine.save_checkpoint, 20.0))
    real_eval, failing = engine.evaluate, {"on": True}

    def evaluate(*args, **kwargs):
        clock.now += 50.0
        if failing["on"]:
            raise RuntimeError("evaluation failed")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    cfg = _tiny(tmp_path)
    with pytest.raises(RuntimeError):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    failing["on"] = False
    final = engine.train(resume=tmp_path / "cut", progress=False)
    logs = [r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6, 8, 10, 12]
    assert [r["images_per_s"] for r in logs] == [cfg.train.batch_size] * 6  # one batch a second
    assert final["train_images_per_s"] == cfg.train.batch_size
    with pytest.raises(ValueError, match="already finished"):
        engine.train(resume=tmp_path / "cut", progress=False)


def test_run_folder_describes_itself(tmp_path) -> None:
    cfg = apply_overrides(get_preset("mnist-resnet-sam", smoke_size=True), [f"out_dir={tmp_path}"])
    final = engine.train(cfg, progress=False)
    run_dir = tmp_path / final["run_dir"].split("/")[-1]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["name"] == "resnet18-c" and saved["optim"]["sam"] is True
    assert 0.0 <= final["test_acc"] <= 1.0 and final["steps"] == 3 and final["params"] > 0
    logs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "acc", "lr", "grad_norm", "eps_norm", "sharpness", "grad_cosine"):
        assert all(key in r for r in logs), key
    assert all(abs(r["eps_norm"] - 0.05) < 1e-4 for r in logs)  # ||eps|| = rho
    assert any("test_acc" in r for r in read_jsonl(run_dir / "metrics.jsonl"))
    run = load_run(run_dir)  # the folder alone rebuilds the model
    assert run.model_spec["in_chans"] == 1 and list_checkpoints(run_dir)


def test_failed_evaluation_keeps_its_checkpoint_and_resume_evaluates_again(
        tmp_path, monkeypatch, full_run) -> None:
    real_eval = engine.evaluate

    def fail_first_eval(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(engine, "evaluate", fail_first_eval)
    with pytest.raises(RuntimeError):
        engine.train(_tiny(tmp_path), run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "evaluate", real_eval)
    # The first evaluation is at step 6, which is also a checkpoint: saved before evaluating.
    assert load_run(tmp_path / "cut").step == 6
    engine.train(resume=tmp_path / "cut", progress=False)
    _same_weights(full_run[0], tmp_path / "cut")
    evals = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "test_acc" in r]
    assert evals == [6, 12]
    want = [r for r in read_jsonl(full_run[0] / "metrics.jsonl") if "test_acc" in r]
    got = [r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "test_acc" in r]
    assert [r["test_acc"] for r in got] == [r["test_acc"] for r in want]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch, full_run) -> None:
    real_step, calls = engine.train_step, {"n": 0}

    def crash_at_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_two)
    with pytest.raises(KeyboardInterrupt):
        engine.train(_tiny(tmp_path), run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    assert not list_checkpoints(tmp_path / "cut")
    assert engine.train(resume=tmp_path / "cut", progress=False)["steps"] == 12
    _same_weights(full_run[0], tmp_path / "cut")


def test_new_run_saves_an_absolute_data_root(tmp_path, monkeypatch) -> None:
    seen = {}

    def stop(cfg):
        seen["root"] = cfg.data.root
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine.Trainer, "build", staticmethod(stop))
    cfg = apply_overrides(get_preset("mnist-vit", smoke_size=True),
                          ["data.source=imagefolder", "data.root=data/imgs"])
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, progress=False)
    assert seen["root"] == str(tmp_path / "data" / "imgs")


def test_meter_averages_an_interval_and_times_only_its_training(monkeypatch) -> None:
    clock = _FakeTime()
    meter = engine._Meter(clock=clock.perf_counter)
    meter.start()
    clock.now += 0.5
    meter.add({"loss": 1.0, "correct": 3.0, "n": 8.0, "skipped": 0.0, "lr": 0.1})
    meter.add({"loss": 3.0, "correct": 1.0, "n": 8.0, "skipped": 0.0, "lr": 0.2})
    meter.stop()
    clock.now += 1.5  # evaluation and checkpointing: not timed
    rec = meter.flush()
    assert rec["loss"] == 2.0 and rec["acc"] == 4 / 16 and rec["images_per_s"] == 16 / 0.5
    assert rec["lr"] == 0.2  # the last step's, not the mean
    meter.start()
    meter.add({"loss": 1.0, "sharpness": 0.5, "n": 8.0, "skipped": 0.0})
    clock.now += 1.0
    meter.stop()
    twin = engine._Meter(clock=clock.perf_counter)  # the interval continued after a resume
    twin.load(json.loads(json.dumps(meter.state())))
    for m in (meter, twin):
        m.start()
        clock.now += 1.0
        m.add({"loss": 2.0, "sharpness": float("nan"), "n": 8.0, "skipped": 1.0})  # fp16 skip
        m.stop()
    rec, rec_twin = meter.flush(), twin.flush()
    assert rec == rec_twin
    assert rec["sharpness"] == 0.5 and rec["loss"] == 1.5 and rec["skipped_steps"] == 1.0
    assert rec["images_per_s"] == 16 / 2.0
    # 10 steps at 100 img/s then 2 steps at 400 img/s (same batch): 12 steps in 0.1 + 0.005 time
    # units, not the plain mean 250.
    records = [{"step": 10, "images_per_s": 100.0}, {"step": 10, "test_acc": 0.5},
               {"step": 12, "images_per_s": 400.0}]
    assert engine.overall_rate(records) == pytest.approx(12 / (10 / 100 + 2 / 400))


def test_overrides_reach_the_step_and_a_strong_sam_bf16_run_completes(tmp_path) -> None:
    cfg = apply_overrides(get_preset("mnist-vit-sam", smoke_size=True),
                          [f"out_dir={tmp_path}", "data.augment=strong", "train.micro_batch=8",
                           "optim.m=16", "train.precision=bf16", "train.max_steps=2"])
    step_cfg = engine.Trainer.build(cfg).step_cfg
    assert (step_cfg.micro_batch, step_cfg.m, step_cfg.autocast_dtype) == (8, 16, torch.bfloat16)
    final = engine.train(cfg, progress=False)
    logs = [r for r in read_jsonl(f"{final['run_dir']}/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for r in logs:  # Mixup soft targets: loss and accuracy against argmax of the target
        assert math.isfinite(r["loss"]) and math.isfinite(r["sharpness"]) and 0 <= r["acc"] <= 1
        assert abs(r["eps_norm"] - 0.05) < 1e-3
    assert 0 <= final["test_acc"] <= 1 and final["steps"] == 2


def test_micro_batches_give_the_full_batch_step(tmp_path) -> None:
    base = [f"out_dir={tmp_path}", "optim.name=sgd", "optim.lr=0.1", "train.max_steps=2"]
    runs = []
    for extra in ([], ["train.micro_batch=8"]):
        cfg = apply_overrides(get_preset("mnist-vit", smoke_size=True), base + extra)
        runs.append(load_run(engine.train(cfg, progress=False)["run_dir"]).model.state_dict())
    for name, a in runs[0].items():
        torch.testing.assert_close(runs[1][name], a, rtol=1e-5, atol=1e-6, msg=name)


def _whole_and_resumed(tmp_path, monkeypatch, *extra: str) -> tuple:
    """The same 5-step run uninterrupted and interrupted at step 5 (last checkpoint at step 3)
    then resumed; returns their run folders."""
    cfg = _tiny(tmp_path, "train.max_steps=5", "train.train_eval_samples=32", *extra)
    engine.train(cfg, run_dir=tmp_path / "whole", progress=False)
    real_step, calls = engine.train_step, {"n": 0}

    def crash_at_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    assert load_run(tmp_path / "cut").step == 3
    engine.train(resume=tmp_path / "cut", progress=False)
    return tmp_path / "whole", tmp_path / "cut"


@pytest.mark.parametrize("extra", [("data.augment=strong",), ("optim.m=8",),
                                   ("train.micro_batch=8",)],
                         ids=["augmentation", "m-sharpness", "micro-batches"])
def test_resume_is_exact_with_augmentation_m_sharpness_and_micro_batches(
        tmp_path, monkeypatch, extra) -> None:
    whole, cut = _whole_and_resumed(tmp_path, monkeypatch, *extra)
    key, value = extra[0].split("=")
    section, name = key.split(".")
    assert str(load_run(cut).config[section][name]) == value  # the setting was in force
    _same_weights(whole, cut)
    assert _log(whole) == _log(cut)


def test_fp16_runs_with_a_grad_scaler_that_checkpoints_and_resumes(tmp_path, monkeypatch) -> None:
    """fp16 autocast on the CPU. The scaler grows its scale after every step here (it starts at
    2^20), so steps overflow, are skipped and back off now and then: a resume that lost the
    scaler's state would skip other steps and reach other weights."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler",
                        functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20,
                                          growth_interval=1))
    seen: dict[str, list] = {"whole": [], "cut": []}
    real_step = engine.train_step

    def record(*args, **kwargs):
        out = real_step(*args, **kwargs)
        scaler = args[6]
        seen["cut" if (tmp_path / "cut").exists() else "whole"].append(
            (scaler.get_scale(), out["skipped"]))
        return out

    monkeypatch.setattr(engine, "train_step", record)
    cfg = _tiny(tmp_path, "train.precision=fp16", "train.device=cpu")
    tr = engine.Trainer.build(apply_overrides(cfg, ["train.max_steps=1"]))
    assert tr.step_cfg.autocast_dtype == torch.float16 and tr.scaler.is_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole, cut = _whole_and_resumed(tmp_path, monkeypatch, "train.precision=fp16",
                                        "train.device=cpu")
    assert seen["whole"][0][1] == 1.0  # the first step overflowed: no optimiser step ...
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]  # ... no warning
    state = json.loads((cut / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["scaler"]["scale"] == seen["whole"][-1][0]
    skipped = [s for _, s in seen["whole"]]
    assert 0 < sum(skipped) < len(skipped)  # both kinds of step happened
    # The resumed process's steps 4 and 5 are the uninterrupted run's steps 4 and 5.
    assert seen["cut"][-2:] == seen["whole"][3:5]
    _same_weights(whole, cut)


def test_the_test_set_is_evaluated_once_per_evaluation_step_also_at_the_end(
        tmp_path, monkeypatch, full_run) -> None:
    """The loop's evaluation at the last step is final.json's test result: the whole test set
    is not run through the model a second time for the same weights (12 steps, eval every 6)."""
    calls = []
    real_eval = engine.evaluate

    def counting(model, batches, device, *args, **kwargs):
        ev = real_eval(model, batches, device, *args, **kwargs)
        calls.append(1)
        return ev

    monkeypatch.setattr(engine, "evaluate", counting)
    final = engine.train(_tiny(tmp_path), run_dir=tmp_path / "run", progress=False)
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "test_acc" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert len(calls) == 3  # steps 6 and 12, then the clean train subset
    assert final["test_acc"] == evals[-1]["test_acc"] == full_run[1]["test_acc"]
    assert final["test_loss"] == evals[-1]["test_loss"]
