"""Checkpoints: self-describing, exact round trips, atomic writes, clear errors when damaged."""
import pytest
import torch

from vitsam.models import create_model, make_spec
from vitsam.train import checkpoint as ck


def _model() -> tuple[torch.nn.Module, dict]:
    spec = make_spec("vit-t4", 10, 16, 1, {"depth": 1, "embed_dim": 16, "num_heads": 2})
    torch.manual_seed(0)
    return create_model("vit-t4", 10, 16, 1, **spec["kwargs"]), spec


def _trained_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    opt.step()
    return opt


def test_flatten_unflatten_optimizer_state_round_trip() -> None:
    model, _ = _model()
    opt = _trained_adam(model)
    sd = opt.state_dict()
    js, tensors = ck.flatten_state(sd, "optimizer")
    back = ck.unflatten_state(js, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(back["state"]) == set(sd["state"])
    for k, st in sd["state"].items():
        for name, val in st.items():
            assert torch.equal(back["state"][k][name], val)


def test_save_and_load_run_is_exact(tmp_path) -> None:
    model, spec = _model()
    opt = _trained_adam(model)
    ck.save_checkpoint(tmp_path, "step-00000001", model, spec, {"name": "t"}, 1, 0, opt)
    run = ck.load_run(tmp_path)
    assert run.step == 1 and run.model_spec == spec and not run.model.training
    for (n, a), (_, b) in zip(model.state_dict().items(), run.model.state_dict().items()):
        assert torch.equal(a, b), n
    state, _, opt_t = ck.read_checkpoint(run.checkpoint)
    opt2 = torch.optim.AdamW(run.model.parameters(), lr=1.0)
    opt2.load_state_dict(ck.unflatten_state(state["optimizer"], opt_t))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    model, spec = _model()
    ck.save_checkpoint(tmp_path, "step-00000001", model, spec, {}, 1, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_write_json", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, "step-00000002", model, spec, {}, 2, 0)
    monkeypatch.undo()
    run = ck.load_run(tmp_path)
    assert run.step == 1 and ck.list_checkpoints(tmp_path) == ["step-00000001"]
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in before.items())


def test_damaged_checkpoint_gives_one_line_error(tmp_path) -> None:
    model, spec = _model()
    ck.save_checkpoint(tmp_path, "step-00000001", model, spec, {}, 1, 0)
    ck.save_checkpoint(tmp_path, "step-00000002", model, spec, {}, 2, 0)
    path = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10:] = b"\x00" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="damaged.*other checkpoints: step-00000001"):
        ck.load_run(tmp_path)
    assert ck.load_run(tmp_path, "step-00000001").step == 1
    with pytest.raises(ck.CheckpointError, match="holds no checkpoint"):
        ck.load_run(tmp_path / "checkpoints")
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_run(tmp_path / "nope")


def test_keep_prunes_old_checkpoints_and_rng_round_trip(tmp_path) -> None:
    model, spec = _model()
    for s in range(1, 5):
        ck.save_checkpoint(tmp_path, f"step-{s:08d}", model, spec, {}, s, 0, keep=2)
    assert ck.list_checkpoints(tmp_path) == ["step-00000003", "step-00000004"]
    state = ck.rng_state()
    a = torch.rand(3)
    ck.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_latest_pointer_to_a_removed_checkpoint_falls_back_and_keep_protects_latest(
        tmp_path) -> None:
    import shutil

    model, spec = _model()
    for s in range(1, 4):
        ck.save_checkpoint(tmp_path, f"step-{s:08d}", model, spec, {}, s, 0)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000003")  # e.g. removed when damaged
    assert ck.load_run(tmp_path).step == 2
    # Resumed from step 2, the run writes step 3 again; keep=1 keeps only that newest one.
    ck.save_checkpoint(tmp_path, "step-00000003", model, spec, {}, 3, 0, keep=1)
    assert ck.list_checkpoints(tmp_path) == ["step-00000003"] and ck.load_run(tmp_path).step == 3


def test_derived_runs_never_overwrite_a_training_run(tmp_path) -> None:
    model, spec = _model()
    ck.save_checkpoint(tmp_path / "trained", "step-00000001", model, spec, {}, 1, 0)
    (tmp_path / "trained" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ck.CheckpointError, match="already holds a training run"):
        ck.save_model_run(tmp_path / "trained", model, spec, {"name": "p"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="already holds other files"):
        ck.save_model_run(tmp_path / "other", model, spec, {"name": "p"})
    ck.save_model_run(tmp_path / "derived", model, spec, {"name": "p"})
    ck.save_model_run(tmp_path / "derived", model, spec, {"name": "p2"})  # a re-run replaces it
    assert ck.load_run(tmp_path / "derived").config == {"name": "p2"}
    assert ck.list_checkpoints(tmp_path / "trained") == ["step-00000001"]


def test_a_derived_run_carries_its_source_runs_data_record(tmp_path) -> None:
    from vitsam.data import load_data_record
    from vitsam.data.record import FORMAT, RECORD_FILE
    from vitsam.data.preprocess import describe
    from vitsam.io import atomic_write_json

    model, spec = _model()
    rec = {"format": FORMAT, "mean": [0.25], "std": [0.5], "in_chans": 1, "img_size": 16, "native_size": 16,
           "classes": [str(i) for i in range(10)], "train_images": 7, "description": "d",
           "preprocessing": describe(16, 0.875)}
    ck.save_model_run(tmp_path / "src", model, spec, {"name": "s"})
    atomic_write_json(tmp_path / "src" / RECORD_FILE, rec)
    ck.save_model_run(tmp_path / "derived", model, spec, {"name": "p"}, data_from=tmp_path / "src")
    assert load_data_record(tmp_path / "derived") == rec
    # Re-derived from a run without a record: the earlier derivation's record does not stay.
    ck.save_model_run(tmp_path / "bare", model, spec, {"name": "b"})
    ck.save_model_run(tmp_path / "derived", model, spec, {"name": "p"}, data_from=tmp_path / "bare")
    assert load_data_record(tmp_path / "derived") is None


def test_merge_json_keeps_a_damaged_file_aside(tmp_path, capsys) -> None:
    from vitsam.io import merge_json, read_json

    path = tmp_path / "analysis.json"
    path.write_text('{"hessian": {"lambda_max": 3.0}')  # truncated
    merge_json(path, {"ntk": {"kappa": 2.0}}, "analysis file")
    assert read_json(path) == {"ntk": {"kappa": 2.0}}
    assert (tmp_path / "analysis.damaged-0.json").read_text() == '{"hessian": {"lambda_max": 3.0}'
    assert "kept it as" in capsys.readouterr().err
    merge_json(path, {"sparsity": {"x": 1}})
    assert set(read_json(path)) == {"ntk", "sparsity"}


def test_saving_removes_folders_left_half_written_by_an_earlier_process(tmp_path) -> None:
    model, spec = _model()
    stale = tmp_path / "checkpoints" / ".tmp-step-00000002-999999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    mine = [tmp_path / "checkpoints" / n for n in (".tmp-notes", ".old-copy", ".tmp-x-12a")]
    for folder in mine:  # not names save_checkpoint writes: left alone
        folder.mkdir()
    ck.save_checkpoint(tmp_path, "step-00000001", model, spec, {}, 1, 0)
    assert not stale.exists() and ck.list_checkpoints(tmp_path) == ["step-00000001"]
    assert all(folder.is_dir() for folder in mine)


def test_keep_deletes_only_the_runs_own_step_checkpoints(tmp_path) -> None:
    import shutil

    model, spec = _model()
    root = tmp_path / "checkpoints"
    for s in range(1, 4):
        ck.save_checkpoint(tmp_path, ck.step_name(s), model, spec, {}, s, 0)
    # A user's copies and folders: none is a step-NNNNNNNN checkpoint this run wrote.
    for copy in ("best-step3", "step-3-copy", "step-00000003.bak", "a-step-00000001"):
        shutil.copytree(root / "step-00000003", root / copy)
    shutil.copytree(root / "step-00000003", root / "step-00000007")  # state.json says step 3
    (root / "step-00000008").mkdir()  # the right name, but not a checkpoint
    (root / "step-00000008" / "notes.txt").write_text("mine")
    user = sorted(p.name for p in root.iterdir() if p.name not in
                  ("step-00000001", "step-00000002", "step-00000003", "latest.json"))
    for s in range(4, 6):
        ck.save_checkpoint(tmp_path, ck.step_name(s), model, spec, {}, s, 0, keep=2)
    left = sorted(p.name for p in root.iterdir() if p.name != "latest.json")
    assert left == sorted(user + ["step-00000004", "step-00000005"])
    assert (root / "step-00000008" / "notes.txt").read_text() == "mine"
    assert ck.load_run(tmp_path).step == 5
    # Without the pointer, "last" is the run's newest step checkpoint, not a copy that sorts later.
    (root / "latest.json").unlink()
    assert ck.resolve_checkpoint(tmp_path).name == "step-00000005"
    assert ck.load_run(tmp_path, "best-step3").step == 3
