"""Run configuration: frozen dataclasses, dotted overrides that reject unknown keys, JSON I/O.

Every value set by an override or read from JSON is checked against its field's declared type
(``check_type``) before the config is built: ``int`` takes integers but not booleans, ``float``
takes integers and floats, ``X | None`` also takes null, tuples take lists, ``Mapping`` fields
take only mappings. A mismatch is a one-line ConfigError naming the key, the value and the type.
"""
from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping

from .data import DataConfig
from .optim.adversarial import ATTACKS
from .optim.factory import OptimConfig
from .optim.schedule import DECAYS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass(frozen=True)
class ModelConfig:
    """A model by vitsam or timm name; ``kwargs`` override its architecture (e.g. depth).

    ``init_from``: a run folder (trained, pruned, imported) whose checkpoint ``init_checkpoint``
    initialises the model instead of random weights (``vitsam finetune``): the classifier is
    new unless the classes are the same, a ViT's position embedding is resampled to the image
    size (``vitsam.models.transfer``).
    """

    name: str = "vit-t4"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_checkpoint: str = "last"


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
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss/gradient
    keep_checkpoints: int = 2
    train_eval_samples: int = 10000  # clean train accuracy at the end on at most this many images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = False  # also write TensorBoard scalars to <run>/tensorboard
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = torch's default
    sync_batchnorm: bool = False  # torchrun on GPUs: BatchNorm statistics over all processes
    compile: bool = False  # torch.compile the model the steps drive (vitsam.train.fastpath)
    compile_mode: str | None = None  # torch.compile mode: default, reduce-overhead, max-autotune, ...
    compile_backend: str = "inductor"  # torch.compile backend (eager / aot_eager: cheap checks)
    channels_last: bool | str = "auto"  # auto (ResNets on CUDA) | true | false
    # Adversarial training (vitsam.optim.adversarial): L-inf, in pixel units of [0, 1] images.
    adversarial: str = "none"  # none | pgd (PGD-k, random start) | fgsm (FGSM-RS, Wong et al.)
    adv_eps: float = 8 / 255  # the eps ball's radius
    adv_steps: int = 7  # PGD iterations (fgsm: one step)
    adv_step_size: float | None = None  # None: pgd 2.5 eps / adv_steps, fgsm 1.25 eps


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pre-training (``vitsam pretrain``; ``vitsam.pretrain``). ``objective``
    none = a supervised run (every key below unused); simclr = SimCLR's NT-Xent on two random
    views of each image, labels unused for training.

    temperature: NT-Xent's tau. proj_hidden / proj_dim: the projection head's widths (hidden
    none = the encoder's feature width). crop_min, hflip, jitter, jitter_p, gray_p: the views
    (``vitsam.pretrain.views``). knn_k, knn_samples: the kNN accuracy logged at eval times (a
    bank of knn_samples training images, as many test images). probe_train_samples,
    probe_test_samples (none = all), probe_l2: the linear probe at the end of the run.
    """

    objective: str = "none"
    temperature: float = 0.5
    proj_hidden: int | None = None
    proj_dim: int = 128
    crop_min: float = 0.2
    hflip: bool = True
    jitter: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    knn_k: int = 20
    knn_samples: int = 1000
    probe_train_samples: int | None = 10000
    probe_test_samples: int | None = None
    probe_l2: float = 1e-4


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


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
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys and values of the wrong
    type are a ConfigError naming the dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or 'the config'} must be a mapping of keys, "
                          f"got {_show(data)} ({_kind(data)})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, val in data.items():
        if key not in names:
            raise ConfigError(_unknown(path + key, names, path))
        typ = hints[key]
        if is_dataclass(typ):
            if not isinstance(val, Mapping):
                raise ConfigError(f"{path}{key} is a section and must be a mapping of its keys, "
                                  f"got {_show(val)} ({_kind(val)})")
            kwargs[key] = from_dict(typ, val, f"{path}{key}.")
        else:
            kwargs[key] = check_type(val, typ, path + key)
    return cls(**kwargs)


# -- type checks ------------------------------------------------------------------------------

def check_type(value: Any, typ: Any, key: str) -> Any:
    """``value`` as a value of the declared type ``typ`` (lists become tuples for tuple fields),
    or a one-line ConfigError naming ``key``, the value and the type expected."""
    ok, out = _conforms(value, typ)
    if not ok:
        raise ConfigError(f"{key}={_show(value)} must be {_describe(typ)}, not {_kind(value)}")
    return out


_UNION = (typing.Union, types.UnionType)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_SEQUENCES = (list, collections.abc.Sequence, collections.abc.Iterable)


def _conforms(value: Any, typ: Any) -> tuple[bool, Any]:
    """(does ``value`` fit ``typ``, the value to store). Types it does not know are accepted."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is Any:
        return True, value
    if typ is type(None) or typ is None:
        return value is None, value
    if origin in _UNION:
        for arm in args:
            ok, out = _conforms(value, arm)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if typ is str:
        return isinstance(value, str), value
    if typ is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            arms = [args[0] if args else Any] * len(value)
        elif len(args) == len(value):
            arms = list(args)
        else:
            return False, value
        items = [_conforms(v, a) for v, a in zip(value, arms)]
        return all(ok for ok, _ in items), tuple(out for _, out in items)
    if typ in _MAPPINGS or origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            return False, value
        kt, vt = args if len(args) == 2 else (Any, Any)
        items = [(_conforms(k, kt), _conforms(v, vt)) for k, v in value.items()]
        return all(a[0] and b[0] for a, b in items), {a[1]: b[1] for a, b in items}
    if typ in _SEQUENCES or origin in _SEQUENCES:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            return False, value
        items = [_conforms(v, args[0] if args else Any) for v in value]
        return all(ok for ok, _ in items), type(value)(out for _, out in items)
    return True, value


def _describe(typ: Any) -> str:
    """The declared type in words: ``a number``, ``an int or null``, ``a list of numbers``."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in _UNION:
        return " or ".join(_describe(a) for a in args)
    if typ is type(None) or typ is None:
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if typ is tuple or origin is tuple:
        if args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if typ in _MAPPINGS or origin in _MAPPINGS:
        return 'a mapping such as {"depth": 2}'
    if typ in _SEQUENCES or origin in _SEQUENCES:
        return f"a list of {_plural(args[0])}" if args else "a list"
    return {bool: "true or false", int: "an int", float: "a number",
            str: "a string"}.get(typ, getattr(typ, "__name__", str(typ)))


def _plural(typ: Any) -> str:
    return {bool: "booleans", int: "ints", float: "numbers", str: "strings"}.get(typ, "values")


def _kind(value: Any) -> str:
    """The JSON kind of a value, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _brief(value: Any) -> str:
    """``repr(value)`` cut to 60 characters (a hostile config.json may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            return _number(text)
        if typ is str:
            return text
        if typing.get_origin(typ) is tuple:
            val = ast.literal_eval(text)
            return tuple(val) if isinstance(val, (list, tuple)) else (val,)
    except (ValueError, SyntaxError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key}={text!r} is not a valid {name}") from None
    return _literal(text)


def _number(text: str) -> float:
    """A float from ``0.5``, ``1e-3`` or a fraction ``8/255`` (pixel-unit radii read best so)."""
    if "/" in text:
        num, _, den = text.partition("/")
        top, bottom = float(num), float(den)  # ValueError for anything but two numbers
        value = top / bottom if bottom else math.inf
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    return float(text)


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
            inner = new.get(parts[0], {})
            if not isinstance(inner, Mapping):
                here = full[: len(full) - len(".".join(parts[1:])) - 1]
                raise ConfigError(f"{here} is a value ({_show(inner)}), not a mapping; "
                                  f"use {here}=...")
            new[parts[0]] = _set(inner, parts[1:], text, full)
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
        val = check_type(val, hints[head], full)
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
    for section in ("train", "optim", "pretrain"):
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
        (t.max_bad_steps >= 1,
         f"train.max_bad_steps must be >= 1 (steps in a row with a non-finite loss or gradient "
         f"before the run stops), got {t.max_bad_steps}"),
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
        (t.decay in DECAYS, f"train.decay must be one of {', '.join(DECAYS)}, got {_brief(t.decay)}"),
        (t.adversarial in ATTACKS,
         f"train.adversarial must be one of {', '.join(ATTACKS)}, got {_brief(t.adversarial)}"),
        (0 <= t.adv_eps <= 1,
         f"train.adv_eps must be in [0, 1] (pixel units of [0, 1] images, e.g. 0.0314 for 8/255), "
         f"got {t.adv_eps}"),
        (t.adv_steps >= 1, f"train.adv_steps must be >= 1 (PGD iterations), got {t.adv_steps}"),
        (t.adv_step_size is None or t.adv_step_size > 0,
         f"train.adv_step_size must be > 0 (pixel units) or none (the attack's default), "
         f"got {t.adv_step_size}"),
        # the name starts the run folder's name inside out_dir: it must not lead out of it
        ("/" not in cfg.name and "\\" not in cfg.name and cfg.name not in (".", ".."),
         f"name {cfg.name!r} must be a plain name (no / or ..): it names the run folder in out_dir"),
    ]
    for ok, msg in checks + _pretrain_checks(cfg):
        if not ok:
            raise ConfigError(msg)
    check_device(t.device, "train.device")
    from .train.fastpath import validate_fastpath

    validate_fastpath(cfg)
    from .optim.factory import validate as validate_optim

    try:
        validate_optim(cfg.optim)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _pretrain_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """The checks of a pre-training run (none for a supervised one)."""
    from .pretrain.simclr import OBJECTIVES

    p, t = cfg.pretrain, cfg.train
    if p.objective == "none":
        return []
    if p.objective not in OBJECTIVES:
        return [(False, f"pretrain.objective must be none or one of {', '.join(OBJECTIVES)}, "
                        f"got {p.objective!r}")]
    why = "NT-Xent compares every image of the batch with every other, so the batch cannot be split"
    return [
        (t.micro_batch is None, f"train.micro_batch must be none for pre-training: {why}"),
        (cfg.optim.m is None, f"optim.m must be none for pre-training (m-sharpness splits the "
                              f"batch into chunks): {why}"),
        (t.batch_size >= 2, f"train.batch_size must be >= 2 for pre-training (negatives come "
                            f"from the other images), got {t.batch_size}"),
        (t.label_smoothing == 0, "train.label_smoothing must be 0 for pre-training (the targets "
                                 "are the positive pairs)"),
        (cfg.data.augment != "strong", "data.augment=strong (Mixup) does not fit pre-training; "
                                       "the views are augmented by pretrain.* (use none or basic)"),
        (not cfg.data.label_noise, "data.label_noise does not fit pre-training: it does not "
                                   "read the training labels"),
        (cfg.model.init_from is None, "model.init_from is for fine-tuning; pre-training starts "
                                      "from random weights"),
        (p.temperature > 0, f"pretrain.temperature must be > 0, got {p.temperature}"),
        (p.proj_dim >= 1, f"pretrain.proj_dim must be >= 1, got {p.proj_dim}"),
        (p.proj_hidden is None or p.proj_hidden >= 1,
         f"pretrain.proj_hidden must be >= 1 or none, got {p.proj_hidden}"),
        (0 < p.crop_min <= 1, f"pretrain.crop_min must be in (0, 1], got {p.crop_min}"),
        (p.jitter >= 0, f"pretrain.jitter must be >= 0, got {p.jitter}"),
        *[(0 <= getattr(p, k) <= 1, f"pretrain.{k} must be a probability in [0, 1], "
                                    f"got {getattr(p, k)}") for k in ("jitter_p", "gray_p")],
        (p.knn_k >= 1, f"pretrain.knn_k must be >= 1, got {p.knn_k}"),
        (p.knn_samples >= 1, f"pretrain.knn_samples must be >= 1, got {p.knn_samples}"),
        *[(getattr(p, k) is None or getattr(p, k) >= 1, f"pretrain.{k} must be >= 1 or none "
                                                        f"(all), got {getattr(p, k)}")
          for k in ("probe_train_samples", "probe_test_samples")],
        (p.probe_l2 >= 0, f"pretrain.probe_l2 must be >= 0, got {p.probe_l2}"),
    ]


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
