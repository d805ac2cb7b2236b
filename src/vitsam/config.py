"""Run configuration: frozen dataclasses, dotted overrides that reject unknown keys, JSON I/O."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping

from .data import DataConfig
from .optim.factory import OptimConfig
from .optim.schedule import DECAYS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass(frozen=True)
class ModelConfig:
    """A model by vitsam or timm name; ``kwargs`` override its architecture (e.g. depth)."""

    name: str = "vit-t4"
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Training-loop settings. Durations in epochs or steps are turned into steps in one place
    (``vitsam.train.engine.Timeline``)."""

    epochs: float = 10
    batch_size: int = 128
    warmup_steps: int | None = None  # wins over warmup_epochs when set
    warmup_epochs: float = 1.0
    decay: str = "cosine"  # cosine | linear | constant
    label_smoothing: float = 0.0
    clip_norm: float | None = 1.0
    micro_batch: int | None = None  # gradient accumulation: micro-batches of this many samples
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    eval_every_epochs: float = 1.0
    ckpt_every_epochs: float = 1.0
    log_every_steps: int = 10
    max_steps: int | None = None  # hard cap on optimiser steps (smoke runs, budgets)
    keep_checkpoints: int = 2
    train_eval_samples: int = 10000  # clean train accuracy at the end on at most this many images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = torch's default


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder."""

    name: str = "run"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs"


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return fix(out)


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, val in data.items():
        if key not in names:
            raise ConfigError(_unknown(path + key, names, path))
        typ = hints[key]
        if is_dataclass(typ) and isinstance(val, Mapping):
            kwargs[key] = from_dict(typ, val, f"{path}{key}.")
        elif isinstance(val, list) and _origin_is_tuple(typ):
            kwargs[key] = tuple(val)
        else:
            kwargs[key] = val
    return cls(**kwargs)


def _origin_is_tuple(typ: Any) -> bool:
    return typing.get_origin(typ) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(typ))


def _unknown(key: str, names: set[str], prefix: str) -> str:
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, sorted(names), n=3)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    return (f"unknown config key {key!r}{hint}; valid keys here: "
            f"{', '.join(prefix + n for n in sorted(names))}")


def _parse(text: str, typ: Any, key: str) -> Any:
    """Parse an override's text as the field's declared type."""
    args = typing.get_args(typ)
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    if is_union:
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        # str accepts any text, so it is tried last (``heads: str | int`` with "3" is the int 3).
        inner = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        last: Exception | None = None
        for a in inner:
            try:
                return _parse(text, a, key)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"cannot parse {key}={text!r}")
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typing.get_origin(typ) is tuple:
            val = ast.literal_eval(text)
            return tuple(val) if isinstance(val, (list, tuple)) else (val,)
    except (ValueError, SyntaxError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key}={text!r} is not a valid {name}") from None
    return _literal(text)


def _literal(text: str) -> Any:
    """A Python/JSON literal if the text is one, else the text itself (for model kwargs)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def apply_overrides(cfg: Any, overrides: list[str], prefix: str = "") -> Any:
    """Apply ``section.key=value`` overrides (``model.kwargs.depth=2`` adds a model argument).

    Unknown keys raise ConfigError naming the valid ones. ``prefix`` (e.g. ``"hessian."``) is
    how the keys were typed before the config was chosen, for the error messages.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {prefix}{item!r} is not of the form key=value "
                              "(e.g. train.epochs=50)")
        key, text = (part.strip() for part in item.split("=", 1))
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {prefix}{item!r} has an empty key; write it as "
                              "section.key=value (e.g. train.epochs=50)")
        cfg = _set(cfg, key.split("."), text, prefix + key)
    return cfg


def _set(obj: Any, parts: list[str], text: str, full: str) -> Any:
    if isinstance(obj, Mapping):  # free-form mapping (model.kwargs): any key is allowed
        new = dict(obj)
        if len(parts) == 1:
            new[parts[0]] = _literal(text)
        else:
            new[parts[0]] = _set(new.get(parts[0], {}), parts[1:], text, full)
        return new
    names = {f.name for f in fields(obj)}
    head = parts[0]
    prefix = full[: len(full) - len(".".join(parts))]
    if head not in names:
        raise ConfigError(_unknown(prefix + head, names, prefix))
    hints = typing.get_type_hints(type(obj))
    cur = getattr(obj, head)
    if len(parts) == 1:
        if is_dataclass(cur):
            raise ConfigError(f"{full} is a section; set one of its keys, e.g. {full}."
                              f"{fields(cur)[0].name}=...")
        val = _literal(text) if isinstance(cur, Mapping) else _parse(text, hints[head], full)
        try:
            return replace(obj, **{head: val})
        except ConfigError:
            raise
        except ValueError as exc:  # the section's own check (e.g. DataConfig.__post_init__)
            raise ConfigError(f"{full}={text}: {str(exc).strip().splitlines()[0]}") from None
    if not (is_dataclass(cur) or isinstance(cur, Mapping)):
        raise ConfigError(f"{prefix + head} is a value, not a section; use {prefix + head}=...")
    return replace(obj, **{head: _set(cur, parts[1:], text, full)})


def validate(cfg: RunConfig) -> None:
    """One-line errors for values that would fail deep inside training (or silently misbehave)."""
    t = cfg.train
    for section in ("train", "optim"):
        for f in fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {v}")
    checks: list[tuple[bool, str]] = [
        (t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.micro_batch is None or 0 < t.micro_batch <= t.batch_size,
         f"train.micro_batch must be in 1..batch_size ({t.batch_size}) or none, "
         f"got {t.micro_batch}"),
        (t.precision in PRECISIONS,
         f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}"),
        (t.clip_norm is None or t.clip_norm > 0,
         f"train.clip_norm must be > 0 or none, got {t.clip_norm}"),
        (0 <= t.label_smoothing < 1,
         f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}"),
        (t.max_steps is None or t.max_steps >= 1,
         f"train.max_steps must be >= 1 or none, got {t.max_steps}"),
        (t.warmup_steps is None or t.warmup_steps >= 0,
         f"train.warmup_steps must be >= 0 or none, got {t.warmup_steps}"),
        (t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}"),
        (t.eval_every_epochs > 0,
         f"train.eval_every_epochs must be > 0 (e.g. 0.5 for twice an epoch), "
         f"got {t.eval_every_epochs}"),
        (t.ckpt_every_epochs > 0,
         f"train.ckpt_every_epochs must be > 0 (e.g. 0.5 for twice an epoch), "
         f"got {t.ckpt_every_epochs}"),
        (t.log_every_steps >= 1, f"train.log_every_steps must be >= 1, got {t.log_every_steps}"),
        (t.keep_checkpoints >= 0,
         f"train.keep_checkpoints must be >= 0 (0 keeps every checkpoint), "
         f"got {t.keep_checkpoints}"),
        (t.train_eval_samples >= 1,
         f"train.train_eval_samples must be >= 1, got {t.train_eval_samples}"),
        (t.threads is None or t.threads >= 1,
         f"train.threads must be >= 1 or none (torch's default), got {t.threads}"),
        (cfg.optim.m is None or cfg.optim.sam,
         f"optim.m={cfg.optim.m} (m-sharpness) needs SAM; set optim.sam=true or optim.m=none"),
        (cfg.optim.sam or cfg.optim.rho >= 0, f"optim.rho must be >= 0, got {cfg.optim.rho}"),
        (t.decay in DECAYS, f"train.decay must be one of {', '.join(DECAYS)}, got {t.decay!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    check_device(t.device, "train.device")
    from .optim.factory import validate as validate_optim

    try:
        validate_optim(cfg.optim)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_device(name: str, key: str = "--device") -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with that GPU visible.

    Raises a one-line ConfigError naming ``key`` otherwise.
    """
    import re

    import torch

    if name in ("auto", "cpu"):
        return name
    if not re.fullmatch(r"cuda(:\d+)?", str(name)):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA device is visible; use {key} cpu"
                          if key.startswith("--") else
                          f"{key}={name} but no CUDA device is visible; use {key}=cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name} but only {torch.cuda.device_count()} CUDA device(s) "
                          "are visible")
    return name
