"""Self-describing checkpoints and run folders.

A run folder::

    config.json            full RunConfig
    data.json              mean/std, classes and preprocessing of the training data, which every
                           evaluation feeds the model with (``vitsam.data.record``); a derived
                           run (``save_model_run``, e.g. pruned) carries its source run's
    metrics.jsonl          one JSON record per logged step / evaluation
    checkpoints/
        latest.json        {"name": "step-00000300", "step": ...}, rewritten atomically
        step-00000300/     model.safetensors  weights
                           optim.safetensors  optimiser tensors (moments, momentum buffers)
                           state.json         step, epoch, model spec, config, optimiser and
                                              scheduler structure, RNG states, checksums
    final.json             test accuracy, wall time, images/s (when training finished)
    analysis.json, eval.json   results of ``vitsam analyze`` / ``vitsam eval``
    cell.json              study cells only: the marker of the stages done, written last
                           (``vitsam.study.stages``)
    .vitsam-train.lock     held by the process writing the folder (train, prune; ``runlock``)

A checkpoint folder is written under a temporary name and renamed into place, and
``latest.json`` is replaced only after that, so an interruption never leaves a damaged
"latest" checkpoint and never removes one that was complete. A write that fails (a full disk)
removes its half-written folder and raises ``CheckpointWriteError`` (an ``OSError``) naming the
checkpoint that is still the latest. A checkpoint damaged later (a truncated copy, a bad disk)
fails its checksums; ``read_latest_good`` then falls back to the newest older one that reads
back whole.

Keeping only the newest N checkpoints (``keep``) deletes nothing but the run's own periodic
checkpoints: folders named exactly ``step-NNNNNNNN`` whose ``state.json`` is a vitsam checkpoint
of that name and step. Anything else under ``checkpoints/`` (a user's ``best-step3``, a copy
``step-3-copy``, ``final``) is never counted and never deleted.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import faults
from ..data.record import RECORD_FILE, copy_data_record
from ..io import atomic_write_json, read_json, sha256_file

FORMAT = "vitsam-checkpoint/1"
_STEP_NAME = re.compile(r"step-(\d{8,})")
_SCRATCH_NAME = re.compile(r"\.(tmp|old)-(.+)-(\d+)")  # save_checkpoint's own scratch folders


def step_name(step: int) -> str:
    """The name of the periodic checkpoint after optimiser step ``step``: ``step-00000300``."""
    return f"step-{step:08d}"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used (missing, damaged, or mismatched)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


# -- nested state <-> (JSON, flat tensors) -------------------------------------------------------

def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (optimizer/scheduler state dicts) into JSON and a flat tensor dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().cpu().clone().contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            if o and all(isinstance(k, int) for k in o):
                return {"__intdict__": [[k, walk(v, f"{path}/{k}")] for k, v in o.items()]}
            return {str(k): walk(v, f"{path}/{k}") for k, v in o.items()}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        return o

    return walk(obj, prefix), tensors


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__intdict__" in obj:
            return {int(k): unflatten_state(v, tensors) for k, v in obj["__intdict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, str]:
    """Torch CPU (and CUDA) generator states, base64-encoded for JSON."""
    enc = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        enc["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                       for s in torch.cuda.get_rng_state_all()]
    return enc


def set_rng_state(enc: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (a damaged record is a one-line CheckpointError)."""
    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)

    try:
        torch.set_rng_state(dec(enc["torch"]))
        if "cuda" in enc and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([dec(s) for s in enc["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"the checkpoint's random-generator state is damaged ({first}); "
                              "resume from another checkpoint or train the run again") from None


# -- writing -------------------------------------------------------------------------------------

def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): clone each one.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: str | Path, name: str, model: nn.Module, model_spec: dict,
                    config: dict, step: int, epoch: int, optimizer: Any = None,
                    scheduler: Any = None, scaler: Any = None, extra: dict | None = None,
                    keep: int | None = None) -> Path:
    """Atomically write checkpoint ``name`` into ``run_dir/checkpoints`` and point latest at it.

    Raises ``CheckpointWriteError`` (one line) when the disk refuses a write; what was written
    before stays as it was.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    final = ckpt_root / name
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_state_dict_cpu(model), str(tmp / "model.safetensors"))
        faults.point("ckpt_write")
        state: dict[str, Any] = {"format": FORMAT, "name": name, "step": step, "epoch": epoch,
                                 "model_spec": model_spec, "config": config, "rng": rng_state(),
                                 "extra": extra or {}}
        tensors: dict[str, torch.Tensor] = {}
        for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None:
                state[key], t = flatten_state(obj.state_dict(), key)
                tensors.update(t)
        if tensors:
            save_file(tensors, str(tmp / "optim.safetensors"))
        state["sha256"] = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        atomic_write_json(tmp / "state.json", state)
        if final.exists():  # same name again (e.g. after a resume): swap, then delete the old copy
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_json(ckpt_root / "latest.json", {"name": name, "step": step, "epoch": epoch})
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written copy only takes space
        err = CheckpointWriteError(f"cannot write checkpoint {name} in {ckpt_root} "
                                   f"({_reason(exc)}); {_still_latest(ckpt_root)}")
        err.errno = _errno(exc)
        raise err from exc
    if keep:
        _prune_old(ckpt_root, keep, protect=name)
    # Half-written folders left by an interrupted earlier process hold a full copy of the
    # weights each; nothing refers to them.
    for stale in ckpt_root.iterdir():
        match = _SCRATCH_NAME.fullmatch(stale.name)
        if match and stale.is_dir() and int(match.group(3)) != os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _reason(exc: BaseException) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: path'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write; safetensors only names it in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    match = re.search(r"os error (\d+)", str(exc))
    return int(match.group(1)) if match else None


def _still_latest(ckpt_root: Path) -> str:
    """Which checkpoint a failed write left as the latest, for its message."""
    try:
        name = read_json(ckpt_root / "latest.json", "checkpoint pointer")["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no earlier checkpoint was changed"
    return f"the previous checkpoint {name} is intact"


def _prune_old(ckpt_root: Path, keep: int, protect: str) -> None:
    """Delete all but the newest ``keep`` of the run's own step checkpoints (never ``protect``).

    Each is first renamed to a scratch name, so an interruption mid-delete never leaves a
    half-deleted folder under a checkpoint's name (the next save removes the scratch folder).
    """
    own = _own_step_checkpoints(ckpt_root)
    for _, old in own[: max(0, len(own) - keep)]:
        if old != protect:
            doomed = ckpt_root / f".old-{old}-{os.getpid()}"
            shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier process of this pid
            os.replace(ckpt_root / old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _own_step_checkpoints(ckpt_root: Path) -> list[tuple[int, str]]:
    """(step, name) of the periodic checkpoints written by ``save_checkpoint`` under
    ``ckpt_root``, oldest first: the name matches ``step-NNNNNNNN`` exactly and its state.json
    records that name, that step and this format."""
    found = []
    for p in ckpt_root.iterdir() if ckpt_root.is_dir() else ():
        match = _STEP_NAME.fullmatch(p.name)
        if not (match and p.is_dir()):
            continue
        try:
            state = read_json(p / "state.json", "checkpoint state")
        except (OSError, ValueError):
            continue
        if (isinstance(state, dict) and state.get("format") == FORMAT
                and state.get("name") == p.name and state.get("step") == int(match.group(1))):
            found.append((int(match.group(1)), p.name))
    return sorted(found)


# -- reading -------------------------------------------------------------------------------------

def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Names of complete checkpoints (those with a state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "state.json").exists())


def resolve_checkpoint(run_dir: str | Path, which: str = "last") -> Path:
    """The folder of checkpoint ``which`` ("last", "final" or a name such as epoch-0003)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise CheckpointError(f"{run_dir} is a file, not a run folder; vitsam reads the run "
                              "folders `vitsam train` writes (safetensors and JSON) and never "
                              "unpickles a .pt/.pth checkpoint")
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; give the folder that "
                              "`vitsam train` printed")
    root = run_dir / "checkpoints"
    names = list_checkpoints(run_dir)
    if not names:
        raise CheckpointError(f"{run_dir} holds no checkpoint (no checkpoints/*/state.json); "
                              "is it a vitsam run folder, and did training save at least once?")
    if which == "last":
        # The pointer names the newest complete checkpoint; if it is missing, damaged or points
        # at a folder that is gone, the newest complete one is the same thing.
        try:
            which = read_json(root / "latest.json", "checkpoint pointer")["name"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            which = None
        if which not in names:  # the run's newest step checkpoint, not a user's copy
            own = _own_step_checkpoints(root)
            which = own[-1][1] if own else names[-1]
    if which not in names:
        raise CheckpointError(f"checkpoint {which!r} not found in {run_dir}; "
                              f"available: {', '.join(names)}")
    return root / which


def read_checkpoint(ckpt_dir: Path, optimizer: bool = True
                    ) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, model tensors, optimiser tensors) of a checkpoint folder, checksums verified.

    ``optimizer=False`` leaves the optimiser file unread (its tensors come back empty): the
    weights alone are all that evaluation and analyses need, and AdamW's state is twice their size.
    """
    try:
        state = read_json(ckpt_dir / "state.json", "checkpoint state")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        state = state if isinstance(state, dict) else {}
        raise CheckpointError(f"{ckpt_dir} is not a {FORMAT} checkpoint "
                              f"(format={_short(state.get('format'))})")
    _check_state(state, ckpt_dir / "state.json")
    others = [n for n in list_checkpoints(ckpt_dir.parent.parent) if n != ckpt_dir.name]
    alt = (f"; other checkpoints: {', '.join(others)} (pick one with --checkpoint NAME, or "
           f"delete {ckpt_dir} to fall back to the newest of them)" if others else
           "; restore it from a copy, or train the run again")
    tensors = []
    for fname in ("model.safetensors", "optim.safetensors")[:2 if optimizer else 1]:
        path = ckpt_dir / fname
        if not path.exists():
            if fname == "model.safetensors":
                raise CheckpointError(f"{path} is missing{alt}")
            tensors.append({})
            continue
        want = state.get("sha256", {}).get(fname)
        if want and sha256_file(path) != want:
            raise CheckpointError(f"{path} is damaged (checksum mismatch){alt}")
        try:
            tensors.append(load_file(str(path)))
        except BaseException as exc:  # noqa: BLE001 - safetensors' Rust panics are BaseExceptions
            if not isinstance(exc, (SafetensorError, OSError, ValueError)) and \
                    type(exc).__name__ != "PanicException":
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(f"{path} cannot be read ({first}){alt}") from None
    return state, tensors[0], tensors[1] if optimizer else {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_state(state: dict, path: Path) -> None:
    """One-line CheckpointError unless ``state`` has the fields readers use, of the right types."""
    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key}={_short(_get(state, key))} must be {want}; the file is "
                               "damaged: restore it from a copy, or train the run again")

    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad("step", "a non-negative integer")
    sha = state.get("sha256", {})
    if not isinstance(sha, dict) or not all(isinstance(v, str) for v in sha.values()):
        raise bad("sha256", "an object of file name: checksum")
    for key in ("config", "extra", "rng"):
        if key in state and not isinstance(state[key], dict):
            raise bad(key, "an object")
    spec = state.get("model_spec")
    if spec is not None:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad("model_spec", "an object with the model's name")
        for key in ("num_classes", "img_size", "in_chans"):
            v = spec.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(f"model_spec.{key}", "a positive integer")
        if not isinstance(spec.get("kwargs", {}), dict):
            raise bad("model_spec.kwargs", "an object")


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def read_latest_good(run_dir: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor], list[str]]:
    """The newest checkpoint of a training run that reads back whole, for resuming it.

    Tried in turn: the one ``latest.json`` names, then the run's other ``step-NNNNNNNN``
    folders, newest first (also those whose state.json no longer parses). Returns (folder,
    state, model tensors, optimiser tensors, problems): one line per newer checkpoint passed
    over, naming it and what is wrong. Raises ``CheckpointError`` when none can be read.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    try:
        pointed = read_json(root / "latest.json", "checkpoint pointer")["name"]
    except (OSError, ValueError, KeyError, TypeError):
        pointed = None
    folders = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    steps = sorted(((int(m.group(1)), n) for n in folders if (m := _STEP_NAME.fullmatch(n))),
                   reverse=True)
    # Only folders of checkpoints/ itself: a pointer such as "../x" names nothing.
    order = [n for n in [pointed, *(name for _, name in steps)]
             if isinstance(n, str) and n in folders]
    problems: list[str] = []
    for name in dict.fromkeys(order):  # unique, in order
        if name not in list_checkpoints(run_dir):
            problems.append(f"{root / name} has no state.json")
            continue
        try:
            state, weights, opt = read_checkpoint(root / name)
        except CheckpointError as exc:
            problems.append(str(exc).split("; ")[0])
            continue
        return root / name, state, weights, opt, problems
    if not problems:  # no step checkpoint at all: whatever "last" means for this folder
        ckpt = resolve_checkpoint(run_dir, "last")
        return (ckpt, *read_checkpoint(ckpt), problems)
    raise CheckpointError(f"no checkpoint of {run_dir} can be read: {'; '.join(problems)}; "
                          "restore one from a copy, or delete the checkpoints folder to train "
                          "the run again from the start")


@dataclass
class LoadedRun:
    """A run's model (eval mode, weights loaded) and everything that describes it."""

    run_dir: Path
    model: nn.Module
    model_spec: dict
    config: dict
    step: int
    checkpoint: Path

    def data_config(self) -> Any:
        """The run's ``DataConfig`` at the model's image size (what every command evaluates on)."""
        from dataclasses import replace

        from ..config import from_dict
        from ..data import DataConfig

        if not isinstance(self.config.get("data"), dict):
            raise CheckpointError(f"the config saved in {self.checkpoint} has no 'data' section, "
                                  "so the run's data set is unknown; this needs a run folder "
                                  "written by `vitsam train` or `vitsam prune`")
        return replace(from_dict(DataConfig, self.config["data"]),
                       img_size=int(self.model_spec["img_size"]))


def load_run(run_dir: str | Path, which: str = "last", device: str | torch.device = "cpu",
             classifier: bool = True) -> LoadedRun:
    """Rebuild a run's model from its folder alone.

    A pre-training run's model (``model_spec["contrastive"]``) has no classifier: every command
    that needs one (evaluation, the analyses, pruning) gets a one-line error saying what to do
    instead; ``classifier=False`` (fine-tuning, probes) loads it.
    """
    from ..models import build_from_spec

    ckpt = resolve_checkpoint(run_dir, which)
    state, weights, _ = read_checkpoint(ckpt, optimizer=False)
    spec = state.get("model_spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{ckpt / 'state.json'} has no model spec; restore it or train the "
                              "run again")
    if classifier and isinstance(spec.get("contrastive"), dict):
        what = spec["contrastive"].get("objective", "contrastive")
        raise CheckpointError(f"{run_dir} is a {what} pre-training run: its model has no "
                              f"classifier, which this needs; `vitsam probe {run_dir}` measures "
                              f"its features, `vitsam finetune {run_dir} --data ... --out ...` "
                              "gives it a classifier (then analyse that run)")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{ckpt / 'state.json'} has no config; restore it or train the run again")
    _check_weights(ckpt, spec, weights)  # on the meta device: nothing allocated for a bad spec
    model = build_from_spec(spec)
    model.load_state_dict(weights, strict=True)
    model.to(device).eval()
    return LoadedRun(Path(run_dir), model, state["model_spec"], state["config"],
                     int(state["step"]), ckpt)


def _check_weights(ckpt: Path, spec: dict, weights: dict[str, torch.Tensor]) -> None:
    """One-line CheckpointError unless the model ``spec`` names can be built and ``weights`` hold
    exactly its tensors (names, shapes, dtypes)."""
    from ..models import ModelError, build_from_spec

    try:
        with torch.device("meta"):
            shell = build_from_spec(spec)
    except (ModelError, ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first if len(first) <= 300 else first[:297] + "..."  # a damaged name can be huge
        raise CheckpointError(f"the model spec in {ckpt / 'state.json'} cannot be built: {first}; "
                              "the checkpoint is damaged or from another vitsam version") from None
    want = {k: (tuple(v.shape), v.dtype) for k, v in shell.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                 (f"{len(wrong)} of another shape or type (e.g. {wrong[0]}: {got[wrong[0]][0]} "
                  f"{str(got[wrong[0]][1])[6:]} in the file, {want[wrong[0]][0]} "
                  f"{str(want[wrong[0]][1])[6:]} in the model)") if wrong else ""]
        raise CheckpointError(f"weights in {ckpt / 'model.safetensors'} do not match the model "
                              f"{spec['name']!r} that its state.json describes: "
                              f"{', '.join(p for p in parts if p)}; the checkpoint's files come "
                              "from different runs or were edited: restore it or train the run again")


def check_new_run_dir(out_dir: str | Path, flag: str = "--out") -> Path:
    """``out_dir`` if a derived run may be written there: absent, an empty folder, or a folder
    written earlier by ``save_model_run`` (overwritten). A training run or any other non-empty
    folder is refused, so nothing there is overwritten."""
    from .runlock import LOCK_FILE  # runlock imports this module

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{flag} {out} is a file; give a folder for the new run")
    if not out.is_dir() or all(p.name == LOCK_FILE for p in out.iterdir()):
        return out
    ckpts = out / "checkpoints"
    derived = ((out / "config.json").is_file() and not (out / "metrics.jsonl").exists()
               and ckpts.is_dir() and all(p.name in ("final", "latest.json") or p.name.startswith(".")
                                          for p in ckpts.iterdir()))
    if not derived:
        what = "a training run" if (out / "metrics.jsonl").exists() or ckpts.is_dir() else \
            "other files"
        raise CheckpointError(f"{flag} {out} already holds {what}; choose a new folder")
    return out


def save_model_run(out_dir: str | Path, model: nn.Module, model_spec: dict, config: dict,
                   extra: dict | None = None, step: int = 0, data_from: str | Path | None = None) -> Path:
    """Write a new, complete run folder holding ``model`` (for derived models, e.g. pruned).

    ``out_dir`` must be new, empty, or an earlier derived run (see ``check_new_run_dir``).
    ``data_from``: the run the model was derived from; its ``data.json`` (the normalisation and
    preprocessing evaluation feeds the model with) is copied, as deriving does not change the data.
    """
    out = check_new_run_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    if data_from is not None:
        copy_data_record(data_from, out)
    else:  # never keep the record of an earlier derived run written here
        (out / RECORD_FILE).unlink(missing_ok=True)
    save_checkpoint(out, "final", model, model_spec, config, step=step, epoch=0, extra=extra)
    return out


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Short labels for figures: folder names without their time stamp, when still unique."""
    import re

    names = [Path(r).name for r in run_dirs]
    short = [re.sub(r"-\d{8}-\d{6}(-\d+)?$", "", n) for n in names]
    return short if len(set(short)) == len(short) else names
