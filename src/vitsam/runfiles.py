"""Checked reading of the result files of run and study folders (what tables and reports read).

``read_run_file(path, kind)`` reads a JSON object and checks the fields that readers use against
``SCHEMAS[kind]``, so a damaged or hand-edited file is one ``DamagedFileError`` naming the file,
the key and what it should hold, never a ``KeyError`` or ``TypeError`` deep inside a table or a
figure. A schema is a dict (a JSON object: each listed key is checked when present, and must be
present when written ``"key!"``; ``"*"`` checks every value), a one-element list (a JSON list of
that), or a leaf: ``NUM`` (a number, not a boolean), ``STR``, ``BOOL``, ``ANY``, ``NUMS`` (a list
of numbers), a tuple of leaves (any of them), or ``REL`` (a path relative to the file's folder,
which must stay inside it: ``vitsam.io.inside``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import DamagedFileError, inside, read_json

NUM, STR, BOOL, ANY, NULL, REL = "a number", "a string", "true or false", "anything", "null", "a relative path"
NUMS = [NUM]

_RESULT = {"result!": {"lambda_max": NUM, "loss": NUM}, "settings": {"*": ANY}, "samples": NUM}
SCHEMAS: dict[str, dict[str, Any]] = {
    "final": {"test_acc!": NUM, "train_acc": (NUM, NULL), "params": (NUM, NULL),
              "train_images_per_s": (NUM, NULL), "wall_time_s": (NUM, NULL), "name": STR,
              "label_noise": {"noisy_memorised": NUM, "noisy_true": NUM, "num_noisy": NUM},
              "probe_acc": NUM, "knn_acc": NUM, "contrastive_loss": (NUM, NULL),
              "probe": {"train_acc": NUM},
              "adversarial": {"attack": STR, "eps": NUM, "train_adv_acc": (NUM, NULL)}},
    "analysis": {"*": {"result!": {"*": ANY}},
                 "hessian": {**_RESULT, "result!": {
                     **_RESULT["result!"],
                     "per_block": {"blocks!": [{"block!": STR, "lambda_max!": NUM}]}}},
                 "hessian_augmented": _RESULT,
                 "trajectory": {"result!": {"explained": NUMS}},
                 "ntk": {"result!": {"at_init": {"kappas": NUMS}, "convention": STR}},
                 "sparsity": {"result!": {"layers": {"*": {"mean_active_pct_per_image": NUM}}}},
                 "attention": {"result!": {"supported": BOOL, "entropy_per_block": NUMS}}},
    "eval": {"corruptions": {"mean_corruption_accuracy": (NUM, NULL), "params": STR, "n": NUM},
             "attack_pgd": {"clean_acc!": NUM, "robust_acc!": NUM, "eps": NUM, "samples": NUM}},
    "sharpness": {"checkpoints!": [{"step!": NUM, "lambda_max!": NUM, "loss!": NUM}],
                  "logged!": [{"step!": NUM, "sharpness!": NUM}]},
    "transfer": {"test_acc!": NUM, "train_acc": (NUM, NULL), "data!": STR, "run": STR},
    "config": {"model!": {"name!": STR}, "optim!": {"sam": BOOL}, "data!": {"augment": STR,
               "train_fraction": NUM}, "train!": {"seed": NUM}},
    "study": {"study!": STR, "description": STR, "scale": STR, "seeds!": NUMS, "command": (STR, NULL),
              "stages": [STR], "columns!": [STR], "wall_time_s": (NUM, NULL), "scale_notes": STR,
              "grid!": [{"name!": REL, "family!": STR, "method!": STR, "seed": NUM, "fraction": NUM}],
              "cells!": {"*": {"status": STR}}},
}
WHAT = {"final": "final results", "analysis": "analysis file", "eval": "evaluation file",
        "sharpness": "sharpness file", "transfer": "transfer result", "config": "run config", "study": "study record"}


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _leaf_ok(v: Any, leaf: str, folder: Path, where: str) -> bool:
    if leaf == ANY:
        return True
    if leaf == NULL:
        return v is None
    if leaf == NUM:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if leaf == STR:
        return isinstance(v, str)
    if leaf == BOOL:
        return isinstance(v, bool)
    if leaf == REL:
        inside(folder, v, where)
        return True
    raise AssertionError(leaf)


def _describe(schema: Any) -> str:
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    if isinstance(schema, tuple):
        return " or ".join(schema)
    return schema


def check(data: Any, schema: Any, path: Path) -> None:
    """Raise a one-line ``DamagedFileError`` unless ``data`` (read from ``path``) fits ``schema``."""
    _check(data, schema, "", Path(path))


def _check(v: Any, schema: Any, key: str, path: Path) -> None:
    where = f"{path} ({key})"
    if isinstance(schema, dict):
        if not isinstance(v, dict):
            raise _bad(path, key, v, "an object")
        for k, sub in schema.items():
            name = k.rstrip("!")
            if name == "*":
                for kk, vv in v.items():
                    _check(vv, sub, f"{key}.{kk}" if key else kk, path)
            elif name in v:
                _check(v[name], sub, f"{key}.{name}" if key else name, path)
            elif k.endswith("!"):
                raise DamagedFileError(f"{path} lacks {f'{key}.{name}' if key else name!r}; the file "
                                       "is damaged or from another program: write it again (re-run "
                                       "the command that made it) or delete it")
    elif isinstance(schema, list):
        if not isinstance(v, list):
            raise _bad(path, key, v, "a list")
        for i, item in enumerate(v):
            _check(item, schema[0], f"{key}[{i}]", path)
    else:
        leaves = schema if isinstance(schema, tuple) else (schema,)
        if not any(_leaf_ok(v, leaf, path.parent, where) for leaf in leaves):
            raise _bad(path, key, v, _describe(schema))


def _bad(path: Path, key: str, v: Any, want: str) -> DamagedFileError:
    return DamagedFileError(f"{path}: {key or 'the file'} is {_kind(v)}, not {want}; the file is "
                            "damaged or from another program: write it again (re-run the command "
                            "that made it) or delete it")


def read_run_file(path: str | Path, kind: str) -> dict[str, Any]:
    """The JSON object in ``path``, checked against ``SCHEMAS[kind]`` (see the module docstring)."""
    path = Path(path)
    data = read_json(path, WHAT[kind], "write it again (re-run the command that made it) or delete it")
    check(data, SCHEMAS[kind], path)
    return data
