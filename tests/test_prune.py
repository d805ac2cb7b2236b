"""MLP surgery and pruning: exact function preservation, exact parameter counts, round trips."""
from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from vitsam.analysis.prune import PruneError, figures, prune_curve, prune_model
from vitsam.models.surgery import (SurgeryError, mlp_hidden_sizes, mlp_modules,
                                   resize_mlp_hidden, shrink_mlp)


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=10).eval()


def _mixer() -> nn.Module:
    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, num_classes=10).eval()


def _kill(mlp: nn.Module, units: list[int]) -> None:
    """Make ``units`` dead by construction: pre-activation ~ -40, where GELU is 0 in float32."""
    with torch.no_grad():
        mlp.fc1.bias[units] = -40.0


def _calib(n_batches: int = 2, b: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))) for _ in range(n_batches)]


def _predicted_params(model: nn.Module, removed: dict[str, int]) -> int:
    """Each removed unit takes one fc1 row with its bias (in + 1) and one fc2 column (out)."""
    total = sum(p.numel() for p in model.parameters())
    for path, n in removed.items():
        mlp = model.get_submodule(path)
        total -= n * (mlp.fc1.in_features + 1 + mlp.fc2.out_features)
    return total


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_pruning_dead_units_keeps_logits_and_counts_params(arch: str) -> None:
    torch.manual_seed(0)
    model = _vit() if arch == "vit" else _mixer()
    paths = [p for p, _ in mlp_modules(model)]
    dead = {paths[0]: [0, 5, 7], paths[1]: [2], paths[-1]: [1, 3, 4, 9]}
    for path, units in dead.items():
        _kill(model.get_submodule(path), units)
    # A unit that never *activates* (GELU(-3) = -0.004 < 0) but still shifts the output: kept.
    with torch.no_grad():
        model.get_submodule(paths[0]).fc1.weight[11].zero_()
        model.get_submodule(paths[0]).fc1.bias[11] = -3.0
    before = mlp_hidden_sizes(model)
    calib = _calib()

    pruned, report = prune_model(model, calib)

    removed = {p: len(u) for p, u in dead.items()}
    assert report["removed"] == report["dead_units"] == sum(removed.values())
    assert mlp_hidden_sizes(model) == before  # the input model is untouched
    after = mlp_hidden_sizes(pruned)
    assert after == {p: h - removed.get(p, 0) for p, h in before.items()}
    assert sum(p.numel() for p in pruned.parameters()) == _predicted_params(model, removed)
    assert report["params_after"] == _predicted_params(model, removed)
    with torch.no_grad():
        for x, _ in calib:
            torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
    assert report["max_abs_logit_change_calib"] <= 1e-5
    assert report["argmax_agreement_calib"] == 1.0


def test_shrink_mlp_matches_zeroed_units_and_follows_keep_order() -> None:
    torch.manual_seed(0)
    mlp = Mlp(6, 10, out_features=5)
    x = torch.randn(4, 3, 6)
    keep = torch.tensor([7, 2, 5])
    ref = nn.Sequential(mlp.fc1, mlp.act)(x)  # (4, 3, 10)
    mask = torch.zeros(10)
    mask[keep] = 1.0
    expected = nn.functional.linear(ref * mask, mlp.fc2.weight, mlp.fc2.bias)
    w1 = mlp.fc1.weight.detach().clone()
    shrink_mlp(mlp, keep)
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (3, 3)
    assert torch.equal(mlp.fc1.weight, w1[keep])
    torch.testing.assert_close(mlp(x), expected)
    for bad, msg in ((torch.tensor([1, 1]), "repeated"), (torch.tensor([0, 3]), r"\[0, 3\)"),
                     (torch.tensor([0.0]), "integer")):
        with pytest.raises(SurgeryError, match=msg):
            shrink_mlp(mlp, bad)


def test_resize_round_trip_through_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    model = _mixer()
    _kill(model.blocks[0].mlp_channels, list(range(0, 60, 3)))
    _kill(model.blocks[1].mlp_tokens, [0, 1, 2])
    pruned, _ = prune_model(model, _calib(1, 2))
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()},
              str(tmp_path / "w.safetensors"))

    torch.manual_seed(123)  # a fresh full-size model with other weights
    fresh = resize_mlp_hidden(_mixer(), mlp_hidden_sizes(pruned))
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    with pytest.raises(SurgeryError, match="no submodule"):
        resize_mlp_hidden(_mixer(), {"blocks.9.mlp_tokens": 3})
    with pytest.raises(SurgeryError, match="not an MLP"):
        resize_mlp_hidden(_mixer(), {"blocks.0": 3})


def test_build_from_spec_rebuilds_pruned_model() -> None:
    from vitsam.models import build_from_spec, create_model, make_spec

    spec = make_spec("vit-t4", 10, 16, 3, {"depth": 1, "embed_dim": 32, "num_heads": 2})
    torch.manual_seed(0)
    model = create_model(spec["name"], spec["num_classes"], spec["img_size"], spec["in_chans"],
                         **spec["kwargs"]).eval()
    _kill(model.blocks[0].mlp, list(range(50)))
    pruned, _ = prune_model(model, [torch.randn(2, 3, 16, 16)])
    rebuilt = build_from_spec({**spec, "mlp_hidden": mlp_hidden_sizes(pruned)})
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))
    assert rebuilt.blocks[0].mlp.fc1.out_features == 128 - 50


class _Tokens(nn.Module):
    """One residual MLP on tokens (B, T, 4), then a linear head; 4 ReLU units: fc1 = identity."""

    def __init__(self, hidden: int = 4, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].mlp = Mlp(4, hidden, act_layer=act_layer)
        self.head = nn.Linear(4, 3)
        if hidden == 4:
            with torch.no_grad():
                self.blocks[0].mlp.fc1.weight.copy_(torch.eye(4))
                self.blocks[0].mlp.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.blocks[0].mlp(x)).mean(1))


def test_ratio_removes_least_active_first() -> None:
    torch.manual_seed(0)
    model = _Tokens().eval()
    # Unit j is positive on exactly j of the 6 tokens: activity 0, 1/6, 2/6, 3/6.
    x = -torch.ones(1, 6, 4)
    for j in range(4):
        x[0, :j, j] = 1.0
    pruned, report = prune_model(model, [x], ratio=0.5)
    assert report["dead_units"] == 1 and report["removed"] == 2
    kept = pruned.blocks[0].mlp.fc1.weight.detach()
    assert torch.equal(kept, torch.eye(4)[[2, 3]])  # units 0 (dead) and 1 (least active) gone
    all_but_one, rep = prune_model(model, [x], ratio=1.0)  # min_keep=1 leaves the most active
    assert rep["removed"] == 3 and torch.equal(all_but_one.blocks[0].mlp.fc1.weight,
                                               torch.eye(4)[[3]])
    with pytest.raises(PruneError, match="ratio"):
        prune_model(model, [x], ratio=1.5)
    with pytest.raises(PruneError, match="criterion"):
        prune_model(model, [x], criterion="magnitude")
    with pytest.raises(PruneError, match="no timm-style MLPs"):
        prune_model(nn.Sequential(nn.Linear(4, 2)), [torch.randn(2, 4)])


@pytest.mark.parametrize("ratio", [0.35, 0.3, 0.5])
def test_ratio_removes_the_exact_decimal_share(ratio: float) -> None:
    """90 GELU units (none dead): round(ratio x 90) go, halves to even, computed in decimal
    (0.35 x 90 = 31.5 -> 32; the float product 31.499999999999996 gave 31)."""
    torch.manual_seed(0)
    model = _Tokens(hidden=90, act_layer=nn.GELU).eval()
    x = torch.randn(2, 20, 4)
    want = int((Decimal(str(ratio)) * 90).to_integral_value(ROUND_HALF_EVEN))
    _, report = prune_model(model, [x], ratio=ratio)
    assert report["dead_units"] == 0 and report["removed"] == want
    curve = prune_curve(model, [x], [(x, torch.zeros(2, dtype=torch.long))], ratios=(ratio,))
    assert curve["removed_fraction"] == [want / 90]


def test_prune_curve_ratio_zero_equals_unpruned_accuracy(tmp_path) -> None:
    torch.manual_seed(0)
    model = _vit()
    evals = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    with torch.no_grad():
        acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in evals) / 16
    curve = prune_curve(model, _calib(1, 2), lambda: iter(evals), ratios=(0.0, 0.25, 0.5))
    total = sum(mlp_hidden_sizes(model).values())
    assert curve["accuracy"][0] == acc == curve["base_accuracy"]
    assert curve["removed_fraction"] == [round(r * total) / total for r in (0.0, 0.25, 0.5)]
    assert curve["params"][0] == sum(p.numel() for p in model.parameters())
    assert curve["params"][2] < curve["params"][1] < curve["params"][0]
    paths = figures([("vit", curve), ("vit-sam", curve)], tmp_path)
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def test_prune_run_writes_loadable_run(tmp_path, monkeypatch, capsys) -> None:
    from vitsam.config import ModelConfig, RunConfig, to_dict
    from vitsam.data import DataConfig, build_data, eval_batches
    from vitsam.data.record import RECORD_FILE, data_record
    from vitsam.eval.runner import run_inputs
    from vitsam.io import atomic_write_json
    from vitsam.models import create_model, make_spec
    from vitsam.train.checkpoint import load_run, save_model_run

    from vitsam.analysis.prune import prune_run

    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))
    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    spec = make_spec("vit-t4", 10, 8, 1, kwargs)
    torch.manual_seed(0)
    model = create_model("vit-t4", 10, 8, 1, **kwargs).eval()
    _kill(model.blocks[0].mlp, list(range(0, 128, 2)))
    data_cfg = DataConfig(source="digits", augment="none")
    config = to_dict(RunConfig(data=data_cfg, model=ModelConfig("vit-t4", kwargs)))
    src = save_model_run(tmp_path / "src", model, spec, config)
    # The statistics the run was trained with (here unlike those recomputed from its data).
    record = {**data_record(build_data(data_cfg)), "mean": [0.25], "std": [0.5]}
    atomic_write_json(src / RECORD_FILE, record)

    report = prune_run(src, tmp_path / "pruned", calib=64, batch_size=128, finetune_steps=2,
                       measure_speed=False, curve_ratios=(0.0, 0.5), progress=False)

    assert report["removed"] == 64 and report["max_abs_logit_change_calib"] <= 1e-5
    assert report["flops_after"] < report["flops_before"]
    bundle = build_data(data_cfg)
    test = list(eval_batches(bundle.test, 128, bundle.mean, bundle.std, 8))
    with torch.no_grad():
        acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / len(bundle.test)
    assert report["test_acc_before"] == acc == report["curve"]["accuracy"][0]
    loaded = load_run(tmp_path / "pruned")
    assert loaded.model_spec["mlp_hidden"] == {"blocks.0.mlp": 64}
    with torch.no_grad():
        tuned = sum(int((loaded.model(x).argmax(1) == y).sum()) for x, y in test)
    assert report["finetune"]["test_acc"] == tuned / len(bundle.test)
    saved = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert saved["removed"] == 64 and saved["params_after"] == report["params_after"]
    # Evaluating the pruned run feeds its model as the source run's was fed, with no fallback.
    capsys.readouterr()
    feed = run_inputs(load_run(tmp_path / "pruned"))
    assert feed == run_inputs(load_run(src)) and feed["from"] == RECORD_FILE and feed["mean"] == [0.25]
    assert "warning" not in capsys.readouterr().err
