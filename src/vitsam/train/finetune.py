"""``vitsam finetune``: train a run's model further on other data, at another resolution.

A fine-tuning run is an ordinary training run (same folder, same resume, same commands after
it) whose config sets ``model.init_from`` / ``model.init_checkpoint``: ``Trainer.build`` then
starts from that checkpoint's weights instead of random ones (``initialised_model``), carried
over by ``vitsam.models.transfer`` (new classifier unless the classes are the same, ViT position
embedding resampled to the new patch grid, first convolution adapted to another channel
count). What was adapted goes to ``final.json`` as ``init``.

``finetune_config`` starts from the defaults of ``RunConfig`` with the ViT paper's fine-tuning
optimiser (SGD with momentum 0.9, no weight decay, learning rate 0.01; SAM off) and the source's
architecture; ``--set`` overrides anything (``optim.sam=true optim.rho=0.05``,
``train.epochs=2``, ``data.augment=none``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import ModelConfig, RunConfig, apply_overrides
from ..data import DataConfig, load_data_record
from ..io import read_json
from ..models import build_from_spec
from ..models.transfer import TransferError, transfer_weights
from ..optim.factory import OptimConfig
from .checkpoint import CheckpointError, load_run, resolve_checkpoint

FINETUNE_OPTIM = OptimConfig(name="sgd", lr=0.01, weight_decay=0.0, momentum=0.9)


def finetune_config(run_dir: str | Path, data: str, root: str | None = None,
                    img_size: int | None = None, checkpoint: str = "last",
                    overrides: list[str] | None = None) -> RunConfig:
    """The config of a run fine-tuning ``run_dir``'s checkpoint on ``data`` at ``img_size``
    (default: the source model's), with ``overrides`` applied."""
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    state = read_json(ckpt / "state.json", "checkpoint state")
    spec = state.get("model_spec") if isinstance(state, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError(f"{ckpt / 'state.json'} has no model spec; restore it or train the "
                              "run again")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    src_name = saved.get("name") if isinstance(saved.get("name"), str) else Path(run_dir).name
    if img_size is not None and (isinstance(img_size, bool) or img_size < 1):
        raise ValueError(f"--img-size must be a positive number of pixels, got {img_size}")
    cfg = RunConfig(
        name=f"{src_name}-ft",
        description=f"fine-tuned from {Path(run_dir).resolve()} ({ckpt.name}) on {data}",
        data=DataConfig(source=data, root=root, img_size=img_size or int(spec["img_size"])),
        model=ModelConfig(name=spec["name"], kwargs=dict(spec.get("kwargs") or {}),
                          init_from=str(Path(run_dir).resolve()), init_checkpoint=ckpt.name),
        optim=FINETUNE_OPTIM)
    return apply_overrides(cfg, list(overrides or []))


def initialised_model(mcfg: ModelConfig, spec: dict[str, Any],
                      classes: list[str]) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """(spec, model, report): the model of ``spec`` (random, from the current torch seed) with
    the weights of ``mcfg.init_from`` carried in. A pruned source's MLP widths are kept
    (``spec["mlp_hidden"]``). The classifier is kept only when the source's recorded classes
    equal ``classes`` (same order) and so its class count."""
    src = load_run(mcfg.init_from, mcfg.init_checkpoint, classifier=False)
    if src.model_spec.get("mlp_hidden"):
        spec = {**spec, "mlp_hidden": dict(src.model_spec["mlp_hidden"])}
    model = build_from_spec(spec)
    rec = load_data_record(src.run_dir)
    src_classes = rec.get("classes") if rec is not None else None
    # A pre-training run's encoder (``vitsam.pretrain``) has no classifier: always a new one,
    # and its projection head is left behind.
    pretrained = isinstance(src.model_spec.get("contrastive"), dict)
    source = src.model.encoder if pretrained else src.model
    keep = (not pretrained and isinstance(src_classes, list)
            and [str(c) for c in src_classes] == list(classes)
            and int(src.model_spec["num_classes"]) == int(spec["num_classes"]))
    try:
        report = transfer_weights(source, model, keep_head=keep)
    except TransferError as exc:
        raise TransferError(f"model.init_from {mcfg.init_from} ({src.checkpoint.name}): "
                            f"{exc}") from None
    report = {"from": str(mcfg.init_from), "checkpoint": src.checkpoint.name,
              "source_model": src.model_spec["name"], **report}
    if pretrained:
        report["source_objective"] = src.model_spec["contrastive"].get("objective")
    return spec, model, report
