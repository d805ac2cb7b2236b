"""Metrics on degenerate input: zero and negative ratio denominators, ties, one class, empty sets.

Each value is checked against a hand computation or an independent brute force (every order in
which tied classes can be ranked).
"""
from __future__ import annotations

import itertools
import math
import re
from math import comb

import pytest
import torch
from torch import nn

from vitsam.eval import metrics as M
from vitsam.eval import robustness as R
from vitsam.eval import shifts as S

SEVERITIES = ("1", "2", "3", "4", "5")


def _results(accuracy: dict[str, list[float]], clean: float) -> dict:
    """An ``evaluate_corruptions`` result with the given per-severity accuracies."""
    acc = {c: dict(zip(SEVERITIES, v)) for c, v in accuracy.items()}
    return {"params": "cifar-c", "accuracy": acc, "clean": {"top1": clean},
            "corruption_error": {c: 1 - sum(v) / len(v) for c, v in accuracy.items()},
            "mean_corruption_accuracy": sum(sum(v) / len(v) for v in accuracy.values()) / len(accuracy)}


# ---------------------------------------------------------------- mCE and relative mCE

def test_relative_ce_whose_baseline_degrades_by_nothing_is_undefined_not_huge() -> None:
    """The issue's case: the baseline's fog error (mean of 1 - 0.83, ..., 1 - 0.46) equals its
    clean error (1 - 0.67), but the float sums differ by 2e-16, which made relative CE ~1e15."""
    base = _results({"fog": [0.83, 0.61, 0.70, 0.75, 0.46], "snow": [0.5] * 5}, clean=0.67)
    run = _results({"fog": [0.6] * 5, "snow": [0.4] * 5}, clean=0.8)
    m = R.mce_from_results(run, base)
    assert m["relative_CE"]["fog"] is None
    assert "equals its clean error" in m["undefined"]["relative_CE"]["fog"]
    # snow by hand: (5 * 0.6 - 5 * 0.2) / (5 * 0.5 - 5 * 0.33) = 2 / 0.85
    assert math.isclose(m["relative_CE"]["snow"], 2 / 0.85)
    assert math.isclose(m["relative_mCE"], 2 / 0.85)  # fog left out of the mean
    # CE is defined for both: fog 2 / 1.65, snow 3 / 2.5
    assert math.isclose(m["mCE"], (2 / 1.65 + 3 / 2.5) / 2) and m["undefined"]["CE"] == {}
    table = R.corruption_errors_table([("base", base), ("b", run)], baseline=base)
    numbers = [float(t) for t in re.findall(r"-?\d+\.\d+", table)]
    assert max(numbers) < 1000  # no huge ratio anywhere
    assert f"{100 * 2 / 0.85:.1f}" in table.splitlines()[2]
    assert any(line.startswith("b: relative CE for fog undefined (the baseline's error under it "
                               "equals its clean error") and "left out of relative mCE" in line
               for line in table.splitlines())


def test_ratios_with_zero_or_negative_denominators_are_undefined_with_reasons() -> None:
    run = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.3, 2: 0.5}, "frost": {1: 0.5, 2: 0.5}}
    base = {"fog": {1: 0.0, 2: 0.0}, "snow": {1: 0.5, 2: 0.7}, "frost": {1: 0.1, 2: 0.2}}
    m = R.mce(run, base, clean_err=0.1, baseline_clean_err=0.3)
    # fog: baseline error 0 -> CE undefined; its relative denominator 0 - 0.6 < 0 -> undefined
    assert m["CE"]["fog"] is None and "makes no errors" in m["undefined"]["CE"]["fog"]
    assert m["mCE"] == pytest.approx((0.8 / 1.2 + 1.0 / 0.3) / 2)
    # frost: baseline 0.3 under frost vs 0.3 clean x 2 = 0.6 -> negative -> undefined
    for c in ("fog", "frost"):
        assert m["relative_CE"][c] is None and "below its clean error" in m["undefined"]["relative_CE"][c]
    assert m["relative_mCE"] == pytest.approx((0.8 - 0.2) / (1.2 - 0.6))  # snow alone
    # Nothing defined: the mean is undefined too, with its reason.
    none = R.mce({"fog": {1: 0.2}}, {"fog": {1: 0.0}}, clean_err=0.1, baseline_clean_err=0.0)
    assert none["mCE"] is None and none["relative_mCE"] is None
    assert "no corruption has a defined CE" in none["undefined"]["mCE"]
    assert "zero denominator" in none["undefined"]["relative_CE"]["fog"]
    assert "needs the clean error" in R.mce({"fog": {1: 0.2}}, {"fog": {1: 0.4}})["undefined"]["relative_mCE"]


def test_a_table_with_no_defined_mce_prints_na() -> None:
    base = _results({"fog": [1.0] * 5}, clean=1.0)  # an error-free baseline
    run = _results({"fog": [0.5] * 5}, clean=0.9)
    row = R.corruption_errors_table([("run", run)], baseline=base).splitlines()[1].split()
    assert row[3:5] == ["n/a", "n/a"]


# ---------------------------------------------------------------- ties, one class, empty sets

def _brute_force_hit(scores: list[float], labels: set[int], k: int) -> float:
    """Mean over every strict order of the tied scores of 'a label is among the first k'."""
    values = sorted(set(scores), reverse=True)
    groups = [[c for c, s in enumerate(scores) if s == v] for v in values]
    orders = list(itertools.product(*[itertools.permutations(g) for g in groups]))
    hits = [bool(labels & set([c for g in order for c in g][:k])) for order in orders]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("scores", [[3.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 5, [2.0, 2.0, 1.0, 1.0, 1.0],
                                    [1.0, 2.0, 3.0, 4.0, 5.0], [float("-inf")] * 2 + [0.0] * 3])
def test_topk_hits_equal_the_mean_over_every_tie_break(scores) -> None:
    for labels in ({0}, {2}, {4}, {1, 3}, {2, 3, 4}):
        mask = torch.zeros(1, 5, dtype=torch.bool)
        mask[0, list(labels)] = True
        for k in range(1, 7):
            got = float(M.topk_hits(torch.tensor([scores]), mask, k)[0])
            assert got == pytest.approx(_brute_force_hit(scores, labels, min(k, 5)), abs=1e-12), (labels, k)


def test_tied_and_nan_logits_score_as_chance_and_as_wrong() -> None:
    flat = torch.zeros(4, 4)
    acc = M.topk_accuracy(flat, torch.zeros(4, dtype=torch.long), ks=(1, 2, 5))
    assert acc == {1: 0.25, 2: 0.5, 5: 1.0}  # not 1.0 because the sort returns index 0 first
    nan = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 2.0, 1.0]])
    assert M.topk_accuracy(nan, torch.tensor([1, 1]), ks=(1, 2)) == {1: 0.5, 2: 0.5}


def test_ece_by_hand_on_bin_edges_ties_and_one_class() -> None:
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0 joins the first, edges close their bin.
    conf = torch.tensor([0.25, 0.5, 0.5, 1.0, 0.0])
    right = torch.tensor([True, False, True, True, False])
    # bin 1: |0.25 + 0 - 1| = 0.75; bin 2: |1.0 - 1| = 0; bin 4: |1 - 1| = 0
    assert M.ece_from_confidences(conf, right, n_bins=4) == pytest.approx(0.75 / 5)
    # A tie at the top: two classes at 0.4, target one of them -> right with probability 1/2,
    # so accuracy 0.5 against confidence 0.4: ECE 0.1 (an argmax that favours index 0: 0.6).
    probs = torch.tensor([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert M.expected_calibration_error(probs, torch.tensor([0, 0])) == pytest.approx(0.1)
    acc = M.MetricAccumulator()
    acc.update(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))  # one class
    assert acc.result() == {"top1": 1.0, "top5": 1.0, "ece": 0.0, "nll": 0.0, "n": 3}
    tied = M.MetricAccumulator(ks=(1,))
    tied.update(torch.log(probs), torch.tensor([0, 0]))
    assert tied.result()["top1"] == 0.5 and tied.result()["ece"] == pytest.approx(0.1)


def test_empty_inputs_are_one_line_errors() -> None:
    empty = torch.zeros(0, 3)
    for call in (lambda: M.topk_accuracy(empty, torch.zeros(0, dtype=torch.long)),
                 lambda: M.expected_calibration_error(empty, torch.zeros(0, dtype=torch.long)),
                 lambda: M.ece_from_confidences(torch.zeros(0), torch.zeros(0, dtype=torch.bool)),
                 lambda: M.MetricAccumulator().result(),
                 lambda: M.evaluate(nn.Linear(3, 3), [])):
        with pytest.raises(ValueError, match="no samples"):
            call()
    with pytest.raises(ValueError, match="k must be >= 1"):
        M.MetricAccumulator(ks=(0,))


# ---------------------------------------------------------------- ReaL

class Constant(nn.Module):
    """Scores every class the same: every prediction is a tie."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.classes)


def _real(model: nn.Module, images: torch.Tensor, labels: list) -> dict:
    return S.evaluate_real_labels(model, images, labels, mean=[0.0], std=[1.0], img_size=4,
                                  in_chans=1, progress=False)


def test_real_labels_on_ties_one_class_and_empty_sets() -> None:
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    # 10 tied classes, sets of 2 (not holding class 0, which a sort would put first):
    # top-1 2/10, top-5 1 - C(8, 5) / C(10, 5); the empty set is skipped.
    res = _real(Constant(10), images, [[3, 7], [], [1, 9]])
    assert res["top1"] == pytest.approx(0.2) and res["n"] == 2 and res["n_skipped"] == 1
    assert res["top5"] == pytest.approx(1 - comb(8, 5) / comb(10, 5))
    one = _real(Constant(1), images, [[0], [0], []])
    assert (one["top1"], one["top5"], one["n"]) == (1.0, 1.0, 2)
    with pytest.raises(ValueError, match="every image has an empty ReaL label set"):
        _real(Constant(3), images, [[], [], []])
    with pytest.raises(ValueError, match="holds no images"):
        _real(Constant(3), images[:0], [])
