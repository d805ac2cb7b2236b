"""Class-token attention maps, attention rollout and attention entropy of Vision Transformers.

For every image the analysis reads the attention probabilities ``softmax(q k^T / sqrt(d))`` of
every block through ``vitsam.models.attention.capture_attention`` (explicit attention path; the
logits are unchanged up to float rounding) and derives:

* **last-block map**: the class token's attention row of the last block over the patch tokens,
  per head and averaged over heads.
* **rollout** (Abnar & Zuidema, 2020): per block the heads are averaged, optionally the smallest
  ``floor(discard_ratio * T * T)`` of each image's T x T entries (exact product: 0.29 of 100
  entries is 29) are set to zero, the identity is added
  (residual connection) and every *row* is re-normalised to sum to 1; the blocks are multiplied
  ``R = A_L ... A_2 A_1`` and the class-token row of ``R`` over the patch tokens is the map. All of
  this is batched: each image has its own matrices.
* **entropy** (nats) of the class token's attention distribution over patches, per block and
  head, averaged over images (lower = more focused; a uniform distribution over N patches has
  ``log N``). The distribution is the class-token row restricted to patch tokens: the entries for
  the prefix tokens (the class token itself and any register tokens) are dropped and the rest is
  divided by its sum.

Maps are always normalised to sum to 1 over patches (same renormalisation). Models without a
class token (global average pooling) have no class-token query; for them every "class-token row"
above is replaced by the **mean attention received by each patch**, i.e. the average over all
patch-token query rows (recorded as ``"query": "mean_patch"`` in the result). MLP-Mixer and
ResNet have no attention; ``run`` returns ``{"supported": False, "reason": ...}`` for them.

``run`` keeps arrays for the figures under keys starting with ``_`` (``_images``: display images
(n, C, H, W) in 0-1, ``_maps``: dict of maps as numpy arrays, ``_image_entropy``: per-image
entropies); these are not JSON-serialisable and must be stripped (all keys starting with ``_``)
before the result is written as JSON.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitsam.exact import scaled
from vitsam.io import save_figure
from vitsam.models.attention import attention_modules, capture_attention
from vitsam.models.modes import eval_mode
from vitsam.progress import progress_bar

Batch = tuple[Tensor, Tensor]


class AttentionError(ValueError):
    """Invalid attention-map settings, inputs or a model without usable attention."""


class AttentionUnsupported(AttentionError):
    """The model has no attention layers (MLP-Mixer, ResNet)."""


@dataclass(frozen=True)
class AttentionConfig:
    """Settings of the attention-map analysis.

    num_images: images whose maps are kept and drawn. heads: "mean" (average of heads) or a head
    index for the drawn last-block map. rollout: also compute attention rollout. discard_ratio:
    fraction (0 <= r < 1) of the smallest head-averaged entries zeroed per block in the rollout.
    image_seed: None takes the first ``num_images`` images, an int draws them with that seed.
    max_batches: batches used for the entropy statistics (None: all). keep_in_json: images whose
    maps go into the JSON result as nested lists. mean/std: per-channel normalisation of the data
    (0-1 scale) to undo for display; None rescales each image to 0-1 instead. chunk: images per
    forward pass (bounds memory: all blocks' T x T maps are held at once).
    """

    num_images: int = 8
    heads: str | int = "mean"
    rollout: bool = True
    discard_ratio: float = 0.0
    image_seed: int | None = None
    max_batches: int | None = 8
    keep_in_json: int = 2
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    chunk: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise AttentionError(f"num_images must be an integer >= 1, got {self.num_images!r}")
        if not (self.heads == "mean" or (isinstance(self.heads, int) and self.heads >= 0)):
            raise AttentionError(f"heads must be 'mean' or a head index >= 0, got {self.heads!r}")
        if not 0.0 <= float(self.discard_ratio) < 1.0:
            raise AttentionError(f"discard_ratio must be in [0, 1), got {self.discard_ratio!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise AttentionError(f"max_batches must be None or an integer >= 1, got {self.max_batches!r}")
        if not isinstance(self.keep_in_json, int) or self.keep_in_json < 0:
            raise AttentionError(f"keep_in_json must be an integer >= 0, got {self.keep_in_json!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise AttentionError(f"chunk must be an integer >= 1, got {self.chunk!r}")
        if (self.mean is None) != (self.std is None):
            raise AttentionError("give both mean and std (or neither) to undo the normalisation")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why attention maps do not apply to ``model``, or None when they do."""
    if not attention_modules(model):
        return (f"{type(model).__name__} has no attention layers (MLP-Mixer/ResNet); "
                "attention maps apply to ViT")
    return None


# ----------------------------------------------------------------------------- pure math

def patch_distribution(probs: Tensor, num_prefix_tokens: int, has_cls: bool) -> Tensor:
    """Attention over patch tokens: (..., T, T) probabilities -> (..., N) rows summing to 1.

    With a class token: its row (query 0) over the N = T - num_prefix_tokens patch keys,
    renormalised after dropping the prefix-token entries. Without: the mean over patch-token
    query rows of the attention each patch key receives, renormalised the same way.
    """
    p = num_prefix_tokens
    if probs.shape[-1] <= p or probs.shape[-1] != probs.shape[-2]:
        raise AttentionError(f"attention must be (..., T, T) with T > {p} prefix tokens, got {tuple(probs.shape)}")
    rows = probs[..., 0, p:] if has_cls else probs[..., p:, p:].mean(dim=-2)
    return rows / rows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)


def entropy(dist: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim of ``dist`` (..., N) (rows sum to 1; 0 log 0 = 0)."""
    return -torch.special.xlogy(dist, dist).sum(dim=-1)


def rollout(attentions: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout over blocks in forward order: list of (B, heads, T, T) -> (B, T, T).

    Per block: mean over heads, zero the smallest ``floor(discard_ratio * T * T)`` (exact) of each
    image's T*T entries, add the identity, renormalise rows to 1. Returns ``A_L @ ... @ A_1`` in float64.
    """
    if not attentions:
        raise AttentionError("rollout needs at least one block's attention")
    result = None
    for a in attentions:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise AttentionError(f"each attention must be (batch, heads, T, T), got {tuple(a.shape)}")
        m = a.double().mean(dim=1)
        b, t, _ = m.shape
        k = scaled(discard_ratio, t * t, math.floor)
        if k > 0:
            flat = m.reshape(b, t * t).clone()
            idx = flat.topk(k, dim=-1, largest=False).indices
            flat.scatter_(-1, idx, 0.0)
            m = flat.reshape(b, t, t)
        m = m + torch.eye(t, dtype=m.dtype, device=m.device)
        m = m / m.sum(dim=-1, keepdim=True)
        result = m if result is None else m @ result
    return result


# ----------------------------------------------------------------------------- model side

def _token_layout(model: nn.Module, num_tokens: int) -> tuple[int, bool, tuple[int, int]]:
    """(num_prefix_tokens, has_cls, patch grid (gh, gw)) for a model whose attention sees T tokens."""
    has_cls = getattr(model, "cls_token", None) is not None
    p = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    n = num_tokens - p
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == n:
        return p, has_cls, (int(grid[0]), int(grid[1]))
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n:
        raise AttentionError(f"cannot arrange {n} patch tokens into a grid; the model's token layout "
                             "(prefix tokens, patch grid) is not a plain ViT's")
    return p, has_cls, (side, side)


def capture(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits (B, classes) and per-block attention probabilities [(B, heads, T, T)] in forward order.

    Raises ``AttentionUnsupported`` for models without attention layers.
    """
    reason = unsupported_reason(model)
    if reason:
        raise AttentionUnsupported(reason)
    order = [name for name, _ in attention_modules(model)]
    with torch.no_grad(), capture_attention(model) as maps:
        logits = model(x)
    attn = [maps[n] for n in order if n in maps]
    if not attn:
        raise AttentionUnsupported(f"{type(model).__name__}'s attention modules exposed no probabilities "
                                   "(no attn_drop); attention maps apply to timm ViTs")
    for a in attn:
        if a.ndim != 4 or a.shape[0] != x.shape[0] or a.shape[-1] != attn[0].shape[-1]:
            raise AttentionError(f"attention of shape {tuple(a.shape)} is not global (batch, heads, T, T) "
                                 "self-attention over all tokens; windowed/pooled attention is not supported")
    return logits, attn


def _to_grid(dist: Tensor, grid: tuple[int, int]) -> Tensor:
    return dist.reshape(*dist.shape[:-1], *grid)


def _display_images(x: Tensor, cfg: AttentionConfig) -> np.ndarray:
    """Normalised (n, C, H, W) -> images in 0-1 for display."""
    x = x.detach().double().cpu()
    if cfg.mean is not None:
        c = x.shape[1]
        if len(cfg.mean) != c or len(cfg.std) != c:
            raise AttentionError(f"mean/std have {len(cfg.mean)}/{len(cfg.std)} values but images have {c} channels")
        x = x * torch.tensor(cfg.std).view(1, c, 1, 1) + torch.tensor(cfg.mean).view(1, c, 1, 1)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.clamp(0, 1).numpy()


def run(model: nn.Module, data: Iterable[Batch], cfg: AttentionConfig = AttentionConfig()) -> dict[str, Any]:
    """Attention entropy per block/head over the data, plus maps of ``cfg.num_images`` images.

    data: (x float (B,C,H,W) normalised, y) batches. Returns ``{"supported": False, "reason"}``
    for models without attention; otherwise ``{"supported", "query", "num_prefix_tokens",
    "patch_grid", "blocks", "entropy_per_block" (L,), "entropy_per_head" (L, heads),
    "entropy_rollout", "max_entropy", "num_images_entropy", "maps" (first ``keep_in_json`` images),
    "settings"}`` plus the ``_``-keys for figures (see module docstring). Entropies in nats.
    """
    if not isinstance(cfg, AttentionConfig):
        raise AttentionError(f"cfg must be an AttentionConfig, got {type(cfg).__name__}")
    reason = unsupported_reason(model)
    if reason:
        return {"supported": False, "reason": reason, "settings": asdict(cfg)}
    device = next(model.parameters()).device
    xs: list[Tensor] = []
    ent_sum: Tensor | None = None
    ent_roll_sum, n_img = 0.0, 0
    layout = None
    with eval_mode(model):
        for bi, item in enumerate(progress_bar(data, desc="attention", disable=None)):
            if cfg.max_batches is not None and bi >= cfg.max_batches:
                break
            if not (isinstance(item, (tuple, list)) and len(item) == 2) or item[0].ndim != 4:
                raise AttentionError("data must yield (x, y) batches with x of shape (batch, C, H, W)")
            xs.append(item[0].cpu())
            for x in item[0].split(cfg.chunk):
                _, attn = capture(model, x.to(device))
                if layout is None:
                    layout = _token_layout(model, attn[0].shape[-1])
                p, has_cls, _ = layout
                dists = torch.stack([patch_distribution(a.double(), p, has_cls) for a in attn])  # (L,B,H,N)
                e = entropy(dists).sum(dim=1)  # (L, H) summed over images
                ent_sum = e if ent_sum is None else ent_sum + e
                if cfg.rollout:
                    r = patch_distribution(rollout(attn, cfg.discard_ratio), p, has_cls)
                    ent_roll_sum += float(entropy(r).sum())
                n_img += x.shape[0]
        if n_img == 0:
            raise AttentionError("data yielded no images; pass at least one (x, y) batch")
        images = torch.cat(xs)
        if cfg.image_seed is None:
            idx = torch.arange(min(cfg.num_images, len(images)))
        else:
            gen = torch.Generator().manual_seed(cfg.image_seed)
            idx = torch.randperm(len(images), generator=gen)[: cfg.num_images].sort().values
        chosen = images[idx]
        _, attn = capture(model, chosen.to(device))

    p, has_cls, grid = layout
    heads = attn[-1].shape[1]
    if cfg.heads != "mean" and cfg.heads >= heads:
        raise AttentionError(f"heads={cfg.heads} but the last block has {heads} heads; use 0..{heads - 1} or 'mean'")
    last_heads = patch_distribution(attn[-1].double(), p, has_cls)  # (n, H, N)
    last_mean = patch_distribution(attn[-1].double().mean(dim=1), p, has_cls)  # (n, N)
    last = last_mean if cfg.heads == "mean" else last_heads[:, cfg.heads]
    maps: dict[str, np.ndarray] = {
        "last": _to_grid(last, grid).cpu().numpy(),
        "last_mean": _to_grid(last_mean, grid).cpu().numpy(),
        "last_heads": _to_grid(last_heads, grid).cpu().numpy(),
    }
    img_entropy = {"last": entropy(last).cpu().numpy()}
    if cfg.rollout:
        roll = patch_distribution(rollout(attn, cfg.discard_ratio), p, has_cls)
        maps["rollout"] = _to_grid(roll, grid).cpu().numpy()
        img_entropy["rollout"] = entropy(roll).cpu().numpy()

    ent = (ent_sum / n_img).cpu()
    k = min(cfg.keep_in_json, len(idx))
    result: dict[str, Any] = {
        "supported": True,
        "model": type(model).__name__,
        "query": "cls" if has_cls else "mean_patch",
        "num_prefix_tokens": p,
        "patch_grid": list(grid),
        "blocks": [n for n, _ in attention_modules(model)][: len(attn)],
        "entropy_per_block": ent.mean(dim=1).tolist(),
        "entropy_per_head": ent.tolist(),
        "entropy_rollout": ent_roll_sum / n_img if cfg.rollout else None,
        "max_entropy": math.log(grid[0] * grid[1]),
        "num_images_entropy": n_img,
        "image_indices": idx.tolist(),
        "maps": {"image_indices": idx[:k].tolist(),
                 **{key: maps[key][:k].round(6).tolist() for key in ("last", "rollout") if key in maps}},
        "settings": {**asdict(cfg), "mean": list(cfg.mean) if cfg.mean else None,
                     "std": list(cfg.std) if cfg.std else None},
        "_images": _display_images(chosen, cfg),
        "_maps": maps,
        "_image_entropy": img_entropy,
    }
    return result


# ----------------------------------------------------------------------------- figures

def _as_triples(results: dict | Sequence) -> list[tuple[str, dict, np.ndarray | None]]:
    if isinstance(results, dict):
        results = [("model", results)]
    out = []
    for item in results:
        if len(item) not in (2, 3):
            raise AttentionError("figures takes a result dict or a list of (label, result[, images])")
        out.append((str(item[0]), item[1], item[2] if len(item) == 3 else None))
    return out


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, gh, gw) patch maps -> (n, H, W) bilinear, each scaled to max 1 for display."""
    t = torch.as_tensor(maps, dtype=torch.float64)[:, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0]
    return (up / up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).numpy()


def _show(ax: Any, img: np.ndarray) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(img[:3], (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def figures(results: dict | Sequence, out_dir: str | Path) -> list[Path]:
    """Grid PNGs in ``out_dir``: images as rows, input + one column per run, map overlaid.

    ``results``: one ``run`` result, or a list of ``(label, result)`` / ``(label, result, images)``
    (images (n, C, H, W) in 0-1 override ``result["_images"]``). Writes ``attention_last.png``
    (last-block class-token map), ``attention_rollout.png`` (if computed) and
    ``attention_entropy.png`` (entropy per block, one line per run). Each cell shows that image's
    entropy in nats; each column title the mean last-block entropy. Runs marked unsupported are
    skipped; all must share the same images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [t for t in _as_triples(results) if t[1].get("supported", False)]
    if not runs:
        raise AttentionError("no result with attention maps to draw (all runs unsupported or empty)")
    for label, r, imgs in runs:
        if "_maps" not in r or (imgs is None and "_images" not in r):
            raise AttentionError(f"result '{label}' has no '_images'/'_maps'; pass run()'s result "
                                 "before its '_' keys are stripped, or give (label, result, images)")
    images = np.asarray(runs[0][2] if runs[0][2] is not None else runs[0][1]["_images"])
    for label, r, _ in runs:
        if r["_maps"]["last"].shape[0] != images.shape[0]:
            raise AttentionError(f"result '{label}' has maps for {r['_maps']['last'].shape[0]} images, "
                                 f"expected {images.shape[0]}; analyse all runs on the same images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, size = images.shape[0], tuple(images.shape[-2:])
    paths = []
    for key, title in (("last", "last block, class token"), ("rollout", "attention rollout")):
        if not all(key in r["_maps"] for _, r, _ in runs):
            continue
        cols = len(runs) + 1
        fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n + 0.6), squeeze=False)
        for i in range(n):
            _show(axes[i, 0], images[i])
        axes[0, 0].set_title("input", fontsize=9)
        for c, (label, r, _) in enumerate(runs, start=1):
            up = _upsample(r["_maps"][key], size)
            ents = r["_image_entropy"][key]
            mean_e = r["entropy_per_block"][-1] if key == "last" else r["entropy_rollout"]
            axes[0, c].set_title(f"{label}\nH={mean_e:.3f} nats", fontsize=9)
            for i in range(n):
                ax = axes[i, c]
                _show(ax, images[i])
                ax.imshow(up[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
                ax.text(0.02, 0.98, f"{ents[i]:.2f}", transform=ax.transAxes, va="top", fontsize=7,
                        color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1})
        fig.suptitle(f"Attention maps ({title}); entropy in nats, lower = more focused", fontsize=10)
        paths.append(save_figure(fig, out / f"attention_{key}.png", dpi=100, bbox_inches="tight"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r, _ in runs:
        ax.plot(range(1, len(r["entropy_per_block"]) + 1), r["entropy_per_block"], marker="o", label=label)
    ax.axhline(runs[0][1]["max_entropy"], color="gray", ls="--", lw=1, label="uniform")
    ax.set(xlabel="block", ylabel="class-token attention entropy (nats)")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "attention_entropy.png", dpi=100, bbox_inches="tight"))
    return paths
