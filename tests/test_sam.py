"""SAM optimizer: perturbation, exact restore, reference update, groups, state and precision."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vitsam.optim import SAM


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


def test_eps_norm_equals_rho_and_restore_is_bit_exact():
    model = _mlp()
    x, y = _batch()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.0)
    w0 = _weights(model)
    _backward(model, x, y)
    sam.first_step(zero_grad=True)
    assert sam.perturbed
    assert abs(sam.last_eps_norm.item() - 0.07) <= 1e-6 * 0.07
    moved = (_flat(_weights(model)) - _flat(w0)).norm().item()
    assert abs(moved - 0.07) <= 1e-5 * 0.07
    _backward(model, x, y)
    model[2].bias.grad = None  # a parameter without second-pass gradient is restored too
    sam.second_step()
    assert not sam.perturbed
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), w0))  # lr=0: only the restore acts


def _loss_at(model: nn.Module, names: list[str], ws: list[torch.Tensor], x, y) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, dict(zip(names, ws)), (x,)), y)


def _reference_sam_sgd(model: nn.Module, x, y, rho: float, lr: float, wd: float) -> list[torch.Tensor]:
    """Hand-written SAM + SGD(weight decay) step with torch.autograd.grad."""
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    g = torch.autograd.grad(_loss_at(model, names, w, x, y), w)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    wp = [(wi + rho * gi / norm).detach().requires_grad_(True) for wi, gi in zip(w, g)]
    g2 = torch.autograd.grad(_loss_at(model, names, wp, x, y), wp)
    return [(wi - lr * (g2i + wd * wi)).detach() for wi, g2i in zip(w, g2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_one_step_matches_hand_written_two_pass_update(dtype, tol):
    model = _mlp(dtype)
    x, y = _batch(dtype)
    expected = _reference_sam_sgd(model, x, y, rho=0.1, lr=0.3, wd=0.01)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3, weight_decay=0.01)
    _backward(model, x, y)
    sam.first_step(zero_grad=True)
    _backward(model, x, y)
    sam.second_step(zero_grad=True)
    for got, ref in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), ref, rtol=tol, atol=tol)


def test_closure_step_equals_explicit_passes():
    a, b = _mlp(), _mlp()
    x, y = _batch()
    sa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sb = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(2):
        sa.zero_grad()
        _backward(a, x, y)
        sa.first_step(zero_grad=True)
        _backward(a, x, y)
        sa.second_step(zero_grad=True)
        sb.step(lambda: _backward(b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_closure_step_runs_both_passes_every_step_whatever_gradients_are_left():
    """Several closure steps on changing batches, without zero_grad and with stray gradients
    before the first, against SAM + SGD-momentum written out with torch.autograd.grad."""
    rho, lr, mu, steps = 0.2, 0.3, 0.9, 4
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
               for _ in range(steps)]
    ref_model = _mlp()
    names = [n for n, _ in ref_model.named_parameters()]
    w, buf = _weights(ref_model), None
    for x, y in batches:
        wg = [t.clone().requires_grad_(True) for t in w]
        grad = torch.autograd.grad(_loss_at(ref_model, names, wg, x, y), wg)
        norm = torch.sqrt(sum((t ** 2).sum() for t in grad))
        wp = [(wi + rho * gi / norm).requires_grad_(True) for wi, gi in zip(w, grad)]
        g2 = torch.autograd.grad(_loss_at(ref_model, names, wp, x, y), wp)
        buf = list(g2) if buf is None else [mu * bi + gi for bi, gi in zip(buf, g2)]
        w = [wi - lr * bi for wi, bi in zip(w, buf)]

    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=mu)
    _backward(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))  # stray gradients, other batch
    calls = []
    for k, (x, y) in enumerate(batches):
        def closure(x=x, y=y):
            calls.append(k)
            return _backward(model, x, y)

        sam.step(closure)
        assert calls.count(k) == 2, f"step {k + 1} ran the closure {calls.count(k)} times"
    for got, ref in zip(model.parameters(), w):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)


def test_adaptive_perturbation_matches_hand_computation():
    model = _mlp(torch.float64)
    x, y = _batch(torch.float64)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    w0 = _weights(model)
    _backward(model, x, y)
    g = [p.grad.clone() for p in model.parameters()]
    sam.first_step()
    denom = torch.sqrt(sum(((wi.abs() * gi) ** 2).sum() for wi, gi in zip(w0, g)))
    expected_eps = [0.5 * wi ** 2 * gi / denom for wi, gi in zip(w0, g)]
    for p, wi, e in zip(model.parameters(), w0, expected_eps):
        torch.testing.assert_close(p.detach() - wi, e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sam.last_eps_norm, _flat(expected_eps).norm(), rtol=1e-9, atol=0)


def test_group_with_rho_zero_is_not_perturbed():
    model = _mlp()
    x, y = _batch()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.0}]
    sam = SAM(groups, torch.optim.SGD, rho=0.2, lr=0.1)
    w_first, w_last = _weights(model[0]), _weights(model[2])
    _backward(model, x, y)
    g_first = [p.grad.clone() for p in model[0].parameters()]
    sam.first_step()
    assert all(torch.equal(p, w) for p, w in zip(model[2].parameters(), w_last))
    # The perturbed group alone carries the full radius.
    moved = _flat([p.detach() - w for p, w in zip(model[0].parameters(), w_first)])
    torch.testing.assert_close(moved, 0.2 * _flat(g_first) / _flat(g_first).norm(), rtol=1e-5, atol=1e-7)
    assert abs(sam.last_eps_norm.item() - 0.2) < 1e-6


def test_zero_gradient_gives_zero_perturbation_without_nan():
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    w0 = _weights(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    sam.first_step()
    assert sam.last_eps_norm.item() == 0.0 and sam.last_grad_norm.item() == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    sam.second_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _sam_iteration(model: nn.Module, sam: SAM, x, y) -> None:
    sam.zero_grad()
    _backward(model, x, y)
    sam.first_step(zero_grad=True)
    _backward(model, x, y)
    sam.second_step(zero_grad=True)


def test_state_dict_round_trip_keeps_base_optimizer_state():
    model = _mlp()
    x, y = _batch()
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _sam_iteration(model, sam, x, y)
    buffer = io.BytesIO()
    torch.save(sam.state_dict(), buffer)  # through bytes, as a checkpoint would
    buffer.seek(0)
    state = torch.load(buffer)
    assert any("exp_avg" in s for s in state["state"].values())
    twin = copy.deepcopy(model)
    twin_sam = SAM(twin.parameters(), torch.optim.AdamW, rho=0.9, lr=5.0)  # overwritten by the load
    twin_sam.load_state_dict(state)
    assert twin_sam.param_groups[0]["rho"] == 0.05 and twin_sam.param_groups[0]["lr"] == 1e-2
    for _ in range(2):
        _sam_iteration(model, sam, x, y)
        _sam_iteration(twin, twin_sam, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_lr_scheduler_on_sam_drives_base_optimizer_without_warning():
    model = _mlp()
    x, y = _batch()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda s: 0.5 ** s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail here
        _sam_iteration(model, sam, x, y)
        sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    sam.load_state_dict(sam.state_dict())  # groups are rebuilt by the load but stay shared
    sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sam.param_groups is sam.base_optimizer.param_groups


def test_bf16_parameters_get_a_real_perturbation_and_exact_restore():
    model = _mlp(torch.bfloat16)
    x, y = _batch(torch.bfloat16)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    w0 = _weights(model)
    _backward(model, x, y)
    g = [p.grad.float() for p in model.parameters()]
    sam.first_step(zero_grad=True)
    norm = _flat(g).norm().float()
    changed = total = 0
    for p, wi, gi in zip(model.parameters(), w0, g):
        # w + eps in fp32, rounded once to bf16
        assert torch.equal(p.detach(), (wi.float() + 0.5 * gi / norm).to(torch.bfloat16))
        changed += (p.detach() != wi).sum().item()
        total += wi.numel()
    assert changed > 0.5 * total
    _backward(model, x, y)
    sam.second_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_grad_cosine_matches_hand_computation():
    model = _mlp()
    x, y = _batch()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    _backward(model, x, y)
    g1 = _flat([p.grad for p in model.parameters()])
    sam.first_step(zero_grad=True)
    _backward(model, x, y)
    g2 = _flat([p.grad for p in model.parameters()])
    sam.second_step()
    expected = (g1 @ g2 / (g1.norm() * g2.norm())).item()
    assert -1.0 <= sam.last_grad_cosine.item() <= 1.0
    assert sam.last_grad_cosine.item() == pytest.approx(expected, abs=1e-5)
    assert sam.last_grad_norm.item() == pytest.approx(g1.norm().item(), rel=1e-6)


def test_bad_arguments_raise_clear_errors():
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="optimizer class"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    sam = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    with pytest.raises(RuntimeError, match="no gradients"):
        sam.first_step()


def test_added_groups_and_copies_stay_shared_with_the_base_optimizer():
    model = _mlp()
    x, y = _batch()
    sam = SAM(model[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sam.add_param_group({"params": model[2].parameters(), "lr": 0.0})
    assert len(sam.base_optimizer.param_groups) == 2 and sam.param_groups[1]["rho"] == 0.05
    twin_model = copy.deepcopy(model)
    twin = SAM([{"params": twin_model[0].parameters()}, {"params": twin_model[2].parameters(), "lr": 0.0}],
               torch.optim.SGD, rho=0.05, lr=0.1)
    clone = copy.deepcopy(twin)
    assert clone.base_optimizer.param_groups is clone.param_groups
    assert clone.base_optimizer.param_groups[0]["params"][0] is not twin.param_groups[0]["params"][0]
    w_first, w_last = _weights(model[0]), _weights(model[2])
    _sam_iteration(model, sam, x, y)
    _sam_iteration(twin_model, twin, x, y)
    assert all(torch.equal(p, w) for p, w in zip(model[2].parameters(), w_last))  # lr=0 group: restored
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
    assert not any(torch.equal(p, w) for p, w in zip(model[0].parameters(), w_first))
