"""Non-finite losses and gradients in fp32 and bf16: skipped steps, counted, a streak stops the run.

The defined semantics: a step with a non-finite loss or gradient (either SAM pass) is skipped as
if its batch had not been drawn; the LR schedule still moves on. So a run with NaN injected at
some steps must reach exactly the weights, optimiser state and BatchNorm statistics of a run that
leaves those batches out.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitsam.cli import main
from vitsam.config import ConfigError, RunConfig, apply_overrides, validate
from vitsam.io import read_jsonl
from vitsam.optim import SAM, StepConfig, train_step
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.badsteps import NonFiniteError
from vitsam.train.checkpoint import list_checkpoints, load_run

NAN = float("nan")
REAL_STEP = engine.train_step


def _net() -> nn.Module:
    """BatchNorm (running statistics) and dropout (RNG draws): both must survive a skipped step."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 3))


def _batches(k: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 3, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(k)]


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sam-sgd":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, momentum=0.9)
    if kind == "sam-adamw":
        return SAM(model.parameters(), torch.optim.AdamW, rho=0.2, lr=0.05)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.05)


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Weights, buffers (BN statistics) and every optimiser state tensor, in a fixed order."""
    out = [t.detach().clone() for t in model.state_dict().values()]
    for s in opt.state_dict()["state"].values():
        out += [v.clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                for _, v in sorted(s.items())]
    return out


def _poison(where: str, at_call: int, param: torch.Tensor):
    """A criterion (and a gradient hook on ``param``) that make the ``at_call``-th loss or
    backward NaN: ``where`` is "loss" or "grad"; calls count every pass of every step."""
    count = {"loss": 0, "grad": 0}

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count["loss"] += 1
        loss = F.cross_entropy(logits, y)
        return loss * NAN if where == "loss" and count["loss"] == at_call else loss

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count["grad"] += 1
        if where == "grad" and count["grad"] == at_call:
            grad = grad.clone()
            grad.view(-1)[0] = NAN  # one entry of one gradient
        return grad

    param.register_hook(hook)
    return criterion


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,where,sam_pass,m", [
    ("sam-sgd", "loss", 1, None), ("sam-sgd", "loss", 2, None), ("sam-sgd", "grad", 1, None),
    ("sam-sgd", "grad", 2, None), ("sam-adamw", "loss", 2, None), ("sam-sgd", "grad", 2, 3),
    ("sgd", "loss", 1, None), ("adamw", "grad", 1, None)])
def test_a_nonfinite_step_is_the_run_without_its_batch(kind, where, sam_pass, m, dtype) -> None:
    """NaN at step 3 of 4 (the loss or one gradient entry, in SAM's first or second pass): the
    weights, BN statistics and optimiser state equal those of steps 1, 2, 4 alone, bit for bit,
    and during the skipped step SAM's perturbation is undone exactly."""
    cfg = StepConfig(m=m, autocast_dtype=dtype)
    sam = kind.startswith("sam")
    passes = (2 * (6 // m if m else 1)) if sam else 1  # backward passes per step
    chunk_pass = sam_pass if m is None else 2 * ((6 // m) - 1) + sam_pass  # in the last chunk
    batches = _batches()

    model = _net()
    opt = _optimizer(model, kind)
    crit = _poison(where, 2 * passes + chunk_pass, model[0].weight)
    outs = []
    for i, (x, y) in enumerate(batches):
        before = _state(model, opt)
        outs.append(train_step(model, crit, x, y, opt, cfg=cfg))
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))
            assert not (sam and opt.perturbed)
    assert [(o["skipped"], o["nonfinite"]) for o in outs] == [(0, 0), (0, 0), (1, 1), (0, 0)]
    if sam:
        assert all(o["grad_cosine"] != o["grad_cosine"] for o in outs[2:3])  # NaN: no second step

    ref = _net()
    ref_opt = _optimizer(ref, kind)
    for i, (x, y) in enumerate(batches):
        if i != 2:
            train_step(ref, F.cross_entropy, x, y, ref_opt, cfg=cfg)
    got, want = _state(model, opt), _state(ref, ref_opt)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_an_inf_loss_is_skipped_too_and_the_next_step_runs() -> None:
    model, (x, y) = _net(), _batches(1)[0]
    opt = _optimizer(model, "sam-sgd")
    w0 = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, lambda lg, t: F.cross_entropy(lg, t) + float("inf"), x, y, opt)
    assert out["skipped"] == out["nonfinite"] == 1.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    out = train_step(model, F.cross_entropy, x, y, opt)
    assert out["skipped"] == out["nonfinite"] == 0.0
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_an_fp16_overflow_is_the_scalers_until_its_scale_cannot_drop() -> None:
    """GradScaler overflow at scale > 1: skipped but not a fault (the scale backs off); at
    scale <= 1 it is; a NaN loss is a fault whatever the scale."""
    def run(init_scale: float, crit) -> dict:
        model, (x, y) = _net(), _batches(1)[0]
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return train_step(model, crit, x, y, _optimizer(model, "sam-sgd"), scaler=scaler)

    out = run(1024.0, F.cross_entropy)
    assert (out["skipped"], out["nonfinite"]) == (1.0, 0.0)
    assert run(1.0, F.cross_entropy)["nonfinite"] == 1.0
    assert run(1024.0, lambda lg, t: F.cross_entropy(lg, t) * NAN)["nonfinite"] == 1.0


def test_training_accuracy_counts_tied_logits_fairly() -> None:
    """A model that scores all 4 classes alike is right 1/4 of the time, whatever the labels
    (argmax's first index would give 0 here); a NaN row is never right."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(75, 4))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    x, y = _batches(1)[0][0], torch.tensor([1, 2, 3, 1, 2, 3])
    out = train_step(model, F.cross_entropy, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert out["correct"] == 6 / 4
    x[0] = NAN
    out = train_step(model, F.cross_entropy, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert out["correct"] == 5 / 4 and out["nonfinite"] == 1.0


def test_the_meter_counts_nonfinite_steps_and_leaves_their_loss_out() -> None:
    meter = engine._Meter(clock=iter(range(100)).__next__)
    meter.start()
    meter.add({"loss": 1.0, "correct": 2.0, "n": 4.0, "skipped": 0.0, "nonfinite": 0.0, "lr": 0.1})
    meter.add({"loss": NAN, "correct": 3.0, "n": 4.0, "grad_norm": NAN, "skipped": 1.0,
               "nonfinite": 1.0, "lr": 0.2})
    meter.stop()  # one clock tick: 1 s
    rec = meter.flush()
    assert (rec["loss"], rec["acc"], rec["lr"]) == (1.0, 0.5, 0.2)
    assert (rec["skipped_steps"], rec["nonfinite_steps"], rec["images_per_s"]) == (1.0, 1.0, 8.0)
    assert "grad_norm" not in rec
    meter.add({"loss": NAN, "correct": 0.0, "n": 4.0, "skipped": 1.0, "nonfinite": 1.0, "lr": 0.3})
    rec = meter.flush()
    assert rec["loss"] != rec["loss"] and rec["acc"] != rec["acc"] and rec["nonfinite_steps"] == 1


def test_max_bad_steps_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"train.max_bad_steps must be >= 1"):
        validate(apply_overrides(RunConfig(), ["train.max_bad_steps=0"]))


# ---------------------------------------------------------------- the training engine

def _tiny(tmp_path, *extra: str):
    """12 SAM steps with dropout, checkpoints every 3, log records every 2."""
    return apply_overrides(get_preset("mnist-vit-sam", smoke_size=True),
                           [f"out_dir={tmp_path}", "train.max_steps=none", "train.epochs=2",
                            "train.ckpt_every_epochs=0.5", "model.kwargs.drop_rate=0.1",
                            "train.log_every_steps=2", "train.train_eval_samples=64", *extra])


def _nan_at(monkeypatch, steps: dict[int, int]) -> None:
    """engine.train_step with the loss of pass ``steps[k]`` (1 or 2) of step k made NaN."""
    real, calls = REAL_STEP, {"step": 0}

    def poisoned(model, criterion, *args, **kwargs):
        calls["step"] += 1
        bad_pass, passes = steps.get(calls["step"]), {"n": 0}

        def crit(logits, y):
            passes["n"] += 1
            loss = criterion(logits, y)
            return loss * NAN if passes["n"] == bad_pass else loss

        return real(model, crit, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", poisoned)


def _same_weights(a_dir, b_dir) -> None:
    a, b = load_run(a_dir).model.state_dict(), load_run(b_dir).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_counted_and_the_run_equals_one_without_those_batches(
        tmp_path, monkeypatch) -> None:
    real = REAL_STEP
    _nan_at(monkeypatch, {3: 1, 8: 2})  # step 3: first pass; step 8: SAM's second pass
    final = engine.train(_tiny(tmp_path), run_dir=tmp_path / "nan", progress=False)

    calls = {"n": 0}

    def leave_out(model, criterion, x, y, optimizer, scheduler, scaler, step_cfg, **kw):
        calls["n"] += 1
        if calls["n"] not in (3, 8):
            return real(model, criterion, x, y, optimizer, scheduler, scaler, step_cfg, **kw)
        lr = scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()  # the schedule moves on, nothing else happens
        return {"loss": 0.0, "correct": 0.0, "n": float(len(y)), "skipped": 0.0, "lr": lr}

    monkeypatch.setattr(engine, "train_step", leave_out)
    engine.train(_tiny(tmp_path), run_dir=tmp_path / "without", progress=False)
    _same_weights(tmp_path / "nan", tmp_path / "without")
    assert (final["skipped_steps"], final["nonfinite_steps"], final["steps"]) == (2, 2, 12)
    recs = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs if r["nonfinite_steps"]] == [4, 8]
    assert all(r["loss"] == r["loss"] for r in recs)  # the skipped NaN does not blank a record
    saved = json.loads((tmp_path / "nan" / "final.json").read_text())
    assert saved["nonfinite_steps"] == 2


def test_a_streak_of_nonfinite_steps_stops_the_run_resumably_from_before_it(
        tmp_path, monkeypatch, capsys) -> None:
    """NaN from step 5 on, train.max_bad_steps=3: the run stops at step 7 with a one-line
    error (exit status 2) and leaves checkpoint step-4, the run just before the fault (the
    step-6 one written during the streak is gone). Resumed with the fault gone, it ends with
    the weights and accuracies of a run that never had one."""
    clean = engine.train(_tiny(tmp_path, "train.max_bad_steps=3"), run_dir=tmp_path / "clean",
                         progress=False)
    _nan_at(monkeypatch, {k: 1 + k % 2 for k in range(5, 13)})  # both passes, alternately
    run = tmp_path / "cut"
    argv = ["train", "--preset", "mnist-vit-sam", "--smoke", "--quiet", "--run-dir", str(run),
            "train.max_steps=none", "train.epochs=2", "train.ckpt_every_epochs=0.5",
            "model.kwargs.drop_rate=0.1", "train.log_every_steps=2",
            "train.train_eval_samples=64", "train.max_bad_steps=3", f"out_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for part in ("stopped at step 7", "3 steps in a row (from step 5)", "optim.lr=0.001",
                 "optim.rho=0.05", "train.precision=", "step-00000004", f"--resume {run}"):
        assert part in err, (part, err)
    assert list_checkpoints(run) == ["step-00000003", "step-00000004"]
    assert load_run(run).step == 4
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["step"] == 7 and sum(r["nonfinite_steps"] for r in recs) == 3
    assert not (run / "final.json").exists()

    monkeypatch.setattr(engine, "train_step", REAL_STEP)
    resumed = engine.train(resume=run, progress=False)
    _same_weights(tmp_path / "clean", run)
    assert (resumed["test_acc"], resumed["train_acc"]) == (clean["test_acc"], clean["train_acc"])
    assert resumed["nonfinite_steps"] == 0  # the log continued from step 4


def test_the_streak_error_is_a_nonfinite_error(tmp_path, monkeypatch) -> None:
    _nan_at(monkeypatch, {k: 1 for k in range(1, 13)})
    with pytest.raises(NonFiniteError, match="from step 1"):
        engine.train(_tiny(tmp_path, "train.max_bad_steps=2"), run_dir=tmp_path / "r", progress=False)
    assert load_run(tmp_path / "r").step == 0  # the untrained weights
