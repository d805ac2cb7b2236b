"""Adversarial training and evaluation: PGD-k / FGSM-RS in pixel units, their composition with
SAM and the training step, exact resume, settings, and ``vitsam eval --attack``."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitsam.cli import main
from vitsam.config import ConfigError, RunConfig, apply_overrides, validate
from vitsam.optim import SAM, StepConfig, train_step
from vitsam.optim.adversarial import Attack, generator_seed
from vitsam.optim.steps import frozen_running_stats

MEAN, STD = (0.4, 0.6), (0.2, 0.3)  # two channels, each with its own statistics


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, -1, 1, 1)
    s = torch.tensor(STD).view(1, -1, 1, 1)
    return (pixels - m) / s


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)


def _linear(classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, classes))


def _batch(n: int = 8, seed: int = 1, lo: float = 0.3, hi: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = lo + (hi - lo) * torch.rand(n, 2, 3, 3, generator=g)
    return _normalise(pixels), torch.randint(0, 2, (n,), generator=g)


def _pgd(eps: float, **kw) -> Attack:
    return Attack(kw.pop("kind", "pgd"), eps, MEAN, STD, **kw)


# -- the attack -----------------------------------------------------------------------------
def test_pgd_at_eps_zero_returns_the_batch_and_exactly_clean_accuracy():
    from vitsam.eval.attacks import robust_accuracy

    model = _linear(classes=3)
    x, y = _batch(16)
    assert torch.equal(_pgd(0.0, steps=5).perturb(model, nn.CrossEntropyLoss(), x, y), x)
    res = robust_accuracy(model, [(x, y)], "pgd", 0.0, MEAN, STD, 3, steps=3, restarts=2,
                          progress=False)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert res["clean_acc"] == res["robust_acc"] == pytest.approx(clean, abs=1e-12)


def test_robust_accuracy_of_a_linear_model_is_the_share_with_margin_beyond_eps():
    """Exactly: a two-class linear model keeps its prediction under every pixel perturbation of
    L-inf size eps iff its margin exceeds eps * sum_i |w1_i - w0_i| / std_i (pixels kept away
    from 0 and 1 so that the range never binds)."""
    from vitsam.eval.attacks import robust_accuracy

    model = _linear(seed=2)
    x, _ = _batch(256, seed=4)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)  # every image right when clean
    y[:32] = 1 - y[:32]  # and some wrong
    w = model[1].weight.detach()
    std = torch.tensor(STD).repeat_interleave(9)  # the flattened (C, H, W) order
    eps = 0.02
    budget = eps * ((w[1] - w[0]).abs() / std).sum()
    margin = (logits[:, 1] - logits[:, 0]) * (2 * y - 1)  # > 0 when right
    want = (margin > budget).float().mean().item()
    res = robust_accuracy(model, [(x[:100], y[:100]), (x[100:], y[100:])], "pgd", eps, MEAN, STD, 2,
                          steps=4, restarts=1, step_size=eps, progress=False)
    assert res["clean_acc"] == pytest.approx(224 / 256)
    assert 0.2 < want < 0.8 and res["robust_acc"] == pytest.approx(want)


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_linear_model_perturbation_is_the_analytic_worst_case(kind):
    """For two classes, the input gradient of CE at a linear model is p_other * (w_other - w_y):
    its sign is sign(w_other - w_y) everywhere, so the worst case in the eps ball is the corner
    eps * sign(w_other - w_y) in pixel units (the normalisation's std > 0 keeps the sign), i.e.
    eps * sign / std in the model's normalised input."""
    model = _linear()
    x, y = _batch(8)
    eps = 0.05
    w = model[1].weight.detach()  # (2, 18)
    direction = torch.sign(w[1 - y] - w[y]).view(-1, 2, 3, 3)  # (B, C, H, W): toward the other class
    if kind == "pgd":  # 2 steps of eps reach the corner from any start inside the ball
        adv = _pgd(eps, steps=3, step_size=eps).perturb(model, nn.CrossEntropyLoss(), x, y)
        want = eps * direction
    else:  # one step of 1.25 eps from the documented random start, clipped to the ball
        key = 7
        adv = _pgd(eps, kind="fgsm", seed=3).perturb(model, nn.CrossEntropyLoss(), x, y, key=key)
        g = torch.Generator().manual_seed(generator_seed(3, key))
        start = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
        want = torch.clamp(start + 1.25 * eps * direction, -eps, eps)
        assert (want == eps * direction).float().mean() < 1  # the start matters ...
        assert ((want - start) * direction > 0).all()  # ... and the step goes the right way
    delta = _pixels(adv) - _pixels(x)
    assert torch.allclose(delta, want, atol=1e-6)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    assert torch.allclose(adv - x, want / std, atol=1e-5)


def test_perturbation_stays_in_the_eps_ball_and_in_pixel_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    g = torch.Generator().manual_seed(5)
    u8 = torch.randint(0, 256, (16, 2, 3, 3), generator=g)
    u8[:, :, 0, 0], u8[:, :, 1, 1] = 0, 255  # pixels at both ends of the range
    x, y = _normalise(u8.float() / 255), torch.randint(0, 3, (16,), generator=g)
    eps = 0.1
    for atk in (_pgd(eps, steps=6, step_size=0.08), _pgd(eps, kind="fgsm")):
        adv = atk.perturb(model, nn.CrossEntropyLoss(), x, y, key=1)
        p, q = _pixels(x), _pixels(adv)
        assert (q - p).abs().max() <= eps + 1e-6
        assert q.min() >= -1e-6 and q.max() <= 1 + 1e-6
        assert (q - p).abs().max() > 0.9 * eps  # it did move
        with torch.no_grad():
            assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_attack_leaves_batchnorm_statistics_gradients_and_the_global_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Dropout(0.5), nn.Flatten(), nn.Linear(36, 2)).train()
    x, y = _batch(8)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _pgd(0.05, steps=2).perturb(model, nn.CrossEntropyLoss(), x, y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_micro_batches_give_the_same_adversarial_batch_without_batchnorm():
    model = _linear(classes=3)
    x, y = _batch(8)
    atk = _pgd(0.05, steps=3)
    whole = atk.perturb(model, nn.CrossEntropyLoss(), x, y, key=2)
    parts = atk.perturb(model, nn.CrossEntropyLoss(), x, y, key=2, micro_batch=3)
    assert torch.allclose(whole, parts, atol=1e-6)


def test_pgd_matches_torchattacks_pgd_from_the_same_start():
    ta = pytest.importorskip("torchattacks")
    from vitsam.eval.attacks import Normalised

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x, _ = _batch(32)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(3))
    ours = _pixels(_pgd(0.03, steps=5, step_size=0.01, random_start=False).perturb(
        model, nn.CrossEntropyLoss(), x, y))
    theirs = ta.PGD(Normalised(model, MEAN, STD), eps=0.03, alpha=0.01, steps=5,
                    random_start=False)(_pixels(x).clamp(0, 1), y)
    assert ((ours - theirs).abs() < 1e-5).float().mean() > 0.99


# -- composition with the training step ----------------------------------------------------
def _step(model: nn.Module, sam: bool, attack: Attack | None, x, y, rho: float = 0.1) -> nn.Module:
    m = copy.deepcopy(model)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=rho, lr=0.5) if sam else \
        torch.optim.SGD(m.parameters(), lr=0.5)
    out = train_step(m, nn.CrossEntropyLoss(), x, y, opt, cfg=StepConfig(attack=attack), key=4)
    assert out["skipped"] == 0.0
    if attack is not None:
        assert out["adv_loss"] == out["loss"] and out["adv_correct"] == out["correct"]
    return m


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_sam_plus_at_is_sams_step_on_the_batch_attacked_at_the_current_weights():
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = _batch(16)
    atk = _pgd(0.1, kind="fgsm", seed=1)
    vanilla, at = _flat(_step(model, False, None, x, y)), _flat(_step(model, False, atk, x, y))
    sam, sam_at = _flat(_step(model, True, None, x, y)), _flat(_step(model, True, atk, x, y))
    for a, b in ((at, vanilla), (sam_at, at), (sam_at, sam), (sam, vanilla)):
        assert (a - b).abs().max() > 1e-4
    # Independently: the adversarial batch made at w, then a plain SAM step on it.
    x_adv = atk.perturb(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, key=4)
    assert torch.equal(_flat(_step(model, True, None, x_adv, y)), sam_at)


def test_at_at_eps_zero_trains_exactly_as_without_an_attack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    x, y = _batch(8)
    a, b = _step(model, True, None, x, y), _step(model, True, _pgd(0.0, steps=3), x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_attack_under_bf16_autocast_and_micro_batches_trains_and_stays_in_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(36, 2))
    x, y = _batch(8)
    atk = _pgd(0.05, steps=2)
    adv = atk.perturb(model, nn.CrossEntropyLoss(), x, y, micro_batch=4,
                      autocast_dtype=torch.bfloat16)
    assert adv.dtype == x.dtype and (_pixels(adv) - _pixels(x)).abs().max() <= 0.05 + 1e-6
    assert (_pixels(adv) - _pixels(x)).abs().max() > 0.04
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    out = train_step(model, nn.CrossEntropyLoss(), x, y, opt, cfg=StepConfig(
        attack=atk, micro_batch=4, autocast_dtype=torch.bfloat16))
    assert out["skipped"] == 0.0 and out["perturbed"] == 1.0


def test_a_nonfinite_attack_gradient_skips_the_step():
    model = _linear()
    x, y = _batch(4)
    x[0, 0, 0, 0] = float("nan")
    before = _flat(model).clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = train_step(model, nn.CrossEntropyLoss(), x, y, opt, cfg=StepConfig(attack=_pgd(0.1)))
    assert out["skipped"] == out["nonfinite"] == 1.0
    assert torch.equal(_flat(model), before)


def _smoke(tmp_path: Path, *extra: str) -> RunConfig:
    from vitsam.presets import get_preset

    return apply_overrides(get_preset("mnist-resnet-sam-at", smoke_size=True), [
        f"out_dir={tmp_path}", "train.max_steps=5", "train.epochs=2", "train.ckpt_every_epochs=0.5",
        "train.log_every_steps=2", "train.train_eval_samples=32", "model.kwargs.width=4", *extra])


def test_training_resumed_mid_run_is_exact(tmp_path, monkeypatch):
    from vitsam.io import read_jsonl

    from resume import assert_same_run, whole_and_resumed

    cfg = _smoke(tmp_path, "train.adversarial=pgd", "train.adv_steps=2")
    whole, cut = whole_and_resumed(cfg, tmp_path, monkeypatch)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert all("adv_acc" in r and "adv_loss" in r
               for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "loss" in r)
    adv = whole["adversarial"]
    assert adv == cut["adversarial"]
    assert (adv["attack"], adv["steps"], adv["sam"]) == ("pgd", 2, True)
    assert adv["eps"] == pytest.approx(0.1) and adv["step_size"] == pytest.approx(2.5 * 0.1 / 2)
    assert 0 <= adv["train_adv_acc"] <= 1


@pytest.mark.parametrize("override, message", [
    ("train.adversarial=PGD", "train.adversarial must be one of none, pgd, fgsm, got 'PGD'"),
    ("train.adv_eps=8", "train.adv_eps must be in [0, 1] (pixel units"),
    ("train.adv_eps=-0.1", "train.adv_eps must be in [0, 1]"),
    ("train.adv_steps=0", "train.adv_steps must be >= 1"),
    ("train.adv_step_size=0", "train.adv_step_size must be > 0"),
    ("train.adv_eps=8/0", "train.adv_eps='8/0' is not a valid float"),
])
def test_bad_adversarial_settings_are_one_line_errors(override, message, capsys):
    with pytest.raises(ConfigError, match=None) as exc:
        validate(apply_overrides(RunConfig(), [override]))
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert main(["train", "--preset", "mnist-vit-at", "--smoke", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitsam: error:") and message in err and "\n" not in err


def test_fractions_read_as_pixel_radii():
    cfg = apply_overrides(RunConfig(), ["train.adv_eps=8/255", "train.adv_step_size=2/255"])
    assert cfg.train.adv_eps == 8 / 255 and cfg.train.adv_step_size == 2 / 255


# -- vitsam eval --attack -------------------------------------------------------------------
@pytest.fixture(scope="module")
def at_run(tmp_path_factory) -> Path:
    from vitsam.presets import get_preset
    from vitsam.train.engine import train

    out = tmp_path_factory.mktemp("at")
    cfg = apply_overrides(get_preset("mnist-vit-at", smoke_size=True),
                          [f"out_dir={out}", "train.train_eval_samples=32"])
    train(cfg, run_dir=out / "run", progress=False)
    return out / "run"


def test_eval_attack_pgd_reports_clean_and_robust_accuracy(at_run, capsys):
    assert main(["eval", str(at_run), "--attack", "pgd", "--attack-samples", "48",
                 "--attack-steps", "4", "--attack-eps", "0.3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "PGD-4 x2" in out and "robust" in out
    res = json.loads((at_run / "eval.json").read_text())["attack_pgd"]
    assert {"attack", "eps", "samples", "clean_acc", "robust_acc", "steps", "restarts",
            "step_size", "seed", "time_s"} <= set(res)
    assert res["samples"] == 48 and res["eps"] == 0.3 and res["step_size"] == pytest.approx(2.5 * 0.3 / 4)
    assert 0 <= res["robust_acc"] <= res["clean_acc"] <= 1


def test_eval_attack_autoattack_runs_through_torchattacks(at_run):
    pytest.importorskip("torchattacks")
    assert main(["eval", str(at_run), "--attack", "autoattack", "--attack-samples", "8",
                 "--attack-eps", "8/255", "--quiet"]) == 0
    res = json.loads((at_run / "eval.json").read_text())
    aa = res["attack_autoattack"]
    assert aa["version"] == "standard" and aa["samples"] == 8 and aa["library"].startswith("torchattacks")
    assert 0 <= aa["robust_acc"] <= aa["clean_acc"]


@pytest.mark.parametrize("args, message", [
    (["--attack-steps", "5"], "--attack-steps goes with --attack pgd or --attack autoattack"),
    (["--attack", "pgd", "--attack-samples", "0"], "--attack-samples must be >= 1"),
    (["--attack", "pgd", "--attack-eps", "2"], "--attack-eps must be in [0, 1]"),
    (["--attack", "pgd", "--attack-eps", "x/3"], "'x/3' is not a number or a fraction like 8/255"),
])
def test_bad_eval_attack_options_are_one_line_errors(at_run, args, message, capsys):
    assert main(["eval", str(at_run), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# -- the adversarial study ------------------------------------------------------------------
def test_adversarial_study_compares_sam_at_with_at_on_clean_and_robust_accuracy(tmp_path):
    from vitsam.study.presets import get_study, study_cells
    from vitsam.study.runner import run_study
    from vitsam.study import tables

    study = get_study("adversarial")
    cells = {c.name: c for c in study_cells(study, "smoke", (0,))}
    assert set(cells) == {f"{f}-{m}-s0" for f in ("resnet", "vit", "mixer") for m in ("at", "sam-at")}
    for c in cells.values():
        assert c.config.train.adversarial == "fgsm" and c.config.optim.sam == (c.method == "sam-at")
    cpu = {c.name: c.config for c in study_cells(study, "cpu", (0,))}
    assert all(cfg.train.adv_eps == 8 / 255 and cfg.data.augment == "none" for cfg in cpu.values())
    rec = run_study(study, "smoke", tmp_path, only=["vit-at-s0", "vit-sam-at-s0"], progress=False)
    assert all(e["status"] == "done" for e in rec["cells"].values())
    t = tables.study_tables(tmp_path, rec)
    for r in t["rows"]:
        ev = json.loads((tmp_path / r["name"] / "eval.json").read_text())["attack_pgd"]
        final = json.loads((tmp_path / r["name"] / "final.json").read_text())
        assert ev["eps"] == 0.1 and ev["samples"] == 32 and ev["steps"] == 3
        assert r["robust_acc"] == ev["robust_acc"] <= r["robust_clean_acc"] == ev["clean_acc"]
        assert r["adv_train_acc"] == final["adversarial"]["train_adv_acc"]
    assert [d["method"] for d in t["diffs"]] == ["sam-at - at"]
    md = (tmp_path / "adversarial.md").read_text()
    assert "PGD robust acc %" in md and "| vit sam-at - at |" in md
