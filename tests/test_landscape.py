import json

import pytest
import timm
import torch
import torch.nn.functional as F

from vitsam.analysis import landscape as ls


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1,
                             embed_dim=16, num_heads=2, num_classes=3)


def tiny_data(n_batches: int = 2, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n_batches)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k


def test_center_equals_model_loss_and_accuracy():
    model, data = tiny_vit().eval(), tiny_data()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    y = torch.cat([y for _, y in data])
    ref_loss = float(F.cross_entropy(logits.double(), y))
    ref_acc = float((logits.argmax(1) == y).double().mean())
    cfg = ls.LandscapeConfig(dims=2, span=(-0.5, 0.5), steps=3, seed=0)
    res = ls.run(model, data, cfg)
    assert res["x"] == [-0.5, 0.0, 0.5] and res["y"] == res["x"]
    assert res["loss"][1][1] == pytest.approx(ref_loss, abs=1e-6)
    assert res["center_loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert res["accuracy"][1][1] == pytest.approx(ref_acc)
    assert res["num_samples"] == 8
    # off-centre points really move the weights
    assert res["loss"][0][0] != pytest.approx(ref_loss, abs=1e-4)
    json.dumps(res)


def test_1d_curve_center_and_shape():
    model, data = tiny_vit(), tiny_data(1)
    res = ls.run(model, data, ls.LandscapeConfig(dims=1, span=1.0, steps=5))
    assert res["x"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and "y" not in res
    assert len(res["loss"]) == 5 and res["loss"][2] == pytest.approx(res["center_loss"], abs=1e-6)


def test_filter_normalised_direction_norms():
    model = tiny_vit()
    named = dict(ls.landscape_parameters(model))
    d = dict(zip(named, ls.filter_normalized_direction(model, torch.Generator().manual_seed(3))))
    w = {k: v.detach() for k, v in named.items()}
    # explicit filter definitions, written out per parameter kind
    qkv = "blocks.0.attn.qkv.weight"
    assert w[qkv].shape == (48, 16)
    for r in range(48):  # every row of the fused q/k/v projection is its own filter
        assert d[qkv][r].norm() == pytest.approx(float(w[qkv][r].norm()), rel=1e-5)
    pos = w["pos_embed"]
    for t in range(pos.shape[1]):  # one filter per token
        assert d["pos_embed"][0, t].norm() == pytest.approx(float(pos[0, t].norm()), rel=1e-5)
    assert d["cls_token"].norm() == pytest.approx(float(w["cls_token"].norm()), rel=1e-5, abs=1e-8)
    conv = "patch_embed.proj.weight"
    for c in range(w[conv].shape[0]):  # one filter per output channel
        assert d[conv][c].norm() == pytest.approx(float(w[conv][c].norm()), rel=1e-5)
    for k, t in w.items():
        if t.ndim <= 1:
            assert torch.count_nonzero(d[k]) == 0, k
        elif t.ndim == 2:
            torch.testing.assert_close(d[k].norm(dim=1), t.norm(dim=1), rtol=1e-5, atol=1e-7)
        assert d[k].shape == t.shape
    # the direction is random, not a copy of the weights
    assert not torch.allclose(d[qkv], w[qkv])


def test_include_bias_norm_perturbs_1d_params_with_their_norm():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.bias.normal_()
    named = dict(ls.landscape_parameters(model))
    d = dict(zip(named, ls.filter_normalized_direction(model, torch.Generator().manual_seed(3), True)))
    for k in ("blocks.0.norm1.weight", "blocks.0.norm1.bias"):
        assert d[k].norm() == pytest.approx(float(named[k].detach().norm()), rel=1e-5)


def test_directions_are_seeded():
    model = tiny_vit()
    a = ls.random_directions(model, ls.LandscapeConfig(seed=5))
    b = ls.random_directions(model, ls.LandscapeConfig(seed=5))
    c = ls.random_directions(model, ls.LandscapeConfig(seed=6))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not torch.equal(a[0][2], c[0][2])
    assert not torch.equal(a[0][2], a[1][2])  # the two axes differ


def test_grid_point_equals_explicit_perturbation():
    model, data = tiny_vit(), tiny_data(1)
    cfg = ls.LandscapeConfig(dims=2, span=(-1.0, 1.0), steps=3, seed=2)
    res = ls.run(model, data, cfg)
    d1, d2 = ls.random_directions(model, cfg)
    other = tiny_vit()
    with torch.no_grad():
        for (_, p), a, b in zip(ls.landscape_parameters(other), d1, d2):
            p.add_(a * 1.0 + b * -1.0)
    loss, _ = ls.evaluate(other.eval(), data)
    assert res["loss"][2][0] == pytest.approx(loss, abs=1e-5)


def test_weights_restored_after_run_and_after_interruption_and_resume(tmp_path):
    data = tiny_data()
    model = tiny_vit().train()
    snap = snapshot(model)
    full = ls.run(model, data, ls.LandscapeConfig(dims=2, steps=4, seed=1))
    assert_same_weights(model, snap)
    assert model.training  # mode restored

    state = tmp_path / "grid.json"
    cfg = ls.LandscapeConfig(dims=2, steps=4, seed=1, state_path=str(state))
    seen = []

    def stop(i):
        seen.append(i)
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ls.run(model, data, cfg, on_row=stop)
    assert_same_weights(model, snap)
    assert len(json.loads(state.read_text())["loss"]) == 2

    resumed_rows = []
    res = ls.run(model, data, cfg, on_row=resumed_rows.append)
    assert resumed_rows == [2, 3]  # only the missing rows were evaluated
    assert_same_weights(model, snap)
    assert res["loss"] == full["loss"] and res["accuracy"] == full["accuracy"]


def test_state_of_other_settings_is_refused(tmp_path):
    data = tiny_data(1)
    state = tmp_path / "grid.json"
    ls.run(tiny_vit(), data, ls.LandscapeConfig(dims=1, steps=3, state_path=str(state)))
    with pytest.raises(ls.LandscapeError, match="other settings"):
        ls.run(tiny_vit(), data, ls.LandscapeConfig(dims=1, steps=3, seed=9, state_path=str(state)))


@pytest.mark.parametrize("kw", [{"dims": 3}, {"span": (1.0, -1.0)}, {"steps": 1}, {"max_batches": 0}])
def test_bad_config_raises(kw):
    with pytest.raises(ls.LandscapeError):
        ls.LandscapeConfig(**kw)


def test_figures_2d_and_1d(tmp_path):
    model, data = tiny_vit(), tiny_data(1)
    r2 = ls.run(model, data, ls.LandscapeConfig(dims=2, steps=3))
    r2b = json.loads(json.dumps(r2))
    paths = ls.figures([("ViT", r2), ("ViT-SAM", r2b)], tmp_path)
    assert [p.name for p in paths] == ["landscape_2d.png"] and paths[0].stat().st_size > 0
    r1 = ls.run(model, data, ls.LandscapeConfig(dims=1, steps=3))
    assert ls.figures(r1, tmp_path)[0].name == "landscape_1d.png"
    with pytest.raises(ls.LandscapeError):
        ls.figures([("a", r1), ("b", r2)], tmp_path)
