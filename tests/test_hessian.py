"""Hessian eigenvalues, trace and density against exact Hessians of tiny models."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.func import functional_call

from vitsam.analysis import hessian as H
from vitsam.models.attention import attention_modules, math_attention

CE = nn.CrossEntropyLoss()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tiny_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                             depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, num_classes=3,
                             **kw).double()


def make_batches(kind: str, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (6,) if kind == "mlp" else (1, 8, 8)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def exact_hessian(model: nn.Module, batches, train: bool = False) -> torch.Tensor:
    """Full (P, P) Hessian of the mean loss over all samples, by torch.autograd.functional."""
    model = copy.deepcopy(model)  # train-mode forwards move BatchNorm buffers
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    shapes, numels = [p.shape for p in params], [p.numel() for p in params]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    model.train(train)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        d = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        return CE(functional_call(model, d, (x,)), y)

    flat = torch.cat([p.reshape(-1) for p in params])
    with math_attention(model):
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def integrate(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


@pytest.fixture(scope="module")
def cases():
    """(model, batches, exact eigenvalues ascending, exact Hessian) per kind, built once."""
    out = {}
    for kind, model in (("mlp", tiny_mlp()), ("vit", tiny_vit())):
        batches = make_batches(kind, (5, 3, 7))
        hess = exact_hessian(model.eval(), batches)
        out[kind] = (model, batches, torch.linalg.eigvalsh(hess), hess)
    return out


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_lanczos_top_k_matches_full_hessian_over_all_batches(cases, kind):
    model, batches, ev, _ = cases[kind]
    res = H.top_eigenvalues(model, CE, batches, k=3, tol=1e-6, max_iter=200)
    want = ev.flip(0)[:3].numpy()
    np.testing.assert_allclose(res.eigenvalues, want, rtol=1e-3)
    assert res.converged and res.method == "lanczos"
    # The operator must be the full-data Hessian: averaging per-batch top eigenvalues would
    # give a different number on these unequal batches.
    per_batch = [H.top_eigenvalues(model, CE, [b], k=1, tol=1e-6).eigenvalues[0] for b in batches]
    assert abs(np.mean(per_batch) - want[0]) > 1e-2 * abs(want[0])


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_single_batch_cached_graph_matches_exact(cases, kind):
    model, batches, _, _ = cases[kind]
    b = batches[1]
    ev = torch.linalg.eigvalsh(exact_hessian(model, [b]))
    res = H.top_eigenvalues(model, CE, [b], k=2, tol=1e-6, max_iter=200, start="random")
    np.testing.assert_allclose(res.eigenvalues, ev.flip(0)[:2].numpy(), rtol=1e-3)


def test_power_iteration_agrees_with_lanczos(cases):
    model, batches, ev, _ = cases["mlp"]
    assert ev[-2] > -ev[0]  # top two by value are also the top two by magnitude here
    power = H.top_eigenvalues(model, CE, batches, k=2, method="power", tol=1e-6, max_iter=2000)
    lanczos = H.top_eigenvalues(model, CE, batches, k=2, tol=1e-6)
    np.testing.assert_allclose(power.eigenvalues, lanczos.eigenvalues, rtol=1e-4)
    np.testing.assert_allclose(power.eigenvalues, ev.flip(0)[:2].numpy(), rtol=1e-3)
    assert power.num_hvps > lanczos.num_hvps


def test_power_iteration_finds_largest_magnitude(cases):
    model, batches, ev, _ = cases["vit"]
    assert -ev[0] > ev[-1]  # negative curvature dominates in magnitude on this random init
    power = H.top_eigenvalues(model, CE, batches, k=1, method="power", tol=1e-4, max_iter=500)
    assert power.eigenvalues[0] == pytest.approx(float(ev[0]), rel=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "vit"])
@pytest.mark.parametrize("k", [1, 3])
def test_change_test_is_accurate_enough_and_never_costs_more(cases, kind, k):
    model, batches, ev, _ = cases[kind]
    want = ev.flip(0)[:k].numpy()
    change = H.top_eigenvalues(model, CE, batches, k=k, tol=1e-3, stop="change")
    residual = H.top_eigenvalues(model, CE, batches, k=k, tol=1e-3, stop="residual")
    assert change.converged and change.stop == "change"
    np.testing.assert_allclose(change.eigenvalues, want, rtol=1e-2)
    np.testing.assert_allclose(residual.eigenvalues, want, rtol=1e-4)
    assert change.num_hvps <= residual.num_hvps


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_change_test_stops_at_the_first_small_change(cases, method):
    # Runs are deterministic, so capping the HVPs replays the first steps of the full run.
    model, batches, ev, _ = cases["mlp"]  # top eigenvalue is also the largest in magnitude
    tol = 1e-3
    run = H.top_eigenvalues(model, CE, batches, tol=tol, stop="change", method=method)
    n = run.num_hvps
    assert run.converged and n >= 3
    lam = [H.top_eigenvalues(model, CE, batches, tol=tol, stop="change", method=method,
                             max_iter=m).eigenvalues[0] for m in (n - 2, n - 1)]
    lam.append(run.eigenvalues[0])
    assert abs(lam[1] - lam[0]) > tol * abs(lam[0])
    assert abs(lam[2] - lam[1]) <= tol * abs(lam[1])
    assert lam[2] == pytest.approx(float(ev[-1]), rel=1e-2)


def test_lanczos_restarts_when_the_start_space_is_exhausted():
    # Linear softmax regression on one sample: the Hessian (diag(p) - p p^T) kron x x^T has
    # rank C - 1 = 2, so a Krylov space stops growing after 3 steps; k = 4 needs a restart.
    torch.manual_seed(0)
    model = nn.Linear(2, 3, bias=False).double()
    batch = [(torch.tensor([[0.7, -1.2]], dtype=torch.float64), torch.tensor([1]))]
    ev = torch.linalg.eigvalsh(exact_hessian(model, batch)).flip(0)[:4].numpy()
    res = H.top_eigenvalues(model, CE, batch, k=4, tol=1e-6)
    assert res.converged and len(res.eigenvalues) == 4
    np.testing.assert_allclose(res.eigenvalues, ev, rtol=1e-6, atol=1e-9)


def test_eigenvectors_are_eigenvectors(cases):
    model, batches, _, hess = cases["vit"]
    res = H.top_eigenvalues(model, CE, batches, k=2, tol=1e-8, max_iter=300,
                            return_eigenvectors=True)
    assert res.eigenvectors.shape == (2, hess.shape[0])
    for lam, v in zip(res.eigenvalues, res.eigenvectors):
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-8)
        assert float((hess @ v - lam * v).norm()) <= 1e-5 * abs(lam)


def test_func_backend_equals_double_backward(cases):
    model, batches, _, hess = cases["vit"]
    with H.analysis_state(model):
        ops = [H.HessianOperator(model, CE, batches, backend=b) for b in ("autograd", "func")]
        gen = torch.Generator().manual_seed(3)
        v = torch.randn(ops[0].size, generator=gen, dtype=torch.float64)
        hv = [op.matvec(v) for op in ops]
    torch.testing.assert_close(hv[0], hess @ v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hv[1], hess @ v, rtol=1e-9, atol=1e-9)


def rademacher_variance(hess: torch.Tensor) -> float:
    """Exact variance of one Rademacher Hutchinson sample z^T H z: 2 sum_{i != j} H_ij^2."""
    off = hess - torch.diag(torch.diag(hess))
    return float(2 * (off**2).sum())


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_trace_within_three_standard_errors(cases, kind):
    model, batches, _, hess = cases[kind]
    res = H.trace(model, CE, batches, probes=150, seed=0)
    exact = float(torch.trace(hess))
    assert res.probes == 150 and res.stderr > 0
    assert abs(res.estimate - exact) <= 3 * res.stderr
    # The reported standard error is calibrated against the exact one of this Hessian.
    true_se = math.sqrt(rademacher_variance(hess) / res.probes)
    assert 0.75 * true_se <= res.stderr <= 1.25 * true_se
    assert abs(res.estimate - exact) <= 4 * true_se


class Quadratic(nn.Module):
    """Every sample's loss is 0.5 w^T A w + b^T w, so the Hessian of the mean is exactly A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=g, dtype=a.dtype))
        self.b = torch.randn(a.shape[0], generator=g, dtype=a.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = 0.5 * self.w @ (self.a @ self.w) + self.b @ self.w
        return value.expand(x.shape[0], 1)


def mean_output(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def quadratic(a: torch.Tensor):
    """(model, batches) whose loss Hessian is a, checked against autograd's dense Hessian."""
    model = Quadratic(a)
    batches = [(torch.zeros(3, 1, dtype=a.dtype), torch.zeros(3, dtype=torch.long))]

    def loss(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ (a @ w) + model.b @ w

    dense = torch.autograd.functional.hessian(loss, model.w.detach())
    torch.testing.assert_close(dense, a, rtol=0, atol=1e-12)
    return model, batches


def with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def test_power_iteration_lists_by_value_and_says_what_it_found():
    # Indefinite Hessian whose most negative eigenvalue dominates in magnitude.
    a = with_spectrum([-13.0, 7.0, 2.0, 0.5])
    model, batches = quadratic(a)
    exact = torch.linalg.eigvalsh(a).flip(0).tolist()  # [7, 2, 0.5, -13]
    one = H.top_eigenvalues(model, mean_output, batches, k=1, method="power", tol=1e-8,
                            max_iter=2000, start="random")
    assert one.eigenvalues == [pytest.approx(-13.0, rel=1e-6)]
    assert one.selection == "largest_magnitude" and not one.lambda_max_is_largest
    two = H.top_eigenvalues(model, mean_output, batches, k=2, method="power", tol=1e-8,
                            max_iter=2000, start="random", return_eigenvectors=True)
    # Found by magnitude (-13 first), listed by value: element 0 is the largest, 7.
    np.testing.assert_allclose(two.eigenvalues, [7.0, -13.0], rtol=1e-6)
    assert two.eigenvalues[0] == pytest.approx(exact[0], rel=1e-6) and two.lambda_max_is_largest
    for lam, v in zip(two.eigenvalues, two.eigenvectors):  # vectors follow their values
        assert float((a @ v - lam * v).norm()) <= 1e-5 * abs(lam)
    lan = H.top_eigenvalues(model, mean_output, batches, k=2, tol=1e-8, start="random")
    np.testing.assert_allclose(lan.eigenvalues, exact[:2], rtol=1e-6)
    assert lan.selection == "largest_algebraic" and lan.lambda_max_is_largest


def test_plugin_labels_lambda_max_when_negative_curvature_dominates(cases):
    from vitsam.analysis.runner import summarize

    model, batches, ev, _ = cases["vit"]
    assert -ev[0] > ev[-1] and -ev[1] > ev[-1]  # the two largest magnitudes are negative
    out = H.run(model, batches, H.HessianConfig(k=1, method="power", tol=1e-4, max_iter=500,
                                                trace_probes=0))
    assert out["lambda_max"] == out["top_eigenvalues"][0] == pytest.approx(float(ev[0]), rel=1e-3)
    assert out["selection"] == "largest_magnitude" and out["lambda_max_is_largest"] is False
    assert "largest may be missed" in summarize("hessian", out)
    lan = H.run(model, batches, H.HessianConfig(k=1, tol=1e-4, trace_probes=0))
    assert lan["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-3)
    assert lan["selection"] == "largest_algebraic" and lan["lambda_max_is_largest"] is True
    assert "missed" not in summarize("hessian", lan)


def test_trace_samples_and_standard_error_against_a_known_hessian():
    # Diagonal-heavy A: its trace is sharp with 400 probes (a 15 % bias would be ~20 standard
    # errors off), and every sample must be one of the 2^(P-1) values z^T A z.
    g = torch.Generator().manual_seed(4)
    p = 4
    off = torch.rand(p, p, generator=g, dtype=torch.float64) * 0.3 - 0.15
    a = (off + off.T).fill_diagonal_(0) + torch.diag(torch.tensor([3.0, -1.0, 5.0, 2.5],
                                                                  dtype=torch.float64))
    model, batches = quadratic(a)
    signs = torch.tensor([[1.0] + [(-1.0) ** ((m >> i) & 1) for i in range(p - 1)]
                          for m in range(2 ** (p - 1))], dtype=torch.float64)
    possible = torch.einsum("ni,ij,nj->n", signs, a, signs)
    res = H.trace(model, mean_output, batches, probes=400, seed=0)
    samples = torch.tensor(res.samples, dtype=torch.float64)
    assert res.probes == len(res.samples) == 400
    gap = (samples[:, None] - possible[None, :]).abs().min(dim=1).values
    assert float(gap.max()) <= 1e-10  # each sample is z^T A z for some z in {-1, 1}^P
    assert res.estimate == pytest.approx(float(samples.mean()), rel=1e-12)
    assert res.stderr == pytest.approx(float(samples.std() / math.sqrt(400)), rel=1e-12)
    true_se = math.sqrt(rademacher_variance(a) / 400)
    assert 0.75 * true_se <= res.stderr <= 1.25 * true_se
    exact = float(torch.trace(a))
    assert abs(res.estimate - exact) <= 4 * true_se < 0.05 * abs(exact)


def test_spectral_density_quadrature_identities(cases):
    model, batches, ev, _ = cases["mlp"]
    p = ev.numel()
    dens = H.spectral_density(model, CE, batches, steps=p, runs=2, num_points=4000, seed=5)
    # With a full Krylov space the Ritz nodes are the exact extreme eigenvalues.
    assert max(dens.nodes[0]) == pytest.approx(float(ev[-1]), rel=1e-6)
    assert min(dens.nodes[0]) == pytest.approx(float(ev[0]), rel=1e-6)
    for w in dens.weights:
        assert sum(w) == pytest.approx(1.0, abs=1e-9)
    # First moment of the quadrature = z^T H z / P for the normalised Rademacher start.
    grid, density = np.asarray(dens.grid), np.asarray(dens.density)
    assert integrate(density, grid) == pytest.approx(1.0, abs=1e-3)
    mean_node = np.mean([np.dot(n, w) for n, w in zip(dens.nodes, dens.weights)])
    assert integrate(grid * density, grid) == pytest.approx(mean_node, abs=1e-3)


@pytest.mark.parametrize("steps", [2, 6])
def test_density_moments_equal_the_start_vectors_moments(cases, steps):
    # Gauss quadrature with m nodes is exact up to degree 2m - 1: for each run,
    # sum_k w_k theta_k^j = z^T H^j z / (z^T z) with z that run's Rademacher start, j <= 3.
    model, batches, _, hess = cases["mlp"]
    size = hess.shape[0]
    dens = H.spectral_density(model, CE, batches, steps=steps, runs=2, seed=5)
    gen = torch.Generator().manual_seed(5)  # the documented start vectors, drawn in run order
    for nodes, weights in zip(dens.nodes, dens.weights):
        z = torch.randint(0, 2, (size,), generator=gen).to(torch.float64) * 2 - 1
        theta, w = np.asarray(nodes), np.asarray(weights)
        assert len(theta) == steps
        hz = z.clone()
        for j in range(4):
            want = float(z @ hz) / float(z @ z)
            assert float(np.sum(w * theta**j)) == pytest.approx(want, rel=1e-8, abs=1e-12), j
            hz = hess @ hz


def test_quadrature_moments_from_any_start_vector():
    a = with_spectrum([-3.0, 0.5, 1.0, 2.0, 6.0], seed=2)
    g = torch.Generator().manual_seed(9)
    v0 = torch.randn(5, generator=g, dtype=torch.float64) * 3  # not unit, not Rademacher
    theta, w = H.quadrature(lambda v: a @ v, v0, steps=3)
    hv = v0.clone()
    for j in range(6):  # exact up to degree 2 * 3 - 1 = 5
        want = float(v0 @ hv) / float(v0 @ v0)
        assert float(np.sum(w * theta**j)) == pytest.approx(want, rel=1e-9, abs=1e-12), j
        hv = a @ hv


def test_state_restored_after_every_analysis():
    model = tiny_vit(drop_rate=0.2, attn_drop_rate=0.2).train()
    model.blocks[0].mlp.eval()  # mixed modes must come back per module
    flags = [m.fused_attn for _, m in attention_modules(model)]
    assert all(flags)
    modes = {n: m.training for n, m in model.named_modules()}
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    batches = make_batches("vit", (4, 3))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    H.top_eigenvalues(model, CE, batches, k=2, tol=1e-3, max_iter=20)
    H.top_eigenvalues(model, CE, batches, k=1, method="power", max_iter=5)
    H.trace(model, CE, batches, probes=3)
    H.spectral_density(model, CE, batches, steps=5)
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [m.fused_attn for _, m in attention_modules(model)] == flags
    for n, t in model.state_dict().items():
        assert torch.equal(t, weights[n]), n
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_uses_batch_statistics_and_restores_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3)).double().eval()
    with torch.no_grad():  # non-trivial running statistics, different from batch statistics
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    batches = [(torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ev_train = torch.linalg.eigvalsh(exact_hessian(model, batches, train=True))
    ev_eval = torch.linalg.eigvalsh(exact_hessian(model, batches, train=False))
    got = H.top_eigenvalues(model, CE, batches, k=1, tol=1e-7, train_mode=True).eigenvalues[0]
    assert got == pytest.approx(float(ev_train[-1]), rel=1e-3)
    assert abs(float(ev_train[-1]) - float(ev_eval[-1])) > 1e-2 * abs(float(ev_eval[-1]))
    got_eval = H.top_eigenvalues(model, CE, batches, k=1, tol=1e-7).eigenvalues[0]
    assert got_eval == pytest.approx(float(ev_eval[-1]), rel=1e-3)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert not model.training


def test_train_mode_keeps_dropout_off(cases):
    model, batches, ev, _ = cases["mlp"]
    torch.manual_seed(0)
    dropped = nn.Sequential(*copy.deepcopy(list(model)), nn.Dropout(0.5)).train()
    # Dropout after the last layer would make every HVP random if it stayed active.
    got = H.top_eigenvalues(dropped, CE, batches, k=1, tol=1e-7, train_mode=True).eigenvalues
    assert got[0] == pytest.approx(float(ev[-1]), rel=1e-6)


def test_plugin_run_and_figures(cases, tmp_path):
    model, batches, ev, hess = cases["mlp"]
    cfg = H.HessianConfig(k=2, tol=1e-6, trace_probes=4, density=True, density_steps=10)
    out = run_json = H.run(model, batches, cfg)
    json.dumps(run_json)
    assert out["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-3)
    assert out["num_params"] == hess.shape[0] and out["num_samples"] == 15
    assert out["config"]["k"] == 2 and len(out["top_eigenvalues"]) == 2
    assert out["config"]["stop"] == "residual" and out["converged"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert out["loss"] == pytest.approx(float(CE(model(x), y)), rel=1e-9)
    paths = H.figures([("a", out), ("b", out)], tmp_path)
    assert {p.name for p in paths} == {"hessian_density.png", "hessian_top_eigenvalues.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="arnoldi"), "unknown eigen-solver"),
        (dict(k=0), "k must be"),
        (dict(tol=0.0), "tol must be"),
        (dict(backend="jax"), "unknown HVP backend"),
        (dict(start="ones"), "unknown start vector"),
        (dict(stop="gap"), "unknown stopping test"),
        (dict(k=10_000), "exceeds the number of parameters"),
    ],
)
def test_bad_arguments_raise_clear_errors(cases, kwargs, match):
    model, batches, _, _ = cases["mlp"]
    with pytest.raises(ValueError, match=match):
        H.top_eigenvalues(model, CE, batches, **kwargs)


def test_bad_batches_and_loss_raise_clear_errors(cases):
    model, batches, _, _ = cases["mlp"]
    with pytest.raises(ValueError, match="no batches"):
        H.top_eigenvalues(model, CE, [])
    with pytest.raises(ValueError, match="same non-zero first dimension"):
        H.top_eigenvalues(model, CE, [(batches[0][0], batches[1][1])])
    with pytest.raises(ValueError, match="batch-mean scalar"):
        H.top_eigenvalues(model, nn.CrossEntropyLoss(reduction="none"), batches)
    with pytest.raises(ValueError, match="trace_probes"):
        H.run(model, batches, H.HessianConfig(trace_probes=1))
    with pytest.raises(ValueError, match="backend='func' cannot run train-mode"):
        H.top_eigenvalues(model, CE, batches, backend="func", train_mode=True)
