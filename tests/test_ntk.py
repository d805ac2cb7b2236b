"""Empirical NTK against kernels built from explicit per-sample autograd Jacobians."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitsam.analysis import ntk as N
from vitsam.models.attention import attention_modules


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                             depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, num_classes=3,
                             **kw).double()


def tiny_bn_convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 6 * 6, 3)).double()
    with torch.no_grad():
        net[1].running_mean.fill_(0.2)
        net[1].running_var.fill_(1.5)
    return net


def inputs_for(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    shape = (6,) if kind == "mlp" else (1, 8, 8)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, P) Jacobian by a plain loop of autograd.grad calls, one logit at a time."""
    params = [p for p in model.parameters()]
    was = model.training
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])[0]
        per_class = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
            per_class.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_class))
    model.train(was)
    return torch.stack(rows).detach()


def reference_kernel(jac: torch.Tensor, convention: str) -> torch.Tensor:
    if convention == "sum-logits":
        g = jac.sum(1)
        return g @ g.T
    if convention == "trace":
        return torch.einsum("ncp,mcp->nm", jac, jac)
    return jac.reshape(-1, jac.shape[-1]) @ jac.reshape(-1, jac.shape[-1]).T


MODELS = {"mlp": (tiny_mlp, "mlp"), "vit": (tiny_vit, "vit"), "bn": (tiny_bn_convnet, "vit")}


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, (factory, kind) in MODELS.items():
        model, x = factory(), inputs_for(kind, 7)
        out[name] = (model, x, explicit_jacobian(model, x))
    return out


@pytest.mark.parametrize("convention", N.CONVENTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_and_kappa_match_explicit_jacobians(references, name, convention):
    model, x, jac = references[name]
    want = reference_kernel(jac, convention)
    theta = N.ntk_kernel(model, x, convention, chunk=3)
    torch.testing.assert_close(theta, want, rtol=1e-10, atol=1e-10)
    ev = np.linalg.eigvalsh(want.numpy())
    res = N.ntk_condition_number(model, x, convention, chunk=3)
    assert res.convention == convention
    assert res.num_params == sum(p.numel() for p in model.parameters())
    if ev[0] > 0:
        assert res.kappa == pytest.approx(ev[-1] / ev[0], rel=1e-8)
    else:  # more kernel rows than parameters: singular kernel
        assert math.isinf(res.kappa)
    np.testing.assert_allclose(res.eigenvalues, ev, rtol=1e-8, atol=1e-9 * ev[-1])


def test_rank_deficient_kernel_has_infinite_kappa():
    model, x = tiny_mlp(), inputs_for("mlp", 30)
    p = sum(q.numel() for q in model.parameters())
    assert 30 * 3 > p  # more kernel rows than parameters
    res = N.ntk_condition_number(model, x, "full")
    assert math.isinf(res.kappa) and res.lambda_min < 1e-10 * res.lambda_max
    assert math.isfinite(N.ntk_condition_number(model, x[:10], "full").kappa)


@pytest.mark.parametrize("convention", N.CONVENTIONS)
def test_memory_bounded_blocks_equal_one_pass(references, convention):
    model, x, _ = references["vit"]
    one_pass = N.ntk_kernel(model, x, convention, chunk=2)
    # A budget below one sample forces outer blocks of `chunk` samples with streamed chunks.
    blocked = N.ntk_kernel(model, x, convention, chunk=2, max_memory_mb=1e-6)
    torch.testing.assert_close(blocked, one_pass, rtol=1e-12, atol=1e-12)


def test_every_parameter_counts_including_tokens(references):
    model, x, jac = references["vit"]
    names = [n for n, _ in model.named_parameters()]
    assert "cls_token" in names and "pos_embed" in names
    # Freezing the tokens must change the kernel: they are part of the default parameter set.
    full = N.ntk_kernel(model, x, "trace")
    model.cls_token.requires_grad_(False)
    model.pos_embed.requires_grad_(False)
    try:
        without = N.ntk_kernel(model, x, "trace")
    finally:
        model.cls_token.requires_grad_(True)
        model.pos_embed.requires_grad_(True)
    assert not torch.allclose(full, without)
    torch.testing.assert_close(full, reference_kernel(jac, "trace"), rtol=1e-10, atol=1e-10)


def test_state_restored():
    model = tiny_vit(drop_rate=0.3).train()
    modes = {n: m.training for n, m in model.named_modules()}
    flags = [m.fused_attn for _, m in attention_modules(model)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    N.ntk_condition_number(model, inputs_for("vit", 4))
    torch.testing.assert_close(torch.rand(2), expected, rtol=0, atol=0)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [m.fused_attn for _, m in attention_modules(model)] == flags and all(flags)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_ntk_at_init_averages_seeds():
    x = inputs_for("vit", 5)
    seen = []

    def factory(seed: int) -> nn.Module:
        seen.append(seed)
        return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                                 depth=1, embed_dim=16, num_heads=2, mlp_ratio=2,
                                 num_classes=3).double()

    out = N.ntk_at_init(factory, x, seeds=(0, 1, 2), convention="trace")
    assert seen == [0, 1, 2] and out["convention"] == "trace"
    kappas = []
    for s in (0, 1, 2):
        torch.manual_seed(s)
        kappas.append(N.ntk_condition_number(factory(s), x, "trace").kappa)
    np.testing.assert_allclose(out["kappas"], kappas, rtol=1e-10)
    assert out["kappa_mean"] == pytest.approx(np.mean(kappas), rel=1e-12)
    assert out["kappa_std"] == pytest.approx(np.std(kappas, ddof=1), rel=1e-12)
    assert len(set(kappas)) == 3  # different seeds, different initialisations


def test_plugin_run_reports_convention_and_init(references, tmp_path):
    model, x, jac = references["vit"]
    data = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(3, dtype=torch.long))]
    cfg = N.NTKConfig(num_inputs=6, convention="sum-logits", seeds=(0, 1), chunk=4)
    out = N.run(model, data, cfg)
    json.dumps(out)
    ev = np.linalg.eigvalsh(reference_kernel(jac[:6], "sum-logits").numpy())
    assert out["kappa"] == pytest.approx(ev[-1] / ev[0], rel=1e-8)
    assert out["convention"] == out["at_init"]["convention"] == "sum-logits"
    assert out["num_inputs"] == 6 and out["at_init"]["seeds"] == [0, 1]
    again = N.run(model, data, cfg)["at_init"]["kappas"]
    assert again == out["at_init"]["kappas"]
    assert out["at_init"]["kappas"][0] != pytest.approx(out["kappa"], rel=1e-6)
    paths = N.figures([("a", out), ("b", out)], tmp_path)
    assert paths[0].name == "ntk_spectrum.png" and paths[0].stat().st_size > 1000


def test_reinitialized_is_seeded_and_leaves_the_original():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b, c = (N.reinitialized(model, s) for s in (0, 0, 1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in before)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(convention="ntk"), "unknown NTK convention"), (dict(chunk=0), "chunk must be")],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        N.ntk_condition_number(tiny_mlp(), inputs_for("mlp", 3), **kwargs)


def test_run_rejects_too_few_inputs():
    with pytest.raises(ValueError, match="num_inputs"):
        N.run(tiny_mlp(), [(inputs_for("mlp", 3), torch.zeros(3))], N.NTKConfig(num_inputs=1))


def trained_resnet():
    """A small resnet18-c whose every tensor moved away from its initial value, as training
    moves it (BatchNorm affine weights and running statistics included)."""
    from vitsam.models import build_from_spec, make_spec

    spec = make_spec("resnet18-c", 3, 8, 1, {"width": 4})
    torch.manual_seed(11)
    model = build_from_spec(spec).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.add_(0.05 + 0.1 * torch.rand(t.shape, generator=g, dtype=t.dtype))
            else:
                t.add_(7)  # num_batches_tracked
    return model.eval(), spec


def fresh_build(spec, seed):
    from vitsam.models import build_from_spec

    torch.manual_seed(seed)
    return build_from_spec(spec).double()


def test_reinitialized_from_spec_is_a_fresh_build():
    model, spec = trained_resnet()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = N.reinitialized(model, 3, spec)
    want = fresh_build(spec, 3).state_dict()
    got = fresh.state_dict()
    assert set(got) == set(trained) and any("bn" in k for k in got)
    for k, v in got.items():
        assert not torch.equal(v, trained[k]), k  # nothing kept from training
        assert torch.equal(v, want[k]), k  # exactly the zoo's initialisation under the seed
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert next(fresh.parameters()).dtype == torch.float64


def test_reinitialized_without_spec_resets_every_tensor():
    model, spec = trained_resnet()
    trained = model.state_dict()
    fresh = N.reinitialized(model, 3).state_dict()
    want = fresh_build(spec, 3).state_dict()
    for k, v in fresh.items():
        assert not torch.equal(v, trained[k]), k
        assert bool(torch.isfinite(v.double()).all()), k
        if ".bn" in k or k.startswith("bn") or "downsample.1" in k:
            assert torch.equal(v, want[k]), k  # BatchNorm's initial constants (zero_init_last too)


def test_reinitialized_refuses_a_tensor_nothing_resets():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.full((3,), 2.0))  # no reset_parameters covers it

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(ValueError, match="cannot re-initialise Scaled.*scale.*model spec"):
        N.reinitialized(Scaled(), 0)


def test_run_at_init_builds_from_the_model_spec():
    model, spec = trained_resnet()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = N.NTKConfig(num_inputs=5, seeds=(0, 1), chunk=5, model_spec=spec)
    out = N.run(model, [(x, torch.zeros(5, dtype=torch.long))], cfg)
    want = [N.ntk_condition_number(fresh_build(spec, s), x).kappa for s in (0, 1)]
    np.testing.assert_allclose(out["at_init"]["kappas"], want, rtol=1e-10)
    assert out["at_init"]["init"] == "built anew from the model spec"
    json.dumps(out)


@pytest.mark.parametrize("kwargs, match", [
    (dict(convention="foo"), "unknown NTK convention 'foo'"),
    (dict(num_inputs=1), "num_inputs must be"),
    (dict(chunk=0), "chunk must be"),
    (dict(seeds=(0, "a")), "seeds must be a list of integers"),
    (dict(max_memory_mb=0), "max_memory_mb must be > 0"),
])
def test_config_rejects_bad_settings_when_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        N.NTKConfig(**kwargs)
