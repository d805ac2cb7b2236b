"""Classification metrics: top-k accuracy, expected calibration error, negative log-likelihood.

Ties are scored as their expected value under uniformly random tie-breaking (``topk_hits``):
a model that gives C classes the same score is right with probability k/C in its top k, not 1 or
0 depending on which tied index the sort happens to return first. Scores without ties count as
before (0 or 1 per image); a row with a NaN score counts as wrong.

Also the preprocessing every evaluator shares: uint8 images -> the run's one view
(``vitsam.data.preprocess.eval_view``: images already at the model's size as they are, others
resized so the shorter side is img_size / crop_pct and centre-cropped) -> normalised by the
training mean/std with the data layer's own ``normalise``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import normalise
from ..data.preprocess import IN_MEMORY_CROP_FRACTION, eval_view
from ..models.modes import eval_mode


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, what: str = "logits") -> None:
    if logits.ndim != 2:
        raise ValueError(f"{what} must have shape (N, num_classes), got {tuple(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(f"targets must be class indices in [0, {logits.shape[1]}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]; check the class mapping")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the probability that the top ``k`` scores hold one of the row's labels.

    scores: (N, C); labels: (N, C) bool, the right classes of each row (one for plain labels,
    several for ReaL sets). Ties among the scores are broken uniformly at random: if G classes
    score above the k-th largest score v and E classes score exactly v, of which J are labels,
    a row with no label above v is hit with probability 1 - C(E - J, k - G) / C(E, k - G).
    Returns (N,) float64 in [0, 1]; 0 for rows holding a NaN score. ``k`` >= C: every row with a
    label is hit.
    """
    s = scores.detach().double()
    k = min(int(k), s.shape[1])
    kth = s.topk(k, dim=1).values[:, -1:]  # the k-th largest value does not depend on tie order
    above, tied = s > kth, s == kth
    room = k - above.sum(1)  # places left for the tied scores, 1..E
    e = tied.sum(1).double()
    j = (tied & labels).sum(1).double()
    miss = torch.ones(s.shape[0], dtype=torch.float64)
    for i in range(k):  # C(E - J, r) / C(E, r) = prod_{i < r} (E - J - i) / (E - i)
        factor = ((e - j - i).clamp(min=0) / (e - i).clamp(min=1))
        miss = torch.where(room > i, miss * factor, miss)
    hit = torch.where((above & labels).any(1), torch.ones_like(miss), 1 - miss)
    return hit.masked_fill(s.isnan().any(1), 0.0)


def top1_hits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The expected number of rows right at top-1 (``topk_hits`` for k = 1, summed): ties for
    the top score count 1 / number tied when the target is among them, a NaN row counts 0.

    logits: (N, C) scores; targets: (N,) int class indices. Not checked (callers' own data).
    """
    labels = F.one_hot(targets.detach().long().cpu(), logits.shape[1]).bool()
    return float(topk_hits(logits.detach().cpu(), labels, 1).sum())


def same_top1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows where the scores ``a`` and ``b`` (N, C) give the same top-1 prediction,
    i.e. the same set of top-scoring classes (a tie in one and not in the other differs); a row
    holding a NaN in either never agrees. Independent of tie order and device."""
    a, b = a.detach().cpu(), b.detach().cpu()
    top_a = a == a.amax(1, keepdim=True)  # all False in a row holding a NaN (amax gives NaN)
    top_b = b == b.amax(1, keepdim=True)
    return (top_a == top_b).all(1) & top_a.any(1) & top_b.any(1)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the k highest scores, per k in ``ks``.

    logits: (N, C) scores (logits or probabilities), targets: (N,) int class indices.
    A k at or above C counts every row as right (all classes are in the top k); ties count as
    the expected hit under random tie-breaking (``topk_hits``).
    """
    _check_logits(logits, targets)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    n = targets.shape[0]
    if n == 0:
        raise ValueError("no samples to score; the batches are empty")
    labels = F.one_hot(targets.long(), logits.shape[1]).bool()
    return {int(k): float(topk_hits(logits, labels, int(k)).sum()) / n for k in ks}


def ece_from_confidences(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE from per-sample confidence (N,) in [0, 1] and correctness (N,): bool, or the
    probability of being right (a tie at the top, ``topk_hits``).

    Equal-width bins (i/n_bins, (i+1)/n_bins]; ECE = sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n = confidence.numel()
    if n == 0:
        raise ValueError("no samples to score; the batches are empty")
    conf = confidence.double().clamp(0, 1)
    # Bin b holds (edge_b, edge_b+1] with the usual linspace edges; confidence 0 joins the first bin.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / n)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017) of predicted probabilities.

    probs: (N, C) rows summing to 1; targets: (N,) int. Confidence = max probability, correct =
    argmax == target (a tie at the top: the chance a random pick among the tied classes is the
    target); 15 equal-width confidence bins by default. Returns a fraction in [0, 1].
    """
    _check_logits(probs, targets, "probs")
    if targets.shape[0] == 0:
        raise ValueError("no samples to score; the batches are empty")
    right = topk_hits(probs, F.one_hot(targets.long(), probs.shape[1]).bool(), 1)
    return ece_from_confidences(probs.max(dim=1).values, right, n_bins)


class MetricAccumulator:
    """Running top-1/top-5 accuracy, ECE and NLL over batches of logits (N, C) and targets (N,)."""

    def __init__(self, ks: Sequence[int] = (1, 5), n_bins: int = 15) -> None:
        if any(int(k) < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.n_bins = n_bins
        self.hits = {k: 0.0 for k in self.ks}
        self.nll_sum = 0.0
        self.n = 0
        self.conf: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch (logits are moved to CPU float64 for exact sums)."""
        logits, targets = logits.detach().double().cpu(), targets.detach().long().cpu()
        _check_logits(logits, targets)
        b = targets.shape[0]
        if b == 0:
            return
        labels = F.one_hot(targets, logits.shape[1]).bool()
        hits = {k: topk_hits(logits, labels, k) for k in {1, *self.ks}}
        for k in self.ks:
            self.hits[k] += float(hits[k].sum())
        self.nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        self.conf.append(logits.softmax(dim=1).max(dim=1).values)
        self.correct.append(hits[1])
        self.n += b

    def result(self) -> dict[str, float | int]:
        """``{top1, top5, ..., ece, nll, n}``: accuracies and ECE as fractions, NLL in nats per sample."""
        if self.n == 0:
            raise ValueError("no samples were evaluated; the batches are empty")
        out: dict[str, float | int] = {f"top{k}": self.hits[k] / self.n for k in self.ks}
        out["ece"] = ece_from_confidences(torch.cat(self.conf), torch.cat(self.correct), self.n_bins)
        out["nll"] = self.nll_sum / self.n
        out["n"] = self.n
        return out


def model_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward pass that insists on a (B, num_classes) tensor of logits."""
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape ({x.shape[0]}, num_classes), got {got}")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: str | torch.device = "cpu", n_bins: int = 15) -> dict[str, float | int]:
    """Top-1, top-5, ECE and NLL of ``model`` over ``(x normalised float (B, C, H, W), y int (B,))``.

    Runs in eval mode without gradients; every module's own train/eval mode is restored.
    """
    acc = MetricAccumulator(n_bins=n_bins)
    with eval_mode(model):
        for x, y in batches:
            acc.update(model_logits(model, x.to(device)), y)
    return acc.result()


def preprocess(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               img_size: int | None = None, crop_pct: float = IN_MEMORY_CROP_FRACTION) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, img_size, img_size): ``eval_view``, /255, normalise.

    ``img_size=None`` keeps the size. Images not yet ``img_size`` x ``img_size`` are resized
    (bilinear, antialiased) so the shorter side is ``img_size / crop_pct`` and centre-cropped,
    never squashed; mean/std are per channel on the 0-1 scale (one value per channel).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {images.dtype}")
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need one value per channel ({c}), got {len(mean)} and {len(std)}; "
                         "use the training run's data statistics")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    if img_size is not None:
        images = eval_view(images, img_size, crop_pct)
    # The data layer's own normalisation, so inputs are bit-identical to the test split's.
    return normalise(images, [float(v) for v in mean], [float(v) for v in std], images.shape[-1])


def uint8_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                  std: Sequence[float], img_size: int | None = None,
                  device: str | torch.device = "cpu",
                  crop_pct: float = IN_MEMORY_CROP_FRACTION) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x normalised float on device, y int64)`` from uint8 images (N, C, H, W) and labels (N,),
    preprocessed as ``preprocess`` does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    for a in range(0, images.shape[0], batch_size):
        x = preprocess(images[a:a + batch_size], mean, std, img_size, crop_pct)
        yield x.to(device), labels[a:a + batch_size].long()
