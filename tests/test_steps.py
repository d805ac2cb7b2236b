"""train_step: SAM and plain steps against hand computations; accumulation, m-chunks, AMP, BN, DDP."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vitsam.optim import SAM, StepConfig, train_step

INF = float("inf")


def _mlp(dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 4)).to(dtype)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _batch(n: int = 8, dtype: torch.dtype = torch.float32, shape: tuple = (6,), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


def _grad(model: nn.Module, ws: list[torch.Tensor], x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean cross-entropy over (x, y) at weights ``ws`` and its gradient, by torch.autograd.grad."""
    names = [n for n, _ in model.named_parameters()]
    ws = [w.detach().requires_grad_(True) for w in ws]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, ws)), (x,)), y)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, ws)]


def _reference_msam(model: nn.Module, x, y, rho: float, lr: float, m: int) -> dict:
    """Hand-written SAM + SGD step with chunks of m samples, each perturbed by its own gradient."""
    w = _weights(model)
    n = x.shape[0]
    clean, final = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    loss = pert_loss = 0.0
    for a in range(0, n, m):
        xc, yc = x[a:a + m], y[a:a + m]
        share = xc.shape[0] / n
        lc, g = _grad(model, w, xc, yc)
        eps = [rho * gi / _flat(g).norm().to(gi.dtype) for gi in g]
        lp, h = _grad(model, [wi + e for wi, e in zip(w, eps)], xc, yc)
        loss, pert_loss = loss + share * lc.item(), pert_loss + share * lp.item()
        clean = [c + share * gi for c, gi in zip(clean, g)]
        final = [f + share * hi for f, hi in zip(final, h)]
    c, f = _flat(clean), _flat(final)
    return {"weights": [wi - lr * fi for wi, fi in zip(w, final)], "loss": loss, "perturbed_loss": pert_loss,
            "grad_norm": c.norm().item(), "grad_cosine": (c @ f / (c.norm() * f.norm())).item()}


def _sam(model: nn.Module, rho: float = 0.1, lr: float = 0.5, **kw) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, **kw)


def test_sam_step_and_signals_match_hand_computation():
    model = _mlp(torch.float64)
    x, y = _batch(dtype=torch.float64)
    ref = _reference_msam(model, x, y, rho=0.1, lr=0.5, m=8)
    with torch.no_grad():
        logits = model(x)
    out = train_step(model, F.cross_entropy, x, y, _sam(model))
    for got, want in zip(model.parameters(), ref["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert out["n"] == 8 and out["skipped"] == 0.0
    assert out["correct"] == (logits.argmax(-1) == y).sum().item()
    for key in ("loss", "perturbed_loss", "grad_norm", "grad_cosine"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key
    assert out["sharpness"] == pytest.approx(out["perturbed_loss"] - out["loss"], abs=1e-6)
    assert out["eps_norm"] == pytest.approx(0.1, rel=1e-6)
    assert -1.0 <= out["grad_cosine"] <= 1.0


def test_plain_step_matches_manual_backward_and_step():
    model, twin = _mlp(), _mlp()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.9)
    out = train_step(model, F.cross_entropy, x, y, opt)
    loss = F.cross_entropy(twin(x), y)
    loss.backward()
    norm = _flat([p.grad for p in twin.parameters()]).norm().item()
    twin_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert "sharpness" not in out and out["skipped"] == 0.0


@pytest.mark.parametrize("use_sam", [True, False])
def test_micro_batches_equal_the_full_batch_step(use_sam):
    full, micro = _mlp(), _mlp()
    x, y = _batch()
    make = _sam if use_sam else (lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    a = train_step(full, F.cross_entropy, x, y, make(full))
    b = train_step(micro, F.cross_entropy, x, y, make(micro), cfg=StepConfig(micro_batch=3))
    for p, q in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_m_equal_to_batch_is_the_plain_sam_step():
    a, b = _mlp(), _mlp()
    x, y = _batch()
    train_step(a, F.cross_entropy, x, y, _sam(a))
    train_step(b, F.cross_entropy, x, y, _sam(b), cfg=StepConfig(m=8))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_m_chunks_match_hand_computation(micro_batch):
    model = _mlp(torch.float64)
    x, y = _batch(dtype=torch.float64)
    ref = _reference_msam(model, x, y, rho=0.1, lr=0.5, m=3)  # chunks of 3, 3, 2
    out = train_step(model, F.cross_entropy, x, y, _sam(model), cfg=StepConfig(m=3, micro_batch=micro_batch))
    for got, want in zip(model.parameters(), ref["weights"]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    for key in ("loss", "perturbed_loss", "grad_norm", "grad_cosine"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key
    assert out["eps_norm"] == pytest.approx(0.1, rel=1e-6)


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    bn = model[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


@pytest.mark.parametrize("m", [None, 4])
def test_second_pass_leaves_batchnorm_running_stats_alone(m):
    model = _bn_net()
    x, y = _batch(shape=(3, 5, 5))
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the first passes alone: one forward per chunk
        for a in range(0, 8, m or 8):
            twin(x[a:a + (m or 8)])
    expected = _bn_stats(twin)
    out = train_step(model, F.cross_entropy, x, y, _sam(model), cfg=StepConfig(m=m))
    assert all(torch.equal(s, e) for s, e in zip(_bn_stats(model), expected))
    if m is None:  # the second pass still normalises with batch statistics
        ref = _reference_msam(copy.deepcopy(_bn_net()), x, y, rho=0.1, lr=0.5, m=8)
        assert out["perturbed_loss"] == pytest.approx(ref["perturbed_loss"], rel=1e-5)


def test_grad_scaler_without_overflow_equals_unscaled_step():
    a, b = _mlp(), _mlp()
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    out_a = train_step(a, F.cross_entropy, x, y, _sam(a))
    out_b = train_step(b, F.cross_entropy, x, y, _sam(b), scaler=scaler)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert out_b["eps_norm"] == pytest.approx(0.1, rel=1e-6)
    assert out_b["grad_norm"] == pytest.approx(out_a["grad_norm"], rel=1e-6)
    assert out_b["skipped"] == 0.0 and scaler.get_scale() == 2.0 ** 12


def _inject_inf_on_backward(param: torch.Tensor, call: int) -> None:
    """Make the ``call``-th backward through ``param`` (1-based) produce an infinite gradient."""
    count = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return torch.full_like(grad, INF) if count[0] == call else grad

    param.register_hook(hook)


@pytest.mark.parametrize("sam,call,m", [(True, 1, None), (True, 2, None), (True, 3, 4), (True, 4, 4),
                                        (False, 1, None)])
def test_grad_scaler_skips_the_whole_step_on_inf(sam, call, m):
    model = _mlp()
    x, y = _batch()
    opt = _sam(model, momentum=0.9) if sam else torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    base = opt.base_optimizer if sam else opt
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w0 = _weights(model)
    _inject_inf_on_backward(model[0].weight, call)
    out = train_step(model, F.cross_entropy, x, y, opt, scaler=scaler, cfg=StepConfig(m=m))
    assert out["skipped"] == 1.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert len(base.state) == 0  # no momentum buffer: the base optimiser never stepped
    assert scaler.get_scale() == 512.0  # update() ran and backed off
    out = train_step(model, F.cross_entropy, x, y, opt, scaler=scaler, cfg=StepConfig(m=m))
    assert out["skipped"] == 0.0 and not all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


# Measured relative error of the autocast update against fp32 SAM: bf16 0.32%, fp16 0.035%
# (torch 2.14, CPU). The same step with plain SGD instead of SAM differs by 8.3%, so these
# tolerances (about 3x the measured error) catch a lost perturbation with a wide margin.
@pytest.mark.parametrize("dtype,use_scaler,rel_tol", [(torch.bfloat16, False, 0.01),
                                                      (torch.float16, True, 0.001)])
def test_autocast_step_is_close_to_fp32(dtype, use_scaler, rel_tol):
    a, b = _mlp(), _mlp()
    x, y = _batch()
    w0 = _flat(_weights(a))
    train_step(a, F.cross_entropy, x, y, _sam(a))
    scaler = torch.amp.GradScaler("cpu") if use_scaler else None
    out = train_step(b, F.cross_entropy, x, y, _sam(b), scaler=scaler, cfg=StepConfig(autocast_dtype=dtype))
    da, db = _flat(_weights(a)) - w0, _flat(_weights(b)) - w0
    assert out["skipped"] == 0.0
    assert (da - db).norm() < rel_tol * da.norm()


def test_reused_randomness_compares_the_same_subnetwork():
    x, y = _batch()
    stats = {}
    for reuse in (True, False):
        model = _mlp(dropout=0.5)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.0)  # no perturbation at all
        torch.manual_seed(5)
        stats[reuse] = train_step(model, F.cross_entropy, x, y, opt, cfg=StepConfig(reuse_randomness=reuse))
        if reuse:  # the RNG stream continues as after a single forward pass
            after_step = torch.get_rng_state()
            torch.manual_seed(5)
            model(x)
            assert torch.equal(after_step, torch.get_rng_state())
    assert stats[True]["sharpness"] == 0.0  # same weights, same dropout masks
    assert stats[False]["sharpness"] != 0.0


@pytest.mark.parametrize("use_sam", [True, False])
def test_clipping_bounds_the_final_gradient(use_sam):
    model = _mlp()
    x, y = _batch()
    opt = _sam(model, lr=1.0) if use_sam else torch.optim.SGD(model.parameters(), lr=1.0)
    _, g = _grad(model, _weights(model), x, y)
    w0 = _flat(_weights(model))
    out = train_step(model, F.cross_entropy, x, y, opt, cfg=StepConfig(clip_norm=1e-3))
    assert (_flat(_weights(model)) - w0).norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert out["grad_norm"] == pytest.approx(_flat(g).norm().item(), rel=1e-5)  # reported before clipping


def test_soft_targets_count_argmax_matches():
    model = _mlp()
    x, _ = _batch()
    targets = torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(3)), -1)

    def soft_ce(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sum(-t * F.log_softmax(logits, -1), -1).mean()

    with torch.no_grad():
        logits = model(x)
    out = train_step(model, soft_ce, x, targets, _sam(model))
    assert out["correct"] == (logits.argmax(-1) == targets.argmax(-1)).sum().item()
    assert out["loss"] == pytest.approx(soft_ce(logits, targets).item(), rel=1e-6)


def test_bad_inputs_raise_value_errors():
    model = _mlp()
    x, y = _batch()
    opt = _sam(model)
    with pytest.raises(ValueError, match="m must be"):
        StepConfig(m=0)
    with pytest.raises(ValueError, match="clip_norm"):
        StepConfig(clip_norm=0.0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        StepConfig(autocast_dtype=torch.float32)
    with pytest.raises(ValueError, match="B=8"):
        train_step(model, F.cross_entropy, x, y[:4], opt)
    with pytest.raises(ValueError, match="integer class labels"):
        train_step(model, F.cross_entropy, x, y.float(), opt)
    with pytest.raises(ValueError, match="scalar mean loss"):
        train_step(model, nn.CrossEntropyLoss(reduction="none"), x, y, opt)


# -- DistributedDataParallel on two CPU processes ----------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = _batch(16)
    x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]  # each worker its own half
    result = {}
    for sync in (False, True):
        net = _mlp()
        model = DistributedDataParallel(net)
        seen: list[torch.Tensor] = []
        handle = net.register_forward_pre_hook(lambda mod, inp: seen.append(mod[0].weight.detach().clone()))
        train_step(model, F.cross_entropy, x, y, _sam(model), cfg=StepConfig(sync_perturbation=sync))
        handle.remove()
        result[sync] = {"eps": seen[1] - seen[0], "weights": _weights(net)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_perturbation_per_worker_or_synchronised(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    # fork (as DataLoader workers do; the worker sets one thread first) avoids re-importing torch
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method=method)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    x, y = _batch(16)
    # Own-gradient perturbation: eps differs across workers; the step equals m-sharpness with m=8.
    assert not torch.allclose(r0[False]["eps"], r1[False]["eps"])
    assert abs(_flat([r0[False]["eps"]]).norm().item() - 0.1) < 0.1  # a real, bounded perturbation
    # Synchronised perturbation: identical eps; the step equals whole-batch SAM.
    assert torch.equal(r0[True]["eps"], r1[True]["eps"])
    for sync, m in ((False, 8), (True, 16)):
        assert all(torch.equal(a, b) for a, b in zip(r0[sync]["weights"], r1[sync]["weights"]))
        ref = _mlp()
        train_step(ref, F.cross_entropy, x, y, _sam(ref), cfg=StepConfig(m=m))
        for got, want in zip(r0[sync]["weights"], ref.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert not math.isclose(_flat(r0[False]["weights"]).sum().item(), _flat(r0[True]["weights"]).sum().item())


def test_cpu_bf16_autocast_takes_the_math_attention_path_and_keeps_the_gradient():
    """CPU flash-attention's bf16 backward is ~10x slower than fp32; ``_autocast`` routes SDPA
    to the math path on the CPU under 16-bit autocast, and leaves fp32 / no autocast alone."""
    from torch.profiler import ProfilerActivity, profile

    from vitsam.optim.precision import autocast as _autocast

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))

    def attention_ops(dtype):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with _autocast(torch.device("cpu"), dtype):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.float().sum().backward()
        return {e.key for e in prof.key_averages()}, out

    ops16, out16 = attention_ops(torch.bfloat16)
    grad16 = q.grad.clone()
    q.grad = None
    ops32, out32 = attention_ops(None)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash not in ops16 and flash in ops32
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.float(), out32, atol=3e-2)
    assert torch.allclose(grad16, q.grad, atol=3e-2) and q.grad.abs().sum() > 0
