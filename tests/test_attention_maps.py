import json
import math
from decimal import Decimal

import numpy as np
import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from vitsam.analysis import attention as am


def tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, depth=2, embed_dim=16, num_heads=2, num_classes=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def tiny_data(n_batches: int = 2, b: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n_batches)]


@torch.no_grad()
def block_attention(blk, h_in):
    """softmax(q k^T / sqrt(d)) of one block from its input, with the block's own weights."""
    a = blk.attn
    z = blk.norm1(h_in)
    b, t, c = z.shape
    qkv = (z @ a.qkv.weight.T + a.qkv.bias).reshape(b, t, 3, a.num_heads, c // a.num_heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // a.num_heads), dim=-1)


def explicit_attention(model, x):
    """Per-block attention recomputed from block inputs caught by forward pre-hooks."""
    inputs = []
    handles = [blk.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
               for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [block_attention(blk, h_in) for blk, h_in in zip(model.blocks, inputs)]


def test_captured_maps_are_distributions_equal_explicit_and_keep_logits():
    model, (x, _) = tiny_vit(qkv_bias=True), tiny_data(1)[0]
    with torch.no_grad():
        ref = model(x)
    logits, attn = am.capture(model, x)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)
    assert len(attn) == 2 and attn[0].shape == (3, 2, 17, 17)
    expl = explicit_attention(model, x)
    for a, e in zip(attn, expl):
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 17), rtol=0, atol=1e-6)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
    with torch.no_grad():  # flags and hooks were restored: the model runs as before
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def hand_rollout(att: np.ndarray, discard: float = 0.0) -> np.ndarray:
    """att (blocks, B, H, T, T) -> (B, T, T) with plain loops."""
    _, bsz, heads, t, _ = att.shape
    out = np.zeros((bsz, t, t))
    for b in range(bsz):
        r = np.eye(t)
        for blk in att:
            m = sum(blk[b, h] for h in range(heads)) / heads
            k = int(Decimal(str(discard)) * t * t)  # floor of the decimal product
            if k:
                order = np.argsort(m, axis=None, kind="stable")[:k]
                m = m.copy()
                m.flat[order] = 0.0
            m = m + np.eye(t)
            for i in range(t):
                m[i] = m[i] / m[i].sum()
            r = m @ r
        out[b] = r
    return out


@pytest.mark.parametrize("discard", [0.0, 0.3])
def test_rollout_matches_hand_computation_for_a_batch(discard):
    g = torch.Generator().manual_seed(0)
    att = torch.rand(2, 2, 3, 4, 4, generator=g) ** 3  # blocks, batch, heads, T, T
    att = att / att.sum(-1, keepdim=True)
    got = am.rollout(list(att), discard).numpy()
    want = hand_rollout(att.double().numpy(), discard)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)  # rows, not columns, are normalised
    assert not np.allclose(got[0], got[1])  # each image keeps its own rollout


@pytest.mark.parametrize("discard", [0.47, 0.57, 0.59, 0.83, 0.29, 0.295, 0.5])
def test_rollout_discards_the_written_fraction_exactly(discard):
    # T = 10: 100 entries, of which 0.57 is 57 (the float product 0.57 * 10 * 10 is 56.99999999999999);
    # (0.295: 29.5, floored); ratios up to 0.9, so only off-diagonal entries (the smallest) go
    g = torch.Generator().manual_seed(0)
    att = torch.rand(1, 1, 10, 10, generator=g) + 0.1 + 10 * torch.eye(10)  # diagonal never discarded
    att = att / att.sum(-1, keepdim=True)
    got = am.rollout([att], discard)
    assert int((got == 0).sum()) == int(Decimal(str(discard)) * 100)
    np.testing.assert_allclose(got.numpy(), hand_rollout(att[None].double().numpy(), discard)[0:1],
                               atol=1e-12)


def test_rollout_tiny_exact_numbers():
    # one block, one head, T=2: A = [[1, 0], [0.5, 0.5]] -> (A + I) rows normalised
    a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    r = am.rollout([a])
    torch.testing.assert_close(r[0], torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64))


def test_entropy_uniform_and_patch_distribution():
    n = 16
    assert float(am.entropy(torch.full((n,), 1.0 / n, dtype=torch.float64))) == pytest.approx(math.log(n), abs=1e-12)
    assert float(am.entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
    probs = torch.full((1, 1, 5, 5), 0.2)
    probs[0, 0, 0] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])  # cls->cls dropped, rest renormalised
    d = am.patch_distribution(probs, num_prefix_tokens=1, has_cls=True)
    torch.testing.assert_close(d, torch.full((1, 1, 4), 0.25))
    # without a class token: mean attention received over the patch queries
    probs = torch.softmax(torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)), -1)
    d = am.patch_distribution(probs, num_prefix_tokens=0, has_cls=False)
    torch.testing.assert_close(d[0, 0], probs[0, 0].mean(0) / probs[0, 0].mean(0).sum())


def test_run_uniform_attention_gives_log_num_patches():
    model = tiny_vit()
    with torch.no_grad():
        for blk in model.blocks:  # q = k = 0 -> every attention row is uniform
            blk.attn.qkv.weight[:32].zero_()
    res = am.run(model, tiny_data(), am.AttentionConfig(num_images=2))
    assert res["supported"] and res["num_images_entropy"] == 6
    np.testing.assert_allclose(res["entropy_per_block"], [math.log(16)] * 2, atol=1e-9)
    np.testing.assert_allclose(res["entropy_per_head"], [[math.log(16)] * 2] * 2, atol=1e-9)
    assert res["entropy_rollout"] == pytest.approx(math.log(16), abs=1e-9)
    assert res["max_entropy"] == pytest.approx(math.log(16))
    np.testing.assert_allclose(res["_maps"]["last"], 1 / 16, atol=1e-9)


def test_run_maps_and_entropy_match_direct_computation(tmp_path):
    model, data = tiny_vit(), tiny_data()
    cfg = am.AttentionConfig(num_images=4, keep_in_json=1, max_batches=2)
    res = am.run(model, data, cfg)
    x = torch.cat([b[0] for b in data])
    attn = explicit_attention(model, x)
    # entropy: per head of the renormalised cls row, mean over images
    ents = []
    for a in attn:
        row = a[:, :, 0, 1:].double()
        row = row / row.sum(-1, keepdim=True)
        ents.append((-(row * row.log()).sum(-1)).mean(0))
    np.testing.assert_allclose(res["entropy_per_head"], torch.stack(ents).numpy(), atol=1e-5)
    # maps of the first four images: last block, mean over heads, as 4x4 grids
    last = attn[-1][:4].mean(1)[:, 0, 1:]
    last = (last / last.sum(-1, keepdim=True)).reshape(4, 4, 4)
    np.testing.assert_allclose(res["_maps"]["last"], last.numpy(), atol=1e-6)
    assert res["_maps"]["last_heads"].shape == (4, 2, 4, 4)
    assert res["_images"].shape == (4, 3, 16, 16) and res["_images"].min() >= 0 and res["_images"].max() <= 1
    assert res["image_indices"] == [0, 1, 2, 3] and res["query"] == "cls"
    public = {k: v for k, v in res.items() if not k.startswith("_")}
    assert len(json.loads(json.dumps(public))["maps"]["last"]) == 1

    paths = am.figures([("ViT", res), ("ViT-SAM", am.run(tiny_vit(depth=1), data, cfg))], tmp_path)
    assert {p.name for p in paths} == {"attention_last.png", "attention_rollout.png", "attention_entropy.png"}


def test_seeded_image_choice_is_deterministic():
    model, data = tiny_vit(depth=1), tiny_data()
    cfg = am.AttentionConfig(num_images=3, image_seed=7, rollout=False)
    a, b = am.run(model, data, cfg), am.run(model, data, cfg)
    assert a["image_indices"] == b["image_indices"] and len(set(a["image_indices"])) == 3
    np.testing.assert_array_equal(a["_images"], b["_images"])


def test_register_tokens_and_global_pool_models():
    x = tiny_data(1)[0][0]
    reg = tiny_vit(reg_tokens=2)
    assert reg.num_prefix_tokens == 3
    res = am.run(reg, [(x, None)], am.AttentionConfig(num_images=1))
    a = explicit_attention(reg, x[:1])[-1].mean(1)[0, 0, 3:]
    np.testing.assert_allclose(res["_maps"]["last"][0], (a / a.sum()).reshape(4, 4).numpy(), atol=1e-6)

    gap = tiny_vit(class_token=False, global_pool="avg")
    res = am.run(gap, [(x, None)], am.AttentionConfig(num_images=1))
    assert res["query"] == "mean_patch" and res["patch_grid"] == [4, 4]
    a = explicit_attention(gap, x[:1])[-1].mean(1)[0].mean(0)
    np.testing.assert_allclose(res["_maps"]["last"][0], (a / a.sum()).reshape(4, 4).numpy(), atol=1e-6)


@pytest.mark.parametrize("name,kw", [
    (MlpMixer, dict(img_size=16, patch_size=8, num_blocks=1, embed_dim=16, num_classes=3)),
    ("resnet18", dict(num_classes=3)),
])
def test_models_without_attention_are_reported_unsupported(name, kw):
    model = (timm.create_model(name, **kw) if isinstance(name, str) else name(**kw)).eval()
    res = am.run(model, tiny_data(1), am.AttentionConfig())
    assert res["supported"] is False
    assert "has no attention layers (MLP-Mixer/ResNet); attention maps apply to ViT" in res["reason"]
    with pytest.raises(am.AttentionUnsupported, match="no attention layers"):
        am.capture(model, tiny_data(1)[0][0])


@pytest.mark.parametrize("kw", [{"num_images": 0}, {"heads": "max"}, {"discard_ratio": 1.0},
                                {"mean": (0.5,)}])
def test_bad_config_raises(kw):
    with pytest.raises(am.AttentionError):
        am.AttentionConfig(**kw)
