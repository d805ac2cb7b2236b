"""Ties, NaN and non-finite steps in pruning and the loss landscape (docs/reliability.md).

Which units are removed never depends on the sort (ties in network order, NaN statistics last);
accuracies count ties as ``vitsam eval`` does (1 / number tied) and NaN rows as wrong, in prune
and landscape alike; a NaN logit makes the reported logit change NaN, not 0; a fine-tuning step
with a non-finite loss or gradient is skipped (the weights end as if its batch had not been
drawn) and too many in a row stop with a one-line error.
"""
from __future__ import annotations

import copy
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import vitsam.data
from vitsam.analysis import landscape, prune

NAN = float("nan")


def _rows(freq: list[list[float]], contrib: list[list[float]]) -> list[dict]:
    return [{"path": f"m{i}", "units": len(f), "dead": np.zeros(len(f), dtype=bool),
             "freq": np.array(f), "contrib": np.array(c)} for i, (f, c) in enumerate(zip(freq, contrib))]


def _kept(keep: dict) -> dict:
    return {k: v.tolist() for k, v in keep.items()}


@pytest.mark.parametrize("criterion", prune.CRITERIA)
def test_tied_units_are_removed_in_network_order(criterion: str) -> None:
    rows = _rows([[0.2] * 3, [0.2] * 3], [[1.0] * 3, [1.0] * 3])
    assert _kept(prune._plan(rows, 2, criterion, 1)) == {"m0": [2], "m1": [0, 1, 2]}
    assert _kept(prune._plan(rows, 4, criterion, 1)) == {"m0": [2], "m1": [2]}


def test_a_nan_statistic_ranks_as_most_active() -> None:
    rows = _rows([[0.0] * 3, [0.0] * 3], [[NAN, 0.5, 0.1], [0.2, NAN, 0.3]])
    # Finite contributions first, smallest first: m0u2, m1u0, m1u2, m0u1.
    assert _kept(prune._plan(rows, 4, "frequency", 1)) == {"m0": [0], "m1": [1]}
    # Then the NaN units, in network order.
    assert _kept(prune._plan(rows, 5, "contribution", 0)) == {"m0": [], "m1": [1]}
    nan_freq = _rows([[NAN, 0.5]], [[0.0, 0.0]])
    assert _kept(prune._plan(nan_freq, 1, "frequency", 0)) == {"m0": [0]}


class _Fixed(nn.Module):
    """A 'model' whose logits for batch k are given; its input is the batch index."""

    def __init__(self, logits: list[list[list[float]]]) -> None:
        super().__init__()
        self.logits = [torch.tensor(b) for b in logits]
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[int(x[0])] + 0 * self.dummy


# Rows: a 2-way tie holding the label, a clear hit, a NaN row whose other score is the largest,
# a 3-way tie, a tie without the label.
LOGITS = [[[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [NAN, 5.0, 0.0]], [[3.0, 3.0, 3.0], [0.0, 4.0, 4.0]]]
LABELS = [[0, 1, 1], [2, 0]]
EXPECTED = Fraction(1, 2) + 1 + 0 + Fraction(1, 3) + 0  # over 5 rows


def _batches(labels: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((len(y),), k), torch.tensor(y)) for k, y in enumerate(labels)]


def _permuted(perm: list[int]) -> tuple[_Fixed, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same scores with the classes renamed: class c becomes perm[c]."""
    inv = np.argsort(perm)
    logits = [[[row[i] for i in inv] for row in b] for b in LOGITS]
    return _Fixed(logits), _batches([[perm[c] for c in y] for y in LABELS])


def test_prune_and_landscape_accuracies_count_ties_fairly_and_nan_rows_as_wrong() -> None:
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # argmax by index would change with these
        model, batches = _permuted(perm)
        assert prune._accuracy(model, batches) == pytest.approx(float(EXPECTED) / 5, abs=1e-12)
        _, acc = landscape.evaluate(model, batches)
        assert acc == pytest.approx(float(EXPECTED) / 5, abs=1e-12)


def test_an_all_nan_model_scores_zero_in_the_landscape() -> None:
    model = _Fixed([[[NAN, NAN, NAN]] * 4])
    loss, acc = landscape.evaluate(model, [(torch.zeros(4), torch.tensor([0, 0, 1, 2]))])
    assert acc == 0.0 and math.isnan(loss)  # argmax of a NaN row is index 0: 'right' for half


def test_agreement_compares_tied_sets_and_a_nan_logit_is_reported() -> None:
    full = _Fixed([[[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    pruned = _Fixed([[[1.0, 0.5, 0.0], [0.0, 2.0, 1.0], [3.0, NAN, 0.0]]])
    batches = _batches([[0, 1, 0]])
    out = prune._compare(full, pruned, batches)
    # Row 0: {0, 1} against {0}, a different prediction though both argmax to 0; row 2: NaN.
    assert out["test_argmax_agreement"] == pytest.approx(1 / 3)
    assert math.isnan(out["test_max_abs_logit_change"])
    assert out["test_acc_before"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["test_acc_after"] == pytest.approx((1 + 1 + 0) / 3)
    clean = prune._compare(full, copy.deepcopy(full), batches)
    assert clean["test_argmax_agreement"] == 1.0 and clean["test_max_abs_logit_change"] == 0.0
    worst, agree = prune._logit_change(pruned, [x for x, _ in batches], full.logits)
    assert math.isnan(worst) and agree == pytest.approx(1 / 3)


# -- fine-tuning with non-finite steps -----------------------------------------------------------

class _Faulty(nn.Module):
    """A linear classifier whose forward passes number ``bad`` give a NaN loss (``where="loss"``)
    or a finite loss with a NaN gradient (``where="grad"``)."""

    def __init__(self, inner: nn.Module, bad: set[int], where: str = "loss") -> None:
        super().__init__()
        self.inner, self.bad, self.where, self.calls = inner, bad, where, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.calls += 1
        if self.calls in self.bad:
            if self.where == "loss":
                return out * NAN
            out.register_hook(lambda g: g * NAN)
        return out


def _data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(n)]


def _finetune(model: nn.Module, batches: list, steps: int, monkeypatch) -> tuple[list[float], int]:
    monkeypatch.setattr(vitsam.data, "train_batches", lambda *a, **k: iter(batches))
    return prune._finetune(model, SimpleNamespace(train=range(4)), steps, 4, 0.05, 0, "cpu", False)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_nonfinite_finetune_step_is_skipped_as_if_its_batch_was_not_drawn(where, monkeypatch) -> None:
    torch.manual_seed(0)
    inner = nn.Linear(5, 3)
    reference = copy.deepcopy(inner)
    batches = _data(4)
    losses, skipped = _finetune(_Faulty(inner, {2}, where), batches, 4, monkeypatch)
    assert skipped == 1 and math.isnan(losses[1]) and all(math.isfinite(v) for v in losses[::2])
    ref_losses, ref_skipped = _finetune(reference, [batches[0], *batches[2:]], 3, monkeypatch)
    assert ref_skipped == 0 and [losses[0], *losses[2:]] == ref_losses
    for a, b in zip(inner.parameters(), reference.parameters()):
        assert torch.equal(a, b)  # bit-exact: the skipped step touched neither weights nor AdamW


def test_nonfinite_finetune_steps_in_a_row_stop_with_a_clear_message(monkeypatch) -> None:
    inner = nn.Linear(5, 3)
    before = copy.deepcopy(inner.state_dict())
    with pytest.raises(prune.PruneError, match=r"^fine-tuning step 4 of 6 had a non-finite "
                                               r"gradient \(3 in a row, nothing written\); "
                                               r"likely causes: a learning rate too high"):
        _finetune(_Faulty(inner, {2, 3, 4}, "grad"), _data(6), 6, monkeypatch)
    with pytest.raises(prune.PruneError, match=r"step 2 of 2 had a non-finite loss"):
        _finetune(_Faulty(inner, {1, 2}), _data(2), 2, monkeypatch)  # fewer steps: all bad
    assert not torch.equal(inner.weight, before["weight"])  # the first step was applied
    assert all(torch.isfinite(p).all() for p in inner.parameters())
