"""SimCLR's pieces: encoder + projection head, and the NT-Xent loss as a classification.

For a batch of N images the two views are stacked, rows ``[0, N)`` view one and ``[N, 2N)``
view two, and ``ContrastiveNet`` maps the 2N images to the NT-Xent *logits* (2N, 2N):
``s_ij = cos(z_i, z_j) / tau`` with the diagonal (an image against itself) at -inf. Row i's
positive is its other view, ``positives(N)[i] = (i + N) mod 2N``, so NT-Xent (Chen et al.,
2020, eq. 1, averaged over all 2N anchors) is exactly the cross-entropy of these logits with
the positives as labels:

    l_i = -log( exp(s_ip) / sum_{k != i} exp(s_ik) ),    loss = mean_i l_i.

That is what lets vitsam's ``optim.steps.train_step`` (plain or SAM, AMP, clipping, skipped
non-finite steps) drive pre-training unchanged, with ``nn.CrossEntropyLoss`` as its criterion;
its ``correct`` count then is the share of anchors whose nearest other view is their
positive (logged as ``acc``). The logits couple every row with every other, so micro-batches
and m-sharpness chunks (which split the batch) are refused by the config check.

Why not lightly (``pip install lightly``, 1.6.0): it installs into torch 2.14 without touching
torch, but brings 14 packages (pytorch-lightning, torchmetrics, hydra-core, omegaconf,
aiohttp, ...), adds 2.3 s to every import on this machine (torch itself: 1.9 s), its
``NTXentLoss`` returns only the loss (no logits for the step's accuracy, no place for the
engine's criterion) and its SimCLR transform works image by image on PIL images, where
vitsam augments whole batches on the device. The pieces here are some sixty lines.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("simclr",)


def positives(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 (2n,): the row of each anchor's other view in a stacked (view one; view two) batch."""
    idx = torch.arange(2 * n, device=device)
    return (idx + n) % (2 * n)


def nt_xent_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(2N, D) projections -> (2N, 2N) float32 NT-Xent logits: cosine / temperature, diagonal
    -inf (computed in float32 also under autocast: the softmax over 2N-1 is sensitive)."""
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.t() / temperature
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return sim.masked_fill(eye, float("-inf"))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of paired projections z1, z2 (N, D), mean over the 2N anchors."""
    logits = nt_xent_logits(torch.cat([z1, z2]), temperature)
    return F.cross_entropy(logits, positives(z1.shape[0], z1.device))


class ProjectionHead(nn.Module):
    """SimCLR's g: Linear(F, H) - BatchNorm - ReLU - Linear(H, D) (the v2 paper's BN)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ContrastiveNet(nn.Module):
    """A zoo model without its classifier (``encoder``: images -> features (B, F)) and the
    projection head; ``forward`` maps a stacked two-view batch (2N, C, H, W) to NT-Xent logits
    (2N, 2N). ``features`` is what probes and fine-tuning use."""

    def __init__(self, encoder: nn.Module, projector: ProjectionHead, temperature: float) -> None:
        super().__init__()
        self.encoder, self.projector, self.temperature = encoder, projector, float(temperature)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"a contrastive batch stacks two views of each image; got an odd "
                             f"batch of {x.shape[0]}")
        return nt_xent_logits(self.projector(self.encoder(x)), self.temperature)


def feature_dim(encoder: nn.Module) -> int:
    """The width of a classifier-less timm model's output features."""
    dim = getattr(encoder, "head_hidden_size", None) or getattr(encoder, "num_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{type(encoder).__name__} does not say its feature width "
                         "(num_features); choose a zoo or timm classification model")
    return dim


def headless(model: nn.Module) -> nn.Module:
    """``model`` with its classifier replaced by the identity (timm's reset_classifier(0)),
    in place: its output is then the pooled features the classifier read."""
    reset = getattr(model, "reset_classifier", None)
    if not callable(reset):
        raise ValueError(f"{type(model).__name__} has no reset_classifier; contrastive "
                         "pre-training needs a zoo or timm classification model")
    reset(0)
    return model


def contrastive_spec(cfg: Any) -> dict[str, Any]:
    """What a checkpoint's ``model_spec["contrastive"]`` records of ``PretrainConfig`` ``cfg``:
    enough to rebuild ``ContrastiveNet`` (``vitsam.models.build_from_spec``)."""
    return {"objective": cfg.objective, "temperature": cfg.temperature,
            "proj_hidden": cfg.proj_hidden, "proj_dim": cfg.proj_dim}


def build_contrastive(encoder: nn.Module, spec: dict[str, Any]) -> ContrastiveNet:
    """``ContrastiveNet`` around the zoo model ``encoder`` (its classifier removed here) for a
    spec's ``contrastive`` record; ``proj_hidden`` None = the feature width."""
    enc = headless(encoder)
    dim = feature_dim(enc)
    hidden = spec.get("proj_hidden") or dim
    return ContrastiveNet(enc, ProjectionHead(dim, int(hidden), int(spec["proj_dim"])),
                          float(spec["temperature"]))
