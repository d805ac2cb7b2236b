"""Model zoo: shapes, gradients, parameter counts against the paper, spec round trip."""
import pytest
import torch

from vitsam.models import MODELS, ModelError, build_from_spec, count_params, create_model, make_spec

TINY = {
    "vit-t4": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "vit-s16": {"depth": 1},
    "mixer-t4": {"num_blocks": 1, "embed_dim": 32},
    "mixer-s16": {"num_blocks": 1},
    "resnet18-c": {"width": 8, "layers": [1, 1, 1, 1]},
    "resnet26v2-c": {"layers": [1, 1, 1, 1], "channels": [128, 128, 128, 128], "stem_chs": 32},
    "resnet50": {"layers": [1, 1, 1, 1], "channels": [128, 128, 128, 128], "stem_chs": 32},
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_tiny_model_shapes_and_gradients(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, img_size=32, in_chans=in_chans, **TINY[name])
    x = torch.randn(3, in_chans, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 7)
    logits.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert torch.isfinite(logits).all()
    # The classifier is always trained (timm zero-initialises some heads and residual
    # branches, so upstream gradients may start at exactly 0).
    head = model.get_classifier()
    assert head.weight.grad.abs().sum() > 0


# Paper, Table 1 / appendix: parameters at 224 px with 1000 classes, in millions.
PAPER_PARAMS = {"vit-s16": 22, "vit-b16": 87, "mixer-s16": 18, "mixer-b16": 59, "resnet50": 25,
                "resnet101": 44, "resnet152": 60, "resnet50x2": 98, "resnet101x2": 173,
                "resnet152x2": 236}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(name: str) -> None:
    with torch.device("meta"):
        n = count_params(create_model(name, 1000, 224, 3))
    paper, millions = PAPER_PARAMS[name], n / 1e6
    # The paper's table gives whole millions, sometimes rounded (ViT-B/16 86.6M -> 87M) and
    # sometimes truncated (ResNet-50 25.5M -> 25M, Mixer-S/16 18.5M -> 18M).
    assert min(abs(millions - paper), abs(int(millions) - paper)) / paper < 0.02


def test_paper_resnets_are_bit_style() -> None:
    with torch.device("meta"):
        model = create_model("resnet50", 1000, 224, 3)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "StdConv2d" in kinds and "GroupNormAct" in kinds and "BatchNorm2d" not in kinds
    bn = create_model("resnet18-c", 10, 32, 3, width=8)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert isinstance(bn.maxpool, torch.nn.Identity) and bn.conv1.kernel_size == (3, 3)


def test_unknown_name_and_bad_sizes_give_clear_errors() -> None:
    with pytest.raises(ModelError, match="did you mean vit-s16"):
        create_model("vit-s61")
    with pytest.raises(ModelError, match="not divisible by patch size 16"):
        create_model("vit-s16", 10, 30, 3)
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        create_model("vit-t4", 0, 32, 3)


def test_any_timm_name_and_spec_round_trip() -> None:
    model = create_model("resnet10t", num_classes=5, img_size=32, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    spec = make_spec("vit-t4", 10, 28, 1, TINY["vit-t4"])
    torch.manual_seed(0)
    a = build_from_spec(spec)
    b = build_from_spec(spec)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_every_small_variant_is_registered_for_small_images() -> None:
    small = {n for n, i in MODELS.items() if i.img_size == 32}
    assert {"vit-t4", "vit-s4", "mixer-t4", "mixer-s4", "resnet18-c"} <= small
