"""Studies at smoke scale: every table cell and figure filled, reuse, failures, aggregation."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
import math
import shutil
import statistics
from pathlib import Path

import pytest

from vitsam.cli import main
from vitsam.config import to_dict
from vitsam.study import stages, tables
from vitsam.study.presets import STUDIES, get_study, study_cells
from vitsam.study.runner import StudyFailed, run_study

pytestmark = pytest.mark.slow


def _record(out: Path, name: str) -> dict:
    return json.loads((out / f"study-{name}.json").read_text())


def test_main_fills_every_table_cell_with_mean_and_spread(study_dir: Path) -> None:
    rec = _record(study_dir, "main")
    t = tables.study_tables(study_dir, rec)
    assert len(t["agg"]) == 6  # 3 families x {vanilla, SAM}
    for row in t["agg"]:
        for col in rec["columns"]:
            assert col in row, (row["family"], row["method"], col)
            assert math.isfinite(row[col]["mean"])
        assert row["test_acc"]["n"] == 2  # both seeds
    # NTK at init: every re-initialisation of both cells counts (2 seeds x 2 draws).
    assert all(r["ntk_kappa_init"]["n"] == 4 for r in t["agg"])
    assert all(r["ntk_convention"] == "sum-logits" for r in t["rows"])
    md = (study_dir / "main.md").read_text()
    assert md.count("\n| resnet") + md.count("\n| vit") + md.count("\n| mixer") == 9  # 6 + 3 diffs


def test_aggregate_matches_statistics_computed_directly(study_dir: Path) -> None:
    rec = _record(study_dir, "main")
    t = tables.study_tables(study_dir, rec)
    for row in t["agg"]:
        accs = []
        for seed in (0, 1):
            final = json.loads((study_dir / f"{row['family']}-{row['method']}-s{seed}" /
                                "final.json").read_text())
            accs.append(100 * final["test_acc"])
        assert row["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
        assert row["test_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))


def test_hessian_is_reported_with_loss_and_augmented_batches(study_dir: Path) -> None:
    ana = json.loads((study_dir / "vit-sam-s0" / "analysis.json").read_text())
    assert ana["hessian"]["result"]["lambda_max"] > 0
    aug = ana["hessian_augmented"]
    assert aug["result"]["augment"] == "basic" and aug["samples"] == 16
    assert 0.0 <= aug["result"]["batch_accuracy"] <= 1.0
    assert math.isfinite(aug["result"]["loss"])


def test_inside_reuses_mains_training_and_adds_its_stages(study_dir: Path) -> None:
    rec = _record(study_dir, "inside")
    assert set(rec["cells"]) == {f"{f}-{m}-s{s}" for f in ("vit", "mixer")
                                 for m in ("vanilla", "sam") for s in (0, 1)}
    for name, entry in rec["cells"].items():
        assert entry["status"] == "done"
        assert "train" not in entry["ran"], name  # main trained it
        assert set(entry["ran"]) == {"sparsity", "attention", "landscape"}
    t = tables.study_tables(study_dir, rec)
    vit = [r for r in t["agg"] if r["family"] == "vit"]
    assert all("attention_entropy" in r and "active_pct" in r for r in vit)
    assert (study_dir / "vit-sam-s0" / "attention_entropy.png").exists()
    assert (study_dir / "vit-sam-s0" / "landscape_1d.png").exists()


def test_sharpness_measures_every_checkpoint(study_dir: Path) -> None:
    for fam in ("vit", "resnet"):
        for meth in ("vanilla", "sam"):
            d = study_dir / f"{fam}-{meth}-ckpts-s0"
            s = json.loads((d / "sharpness.json").read_text())
            ckpts = sorted(p.name for p in (d / "checkpoints").iterdir() if p.is_dir())
            assert [p["checkpoint"] for p in s["checkpoints"]] == ckpts
            assert [p["step"] for p in s["checkpoints"]] == [1, 2, 3]
            assert all(p["lambda_max"] > 0 and math.isfinite(p["loss"]) for p in s["checkpoints"])
            assert bool(s["logged"]) == (meth == "sam")  # only SAM logs its sharpness


def test_geometry_reuses_sharpness_cells_and_fills_its_columns(study_dir: Path) -> None:
    rec = _record(study_dir, "geometry")
    for name, entry in rec["cells"].items():
        assert entry["status"] == "done" and "train" not in entry["ran"], name
        assert set(entry["ran"]) == {"blocks", "trajectory"}
    t = tables.study_tables(study_dir, rec)
    for r in t["rows"]:
        ana = json.loads((study_dir / r["name"] / "analysis.json").read_text())
        res = ana["hessian"]["result"]
        blocks = res["per_block"]["blocks"]
        # The columns are read from the blocks themselves, computed here independently.
        top = max(blocks, key=lambda b: b["lambda_max"])
        assert r["block_lambda_max"] == top["lambda_max"] and r["sharpest_block"] == top["block"]
        assert all(b["trace"]["probes"] == 2 for b in blocks)
        # No block is sharper than the whole Hessian (Cauchy interlacing), up to Lanczos's tol.
        assert top["lambda_max"] <= res["lambda_max"] * 1.05 + 1e-6
        traj = ana["trajectory"]["result"]
        assert len(traj["coords"]) == 3 and r["trajectory_explained"] == sum(traj["explained"])
        assert r["trajectory_explained"] == pytest.approx(1.0)  # 2 differences span a plane
    md = (study_dir / "geometry.md").read_text()
    assert "Hessian per block, vit:" in md and "Hessian per block, resnet:" in md
    assert md.count("| blocks.0 |") == 1 and md.count("| layer1 |") == 1


def test_transfer_fine_tunes_each_sharpness_cell_and_reports_its_accuracy(study_dir: Path) -> None:
    import torch

    from vitsam.data import build_data, eval_batches
    from vitsam.train.checkpoint import load_run

    rec = _record(study_dir, "transfer")
    for name, entry in rec["cells"].items():
        assert entry["status"] == "done" and entry["ran"] == ["transfer"], name  # not retrained
    t = tables.study_tables(study_dir, rec)
    assert len(t["rows"]) == 4
    for r in t["rows"]:
        res = json.loads((study_dir / r["name"] / "transfer.json").read_text())
        run_dir = study_dir / r["name"] / res["run"]
        assert res["data"] == "mnist5k" and res["init"]["from"] == str((study_dir / r["name"]).resolve())
        # The accuracy, recomputed here from the fine-tuned weights and the MNIST-5k test split.
        run = load_run(run_dir)
        bundle = build_data(run.data_config())
        hits = n = 0
        with torch.no_grad():
            run.model.eval()
            for x, y in eval_batches(bundle.test, 256, bundle.mean, bundle.std, bundle.img_size):
                hits += int((run.model(x).argmax(1) == y).sum())
                n += len(y)
        assert n == len(bundle.test) and res["test_acc"] == pytest.approx(hits / n)
        assert r["transfer_acc"] == res["test_acc"]
    md = (study_dir / "transfer.md").read_text()
    assert "transfer test acc %" in md and "| vit sam - vanilla |" in md
    assert "Hessian per block" not in md  # geometry's blocks, on the same cells, are not this table's


def test_report_html_and_markdown_hold_the_same_numbers(study_dir: Path) -> None:
    from vitsam.report import build_report

    html, md = build_report([study_dir])
    text, mdt = html.read_text(), md.read_text()
    rec = _record(study_dir, "main")
    t = tables.study_tables(study_dir, rec)
    for row in t["agg"]:
        for col in rec["columns"]:
            cell = tables.fmt_cell(row[col], col)
            assert cell in mdt and cell.replace("±", "&plusmn;") in text.replace("±", "&plusmn;")
    assert "src=\"http" not in text and "<script src" not in text  # nothing fetched
    for fig in ("main_training.png", "main_lambda_max.png", "main_corruptions.png",
                "sharpness_sharpness.png", "inside_sparsity.png", "geometry_blocks_vit.png",
                "geometry_blocks_resnet.png", "geometry_trajectory_vit.png"):
        assert f"figures/{fig}" in mdt, fig
    assert (study_dir / "main.csv").read_text().count("\n") == 13  # header + 12 cells


def test_deleting_a_cell_retrains_only_that_cell(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study_dir, out)
    shutil.rmtree(out / "mixer-sam-s1")
    rec = run_study(get_study("main"), "smoke", out, seeds=(0, 1), progress=False)
    trained = [n for n, e in rec["cells"].items() if "train" in e.get("ran", [])]
    assert trained == ["mixer-sam-s1"]
    assert sum(e["status"] == "reused" for e in rec["cells"].values()) == 11


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path: Path, capsys) -> None:
    # Mixer takes num_blocks, a ViT does not: only the ViT cell can fail.
    code = main(["study", "main", "--scale", "smoke", "--out", str(tmp_path), "--quiet",
                 "--only", "vit-vanilla-s0", "mixer-vanilla-s0", "model.kwargs.num_blocks=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 of 2 cells failed (vit-vanilla-s0)" in err and len(err.strip().splitlines()) == 1
    rec = _record(tmp_path, "main")
    assert rec["cells"]["vit-vanilla-s0"]["status"] == "failed"
    assert rec["cells"]["mixer-vanilla-s0"]["status"] == "done"
    assert (tmp_path / "mixer-vanilla-s0" / "cell.json").exists()
    assert not (tmp_path / "vit-vanilla-s0" / "cell.json").exists()


def test_augment_grid_in_two_worker_processes(tmp_path: Path) -> None:
    rec = run_study(get_study("augment"), "smoke", tmp_path, seeds=(0,), workers=2,
                    progress=False)
    assert len(rec["cells"]) == 24 and all(e["status"] == "done" for e in rec["cells"].values())
    t = tables.study_tables(tmp_path, rec)
    assert {r["fraction"] for r in t["agg"]} == {1.0, 0.5}
    assert all("test_acc" in r and "lambda_max" in r for r in t["agg"])
    # Half the training fraction trains on half the images.
    cfg = lambda n: json.loads((tmp_path / n / "config.json").read_text())["data"]  # noqa: E731
    assert cfg("vit-sam-f0.5-s0")["train_fraction"] == pytest.approx(
        cfg("vit-sam-s0")["train_fraction"] / 2)
    assert cfg("vit-aug-s0")["augment"] == "strong"
    from vitsam.report import build_report

    _, md = build_report([tmp_path])
    assert "figures/augment_gain_vs_size.png" in md.read_text()


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_augment_evaluates_once_except_the_cells_it_shares_with_main(scale: str) -> None:
    """Cells only the data-size table reads evaluate at their last step alone; the fraction-1
    vanilla and SAM cells stay main's cells, config for config (so one folder trains them once)."""
    main_cells = {c.name: c for c in study_cells(get_study("main"), scale, (0,))}
    aug = study_cells(get_study("augment"), scale, (0,))
    shared = [c for c in aug if c.name in main_cells]
    assert {c.name for c in shared} == set(main_cells)
    assert all(c.config == main_cells[c.name].config for c in shared)
    rest = [c for c in aug if c.name not in main_cells]
    assert len(rest) == len(aug) - len(main_cells) > 0
    for c in rest:
        t = c.config.train
        assert t.eval_every_epochs == t.epochs, c.name
    from vitsam.train.engine import Timeline, is_time
    tl = Timeline.from_config(rest[0].config.train, 7)
    assert [s for s in range(1, tl.total_steps + 1)
            if is_time(s, tl.eval_every, tl.total_steps)] == [tl.total_steps]


def test_changed_config_in_an_existing_cell_folder_is_refused(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study_dir / "vit-sam-s0", out / "vit-sam-s0")
    with pytest.raises(StudyFailed, match="another configuration"):
        run_study(get_study("main"), "smoke", out, seeds=(0,), only=["vit-sam-s0"],
                  overrides=["optim.rho=0.5"], progress=False)


# -- pure logic -------------------------------------------------------------------------------

def test_significance_needs_two_seeds_and_a_gap_beyond_the_spreads() -> None:
    a = {"mean": 10.0, "std": 1.0, "n": 3}
    assert tables.significant(a, {"mean": 7.9, "std": 1.0, "n": 3}) is True
    assert tables.significant(a, {"mean": 8.1, "std": 1.0, "n": 3}) is False
    assert tables.significant(a, {"mean": 0.0, "std": 0.0, "n": 1}) is None


def test_aggregate_and_differences_on_hand_made_rows() -> None:
    rows = [{"name": f"vit-{m}-s{s}", "family": "vit", "method": m, "fraction": 1.0, "seed": s,
             "status": "done", "test_acc": acc, "lambda_max": lam}
            for m, s, acc, lam in (("vanilla", 0, 0.50, 100.0), ("vanilla", 1, 0.54, 120.0),
                                   ("sam", 0, 0.60, 30.0), ("sam", 1, 0.62, 34.0))]
    agg = tables.aggregate(rows, ["test_acc", "lambda_max"])
    van = next(r for r in agg if r["method"] == "vanilla")
    assert van["test_acc"]["mean"] == pytest.approx(52.0)
    assert van["test_acc"]["std"] == pytest.approx(statistics.stdev([50.0, 54.0]))
    d = tables.differences(agg, ["test_acc", "lambda_max"])[0]
    assert d["test_acc"]["diff"] == pytest.approx(61.0 - 52.0)
    assert d["test_acc"]["significant"] is True  # 9 > 2.83 + 1.41
    assert d["lambda_max"]["diff"] == pytest.approx(32.0 - 110.0)
    assert tables.best(agg, "lambda_max") == {agg.index(next(r for r in agg if r["method"] == "sam"))}


def test_study_cells_bad_input_is_one_line() -> None:
    from vitsam.config import ConfigError

    with pytest.raises(ConfigError, match="unknown study 'mian'.*did you mean main"):
        get_study("mian")
    with pytest.raises(ConfigError, match="no cell 'vit-sam-s9'"):
        study_cells(STUDIES["main"], "smoke", [0], only=["vit-sam-s9"])
    with pytest.raises(ConfigError, match="distinct"):
        study_cells(STUDIES["main"], "smoke", [0, 0])


@pytest.mark.parametrize("args, text", [
    (["study", "main", "--seeds", "a,b"], "--seeds 'a,b' must be comma-separated integers"),
    (["study", "main", "--workers", "0"], "--workers must be a positive integer"),
    (["study", "main", "train.epochz=3"], "unknown config key 'train.epochz'"),
    (["report", "/nonexistent-folder"], "is not a folder"),
])
def test_cli_errors(args: list[str], text: str, tmp_path: Path, capsys) -> None:
    if args[0] == "study":
        args = [*args[:2], "--out", str(tmp_path / "s"), *args[2:]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1


def test_stage_list_is_complete() -> None:
    for study in STUDIES.values():
        assert set(study.stages) <= set(stages.STAGES)


def test_matched_loss_interpolates_curvature_in_log_loss_between_bracketing_checkpoints():
    # Cell A reaches loss 0.1 exactly at its last checkpoint; cell B jumps from 1.0 to 0.01, so
    # its curvature at L* = 0.1 lies halfway in log(loss): lambda 300 -> 100 gives 200.
    a = {"_checkpoints": [{"step": 10, "loss": 2.0, "lambda_max": 5.0},
                          {"step": 20, "loss": 0.1, "lambda_max": 7.0}]}
    b = {"_checkpoints": [{"step": 10, "loss": 1.0, "lambda_max": 300.0},
                          {"step": 30, "loss": 0.01, "lambda_max": 100.0},
                          {"step": 40, "loss": 0.005, "lambda_max": 2.0}]}
    none = {"test_acc": 0.5}
    target = tables.match_losses([a, b, none])
    assert target == pytest.approx(0.1)
    assert a["lambda_max_matched"] == 7.0 and a["matched_step"] == 20
    assert b["lambda_max_matched"] == pytest.approx(200.0)
    assert b["matched_step"] == pytest.approx(20.0)
    assert "lambda_max_matched" not in none


def test_cell_fingerprint_ignores_settings_that_leave_a_finished_run_unchanged():
    cell = study_cells(get_study("main"), "smoke", [0])[0]
    cfg = cell.config
    fp = stages.fingerprint(cfg)
    same = replace(cfg, train=replace(cfg.train, threads=7, max_bad_steps=3))
    assert stages.fingerprint(same) == fp
    assert stages.fingerprint(replace(cfg, data=replace(cfg.data, bad_files="skip"))) == fp
    # A folder made before train.max_bad_steps, train.sync_batchnorm, data.bad_files and the
    # cheaper SAM keys existed: its config had none of them.
    old = to_dict(replace(cfg, out_dir="", train=replace(cfg.train, threads=None)))
    del old["train"]["max_bad_steps"], old["train"]["sync_batchnorm"], old["data"]["bad_files"]
    del old["data"]["label_noise"], old["data"]["label_noise_kind"]
    for key in ("sam_variant", "looksam_k", "looksam_alpha", "looksam_scope", "sam_prob", "sam_seed",
                "fused"):
        del old["optim"][key]
    del old["model"]["init_from"], old["model"]["init_checkpoint"], old["data"]["resident"]
    for key in ("compile", "compile_mode", "compile_backend", "channels_last", "adversarial",
                "adv_eps", "adv_steps", "adv_step_size"):
        del old["train"][key]
    del old["pretrain"]  # the pre-training section (vitsam.pretrain), unused at objective none
    assert hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16] == fp
    looksam = replace(cfg, optim=replace(cfg.optim, sam=True, sam_variant="looksam"))
    assert stages.fingerprint(looksam) != stages.fingerprint(replace(looksam, optim=replace(
        looksam.optim, looksam_k=3)))
    assert stages.fingerprint(replace(cfg, optim=replace(cfg.optim, looksam_k=3))) == fp  # unused
    # A LookSAM cell from before looksam_scope trained with global norms: it must not match.
    assert stages.fingerprint(replace(looksam, optim=replace(looksam.optim, looksam_scope="global"))) \
        != stages.fingerprint(looksam)
    for variant in ("random", "sam-on"):  # the scope changes nothing there, so those cells match
        other = replace(cfg, optim=replace(cfg.optim, sam=True, sam_variant=variant))
        assert stages.fingerprint(other) == stages.fingerprint(replace(other, optim=replace(
            other.optim, looksam_scope="global")))
    assert stages.fingerprint(replace(cfg, train=replace(cfg.train, sync_batchnorm=True))) != fp
    assert stages.fingerprint(replace(cfg, data=replace(cfg.data, label_noise=0.2))) != fp
    assert stages.fingerprint(replace(cfg, pretrain=replace(cfg.pretrain, temperature=0.1))) == fp
    simclr = replace(cfg, pretrain=replace(cfg.pretrain, objective="simclr"))
    assert stages.fingerprint(simclr) != fp
    assert stages.fingerprint(replace(simclr, pretrain=replace(simclr.pretrain,
                                                               temperature=0.1))) != \
        stages.fingerprint(simclr)
    assert stages.fingerprint(replace(cfg, train=replace(cfg.train, adv_eps=0.1))) == fp  # unused
    at = replace(cfg, train=replace(cfg.train, adversarial="fgsm"))
    assert stages.fingerprint(at) != fp
    assert stages.fingerprint(replace(at, train=replace(at.train, adv_eps=0.1))) != stages.fingerprint(at)
    assert stages.fingerprint(replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + 1))) != fp


@pytest.mark.parametrize("scale", ["cpu", "gpu", "paper"])
def test_every_study_builds_valid_cells_at_the_larger_scales(scale: str) -> None:
    """The grids that CI cannot train still build: distinct names, valid configs, and at gpu
    scale the whole CIFAR-10 training set (no subset) on the c10 presets."""
    from vitsam.config import validate

    for name, study in STUDIES.items():
        if name == "demo":
            continue
        cells = study_cells(study, scale, (0, 1))
        assert len({c.name for c in cells}) == len(cells), name
        for c in cells:
            validate(c.config)
            assert c.config.train.seed == c.seed and c.config.name == c.name
            if scale == "gpu" and c.fraction == 1.0:
                assert c.config.data.train_fraction == 1.0, c.name


def test_noise_study_reports_memorisation_read_from_the_runs(tmp_path: Path) -> None:
    from vitsam.report import build_report

    only = ["vit-vanilla-noise0.2-s0", "vit-sam-noise0.2-s0"]
    rec = run_study(get_study("noise"), "smoke", tmp_path, only=only, progress=False)
    t = tables.study_tables(tmp_path, rec)
    for r in t["rows"]:
        final = json.loads((tmp_path / r["name"] / "final.json").read_text())
        cfg = json.loads((tmp_path / r["name"] / "config.json").read_text())
        assert cfg["data"]["label_noise"] == 0.2
        assert r["noisy_memorised"] == final["label_noise"]["noisy_memorised"]
        assert r["noisy_true"] == final["label_noise"]["noisy_true"]
        assert final["label_noise"]["num_noisy"] > 0
    agg = {row["method"]: row for row in t["agg"]}
    assert agg["sam"]["noisy_memorised"]["mean"] == pytest.approx(
        100 * t["rows"][[r["method"] for r in t["rows"]].index("sam")]["noisy_memorised"])
    _, md = build_report([tmp_path])
    assert "figures/noise_memorisation.png" in md.read_text()


def test_sam_variants_runs_whole_and_compares_each_variant_with_full_sam(tmp_path: Path) -> None:
    out = tmp_path / "variants"
    rec = run_study(get_study("sam-variants"), "smoke", out, seeds=(0,), progress=False)
    assert len(rec["cells"]) == 10 and all(e["status"] == "done" for e in rec["cells"].values())
    for f in ("vit", "mixer"):
        for m in ("looksam", "sam-on", "random"):
            final = json.loads((out / f"{f}-{m}-s0" / "final.json").read_text())
            assert final["sam_variant"] == m and final["sam"] is True
        looksam = json.loads((out / f"{f}-looksam-s0" / "final.json").read_text())
        assert 0 < looksam["perturbed_steps"] < looksam["steps"] or looksam["steps"] == 1
    t = tables.study_tables(out, rec)
    assert all("test_acc" in r and "lambda_max" in r and "train_images_per_s" in r for r in t["agg"])
    assert {d["method"] for d in t["diffs"]} == {"sam - vanilla", "looksam - sam", "sam-on - sam",
                                                 "random - sam"}
    md = (out / "sam-variants.md").read_text()
    assert "| vit looksam - sam |" in md and "| mixer sam-on |" in md
    from vitsam.report import build_report

    _, page = build_report([out])
    assert "sam-variants" in page.read_text() and "figures/sam-variants_lambda_max.png" in page.read_text()


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_sam_variants_shares_main_cells_config_for_config(scale: str) -> None:
    main_cells = {c.name: c for c in study_cells(get_study("main"), scale, (0,))}
    cells = study_cells(get_study("sam-variants"), scale, (0,))
    shared = [c for c in cells if c.name in main_cells]
    assert len(cells) == 10 and len(shared) == 4
    assert all(stages.fingerprint(c.config) == stages.fingerprint(main_cells[c.name].config)
               and c.config == main_cells[c.name].config for c in shared)
    for c in cells:
        o = c.config.optim
        assert o.sam == (c.method != "vanilla")
        assert o.sam_variant == (c.method if c.method in ("looksam", "sam-on", "random") else "full")
    if scale == "cpu":
        vit = next(c for c in cells if c.name == "vit-looksam-s0").config
        assert vit.model.kwargs["embed_dim"] == 128 and vit.data.augment == "none"
