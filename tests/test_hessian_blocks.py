"""Curvature per block against the exact Hessian of tiny models."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from vitsam.analysis import hessian as H
from vitsam.analysis.runner import plugin_config
from vitsam.models import create_model

import timm

from test_hessian import CE, exact_hessian, make_batches


def _block_slices(model: nn.Module) -> dict[str, list[int]]:
    """Positions of every block's parameters in the flat (P,) vector of ``exact_hessian``."""
    where, start = {}, 0
    for name, p in model.named_parameters():
        where[name] = list(range(start, start + p.numel()))
        start += p.numel()
    return {b: [i for n in names for i in where[n]]
            for b, names in H.parameter_blocks(model).items()}


@pytest.fixture(scope="module")
def vit_case():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                              depth=2, embed_dim=8, num_heads=2, mlp_ratio=2,
                              num_classes=3).double().eval()
    batches = make_batches("vit", (6, 5))
    return model, batches, exact_hessian(model, batches)


def test_blocks_partition_the_parameters_in_model_order(vit_case) -> None:
    model = vit_case[0]
    groups = H.parameter_blocks(model)
    assert list(groups) == ["embed", "blocks.0", "blocks.1", "head"]
    assert groups["embed"][:2] == ["cls_token", "pos_embed"]
    assert set(groups["head"]) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    flat = [n for names in groups.values() for n in names]
    assert flat == [n for n, _ in model.named_parameters()]
    resnet = create_model("resnet18-c", 10, 32, 3, width=8, layers=[1, 1, 1, 1])
    assert list(H.parameter_blocks(resnet)) == ["embed", "layer1", "layer2", "layer3",
                                                "layer4", "head"]


def test_block_lambda_max_is_the_top_eigenvalue_of_the_exact_diagonal_block(vit_case) -> None:
    model, batches, hess = vit_case
    rows = H.per_block(model, CE, batches, tol=1e-7, max_iter=200, trace_probes=0)
    slices = _block_slices(model)
    assert [r["block"] for r in rows] == list(slices)
    for r in rows:
        idx = torch.tensor(slices[r["block"]])
        exact = float(torch.linalg.eigvalsh(hess[idx][:, idx])[-1])
        assert r["num_params"] == len(idx)
        assert r["lambda_max"] == pytest.approx(exact, rel=1e-6, abs=1e-9), r["block"]
        assert r["converged"] and r["num_hvps"] > 0 and r["seconds"] > 0
    # Interlacing: no block is sharper than the whole model.
    full = float(torch.linalg.eigvalsh(hess)[-1])
    assert max(r["lambda_max"] for r in rows) <= full * (1 + 1e-6)


class TwoLayers(nn.Module):
    """A 2-block MLP whose Hessian has cross terms between its blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3)]).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](torch.tanh(self.blocks[0](x)))


def test_block_traces_are_unbiased_and_sum_to_the_full_trace() -> None:
    model = TwoLayers()
    batches = make_batches("mlp", (9, 4))
    hess = exact_hessian(model, batches)
    slices = _block_slices(model)
    idx0, idx1 = (torch.tensor(slices[b]) for b in ("blocks.0", "blocks.1"))
    assert torch.count_nonzero(hess[idx0][:, idx1]) > 0  # not block-diagonal
    rows = H.per_block(model, CE, batches, tol=1e-3, max_iter=50, trace_probes=300)
    for r in rows:
        idx = torch.tensor(slices[r["block"]])
        exact = float(torch.trace(hess[idx][:, idx]))
        assert abs(r["trace"]["estimate"] - exact) <= 4 * r["trace"]["stderr"], r["block"]
    total = sum(r["trace"]["estimate"] for r in rows)
    err = sum(r["trace"]["stderr"] ** 2 for r in rows) ** 0.5
    assert abs(total - float(torch.trace(hess))) <= 4 * err


class TwoHeads(nn.Module):
    """Two linear heads on the same inputs, each with its own loss term: the Hessian of the
    summed loss is block-diagonal, one block per head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.blocks = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)]).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.blocks], dim=1)


def two_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return CE(out[:, :3], y) + 3.0 * CE(out[:, 3:], (y + 1) % 3)


def test_a_block_diagonal_hessian_has_the_blocks_eigenvalues() -> None:
    model = TwoHeads()
    batches = make_batches("mlp", (7,))
    x, y = batches[0]
    params = dict(model.named_parameters())
    names = list(params)

    def loss(*ps):
        return two_losses(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params.values()))
    # Parameters 0, 1 belong to head 0 and 2, 3 to head 1: no cross terms.
    assert all(torch.count_nonzero(blocks[i][j]) == 0 for i in (0, 1) for j in (2, 3))
    rows = H.per_block(model, two_losses, batches, tol=1e-8, max_iter=100, trace_probes=0)
    assert [r["block"] for r in rows] == ["blocks.0", "blocks.1"]
    for r, (a, b) in zip(rows, ((0, 1), (2, 3))):
        size = [params[names[k]].numel() for k in (a, b)]
        dense = torch.cat([torch.cat([blocks[i][j].reshape(size[i - a], size[j - a])
                                      for j in (a, b)], 1) for i in (a, b)], 0)
        assert r["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-7)
    full = H.top_eigenvalues(model, two_losses, batches, tol=1e-8, max_iter=100).eigenvalues[0]
    assert max(r["lambda_max"] for r in rows) == pytest.approx(full, rel=1e-7)


def test_per_block_from_the_plugin_with_an_overlaid_figure(tmp_path) -> None:
    model, batches = TwoLayers(), make_batches("mlp", (9, 4))
    cfg = plugin_config("hessian", ["hessian.per_block=true", "hessian.trace_probes=2",
                                    "hessian.tol=0.01"])
    assert cfg.per_block is True
    res = H.run(model, batches, cfg)
    pb = res["per_block"]
    assert [r["block"] for r in pb["blocks"]] == ["blocks.0", "blocks.1"]
    assert pb["num_hvps"] == sum(r["num_hvps"] for r in pb["blocks"])
    paths = H.figures([("vanilla", res), ("sam", res)], tmp_path)
    fig = tmp_path / "hessian_per_block.png"
    assert fig in paths
    with Image.open(fig) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    table = (tmp_path / "hessian_per_block.md").read_text().splitlines()
    assert table[0] == ("| block | lambda_max vanilla | lambda_max sam | trace vanilla | "
                        "trace sam | parameters |")
    first = pb["blocks"][0]
    assert table[2].startswith(f"| blocks.0 | {first['lambda_max']:.4g} | {first['lambda_max']:.4g} |")
    assert table[2].endswith(f"| {first['num_params']:,} |") and len(table) == 4
    assert "per_block" not in H.run(model, batches, plugin_config("hessian", ["hessian.tol=0.05",
                                                                              "hessian.trace_probes=0"]))
    with pytest.raises(ValueError, match="per_block must be true or false"):
        H.HessianConfig(per_block="yes")
    with pytest.raises(ValueError, match="no trainable parameter 'nope'"):
        H.top_eigenvalues(model, CE, batches, params=["nope"])
