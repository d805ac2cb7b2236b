"""Every analysis and evaluation gives each module its own train/eval mode back, not one flag for the tree."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from vitsam.analysis import attention, hessian, landscape, ntk, prune, sparsity
from vitsam.eval import shifts, throughput
from vitsam.eval.metrics import evaluate
from vitsam.models import check_forward


def mixed_vit(root_training: bool) -> nn.Module:
    """A tiny ViT whose root is in one mode and one block's MLP (and a norm) in the other."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                              depth=2, embed_dim=16, num_heads=2, mlp_ratio=2, num_classes=3,
                              drop_rate=0.1)
    model.train(root_training)
    model.blocks[0].mlp.train(not root_training)  # e.g. a block frozen in eval
    model.norm.train(not root_training)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))]


ANALYSES = {
    "sparsity": lambda m, d: sparsity.run(m, d),
    "landscape": lambda m, d: landscape.run(m, d, landscape.LandscapeConfig(dims=1, steps=2)),
    "attention": lambda m, d: attention.run(m, d, attention.AttentionConfig(num_images=2)),
    "prune_model": lambda m, d: prune.prune_model(m, d, ratio=0.2),
    "prune_curve": lambda m, d: prune.prune_curve(m, d, d, ratios=(0.0, 0.5)),
    "count_flops": lambda m, d: prune.count_flops(m, 8, 1),
    "hessian": lambda m, d: hessian.run(m, d, hessian.HessianConfig(max_iter=3, trace_probes=2)),
    "ntk": lambda m, d: ntk.run(m, d, ntk.NTKConfig(num_inputs=3, seeds=(0,))),
    "check_forward": lambda m, d: check_forward(m, "vit", 3, 8, 1),
}


def uint8_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (4, 1, 8, 8), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 2, 0])


_NORM = {"mean": (0.5,), "std": (0.25,), "img_size": 8, "in_chans": 1, "progress": False}
EVALUATORS = {
    "evaluate": lambda m: evaluate(m, batches()),
    "class_mapped": lambda m: shifts.evaluate_class_mapped(m, uint8_images(), {"0": 0, "1": 1, "2": 2},
                                                           **_NORM),
    "test_folder": lambda m: shifts.evaluate_folder(m, uint8_images(), ["0", "1", "2"], **_NORM),
    "real_labels": lambda m: shifts.evaluate_real_labels(m, uint8_images()[0], [[0], [1, 2], [], [2]],
                                                         **_NORM),
    "inference_throughput": lambda m: throughput.inference_throughput(m, 2, 8, in_chans=1, warmup=1,
                                                                      repeats=1),
}


@pytest.mark.parametrize("root_training", [True, False])
@pytest.mark.parametrize("name", list(ANALYSES) + list(EVALUATORS))
def test_each_module_keeps_its_mode(name, root_training):
    model = mixed_vit(root_training)
    modes = {n: m.training for n, m in model.named_modules()}
    assert len(set(modes.values())) == 2  # really mixed
    if name in ANALYSES:
        ANALYSES[name](model, batches())
    else:
        EVALUATORS[name](model)
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("name", list(EVALUATORS))
def test_evaluators_run_every_module_in_eval_mode(name):
    """Inside, the whole tree is in eval mode (dropout off), whatever the modes outside."""
    model = mixed_vit(True)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, _: seen.append(any(x.training for x in m.modules())))
    EVALUATORS[name](model)
    hook.remove()
    assert seen and not any(seen)


def test_eval_mode_restores_each_module_also_after_an_error():
    from vitsam.models.modes import eval_mode, restore_modes

    model = mixed_vit(True)
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert {n: m.training for n, m in model.named_modules()} == modes
    with restore_modes(model):
        model.train()
    assert {n: m.training for n, m in model.named_modules()} == modes
