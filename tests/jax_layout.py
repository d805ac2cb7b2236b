"""Tiny checkpoints in the layout of google-research/vision_transformer's .npz files, written from
a timm model by a mapping of their own (not vitsam's), and numpy forwards that read the Flax
layout directly (Dense: x @ kernel + bias; attention kernels (D, heads, head_dim))."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (LayerNorm scales and biases too) drawn afresh, so no mapping hides
    behind a default value of 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def vit_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The .npz arrays of a timm VisionTransformer (class token, no pre-logits)."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    hd = dim // heads
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"],
           "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, e = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        m = e + "MultiHeadDotProductAttention_1/"
        w = sd[b + "attn.qkv.weight"]  # rows: q, k, v outputs
        bias = sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[m + f"{n}/kernel"] = w[j * dim:(j + 1) * dim].T.reshape(dim, heads, hd)
            out[m + f"{n}/bias"] = bias[j * dim:(j + 1) * dim].reshape(heads, hd)
        out[m + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, dim)
        out[m + "out/bias"] = sd[b + "attn.proj.bias"]
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[e + f"{dst}/scale"], out[e + f"{dst}/bias"] = sd[b + src + ".weight"], sd[b + src + ".bias"]
        for r in range(2):
            out[e + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[e + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    return out


def mixer_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The .npz arrays of a timm MlpMixer."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    out = {"stem/kernel": sd["stem.proj.weight"].transpose(2, 3, 1, 0),
           "stem/bias": sd["stem.proj.bias"],
           "pre_head_layer_norm/scale": sd["norm.weight"], "pre_head_layer_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, e = f"blocks.{i}.", f"MixerBlock_{i}/"
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            out[e + f"{dst}/scale"], out[e + f"{dst}/bias"] = sd[b + src + ".weight"], sd[b + src + ".bias"]
        for src, dst in (("mlp_tokens", "token_mixing"), ("mlp_channels", "channel_mixing")):
            for r in range(2):
                out[e + f"{dst}/Dense_{r}/kernel"] = sd[b + f"{src}.fc{r + 1}.weight"].T
                out[e + f"{dst}/Dense_{r}/bias"] = sd[b + f"{src}.fc{r + 1}.bias"]
    return out


# -- numpy forwards on the Flax layout (float64, exact GELU as timm) ---------------------------

_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _ln(x: np.ndarray, w: dict, key: str) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w[key + "/scale"] + w[key + "/bias"]


def _dense(x: np.ndarray, w: dict, key: str) -> np.ndarray:
    return x @ w[key + "/kernel"] + w[key + "/bias"]


def _patchify(x: np.ndarray, w: dict, key: str) -> np.ndarray:
    """NCHW images -> (B, tokens, D) through the HWIO kernel with stride = patch size."""
    k = w[key + "/kernel"]
    p = k.shape[0]
    nhwc = x.transpose(0, 2, 3, 1)
    b, h, wd, c = nhwc.shape
    patches = nhwc.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    out = np.einsum("bijxyc,xycd->bijd", patches, k) + w[key + "/bias"]
    return out.reshape(b, -1, k.shape[-1])


def vit_forward(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in arrays.items()}
    h = _patchify(x.astype(np.float64), w, "embedding")
    cls = np.broadcast_to(w["cls"], (h.shape[0], 1, h.shape[-1]))
    h = np.concatenate([cls, h], axis=1) + w["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        e = f"Transformer/encoderblock_{i}/"
        m = e + "MultiHeadDotProductAttention_1/"
        y = _ln(h, w, e + "LayerNorm_0")
        q, k, v = (np.einsum("bld,dhk->blhk", y, w[m + f"{n}/kernel"]) + w[m + f"{n}/bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
        logits = logits - logits.max(-1, keepdims=True)
        att = np.exp(logits)
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", att, v)
        h = h + np.einsum("bqhk,hkd->bqd", o, w[m + "out/kernel"]) + w[m + "out/bias"]
        y = _ln(h, w, e + "LayerNorm_2")
        h = h + _dense(_gelu(_dense(y, w, e + "MlpBlock_3/Dense_0")), w, e + "MlpBlock_3/Dense_1")
        i += 1
    h = _ln(h, w, "Transformer/encoder_norm")
    return _dense(h[:, 0], w, "head")


def mixer_forward(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in arrays.items()}
    h = _patchify(x.astype(np.float64), w, "stem")
    i = 0
    while f"MixerBlock_{i}/LayerNorm_0/scale" in w:
        e = f"MixerBlock_{i}/"
        y = _ln(h, w, e + "LayerNorm_0").transpose(0, 2, 1)
        y = _dense(_gelu(_dense(y, w, e + "token_mixing/Dense_0")), w, e + "token_mixing/Dense_1")
        h = h + y.transpose(0, 2, 1)
        y = _ln(h, w, e + "LayerNorm_1")
        h = h + _dense(_gelu(_dense(y, w, e + "channel_mixing/Dense_0")), w,
                       e + "channel_mixing/Dense_1")
        i += 1
    h = _ln(h, w, "pre_head_layer_norm")
    return _dense(h.mean(1), w, "head")
