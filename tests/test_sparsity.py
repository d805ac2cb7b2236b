"""Activation sparsity: exact percentages on hand-built models, hooks left behind none."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from vitsam.analysis import sparsity
from vitsam.analysis.sparsity import SparsityConfig, SparsityError


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.mlp = Mlp(dim, hidden, act_layer=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TinyTokens(nn.Module):
    """ViT-like: tokens (B, T, D) -> blocks of residual MLPs -> mean over tokens."""

    def __init__(self, dim: int = 4, hidden: int = 4, depth: int = 1,
                 act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, hidden, act) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x.mean(1)


def _identity_fc1(model: TinyTokens) -> None:
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.copy_(torch.eye(4))
        model.blocks[0].mlp.fc1.bias.zero_()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hand_built_exact_percentages_and_hooks_removed() -> None:
    torch.manual_seed(0)
    model = TinyTokens().eval()
    _identity_fc1(model)  # hidden unit j = GELU(token[j]): positive exactly where token[j] > 0
    neg = [-1.0, -1.0, -1.0, -1.0]  # GELU(-1) = -0.159: negative, so not activated
    img0 = [[1.0, -1, -1, -1], neg, [-2.0, -1, -1, -1]]  # unit 0 fires on one token
    img1 = [[-1.0, 2, -1, -1], [-1.0, 0.5, -1, -1], neg]  # unit 1 fires on two tokens
    img2 = [neg, neg, neg]  # nothing fires
    batches = [(torch.tensor([img0, img1]), torch.zeros(2)), (torch.tensor([img2]), torch.zeros(1))]
    before = [model(x) for x, _ in batches]

    res = sparsity.run(model, batches)
    layer = res["layers"]["blocks.0.mlp.act"]
    assert layer["kind"] == "mlp" and layer["units"] == 4 and res["images"] == 3
    assert layer["ever_active_pct"] == pytest.approx(50.0)  # units 0 and 1
    assert layer["mean_active_pct_per_image"] == pytest.approx(100 * (1 / 4 + 1 / 4 + 0) / 3)

    first = sparsity.run(model, batches, SparsityConfig(max_batches=1))
    assert first["images"] == 2
    assert first["layers"]["blocks.0.mlp.act"]["mean_active_pct_per_image"] == pytest.approx(25.0)

    assert _no_hooks(model)
    for (x, _), out in zip(batches, before):
        assert torch.equal(model(x), out)


def test_random_inputs_match_numpy_reference_and_threshold() -> None:
    torch.manual_seed(1)
    model = TinyTokens(dim=5, hidden=12).eval()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias.sub_(1.5)  # make several units rarely or never active
    xs = [torch.randn(4, 3, 5) for _ in range(3)]
    thr = 0.05
    res = sparsity.run(model, [(x, None) for x in xs], SparsityConfig(threshold=thr))
    fc1 = model.blocks[0].mlp.fc1
    w, b = fc1.weight.detach().double().numpy(), fc1.bias.detach().double().numpy()
    x = torch.cat(xs).double().numpy()  # (N, T, D)
    pre = x @ w.T + b
    act = torch.nn.functional.gelu(torch.from_numpy(pre)).numpy()
    per_image = (act > thr).any(axis=1)  # (N, H)
    layer = res["layers"]["blocks.0.mlp.act"]
    assert layer["ever_active_pct"] == pytest.approx(100 * per_image.any(axis=0).mean())
    assert layer["mean_active_pct_per_image"] == pytest.approx(100 * per_image.mean(axis=1).mean())
    assert 0 < layer["ever_active_pct"] < 100


def test_mixer_token_and_channel_reported_separately() -> None:
    torch.manual_seed(0)
    model = MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, num_classes=10).eval()
    blk = model.blocks[0]
    tok_h, ch_h = blk.mlp_tokens.fc1.out_features, blk.mlp_channels.fc1.out_features
    with torch.no_grad():
        # Zero weights: every unit outputs GELU(bias) everywhere, on (or off) for all images.
        blk.mlp_tokens.fc1.weight.zero_()
        blk.mlp_tokens.fc1.bias.fill_(-3.0)
        blk.mlp_tokens.fc1.bias[:3] = 2.0
        blk.mlp_channels.fc1.weight.zero_()
        blk.mlp_channels.fc1.bias.fill_(-3.0)
        blk.mlp_channels.fc1.bias[:40] = 1.0
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    res = sparsity.run(model, [(x, None)])
    tok = res["layers"]["blocks.0.mlp_tokens.act"]
    ch = res["layers"]["blocks.0.mlp_channels.act"]
    assert (tok["kind"], tok["units"], ch["kind"], ch["units"]) == ("token", tok_h, "channel", ch_h)
    assert tok["ever_active_pct"] == pytest.approx(100 * 3 / tok_h)
    assert tok["mean_active_pct_per_image"] == pytest.approx(100 * 3 / tok_h)
    assert ch["ever_active_pct"] == pytest.approx(100 * 40 / ch_h)
    assert list(res["layers"]) == ["blocks.0.mlp_tokens.act", "blocks.0.mlp_channels.act",
                                   "blocks.1.mlp_tokens.act", "blocks.1.mlp_channels.act"]
    assert res["by_kind"]["token"]["ever_active_pct"] == pytest.approx(
        (tok["ever_active_pct"] + res["layers"]["blocks.1.mlp_tokens.act"]["ever_active_pct"]) / 2)
    assert _no_hooks(model) and torch.equal(model(x), out)


def test_resnet_stem_channels_match_manual_forward() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    with torch.no_grad():
        model.bn1.bias.normal_(0, 2.0)  # some stem channels rarely positive
    x = torch.randn(2, 3, 32, 32)
    res = sparsity.run(model, [(x, None)])
    assert len(res["layers"]) == 17  # the stem ReLU + 2 per basic block
    with torch.no_grad():
        stem = torch.relu(model.bn1(model.conv1(x)))  # (B, 64, H, W)
    per_image = (stem > 0).flatten(2).any(dim=2)  # (B, 64)
    layer = res["layers"]["act1"]
    assert layer["kind"] == "relu" and layer["units"] == 64
    assert layer["ever_active_pct"] == pytest.approx(100 * per_image.any(0).double().mean().item())
    assert layer["mean_active_pct_per_image"] == pytest.approx(
        100 * per_image.double().mean(1).mean().item())
    assert _no_hooks(model)


def test_bad_input_raises_and_cleans_up() -> None:
    with pytest.raises(SparsityError, match="max_batches"):
        SparsityConfig(max_batches=0)
    with pytest.raises(SparsityError, match="neither"):
        sparsity.run(nn.Sequential(nn.Linear(3, 3)), [(torch.randn(2, 3), None)])
    relu = nn.ReLU()
    shared = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    with pytest.raises(SparsityError, match="more than once"):
        sparsity.run(shared, [(torch.randn(2, 3), None)])
    assert _no_hooks(shared)


def test_table_and_figure(tmp_path) -> None:
    model = TinyTokens().eval()
    _identity_fc1(model)
    x = torch.tensor([[[1.0, 1, -1, -1]]])  # one image, one token: units 0 and 1 fire
    res = sparsity.run(model, [(x, None)])
    text = sparsity.table([("vit", res), ("vit-sam", res)])
    row = next(line for line in text.splitlines() if line.startswith("blocks.0.mlp.act"))
    assert row.split()[1:] == ["mlp", "4", "50.0", "50.0", "50.0", "50.0"]
    paths = sparsity.figures([("vit", res), ("vit-sam", res)], tmp_path)
    assert [p.name for p in paths] == ["sparsity.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(res["by_kind"]["mlp"]["ever_active_pct"])
