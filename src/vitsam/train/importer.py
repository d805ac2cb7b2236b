"""``vitsam import``: a released checkpoint file as a run folder every command reads.

The file is read by ``vitsam.models.released`` into timm names, mapped onto a zoo model (the
``--model`` named, else the zoo entry of exactly the file's architecture, else the closest one
with ``model.kwargs`` for the differences), loaded strictly and checked with a forward pass.
The folder is what ``save_model_run`` writes for a derived model (``checkpoints/final``, step
0), plus:

* ``config.json``: a full ``RunConfig`` whose data section names the data the model is
  analysed and evaluated on (``--data`` / ``--root``, at the checkpoint's image size, no
  augmentation; default ``imagefolder`` without a root, so analyses ask for one);
* ``data.json``: the checkpoint's own input convention (mean = std = 0.5 per channel, the
  family's timm evaluation crop: 0.9 for ViT, 0.875 for Mixer, or ``--crop-pct``), not
  statistics of the data, so every evaluation feeds the model as its authors did;
* ``checkpoints/final/state.json`` ``extra.imported``: the file, its SHA-256 and its layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RunConfig, apply_overrides, to_dict, validate
from ..data import DataConfig
from ..data.record import RECORD_FILE, model_record
from ..io import atomic_write_json, sha256_file
from ..models import MODELS, build_from_spec, check_forward, count_params, make_spec
from ..models.released import NORMALISATION, Released, ReleasedError, check_shapes, read_released
from .checkpoint import check_new_run_dir, save_model_run

CROP_PCT = {"vit": 0.9, "mixer": 0.875}  # timm's evaluation crops for these weights
_ARCH = {"vit": ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"),
         "mixer": ("patch_size", "embed_dim", "num_blocks", "mlp_ratio")}
_DEFAULTS = {"vit": {"mlp_ratio": 4.0}, "mixer": {"mlp_ratio": (0.5, 4.0)}}


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def zoo_model(rel: Released, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(zoo name, model kwargs) for the checkpoint.

    ``name`` given: that zoo model as it is (a file of another shape fails ``check_shapes``).
    Otherwise the zoo entry whose architecture equals the file's (a timm ViT file does not
    record its head count: the entry that matches everything else, else width / 64, timm's head
    width), else the entry of the family with the same patch size and kwargs for the rest.
    """
    if name is not None:
        info = MODELS.get(name)
        if info is None or info.family != rel.family:
            fam = [n for n, i in MODELS.items() if i.family == rel.family]
            what = {"vit": "ViT", "mixer": "Mixer"}[rel.family]
            raise ReleasedError(f"--model {name!r} is not a zoo {what}; this checkpoint is a "
                                f"{what}: one of {', '.join(fam)}")
        return name, {}
    arch = {k: rel.arch[k] for k in _ARCH[rel.family]}
    family = [i for i in MODELS.values() if i.family == rel.family]

    def full(info: Any) -> dict[str, Any]:
        return {**_DEFAULTS[rel.family], **info.args}

    def fits(info: Any) -> bool:
        f = full(info)
        return all(_json(f.get(k)) == _json(v) for k, v in arch.items() if v is not None)

    exact = sorted((i for i in family if fits(i)), key=lambda i: i.img_size != rel.arch["img_size"])
    if exact:
        return exact[0].name, {}
    if arch.get("num_heads", 0) is None:
        if arch["embed_dim"] % 64:
            raise ReleasedError(f"{rel.path} does not record the number of attention heads and no "
                                f"zoo ViT has its shapes (width {arch['embed_dim']}); give --model")
        arch["num_heads"] = arch["embed_dim"] // 64
    same_patch = [i for i in family if i.args.get("patch_size") == arch["patch_size"]]
    base = (same_patch or family)[0]
    kwargs = {k: _json(v) for k, v in arch.items() if _json(full(base).get(k)) != _json(v)}
    return base.name, kwargs


def import_checkpoint(file: str | Path, out: str | Path, model: str | None = None,
                      data: str | None = None, root: str | None = None,
                      crop_pct: float | None = None, overrides: list[str] | None = None,
                      ) -> dict[str, Any]:
    """Write the run folder ``out`` for the checkpoint ``file``; returns a summary
    (``name``, ``kwargs``, ``params``, ``num_classes``, ``img_size``, ``layout``, ``run_dir``)."""
    overrides = list(overrides or [])
    for o in overrides:
        if o.split("=", 1)[0].strip().startswith("model."):
            raise ConfigError(f"--set {o}: the model is the checkpoint's; choose it with --model")
    check_new_run_dir(out)  # before reading a file of hundreds of megabytes
    rel = read_released(file)
    name, kwargs = zoo_model(rel, model)
    a = rel.arch
    spec = make_spec(name, a["num_classes"], a["img_size"], a["in_chans"], kwargs)
    with torch.device("meta"):  # the shapes first, without allocating a wrong model's weights
        check_shapes(rel, build_from_spec(spec), name)
    net = build_from_spec(spec)
    net.load_state_dict(rel.state, strict=True)
    check_forward(net, name, a["num_classes"], a["img_size"], a["in_chans"])
    src = Path(file).resolve()
    try:
        dcfg = DataConfig(source=data or "imagefolder",
                          root=str(Path(root).expanduser().resolve()) if root else None,
                          img_size=a["img_size"], augment="none")
    except ValueError as exc:
        raise ConfigError(f"--data {data}: {str(exc).splitlines()[0]}") from None
    cfg = RunConfig(name=src.stem.replace(" ", "_"),
                    description=f"imported from {src.name} ({rel.layout})", data=dcfg,
                    model=ModelConfig(name=name, kwargs=kwargs))
    cfg = apply_overrides(cfg, overrides)
    if cfg.data.img_size != a["img_size"]:
        raise ConfigError(f"data.img_size must stay the checkpoint's {a['img_size']} px; "
                          "`vitsam finetune` changes the resolution")
    validate(cfg)
    crop = CROP_PCT[rel.family] if crop_pct is None else crop_pct
    mean, std = NORMALISATION
    record = model_record([mean] * a["in_chans"], [std] * a["in_chans"], a["img_size"], crop,
                          f"the input convention of {src.name}: [-1, 1] scaling")
    extra = {"imported": {"file": str(src), "sha256": sha256_file(src), "layout": rel.layout}}
    run = save_model_run(out, net, spec, to_dict(cfg), extra=extra, step=0)
    atomic_write_json(Path(run) / RECORD_FILE, record)
    return {"name": name, "kwargs": kwargs, "params": count_params(net), "layout": rel.layout,
            "num_classes": a["num_classes"], "img_size": a["img_size"], "run_dir": str(run),
            "crop_pct": crop, "data": cfg.data.source}


def describe_import(summary: dict[str, Any]) -> str:
    """The lines ``vitsam import`` prints."""
    kw = ", ".join(f"{k}={v}" for k, v in summary["kwargs"].items())
    return (f"{summary['layout']} -> {summary['name']}{f' ({kw})' if kw else ''}: "
            f"{summary['params'] / 1e6:.1f}M parameters, {summary['num_classes']} classes, "
            f"{summary['img_size']} px, inputs scaled to [-1, 1], eval crop {summary['crop_pct']}\n"
            f"run folder -> {summary['run_dir']} (data: {summary['data']})")
