"""Contrastive pre-training: NT-Xent against its formula, the two views, the linear probe, SAM,
exact resume, fine-tuning from a pre-training run, and one-line errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitsam.cli import main
from vitsam.config import ConfigError, apply_overrides, validate
from vitsam.io import read_jsonl
from vitsam.pretrain import ContrastiveNet, ProjectionHead, nt_xent, positives, pretrain_config
from vitsam.pretrain.probe import knn_accuracy, linear_probe
from vitsam.pretrain.views import ViewSpec, step_generator, two_views
from vitsam.train import engine
from vitsam.train.checkpoint import CheckpointError, load_run
from vitsam.train.finetune import finetune_config


def _direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """NT-Xent written out from its definition (SimCLR, eq. 1), in float64 loops."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    cos = lambda a, b: float(a @ b) / (float(a.norm()) * float(b.norm()))  # noqa: E731
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2  # the other view of the same image
        denom = sum(math.exp(cos(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / tau) / denom)
    return total / n2


def test_nt_xent_equals_its_formula_and_the_model_logits_give_it() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    for tau in (0.1, 0.5, 2.0):
        want = _direct_nt_xent(z1, z2, tau)
        assert float(nt_xent(z1, z2, tau)) == pytest.approx(want, rel=1e-5)
    # Through ContrastiveNet: identity encoder and a projection head whose output is z.
    head = ProjectionHead(5, 4, 5)
    net = ContrastiveNet(torch.nn.Identity(), head, 0.3)
    head.net = torch.nn.Identity()
    logits = net(torch.cat([z1, z2]))
    assert torch.isinf(logits.diagonal()).all()
    assert float(F.cross_entropy(logits, positives(3))) == pytest.approx(
        _direct_nt_xent(z1, z2, 0.3), rel=1e-5)
    assert positives(3).tolist() == [3, 4, 5, 0, 1, 2]


def test_views_are_independent_seeded_and_keep_each_image_in_its_rows() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 16, 16, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    spec = ViewSpec()
    a = two_views(xn, mean, std, spec, step_generator(0, 5))
    assert a.shape == (12, 3, 16, 16)
    assert torch.equal(a, two_views(xn, mean, std, spec, step_generator(0, 5)))  # resumable
    assert not torch.allclose(a, two_views(xn, mean, std, spec, step_generator(0, 6)))
    assert (a[:6] - a[6:]).abs().amax(dim=(1, 2, 3)).min() > 0.05  # the two views differ
    # Images of one flat colour each: every view of image i (rows i and i + 6) keeps its
    # colour when the jitter is off, whatever the crop and flip.
    flat = torch.rand(6, 3, 1, 1, generator=g).expand(6, 3, 16, 16)
    plain = ViewSpec(jitter=0.0, gray_p=0.0)
    v = two_views(flat, (0.0,) * 3, (1.0,) * 3, plain, step_generator(0, 0))
    assert torch.allclose(v[:6], flat, atol=1e-5) and torch.allclose(v[6:], flat, atol=1e-5)


def test_linear_probe_matches_sklearn_and_known_features_beat_random_ones() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, k, d = 400, 4, 8
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 1.0, (k, d))
    good = centres[y] + rng.normal(0, 0.7, (n, d))  # class signal: separable up to noise
    rand = rng.normal(0, 1.0, (n, d))  # no signal: chance level (1/4)
    tr, te = slice(0, 300), slice(300, n)
    yt = torch.tensor(y)
    res = {}
    for name, f in (("good", good), ("random", rand)):
        ft = torch.tensor(f, dtype=torch.float32)
        res[name] = linear_probe(ft[tr], yt[tr], ft[te], yt[te], k, l2=1e-2)
        # sklearn's L2 logistic regression on the same standardised features: C = 1/(n * l2)
        mu, sd = f[tr].mean(0), f[tr].std(0)
        clf = LogisticRegression(C=1 / (300 * 1e-2), tol=1e-10, max_iter=5000)
        clf.fit((f[tr] - mu) / sd, y[tr])
        assert res[name]["test_acc"] == pytest.approx(clf.score((f[te] - mu) / sd, y[te]), abs=0.011)
    assert res["good"]["test_acc"] > 0.85 and res["random"]["test_acc"] < 0.45
    ft = torch.tensor(good, dtype=torch.float32)
    assert knn_accuracy(ft[tr], yt[tr], ft[te], yt[te], k, 10) > 0.8


def _smoke(tmp_path, *extra: str):
    return pretrain_config("mnist-vit", smoke=True, overrides=[
        f"out_dir={tmp_path}", "data.source=digits", "data.img_size=8",
        "model.kwargs.patch_size=4", "data.train_fraction=0.25", "train.batch_size=16",
        "pretrain.probe_test_samples=100", "pretrain.knn_samples=50", *extra])


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_run(run_dir, classifier=False).model.state_dict()


def test_sam_pretraining_moves_the_weights_differently_from_plain(tmp_path) -> None:
    runs = {}
    for tag, extra in (("plain", []), ("sam", ["optim.sam=true", "optim.rho=0.05"]),
                       ("tiny", ["optim.sam=true", "optim.rho=1e-9"])):
        # SGD: Adam would blow up the tiny-rho run's rounding-level gradient differences.
        runs[tag] = engine.train(_smoke(tmp_path, "train.max_steps=2", "optim.name=sgd",
                                        "optim.lr=0.1", *extra),
                                 run_dir=tmp_path / tag, progress=False)
    plain, sam, tiny = (_weights(tmp_path / t) for t in ("plain", "sam", "tiny"))
    gap = max(float((plain[k] - sam[k]).abs().max()) for k in plain)
    near = max(float((plain[k] - tiny[k]).abs().max()) for k in plain)
    assert gap > 1e-4 and near < gap / 100  # the perturbation, not other randomness
    logged = [r for r in read_jsonl(tmp_path / "sam" / "metrics.jsonl") if "sharpness" in r]
    assert logged and all(r["eps_norm"] == pytest.approx(0.05, rel=1e-4) for r in logged)
    assert runs["sam"]["objective"] == "simclr" and 0 <= runs["sam"]["probe_acc"] <= 1


def test_pretraining_resumes_exactly_after_a_kill(tmp_path, monkeypatch) -> None:
    cfg = _smoke(tmp_path, "train.max_steps=none", "train.epochs=1", "train.ckpt_every_epochs=0.5",
                 "optim.sam=true")
    full = engine.train(cfg, run_dir=tmp_path / "full", progress=False)
    per_half = full["steps"] // 2
    real, calls = engine.train_step, {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == per_half + 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real)
    assert load_run(tmp_path / "cut", classifier=False).step == per_half
    resumed = engine.train(resume=tmp_path / "cut", progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["probe_acc"] == full["probe_acc"] and resumed["knn_acc"] == full["knn_acc"]
    losses = lambda d: [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_a_pretraining_run_fine_tunes_with_a_new_head_on_its_encoder(tmp_path) -> None:
    engine.train(_smoke(tmp_path, "train.max_steps=2"), run_dir=tmp_path / "pre", progress=False)
    cfg = finetune_config(tmp_path / "pre", "digits", img_size=8,
                          overrides=["train.max_steps=1", "data.train_fraction=0.25",
                                     "train.batch_size=16", "train.train_eval_samples=50"])
    tr = engine.Trainer.build(cfg)
    enc = load_run(tmp_path / "pre", classifier=False).model.encoder.state_dict()
    got = tr.model.state_dict()
    assert enc and all(torch.equal(got[k], v) for k, v in enc.items())
    assert tr.init["head"] == "new" and tr.init["source_objective"] == "simclr"
    final = engine.train(cfg, run_dir=tmp_path / "ft", progress=False)
    assert final["init"]["from"] == str((tmp_path / "pre").resolve()) and "test_top5" in final
    load_run(tmp_path / "ft")  # an ordinary classifier run now


@pytest.mark.parametrize("override, words", [
    ("train.micro_batch=8", "micro_batch must be none"),
    ("optim.m=4", "optim.m"),
    ("pretrain.temperature=0", "temperature must be > 0"),
    ("pretrain.objective=byol", "pretrain.objective must be none or one of simclr"),
    ("data.augment=strong", "Mixup"),
    ("pretrain.gray_p=1.5", "gray_p must be a probability"),
])
def test_bad_pretraining_settings_are_one_line_errors(tmp_path, override, words) -> None:
    cfg = apply_overrides(_smoke(tmp_path), ["optim.sam=true"] if "optim.m" in override else [])
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as err:
        validate(apply_overrides(cfg, [override]))
    assert "\n" not in str(err.value)


def test_commands_that_need_a_classifier_refuse_a_pretraining_run_in_one_line(tmp_path,
                                                                              capsys) -> None:
    run = tmp_path / "pre"
    engine.train(_smoke(tmp_path, "train.max_steps=1"), run_dir=run, progress=False)
    with pytest.raises(CheckpointError, match="pre-training run: its model has no classifier"):
        load_run(run)
    for argv in (["analyze", str(run), "--hessian", "--quiet"], ["eval", str(run)],
                 ["pretrain", "--smoke"], ["probe", str(run), "--train-samples", "-3"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitsam: error:") and "\n" not in err and "Traceback" not in err
    assert main(["probe", str(run), "--train-samples", "100", "--test-samples", "100"]) == 0
    assert "linear probe" in capsys.readouterr().out and (run / "probe.json").exists()
