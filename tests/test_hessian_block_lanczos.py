"""Batched Hessian-vector products and block Lanczos against exact Hessians of tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from test_hessian import CE, exact_hessian, make_batches, tiny_mlp, tiny_vit
from vitsam.analysis import hessian as H
from vitsam.analysis.hessian.block_lanczos import block_lanczos


@pytest.fixture(scope="module")
def cases():
    """(model, batches, exact eigenvalues descending, exact Hessian) per kind, built once."""
    out = {}
    for kind, model in (("mlp", tiny_mlp()), ("vit", tiny_vit())):
        batches = make_batches(kind, (5, 3, 7))
        hess = exact_hessian(model.eval(), batches)
        out[kind] = (model, batches, torch.linalg.eigvalsh(hess).flip(0).numpy(), hess)
    return out


def _vectors(size: int, b: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_matmat_equals_single_products_and_the_dense_hessian(cases, kind, backend):
    model, batches, _, hess = cases[kind]
    with H.analysis_state(model):
        op = H.HessianOperator(model, CE, batches, backend=backend)  # 3 batches: no cache
        vs = _vectors(op.size, 3)
        got = op.matmat(vs)
        singles = torch.stack([op.matvec(v) for v in vs])
    assert got.shape == (3, op.size)
    torch.testing.assert_close(got, singles, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, vs @ hess, rtol=1e-9, atol=1e-9)
    assert op.num_hvps == 6 and op.num_passes == 4


def test_matmat_on_a_cached_graph_can_be_repeated(cases):
    model, batches, _, hess = cases["vit"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with H.analysis_state(model):
        op = H.HessianOperator(model, CE, [(x, y)])
        assert op.cache_graph
        for seed in (1, 2):  # the second pass reuses the graph the first one kept
            vs = _vectors(op.size, 2, seed)
            torch.testing.assert_close(op.matmat(vs), vs @ hess, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(op.matvec(vs[0]), hess @ vs[0], rtol=1e-9, atol=1e-9)


def test_matmat_float32_matches_single_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16),
                          nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen))
               for n in (4, 9)]
    with H.analysis_state(model):
        op = H.HessianOperator(model, CE, batches)
        vs = _vectors(op.size, 4).float()
        singles = torch.stack([op.matvec(v) for v in vs])
        torch.testing.assert_close(op.matmat(vs), singles, rtol=1e-5, atol=1e-6)


def test_matmat_rejects_bad_shapes(cases):
    model, batches, _, _ = cases["mlp"]
    op = H.HessianOperator(model, CE, batches)
    for bad in (torch.zeros(op.size), torch.zeros(2, op.size + 1), torch.zeros(0, op.size)):
        with pytest.raises(ValueError, match="expected \\(b, "):
            op.matmat(bad)


@pytest.mark.parametrize("b", [2, 3])
@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_block_lanczos_top_k_is_exact_against_the_dense_hessian(cases, kind, b):
    model, batches, ev, hess = cases[kind]
    res = H.top_eigenvalues(model, CE, batches, k=3, method="block-lanczos", block_size=b,
                            tol=1e-8, max_iter=300, return_eigenvectors=True)
    np.testing.assert_allclose(res.eigenvalues, ev[:3], rtol=1e-7)
    assert res.converged and res.method == "block-lanczos" and res.block_size == b
    assert res.selection == "largest_algebraic" and res.lambda_max_is_largest
    assert res.num_hvps % b == 0
    # The reported residual ||R s_last|| / |theta| is the true one of the returned pair.
    for lam, v, r in zip(res.eigenvalues, res.eigenvectors, res.residuals):
        true = float((hess @ v - lam * v).norm()) / abs(lam)
        assert true <= 1e-8 and r == pytest.approx(true, rel=1e-2, abs=1e-11)


@pytest.mark.parametrize("b", [2, 4])
def test_block_lanczos_matches_single_vector_lanczos(cases, b):
    model, batches, _, _ = cases["vit"]
    kw = dict(k=5, tol=1e-6, max_iter=400)
    single = H.top_eigenvalues(model, CE, batches, **kw)
    block = H.top_eigenvalues(model, CE, batches, method="block-lanczos", block_size=b, **kw)
    assert single.converged and block.converged
    np.testing.assert_allclose(block.eigenvalues, single.eigenvalues, rtol=1e-4)


def test_block_size_one_is_single_vector_lanczos(cases):
    model, batches, _, _ = cases["vit"]
    kw = dict(k=2, tol=1e-6, max_iter=200)
    single = H.top_eigenvalues(model, CE, batches, **kw)
    block = H.top_eigenvalues(model, CE, batches, method="block-lanczos", block_size=1, **kw)
    assert block.num_hvps == single.num_hvps
    np.testing.assert_allclose(block.eigenvalues, single.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(block.residuals, single.residuals, rtol=1e-4, atol=1e-14)


def _diagonal_operator(diag: torch.Tensor):
    def matmat(q: torch.Tensor) -> torch.Tensor:
        return q * diag

    return matmat


def _top(t: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh(t))[::-1][:k]


def test_block_lanczos_finds_a_repeated_eigenvalue_with_its_multiplicity():
    # Single-vector Lanczos sees one copy of a repeated eigenvalue from any start vector (the
    # Krylov space holds one direction of its eigenspace; only rounding errors amplified over
    # many steps bring in more); a block of b >= 3 sees all three.
    diag = torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0]), torch.linspace(0.1, 1.0, 26)]).double()
    v0 = _vectors(30, 3)
    t, _, q = block_lanczos(_diagonal_operator(diag), v0, 18)
    assert q.shape == (18, 30)
    np.testing.assert_allclose(_top(t, 4), [5.0, 5.0, 5.0, 3.0], rtol=1e-6)
    torch.testing.assert_close(q @ q.T, torch.eye(18, dtype=torch.float64))
    alpha, beta, _, _ = H.lanczos(lambda v: v * diag, v0[0], 12)
    single = np.sort(np.linalg.eigvalsh(np.diag(alpha) + np.diag(beta[:-1], 1)
                                        + np.diag(beta[:-1], -1)))[::-1]
    np.testing.assert_allclose(single[:2], [5.0, 3.0], rtol=1e-6)  # one copy of 5, then 3


def test_block_lanczos_survives_a_rank_deficient_block():
    # A start block with a repeated vector, and a block that becomes invariant after one step
    # (start inside an eigenspace): lost rank is replaced by fresh orthogonal directions.
    diag = torch.arange(1.0, 13.0, dtype=torch.float64)
    v = _vectors(12, 1)[0]
    e = torch.zeros(12, dtype=torch.float64)
    e[3] = 1.0
    for v0 in (torch.stack([v, v, 2 * v]), torch.stack([e, 2 * e])):
        t, r, q = block_lanczos(_diagonal_operator(diag), v0, 12)
        torch.testing.assert_close(q @ q.T, torch.eye(12, dtype=torch.float64))
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(t)), diag.numpy(), rtol=1e-10)


def test_block_lanczos_stops_within_max_iter_products(cases):
    model, batches, _, _ = cases["vit"]
    res = H.top_eigenvalues(model, CE, batches, k=2, method="block-lanczos", block_size=4,
                            tol=1e-12, max_iter=10)
    assert res.num_hvps == 8 and not res.converged  # two steps of four fit in 10


def test_plugin_runs_block_lanczos(cases):
    model, batches, ev, _ = cases["mlp"]
    cfg = H.HessianConfig(k=2, method="block-lanczos", block_size=3, tol=1e-6, trace_probes=0)
    out = H.run(model, batches, cfg)
    json.dumps(out)
    np.testing.assert_allclose(out["top_eigenvalues"], ev[:2], rtol=1e-6)
    assert out["block_size"] == 3 and out["config"]["block_size"] == 3 and out["converged"]
    assert out["selection"] == "largest_algebraic" and out["num_hvps"] % 3 == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(block_size=2.0), "block_size must be a positive integer"),
        (dict(block_size=8, max_iter=5), "exceeds max_iter"),
        (dict(block_size=90, max_iter=100), "exceeds the number of parameters"),
    ],
)
def test_bad_block_settings_raise_clear_errors(cases, kwargs, match):
    model, batches, _, _ = cases["mlp"]
    with pytest.raises(ValueError, match=match):
        H.top_eigenvalues(model, CE, batches, method="block-lanczos", **kwargs)
    if "max_iter" not in kwargs and "90" not in str(kwargs):
        with pytest.raises(ValueError, match=match):
            H.HessianConfig(method="block-lanczos", **kwargs)
