"""The GPU fast path on the CPU: torch.compile, channels_last, fused optimisers, resident data.

Each setting must train as the default path does: the same losses to float rounding, exact
resume, checkpoints with the plain module's keys, the same batches.
"""
import copy

import pytest
import torch
from torch import nn

from vitsam.config import ConfigError, apply_overrides, to_dict, validate
from vitsam.data import train_batches
from vitsam.data.loader import _pin
from vitsam.data.tensors import ImageFiles
from vitsam.io import read_jsonl
from vitsam.optim.factory import OptimConfig, build_optimizer, use_fused
from vitsam.presets import get_preset
from vitsam.study import stages
from vitsam.train import engine, fastpath
from vitsam.train.checkpoint import load_run

from resume import whole_and_resumed

CPU = torch.device("cpu")


def _cfg(tmp_path, preset: str, *extra: str):
    return apply_overrides(get_preset(preset, smoke_size=True),
                           [f"out_dir={tmp_path}", "train.train_eval_samples=32", *extra])


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _train(cfg, run_dir):
    engine.train(cfg, run_dir=run_dir, progress=False)
    return run_dir


# -- torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["mnist-vit-sam", "mnist-resnet-sam"])
def test_compiled_run_has_the_plain_losses_and_plain_checkpoints(tmp_path, preset) -> None:
    """aot_eager traces forward and backward into FX graphs as inductor does, without a C
    compiler; SAM's second pass (BatchNorm statistics frozen) is a second graph."""
    plain = _train(_cfg(tmp_path, preset), tmp_path / "plain")
    comp = _train(_cfg(tmp_path, preset, "train.compile=true", "train.compile_backend=aot_eager"),
                  tmp_path / "compiled")
    a, b = _losses(plain), _losses(comp)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    run = load_run(comp)  # strict load into a freshly built plain model
    keys = list(run.model.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    ref = load_run(plain).model.state_dict()
    for k, v in run.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


def _whole_and_resumed(tmp_path, monkeypatch, *extra: str):
    """A 5-step run uninterrupted, and interrupted at step 5 (checkpoint at step 3) then resumed."""
    cfg = _cfg(tmp_path, "mnist-vit-sam", "train.max_steps=5", "train.ckpt_every_epochs=0.5",
               "train.epochs=2", "train.log_every_steps=2", "model.kwargs.drop_rate=0.1", *extra)
    whole_and_resumed(cfg, tmp_path, monkeypatch)
    return tmp_path / "whole", tmp_path / "cut"


def _same_weights(a_dir, b_dir) -> None:
    a, b = load_run(a_dir).model.state_dict(), load_run(b_dir).model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compiled_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    whole, cut = _whole_and_resumed(tmp_path, monkeypatch, "train.compile=true",
                                    "train.compile_backend=eager")
    assert load_run(cut).config["train"]["compile"] is True
    _same_weights(whole, cut)
    assert _losses(whole) == _losses(cut)


def test_the_steps_drive_the_compiled_module_and_checkpoints_the_plain_one(tmp_path) -> None:
    tr = engine.Trainer.build(_cfg(tmp_path, "mnist-vit", "train.compile=true",
                                   "train.compile_backend=eager"))
    assert isinstance(tr.net, torch._dynamo.eval_frame.OptimizedModule)
    assert tr.net._orig_mod is tr.model and not isinstance(tr.model, type(tr.net))
    plain = engine.Trainer.build(_cfg(tmp_path, "mnist-vit"))
    assert plain.net is plain.model


# -- channels_last --------------------------------------------------------------------------

def test_channels_last_resnet_has_the_same_losses(tmp_path) -> None:
    runs = {v: _train(_cfg(tmp_path, "mnist-resnet-sam", f"train.channels_last={v}"),
                      tmp_path / f"cl-{v}") for v in ("false", "true")}
    torch.testing.assert_close(torch.tensor(_losses(runs["true"])),
                               torch.tensor(_losses(runs["false"])), rtol=1e-5, atol=1e-6)
    tr = engine.Trainer.build(_cfg(tmp_path, "mnist-resnet", "train.channels_last=true"))
    conv = next(p for p in tr.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert tr.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()  # really NHWC, not a 1x1 filter that is both


def test_channels_last_auto_is_for_resnets_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert fastpath.use_channels_last("auto", "resnet", cuda)
    assert not fastpath.use_channels_last("auto", "resnet", CPU)
    assert not fastpath.use_channels_last("auto", "vit", cuda)
    assert fastpath.use_channels_last(True, "vit", CPU) and not fastpath.use_channels_last(False, "resnet", cuda)


def test_channels_last_and_fused_resume_exactly(tmp_path, monkeypatch) -> None:
    """The optimiser state saved from NHWC parameters loads back into them (fused kernel)."""
    whole, cut = _whole_and_resumed(tmp_path, monkeypatch, "train.channels_last=true",
                                    "optim.fused=true")
    _same_weights(whole, cut)


# -- fused optimisers -----------------------------------------------------------------------

def _net() -> nn.Module:
    torch.manual_seed(0)
    # (no bias right before the BatchNorm: its gradient is rounding noise, which Adam amplifies)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(64, 5))


@pytest.mark.parametrize("name,sam", [("adamw", False), ("sgd", False), ("adamw", True)])
def test_fused_optimiser_makes_the_foreach_steps(name, sam) -> None:
    from vitsam.optim.steps import train_step

    x, y = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    nets = []
    for fused in (False, True):
        net = _net()
        opt = build_optimizer(net, OptimConfig(name=name, lr=0.05, sam=sam, fused=fused))
        base = getattr(opt, "base_optimizer", opt)
        assert base.defaults.get("fused") is (True if fused else None)
        for _ in range(4):
            train_step(net, nn.CrossEntropyLoss(), x, y, opt)
        nets.append(net)
    moved = 0.0
    ref = _net()
    for (k, a), b, r in zip(nets[0].state_dict().items(), nets[1].state_dict().values(),
                            ref.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
        moved = max(moved, (a.float() - r.float()).abs().max().item())
    assert moved > 1e-3  # the steps did change the weights


def test_fused_auto_is_on_cuda_only() -> None:
    assert use_fused("auto", "cuda") and not use_fused("auto", "cpu")
    assert use_fused(True, "cpu") and not use_fused(False, "cuda")


# -- device-resident data -------------------------------------------------------------------

@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_resident_batches_equal_the_default_ones(tmp_path, augment) -> None:
    tr = engine.Trainer.build(_cfg(tmp_path, "mnist-vit", f"data.augment={augment}",
                                   "data.resident=true"))
    default = engine.Trainer.build(_cfg(tmp_path, "mnist-vit", f"data.augment={augment}",
                                        "data.resident=false"))
    assert tr.bundle.train.images.device == tr.device
    for k, ((xa, ya), (xb, yb)) in enumerate(zip(
            train_batches(tr.bundle, 16, epoch=1, seed=3, device=tr.device, start_batch=1),
            train_batches(default.bundle, 16, epoch=1, seed=3, device=CPU, start_batch=1))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb), k
    assert k >= 2


def test_resident_auto_is_off_on_the_cpu_and_true_needs_cached_images(tmp_path) -> None:
    cfg = _cfg(tmp_path, "mnist-vit")
    bundle = engine.Trainer.build(cfg).bundle
    assert not fastpath.use_resident("auto", bundle, CPU)
    assert fastpath.use_resident(True, bundle, CPU) and not fastpath.use_resident(False, bundle, CPU)
    files = copy.copy(bundle)
    files.train = ImageFiles(["a.jpg"], torch.zeros(1, dtype=torch.long))
    assert not fastpath.use_resident("auto", files, CPU)
    with pytest.raises(ConfigError, match="data.resident=true needs images cached"):
        fastpath.use_resident(True, files, CPU)


def test_decoded_batches_are_pinned_only_for_a_gpu() -> None:
    assert not _pin("cpu") and not _pin(CPU)
    assert _pin("cuda") == torch.cuda.is_available()


# -- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train.channels_last=maybe", "train.channels_last must be auto, true or false"),
    ("optim.fused=yes please", "optim.fused must be auto, true or false"),
    ("data.resident=sometimes", "resident must be auto, true or false"),
    ("train.compile_mode=fastest", "train.compile_mode must be one of default"),
])
def test_bad_fast_path_settings_are_one_line_errors(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate(_cfg(tmp_path, "mnist-vit", override))
    assert "\n" not in str(info.value)


def test_compile_backend_and_mode_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'nope' is not a torch.compile backend") as info:
        validate(_cfg(tmp_path, "mnist-vit", "train.compile=true", "train.compile_backend=nope"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="option of the inductor backend"):
        validate(_cfg(tmp_path, "mnist-vit", "train.compile_mode=max-autotune",
                      "train.compile_backend=eager"))
    validate(_cfg(tmp_path, "mnist-vit", "train.compile=true", "train.compile_mode=max-autotune"))


def test_switches_parse_as_booleans_or_auto(tmp_path) -> None:
    cfg = _cfg(tmp_path, "mnist-vit", "train.channels_last=true", "optim.fused=false",
               "data.resident=auto")
    assert (cfg.train.channels_last, cfg.optim.fused, cfg.data.resident) == (True, False, "auto")


def test_fast_path_settings_at_their_defaults_keep_study_fingerprints(tmp_path) -> None:
    cfg = get_preset("mnist-vit-sam", smoke_size=True)
    fp = stages.fingerprint(cfg)
    old = to_dict(cfg)  # a config written before these settings existed
    for section, key, _ in stages.FAST_PATH_DEFAULTS:
        del old[section][key]
    from vitsam.config import RunConfig, from_dict
    assert stages.fingerprint(from_dict(RunConfig, old)) == fp
    for override in ("train.compile=true", "train.channels_last=true", "optim.fused=true",
                     "data.resident=false"):
        assert stages.fingerprint(apply_overrides(cfg, [override])) != fp, override
