"""Optimiser factory: which parameters are decayed, for vitsam and timm models."""
import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from vitsam.optim.factory import OptimConfig, build_optimizer


def _groups(model: nn.Module, opt: torch.optim.Optimizer) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


@pytest.mark.parametrize("name, kwargs", [
    ("swin_tiny_patch4_window7_224",
     {"img_size": 32, "window_size": 4, "embed_dim": 8, "depths": (1, 1), "num_heads": (1, 2)}),
    ("beit_base_patch16_224",
     {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}),
])
def test_timm_no_weight_decay_tensors_are_not_decayed(name, kwargs) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    groups = _groups(model, build_optimizer(model, OptimConfig(weight_decay=0.05, sam=True)))
    # timm's own grouping with the model's list is the reference.
    ref = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    ids = {id(p): n for n, p in model.named_parameters()}
    ref_no = {ids[id(p)] for g in ref if g["weight_decay"] == 0.0 for p in g["params"]}
    assert groups[0.0] == ref_no
    assert groups[0.05] == {n for n, _ in model.named_parameters()} - ref_no
    # The relative-position tables are 2-D, so the 1-D rule alone decayed them.
    tables = {n: p for n, p in model.named_parameters() if "relative_position_bias_table" in n}
    assert len(tables) == 2 and all(p.ndim == 2 for p in tables.values())
    assert set(tables) <= groups[0.0]


def test_no_weight_decay_patterns_and_module_names_and_the_own_rules() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)  # a module name covers its weight
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.scale = nn.Parameter(torch.ones(4, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))  # by name, always
            self.head = nn.Linear(4, 2)

        def no_weight_decay(self) -> set[str]:
            return {"emb", "blocks.*.weight", "sca"}  # "sca" is neither "scale" nor its module

    model = Net()
    groups = _groups(model, build_optimizer(model, OptimConfig(weight_decay=0.1)))
    assert groups[0.1] == {"scale", "head.weight"}
    assert groups[0.0] == {"emb.weight", "blocks.0.weight", "blocks.1.weight", "blocks.0.bias",
                           "blocks.1.bias", "pos_embed", "head.bias"}
