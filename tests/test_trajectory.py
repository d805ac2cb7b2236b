"""Training trajectories projected on their principal directions, and the L2 term in landscapes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from vitsam.analysis import landscape, trajectory
from vitsam.analysis.landscape import LandscapeConfig, evaluate
from vitsam.analysis.runner import Request, analyze, draw
from vitsam.config import apply_overrides
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.checkpoint import list_checkpoints, load_run


def test_a_straight_path_is_all_on_the_first_axis() -> None:
    g = torch.Generator().manual_seed(0)
    end, u = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(2))
    ts = [3.0, 2.0, 1.5, 0.5, 0.0]
    pca = trajectory.pca_path(torch.stack([end + t * u for t in ts]))
    assert pca["explained"][0] == pytest.approx(1.0, abs=1e-12)
    assert pca["explained"][1] == pytest.approx(0.0, abs=1e-12)
    c = pca["coords"]
    assert torch.allclose(c[:, 0], -torch.tensor(ts, dtype=torch.float64) * u.norm())
    assert torch.allclose(c[:, 1], torch.zeros(5, dtype=torch.float64), atol=1e-9)


def test_a_planar_path_keeps_its_geometry_and_the_shares_add_up() -> None:
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=torch.float64))
    plane = torch.tensor([[4.0, 1.0], [2.5, -1.0], [1.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    end = torch.randn(40, generator=g, dtype=torch.float64)
    pca = trajectory.pca_path(end + plane @ q.T)
    assert sum(pca["explained"]) == pytest.approx(1.0, abs=1e-12)
    assert pca["explained"][0] >= pca["explained"][1] > 0
    # An orthogonal change of axes: every distance between checkpoints is kept.
    assert torch.allclose(torch.cdist(pca["coords"], pca["coords"]), torch.cdist(plane, plane))
    assert (pca["coords"][0] <= 0).all()
    with pytest.raises(ValueError, match="at least 3 checkpoints"):
        trajectory.pca_path(torch.stack([end, end + 1]))


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A tiny ViT run with checkpoints at steps 2, 4 and 6 (two differences: a plane)."""
    tmp = tmp_path_factory.mktemp("traj")
    cfg = apply_overrides(get_preset("mnist-vit", smoke_size=True),
                          [f"out_dir={tmp}", "train.max_steps=none", "train.epochs=1",
                           "train.ckpt_every_epochs=0.34", "train.keep_checkpoints=10"])
    engine.train(cfg, run_dir=tmp / "run", progress=False)
    return tmp / "run"


def test_checkpoints_sit_on_the_plotted_plane_at_their_own_loss(three_checkpoints, tmp_path) -> None:
    run_dir = three_checkpoints
    names = list_checkpoints(run_dir)
    assert len(names) == 3
    req = Request(["trajectory"], batches=1, batch_size=32, settings=["trajectory.steps=5"])
    r = analyze(run_dir, req, progress=False)["trajectory"]["result"]
    assert r["checkpoints"] == names and r["weight_decay"] == "excluded"
    assert sum(r["explained"]) == pytest.approx(1.0, abs=1e-9)  # 2 differences span the plane
    data = _batches(run_dir)
    for name, loss in zip(names, r["checkpoint_loss"]):
        # The path lies in the plane, so its projected point is the checkpoint's own weights.
        assert loss == pytest.approx(evaluate(load_run(run_dir, name).model, data)[0], rel=1e-4)
    c = np.asarray(r["coords"])
    assert c[-1].tolist() == [0.0, 0.0]
    for k, axis in enumerate((r["x"], r["y"])):
        assert min(axis) < c[:, k].min() and max(axis) > c[:, k].max() and len(axis) == 5
    # A grid value is the loss at w_n + x_i d1 + y_j d2, computed here from the checkpoints.
    w = [torch.cat([p.detach().reshape(-1).double() for p in load_run(run_dir, n).model.parameters()])
         for n in names]
    # Grid point (x_1, y_3) as a combination of the two checkpoint differences, which span
    # the same plane as the PCA axes: solve (x_1, y_3) = s c_0 + t c_1.
    i, j = 1, 3
    s, t = np.linalg.solve(np.stack([c[0], c[1]], 1), np.array([r["x"][i], r["y"][j]]))
    model = load_run(run_dir, names[-1]).model
    point = w[2] + s * (w[0] - w[2]) + t * (w[1] - w[2])
    torch.nn.utils.vector_to_parameters(point.float(), model.parameters())
    assert r["loss"][i][j] == pytest.approx(evaluate(model, data)[0], rel=1e-4)
    paths = draw("trajectory", [("a", r), ("b", r)], tmp_path)
    assert [p.name for p in paths] == ["trajectory.png"] and paths[0].stat().st_size > 10_000


def _batches(run_dir):
    """The batches `analyze` drew (1 x 32 training images, seed 0)."""
    from vitsam.analysis.runner import sample_batches
    from vitsam.data import build_data

    bundle = build_data(load_run(run_dir).data_config())
    return sample_batches(bundle.train, bundle.mean, bundle.std, bundle.img_size, 32, 32, 0, "cpu")


def test_a_run_with_one_checkpoint_is_not_applicable(three_checkpoints, tmp_path) -> None:
    cfg = trajectory.TrajectoryConfig(run_dir=str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    r = trajectory.run(nn.Linear(2, 2), [], cfg)
    assert r["supported"] is False and "keep_checkpoints" in r["reason"]
    with pytest.raises(ValueError, match="steps must be an integer >= 3"):
        trajectory.TrajectoryConfig(steps=2)


def test_the_l2_term_is_half_the_rate_times_the_decayed_squared_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    base = landscape.run(model, batches, LandscapeConfig(dims=1, steps=3))
    with_l2 = landscape.run(model, batches, LandscapeConfig(dims=1, steps=3, weight_decay=True,
                                                            decay_rate=0.05))
    # Biases are not decayed: only the weight matrix counts.
    want = 0.5 * 0.05 * float(model[1].weight.detach().double().pow(2).sum())
    assert with_l2["center_loss"] - base["center_loss"] == pytest.approx(want, rel=1e-9)
    assert base["weight_decay"] == "excluded" and with_l2["weight_decay"] == "included"
    # Off-centre, the term follows the perturbed weights: larger than at the centre here.
    assert with_l2["loss"][0] - base["loss"][0] > 0
    with pytest.raises(landscape.LandscapeError, match="needs decay_rate"):
        LandscapeConfig(weight_decay=True)
