"""Cheaper SAM variants against hand-written loops: LookSAM, SAM-ON, random SAM; resume, DDP."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vitsam.config import ConfigError, RunConfig, apply_overrides, validate
from vitsam.optim import SAM, StepConfig, train_step
from vitsam.optim.factory import OptimConfig, build_optimizer
from vitsam.optim.variants import LookSAM, RandomSAM, SAMOn, norm_only_groups, perturbs
from vitsam.train.checkpoint import flatten_state, unflatten_state

from resume import assert_same_run, whole_and_resumed

RHO, LR = 0.1, 0.5


def _mlp(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.LayerNorm(8)] if norm else []
    return nn.Sequential(nn.Linear(6, 8), *mid, nn.Tanh(), nn.Linear(8, 4))


def _batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def _grad(model: nn.Module, ws: list[torch.Tensor], x, y) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    ws = [w.detach().requires_grad_(True) for w in ws]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, ws)), (x,)), y)
    return [g.detach() for g in torch.autograd.grad(loss, ws)]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _reference(model: nn.Module, batches, sam_steps, k_alpha: float | None = None,
               scope: str = "tensor"):
    """SGD on a hand-written schedule: SAM on ``sam_steps``, else the clean gradient plus (with
    ``k_alpha``, LookSAM's alpha) alpha |g| / |g_v| g_v from the last SAM step, the projection
    and the norms taken per parameter tensor or over the concatenated vector (``scope``)."""
    w = _weights(model)
    gv = None
    for t, (x, y) in enumerate(batches):
        g = _grad(model, w, x, y)
        if t in sam_steps:
            fg = _flat(g)
            eps = [RHO * gi / fg.norm() for gi in g]
            gs = _grad(model, [a + e for a, e in zip(w, eps)], x, y)
            if scope == "global":
                coef = torch.dot(fg, _flat(gs)) / torch.dot(fg, fg)
                gv = [s - coef * gi for s, gi in zip(gs, g)]
            else:
                gv = [s - (s * gi).sum() / (gi * gi).sum() * gi for s, gi in zip(gs, g)]
            upd = gs
        elif k_alpha is not None and gv is not None:
            if scope == "global":
                scale = k_alpha * _flat(g).norm() / _flat(gv).norm()
                upd = [gi + scale * v for gi, v in zip(g, gv)]
            else:
                upd = [gi + k_alpha * gi.norm() / v.norm() * v for gi, v in zip(g, gv)]
        else:
            upd = g
        w = [a - LR * u for a, u in zip(w, upd)]
    return w


def _run(model: nn.Module, opt: torch.optim.Optimizer, batches, cfg: StepConfig = StepConfig()):
    outs = [train_step(model, F.cross_entropy, x, y, opt, cfg=cfg) for x, y in batches]
    return _weights(model), outs


def _close(got, want, atol: float = 1e-6) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=atol)


# -- LookSAM --------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_looksam_matches_a_hand_written_loop(scope):
    model = _mlp()
    batches = _batches(7)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=3, alpha=0.7, scope=scope)
    got, outs = _run(model, opt, batches)
    # Per tensor, a g_v that is nearly a float32 cancellation residue (a 4-element bias) is
    # scaled up to alpha |g_i|: the rounding of the two computations' op orders grows with it.
    _close(got, _reference(_mlp(), batches, {0, 3, 6}, k_alpha=0.7, scope=scope), atol=2e-5)
    other = _reference(_mlp(), batches, {0, 3, 6}, k_alpha=0.7, scope=({"tensor", "global"} - {scope}).pop())
    assert not torch.allclose(_flat(got), _flat(other))  # the two scopes are different updates
    assert [o["perturbed"] for o in outs] == [1, 0, 0, 1, 0, 0, 1]
    assert opt.perturbed_steps == 3 and opt.steps_taken == 7
    assert all(o["perturbed_loss"] != o["perturbed_loss"] for o in outs[1:3])  # NaN in between
    # alpha = 0 is SAM every k steps and the plain gradient in between
    model = _mlp()
    _run(model, LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=3, alpha=0.0), batches)
    _close(_weights(model), _reference(_mlp(), batches, {0, 3, 6}))


def test_looksam_with_k_1_is_sam():
    batches = _batches(4)
    a, b = _mlp(), _mlp()
    _run(a, LookSAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=1), batches)
    _run(b, SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR), batches)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))


def test_looksam_direction_is_orthogonal_to_the_clean_gradient():
    model = _mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=2)
    x, y = _batches(1)[0]
    g = _grad(model, _weights(model), x, y)
    train_step(model, F.cross_entropy, x, y, opt)
    gv = [opt.direction[p] for p in model.parameters()]
    for v, gi in zip(gv, g):  # per tensor (the default scope), hence also as a whole
        assert abs(torch.dot(v.reshape(-1), gi.reshape(-1)).item()) < 1e-5 * v.norm().item() * gi.norm().item()
    assert _flat(gv).norm().item() > 0


def _digits_mlp() -> nn.Module:
    """An MLP whose head starts at zero, as the zoo's ViT and Mixer heads do."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def _digits_loss(opt_for, steps: int = 60) -> float:
    """Training loss on scikit-learn's digits after ``steps`` AdamW(-based) steps of batch 64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    net = _digits_mlp()
    opt = opt_for(net)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        train_step(net, F.cross_entropy, x[idx], y[idx], opt)
    with torch.no_grad():
        return F.cross_entropy(net(x), y).item()


def test_looksam_trains_behind_a_zero_initialised_head_like_sam():
    """The failure that global norms caused on CIFAR-10 (docs/results.md), in miniature: at the
    start only the head has a gradient, and a g_v scaled by the head's |g| drowns the body's
    own gradient under AdamW. Per-tensor norms train as SAM does."""
    kw = dict(rho=0.2, lr=3e-3, weight_decay=0.0)
    sam = _digits_loss(lambda n: SAM(n.parameters(), torch.optim.AdamW, **kw))
    tensor = _digits_loss(lambda n: LookSAM(n.parameters(), torch.optim.AdamW, k=5, alpha=0.7, **kw))
    glob = _digits_loss(lambda n: LookSAM(n.parameters(), torch.optim.AdamW, k=5, alpha=0.7,
                                          scope="global", **kw))
    start = float(torch.log(torch.tensor(10.0)))
    assert sam < 0.5 * start
    assert tensor < 0.5 * start and abs(tensor - sam) < 0.25 * start, (tensor, sam)
    assert glob > tensor, (glob, tensor)


def test_looksam_m_chunks_step_is_the_m_sam_step():
    batches = _batches(2)
    a, b = _mlp(), _mlp()
    cfg = StepConfig(m=4)
    _run(a, LookSAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=2), batches[:1], cfg)
    _run(b, SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR), batches[:1], cfg)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))


# -- SAM-ON ---------------------------------------------------------------------------------
def test_sam_on_perturbs_only_normalisation_parameters_by_the_restricted_formula():
    model = _mlp(norm=True)
    opt = SAMOn(norm_only_groups(model, [{"params": list(model.parameters())}], RHO),
                torch.optim.SGD, rho=RHO, lr=LR)
    x, y = _batches(1)[0]
    w = _weights(model)
    g = _grad(model, w, x, y)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    names = [n for n, _ in model.named_parameters()]
    is_norm = [n.startswith("1.") for n in names]  # the LayerNorm's weight and bias
    gn = _flat([gi for gi, keep in zip(g, is_norm) if keep]).norm()
    for p, w0, gi, keep, n in zip(model.parameters(), w, g, is_norm, names):
        eps = p.detach() - w0
        if keep:
            torch.testing.assert_close(eps, RHO * gi / gn, rtol=1e-5, atol=1e-7, msg=n)
        else:
            assert torch.equal(eps, torch.zeros_like(eps)), n
    opt.second_step()
    assert all(torch.equal(p.detach(), w0) for p, w0 in zip(model.parameters(), w)) is False  # it stepped


def test_sam_on_from_the_factory_perturbs_the_norm_layers_of_a_vit():
    from vitsam.models import create_model

    model = create_model("vit-t4", 10, 8, 3, depth=1, patch_size=4, embed_dim=16, num_heads=2)
    opt = build_optimizer(model, OptimConfig(sam=True, sam_variant="sam-on"))
    names = {id(p): n for n, p in model.named_parameters()}
    perturbed = {names[id(p)] for g in opt.param_groups if g["rho"] > 0 for p in g["params"]}
    assert perturbed == {n for n in names.values() if "norm" in n} and perturbed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    with pytest.raises(ValueError, match="no trainable normalisation"):
        build_optimizer(nn.Linear(3, 2), OptimConfig(sam=True, sam_variant="sam-on"))


# -- random ---------------------------------------------------------------------------------
def test_random_sam_with_p_1_is_sam_and_with_p_0_the_base_optimiser():
    batches = _batches(4)
    a, b, c = _mlp(), _mlp(), _mlp()
    _, outs = _run(a, RandomSAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR, prob=1.0), batches)
    _run(b, SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR), batches)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))
    assert [o["perturbed"] for o in outs] == [1, 1, 1, 1]
    opt = RandomSAM(c.parameters(), torch.optim.SGD, rho=RHO, lr=LR, prob=0.0)
    _, outs = _run(c, opt, batches)
    d = _mlp()
    _run(d, torch.optim.SGD(d.parameters(), lr=LR), batches)
    assert all(torch.equal(x, y) for x, y in zip(_weights(c), _weights(d)))
    assert opt.perturbed_steps == 0 and [o["perturbed"] for o in outs] == [0, 0, 0, 0]


def test_random_sam_follows_its_seeded_draws():
    batches = _batches(8)
    plan = {t for t in range(8) if perturbs(3, t, 0.5)}
    assert 0 < len(plan) < 8  # a real mix on these 8 steps
    assert plan != {t for t in range(8) if perturbs(4, t, 0.5)}  # the seed matters
    model = _mlp()
    opt = RandomSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, prob=0.5, seed=3)
    _, outs = _run(model, opt, batches)
    assert {t for t, o in enumerate(outs) if o["perturbed"]} == plan
    _close(_weights(model), _reference(_mlp(), batches, plan))
    share = sum(perturbs(0, t, 0.2) for t in range(2000)) / 2000
    assert abs(share - 0.2) < 0.03


# -- resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: LookSAM(ps, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, k=3),
    lambda ps: RandomSAM(ps, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, prob=0.5, seed=1),
], ids=["looksam", "random"])
def test_state_dict_through_a_checkpoint_resumes_bit_exactly(make):
    batches = _batches(8)
    whole = _mlp()
    _run(whole, make(whole.parameters()), batches)
    first = _mlp()
    opt = make(first.parameters())
    _run(first, opt, batches[:4])
    js, tensors = flatten_state(opt.state_dict())
    again = _mlp()
    again.load_state_dict(first.state_dict())
    opt2 = make(again.parameters())
    opt2.load_state_dict(unflatten_state(js, tensors))
    assert (opt2.steps_taken, opt2.perturbed_steps) == (opt.steps_taken, opt.perturbed_steps)
    _run(again, opt2, batches[4:])
    assert all(torch.equal(x, y) for x, y in zip(_weights(whole), _weights(again)))


@pytest.mark.parametrize("variant", ["looksam", "random"])
def test_training_resumed_mid_run_is_exact(tmp_path, monkeypatch, variant):
    from vitsam.presets import get_preset

    cfg = apply_overrides(get_preset("mnist-vit-sam", smoke_size=True), [
        f"out_dir={tmp_path}", "train.max_steps=5", "train.epochs=2", "train.ckpt_every_epochs=0.5",
        "train.log_every_steps=2", "train.train_eval_samples=32", f"optim.sam_variant={variant}",
        "optim.looksam_k=2", "optim.sam_prob=0.5"])
    whole, cut = whole_and_resumed(cfg, tmp_path, monkeypatch)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    want = {"looksam": 3, "random": sum(perturbs(0, t, 0.5) for t in range(5))}[variant]
    assert whole["perturbed_steps"] == cut["perturbed_steps"] == want
    assert whole["sam_variant"] == variant


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["optim.sam=true", "optim.sam_variant=lookSAM"],
     "unknown optim.sam_variant 'lookSAM'; choose one of full, looksam, sam-on, random"),
    (["optim.sam_variant=looksam"], "optim.sam_variant=looksam needs optim.sam=true"),
    (["optim.sam=true", "optim.looksam_k=0"], "optim.looksam_k must be >= 1"),
    (["optim.sam=true", "optim.looksam_alpha=-1"], "optim.looksam_alpha must be >= 0"),
    (["optim.sam=true", "optim.looksam_scope=layer"],
     "unknown optim.looksam_scope 'layer'; choose one of tensor, global"),
    (["optim.sam=true", "optim.sam_prob=1.5"], r"optim.sam_prob must be in \[0, 1\]"),
    (["optim.sam=true", "optim.sam_seed=-2"], "optim.sam_seed must be >= 0"),
])
def test_bad_variant_settings_are_one_line_config_errors(overrides, message):
    cfg = apply_overrides(RunConfig(), overrides)
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


# -- DistributedDataParallel on two CPU processes ---------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    for sync in (False, True):
        net = _mlp()
        model = DistributedDataParallel(net)
        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=2)
        for x, y in _batches(3, 16):
            train_step(model, F.cross_entropy, x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8],
                       opt, cfg=StepConfig(sync_perturbation=sync))
        result[sync] = _weights(net)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_looksam_under_ddp_keeps_the_processes_in_step(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method=method)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for sync in (False, True):  # per-process perturbation: directions averaged, weights agree
        assert all(torch.equal(a, b) for a, b in zip(r0[sync], r1[sync])), sync
    ref = _mlp()  # synchronised: the whole-batch LookSAM
    _run(ref, LookSAM(ref.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=2), _batches(3, 16))
    _close(r0[True], _weights(ref), atol=2e-5)  # per-tensor g_v scaling amplifies rounding
    assert not torch.allclose(_flat(r0[False]), _flat(r0[True]))
