"""The paper's released checkpoints, read into the zoo's (timm's) parameter names.

Two published formats are read, never downloaded:

* ``.npz`` files of google-research/vision_transformer (JAX/Flax parameters flattened with
  ``/``; an optional ``opt/target/`` prefix is the optimiser wrapper of older files).
  ViT: ``embedding/kernel`` (p, p, C, D) HWIO, ``cls`` (1, 1, D),
  ``Transformer/posembed_input/pos_embedding`` (1, 1 + N, D), per block ``i``
  ``Transformer/encoderblock_i/LayerNorm_0`` (pre-attention), ``.../MultiHeadDotProductAttention_1/
  {query,key,value}/kernel`` (D, heads, head_dim) with biases (heads, head_dim), ``.../out/kernel``
  (heads, head_dim, D), ``.../LayerNorm_2`` (pre-MLP), ``.../MlpBlock_3/Dense_{0,1}``, then
  ``Transformer/encoder_norm`` and ``head`` (D, classes). Mixer: ``stem`` (p, p, C, D),
  ``MixerBlock_i/LayerNorm_{0,1}``, ``MixerBlock_i/{token,channel}_mixing/Dense_{0,1}``,
  ``pre_head_layer_norm``, ``head``. Dense kernels are (in, out): torch's weight is the transpose.
* ``.safetensors`` holding a timm state dict (timm's ``vit_base_patch16_224.sam_in1k`` weights
  saved locally, or a timm Mixer): the zoo's ViT and Mixer are timm's classes, so the names are
  the zoo's own.

``read_released(path)`` returns a ``Released``: the family, the architecture read from the tensor
shapes, and the state dict in timm names, each tensor remembering the file key it came from so
that ``check_shapes`` names that key when a model does not fit. A layout this module does not
know, a missing key, a key left over (e.g. a ViT ``pre_logits`` representation layer, which the
zoo's ViT does not have) or inconsistent shapes are one-line ``ReleasedError``s naming the key.

Both formats' models were trained on inputs scaled to [-1, 1] (mean = std = 0.5 per channel,
``NORMALISATION``). The JAX models use the tanh approximation of GELU, timm's (and so the zoo's)
the exact one, as timm does when it loads these files; logits differ by float-rounding-sized
amounts, not in accuracy.
"""
from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

NORMALISATION = (0.5, 0.5)  # (mean, std) of every channel, on the 0-1 scale
_JAX_PREFIXES = ("opt/target/",)


class ReleasedError(ValueError):
    """A checkpoint file whose layout or shapes do not fit the zoo's models."""


@dataclass
class Released:
    """A released checkpoint read into timm names.

    family: "vit" | "mixer". arch: the architecture read from the shapes (``patch_size``,
    ``embed_dim``, ``depth`` / ``num_blocks``, ``num_heads`` (None when the file cannot tell,
    timm ViT files), ``mlp_ratio``, ``num_classes``, ``img_size``, ``in_chans``). state:
    {timm name: float32 tensor}; origin: {timm name: file key}. layout: a short name of the format.
    """

    path: Path
    family: str
    layout: str
    arch: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)
    origin: dict[str, str] = field(repr=False)


def read_released(path: str | Path) -> Released:
    """Read a released ``.npz`` or timm ``.safetensors`` checkpoint (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ReleasedError(f"checkpoint file {path} does not exist" if not path.exists() else
                            f"{path} is a folder; give the .npz or .safetensors file")
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix == ".safetensors":
        return _read_timm(path)
    raise ReleasedError(f"{path}: unknown checkpoint format {path.suffix or '(no suffix)'!r}; "
                        "vitsam imports the .npz files of google-research/vision_transformer and "
                        "timm state dicts saved as .safetensors")


# -- reading -------------------------------------------------------------------------------------

class _Keys:
    """The file's tensors by key; ``take`` marks keys used, so keys left over can be named."""

    def __init__(self, path: Path, arrays: dict[str, Any], layout: str) -> None:
        self.path, self.arrays, self.layout = path, arrays, layout
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.arrays

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get(key, mark=False).shape)

    def get(self, key: str, mark: bool = True) -> Any:
        if key not in self.arrays:
            raise ReleasedError(f"{self.path} lacks {key!r}, which the {self.layout} layout has; "
                                "the file is incomplete or of another architecture")
        if not np.issubdtype(np.asarray(self.arrays[key]).dtype, np.floating):
            raise ReleasedError(f"{self.path}: {key!r} holds {np.asarray(self.arrays[key]).dtype} "
                                "values where float weights belong; the file is damaged or not "
                                "a checkpoint of weights")
        if mark:
            self.used.add(key)
        return self.arrays[key]

    def leftover(self) -> None:
        rest = sorted(set(self.arrays) - self.used)
        if rest:
            more = f" (and {len(rest) - 1} more)" if len(rest) > 1 else ""
            raise ReleasedError(f"{self.path} holds {rest[0]!r}{more}, which the zoo's "
                                f"{self.layout.split(' ')[0]} has no place for; only the plain "
                                "classifier checkpoints of that layout can be imported")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ReleasedError(f"{path} cannot be read as .npz ({first}); is the download "
                            "complete?") from None


def _read_npz(path: Path) -> Released:
    arrays = _load_npz(path)
    for prefix in _JAX_PREFIXES:
        if any(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if "embedding/kernel" in arrays and "Transformer/encoderblock/LayerNorm_0/scale" in arrays:
        raise ReleasedError(f"{path} is a big_vision ViT (blocks stacked under "
                            "'Transformer/encoderblock/'); vitsam imports the per-block layout "
                            "of google-research/vision_transformer ('Transformer/encoderblock_0/')")
    if "embedding/kernel" in arrays:
        return _vit_npz(_Keys(path, arrays, "ViT .npz"))
    if "stem/kernel" in arrays:
        return _mixer_npz(_Keys(path, arrays, "Mixer .npz"))
    some = ", ".join(repr(k) for k in sorted(arrays)[:3]) or "no arrays"
    raise ReleasedError(f"{path} is not a ViT or Mixer checkpoint of google-research/"
                        f"vision_transformer (no 'embedding/kernel' or 'stem/kernel'; it holds "
                        f"{some}, ...)")


def _t(a: Any) -> torch.Tensor:
    """A float32 tensor sharing a float32 array's memory (copied only when read-only or of
    another float type: a ViT-B file is 330 MB)."""
    arr = np.asarray(a).astype(np.float32, copy=False)  # float dtypes: checked by _Keys.get
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _count(keys: _Keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys.arrays if (m := re.fullmatch(pattern, k))}
    n = len(found)
    if found != set(range(n)):
        missing = min(set(range(max(found) + 1)) - found)
        prefix = pattern.split("(")[0].replace("\\", "")  # the key up to the block number
        raise ReleasedError(f"{keys.path}: block {missing} is missing ({prefix}{missing}...) "
                            "although later blocks are present")
    return n


def _grid(keys: _Keys, key: str, tokens: int, prefix_tokens: int) -> int:
    side = math.isqrt(max(tokens - prefix_tokens, 0))
    if side * side != tokens - prefix_tokens or side == 0:
        raise ReleasedError(f"{keys.path}: {key!r} has {tokens} positions, not {prefix_tokens} + "
                            "a square grid of patches")
    return side


def _patch(keys: _Keys, key: str) -> tuple[int, int, int]:
    """(patch size, input channels, width) of a Flax HWIO patch kernel."""
    shape = keys.shape(key)
    if len(shape) != 4 or shape[0] != shape[1]:
        raise ReleasedError(f"{keys.path}: {key!r} has shape {shape}, not a square patch kernel "
                            "(p, p, channels, width)")
    return shape[0], shape[2], shape[3]


class _State:
    """The mapped state dict and, for each entry, the file key it came from."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}

    def put(self, name: str, tensor: torch.Tensor, key: str) -> None:
        self.state[name] = tensor.contiguous()
        self.origin[name] = key


def _dense(st: _State, keys: _Keys, src: str, dst: str) -> None:
    st.put(f"{dst}.weight", _t(keys.get(f"{src}/kernel")).T, f"{src}/kernel")
    st.put(f"{dst}.bias", _t(keys.get(f"{src}/bias")), f"{src}/bias")


def _norm(st: _State, keys: _Keys, src: str, dst: str) -> None:
    st.put(f"{dst}.weight", _t(keys.get(f"{src}/scale")), f"{src}/scale")
    st.put(f"{dst}.bias", _t(keys.get(f"{src}/bias")), f"{src}/bias")


def _conv(st: _State, keys: _Keys, src: str, dst: str) -> None:
    # HWIO -> OIHW
    st.put(f"{dst}.weight", _t(keys.get(f"{src}/kernel")).permute(3, 2, 0, 1), f"{src}/kernel")
    st.put(f"{dst}.bias", _t(keys.get(f"{src}/bias")), f"{src}/bias")


def _vit_npz(keys: _Keys) -> Released:
    patch, chans, dim = _patch(keys, "embedding/kernel")
    depth = _count(keys, r"Transformer/encoderblock_(\d+)/LayerNorm_0/scale")
    pos_key = "Transformer/posembed_input/pos_embedding"
    pos = keys.shape(pos_key)
    if len(pos) != 3:
        raise ReleasedError(f"{keys.path}: {pos_key!r} has shape {pos}, not (1, tokens, width)")
    side = _grid(keys, pos_key, pos[1], 1)
    q_key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    q = keys.shape(q_key)
    if depth == 0 or len(q) != 3 or q[0] != dim or q[1] * q[2] != dim:
        raise ReleasedError(f"{keys.path}: {q_key!r} has shape {q}, not (width {dim}, heads, "
                            f"head width) with heads x head width = {dim}")
    mlp_key = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    hidden = keys.shape(mlp_key)[-1]
    head = keys.shape("head/kernel")
    st = _State()
    _conv(st, keys, "embedding", "patch_embed.proj")
    st.put("cls_token", _t(keys.get("cls")), "cls")
    st.put("pos_embed", _t(keys.get(pos_key)), pos_key)
    for i in range(depth):
        src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        mha = f"{src}/MultiHeadDotProductAttention_1"
        _norm(st, keys, f"{src}/LayerNorm_0", f"{dst}.norm1")
        # (D, heads, head_dim) kernels: one (heads * head_dim, D) weight each, stacked q, k, v.
        qkv = [_t(keys.get(f"{mha}/{n}/kernel")) for n in ("query", "key", "value")]
        st.put(f"{dst}.attn.qkv.weight", torch.cat([w.reshape(w.shape[0], -1).T for w in qkv]),
               f"{mha}/query/kernel")
        st.put(f"{dst}.attn.qkv.bias", torch.cat([_t(keys.get(f"{mha}/{n}/bias")).reshape(-1)
                                                  for n in ("query", "key", "value")]),
               f"{mha}/query/bias")
        out = _t(keys.get(f"{mha}/out/kernel"))  # (heads, head_dim, D)
        st.put(f"{dst}.attn.proj.weight", out.reshape(-1, out.shape[-1]).T, f"{mha}/out/kernel")
        st.put(f"{dst}.attn.proj.bias", _t(keys.get(f"{mha}/out/bias")), f"{mha}/out/bias")
        _norm(st, keys, f"{src}/LayerNorm_2", f"{dst}.norm2")
        _dense(st, keys, f"{src}/MlpBlock_3/Dense_0", f"{dst}.mlp.fc1")
        _dense(st, keys, f"{src}/MlpBlock_3/Dense_1", f"{dst}.mlp.fc2")
    _norm(st, keys, "Transformer/encoder_norm", "norm")
    _dense(st, keys, "head", "head")
    keys.leftover()
    arch = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": q[1],
            "mlp_ratio": hidden / dim, "num_classes": head[-1], "img_size": side * patch,
            "in_chans": chans}
    return Released(keys.path, "vit", "vision_transformer .npz (ViT)", arch, st.state, st.origin)


def _mixer_npz(keys: _Keys) -> Released:
    patch, chans, dim = _patch(keys, "stem/kernel")
    depth = _count(keys, r"MixerBlock_(\d+)/LayerNorm_0/scale")
    tok_key = "MixerBlock_0/token_mixing/Dense_0/kernel"
    if depth == 0:
        raise ReleasedError(f"{keys.path} has no 'MixerBlock_0/...' blocks")
    tokens, tok_hidden = keys.shape(tok_key)
    side = _grid(keys, tok_key, tokens, 0)
    ch_hidden = keys.shape("MixerBlock_0/channel_mixing/Dense_0/kernel")[-1]
    head = keys.shape("head/kernel")
    st = _State()
    _conv(st, keys, "stem", "stem.proj")
    for i in range(depth):
        src, dst = f"MixerBlock_{i}", f"blocks.{i}"
        _norm(st, keys, f"{src}/LayerNorm_0", f"{dst}.norm1")
        _dense(st, keys, f"{src}/token_mixing/Dense_0", f"{dst}.mlp_tokens.fc1")
        _dense(st, keys, f"{src}/token_mixing/Dense_1", f"{dst}.mlp_tokens.fc2")
        _norm(st, keys, f"{src}/LayerNorm_1", f"{dst}.norm2")
        _dense(st, keys, f"{src}/channel_mixing/Dense_0", f"{dst}.mlp_channels.fc1")
        _dense(st, keys, f"{src}/channel_mixing/Dense_1", f"{dst}.mlp_channels.fc2")
    _norm(st, keys, "pre_head_layer_norm", "norm")
    _dense(st, keys, "head", "head")
    keys.leftover()
    arch = {"patch_size": patch, "embed_dim": dim, "num_blocks": depth,
            "mlp_ratio": (tok_hidden / dim, ch_hidden / dim), "num_classes": head[-1],
            "img_size": side * patch, "in_chans": chans}
    return Released(keys.path, "mixer", "vision_transformer .npz (Mixer)", arch, st.state,
                    st.origin)


def _read_timm(path: Path) -> Released:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except BaseException as exc:  # noqa: BLE001 - safetensors' Rust panics are BaseExceptions
        if not isinstance(exc, (SafetensorError, OSError, ValueError)) and \
                type(exc).__name__ != "PanicException":
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ReleasedError(f"{path} cannot be read as safetensors ({first})") from None
    state = {k: v.float().contiguous() for k, v in raw.items()}
    origin = {k: k for k in state}

    def shape(key: str, layout: str) -> tuple[int, ...]:
        if key not in state:
            raise ReleasedError(f"{path} lacks {key!r}, which the {layout} layout has; the file "
                                "is incomplete or of another architecture")
        return tuple(state[key].shape)

    if "cls_token" in state or "patch_embed.proj.weight" in state:
        layout = "timm ViT state dict"
        dim, chans, patch, _ = shape("patch_embed.proj.weight", layout)
        depth = _count(_Keys(path, state, layout), r"blocks\.(\d+)\.norm1\.weight")
        pos = shape("pos_embed", layout)
        side = _grid(_Keys(path, {}, layout), "pos_embed", pos[1], 1)
        arch = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": None,
                "mlp_ratio": shape("blocks.0.mlp.fc1.weight", layout)[0] / dim,
                "num_classes": shape("head.weight", layout)[0], "img_size": side * patch,
                "in_chans": chans}
        return Released(path, "vit", layout, arch, state, origin)
    if "stem.proj.weight" in state:
        layout = "timm Mixer state dict"
        dim, chans, patch, _ = shape("stem.proj.weight", layout)
        depth = _count(_Keys(path, state, layout), r"blocks\.(\d+)\.norm1\.weight")
        tok_hidden, tokens = shape("blocks.0.mlp_tokens.fc1.weight", layout)
        side = _grid(_Keys(path, {}, layout), "blocks.0.mlp_tokens.fc1.weight", tokens, 0)
        arch = {"patch_size": patch, "embed_dim": dim, "num_blocks": depth,
                "mlp_ratio": (tok_hidden / dim, shape("blocks.0.mlp_channels.fc1.weight", layout)[0] / dim),
                "num_classes": shape("head.weight", layout)[0], "img_size": side * patch,
                "in_chans": chans}
        return Released(path, "mixer", layout, arch, state, origin)
    some = ", ".join(repr(k) for k in sorted(state)[:3]) or "no tensors"
    raise ReleasedError(f"{path} is not a timm ViT or Mixer state dict (no 'patch_embed.proj."
                        f"weight' or 'stem.proj.weight'; it holds {some}, ...)")


# -- fitting a zoo model --------------------------------------------------------------------------

def check_shapes(rel: Released, model: nn.Module, name: str) -> None:
    """One-line ``ReleasedError`` unless ``rel.state`` holds exactly ``model``'s tensors, shape
    for shape; the message names the file key."""
    want = model.state_dict()
    for k, v in rel.state.items():
        if k not in want:
            raise ReleasedError(f"{rel.path}: {rel.origin[k]!r} maps to {k}, which model "
                                f"{name!r} does not have; choose another --model")
        if tuple(v.shape) != tuple(want[k].shape):
            raise ReleasedError(f"{rel.path}: {rel.origin[k]!r} has shape {tuple(v.shape)} as "
                                f"{k}, which is {tuple(want[k].shape)} in model {name!r}; "
                                "choose the --model of this checkpoint's architecture")
    missing = sorted(set(want) - set(rel.state))
    if missing:
        raise ReleasedError(f"{rel.path} has nothing for {missing[0]} of model {name!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                            "choose the --model of this checkpoint's architecture")
