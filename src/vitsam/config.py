"""Run configuration: frozen dataclasses, dotted overrides that reject unknown keys, JSON I/O."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping

from .data import DataConfig
from .optim.factory import OptimConfig

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
        inner = [a for a in args if a is not type(None)]
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


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (``model.kwargs.depth=2`` adds a model argument).

    Unknown keys raise ConfigError naming the valid ones.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              "(e.g. train.epochs=50)")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip())
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
        return replace(obj, **{head: val})
    if not (is_dataclass(cur) or isinstance(cur, Mapping)):
        raise ConfigError(f"{prefix + head} is a value, not a section; use {prefix + head}=...")
    return replace(obj, **{head: _set(cur, parts[1:], text, full)})


def validate(cfg: RunConfig) -> None:
    """One-line errors for values that would fail deep inside training."""
    t = cfg.train
    if not t.epochs > 0:
        raise ConfigError(f"train.epochs must be > 0, got {t.epochs}")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.micro_batch is not None and not 0 < t.micro_batch <= t.batch_size:
        raise ConfigError(f"train.micro_batch must be in 1..batch_size ({t.batch_size}), "
                          f"got {t.micro_batch}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {t.precision!r}")
    if t.clip_norm is not None and not t.clip_norm > 0:
        raise ConfigError(f"train.clip_norm must be > 0 or none, got {t.clip_norm}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or none, got {t.max_steps}")
    from .optim.factory import validate as validate_optim

    validate_optim(cfg.optim)
