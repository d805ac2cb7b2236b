"""One-line readings of a result table: what the numbers say about the paper's claims.

Readings are computed from the numbers, never written in advance, so a run where a claim does
not hold says so.
"""
from __future__ import annotations

from typing import Any, Sequence

FIT = 0.98  # a model "fits" its training data at this clean training accuracy


def _pair(rows: Sequence[dict[str, Any]], family: str) -> tuple[dict, dict] | None:
    van = [r for r in rows if r["family"] == family and r["method"] == "vanilla"]
    sam = [r for r in rows if r["family"] == family and r["method"] == "sam"]
    return (van[0], sam[0]) if van and sam else None


def pair_reading(family: str, van: dict[str, Any], sam: dict[str, Any]) -> str:
    """SAM against vanilla for one family: curvature, accuracy, and whether it fit its data."""
    parts = []
    for key, where in (("lambda_max_aug", "on shifted training images"),
                       ("lambda_max", "on the training images themselves")):
        if key in van and key in sam and sam[key] > 0:
            ratio = van[key] / sam[key]
            change = f"lowered ({ratio:.1f}x)" if ratio > 1 else "raised"
            loss = (f", at loss {van[key + '_loss']:.3g} vs {sam[key + '_loss']:.3g}"
                    if key + "_loss" in van and key + "_loss" in sam else "")
            parts.append(f"lambda_max {where} {van[key]:.4g} -> {sam[key]:.4g}: {change}{loss}")
    d = 100 * (sam["test_acc"] - van["test_acc"])
    parts.append(f"test accuracy {'+' if d >= 0 else ''}{d:.2f} points")
    fit = van.get("train_acc", 0.0) >= FIT
    regime = (f"vanilla fits its training data ({100 * van['train_acc']:.1f}% train)" if fit else
              f"vanilla still underfits ({100 * van['train_acc']:.1f}% train), where SAM is "
              "expected to cost accuracy")
    return f"{family}: SAM " + "; ".join(parts) + f"; {regime}"


def demo_reading(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's reading: per family, then whether SAM helped the ViT more than the ResNet."""
    lines, gains, flat = [], {}, {}
    for fam in ("vit", "resnet"):
        p = _pair(rows, fam)
        if not p:
            continue
        lines.append(pair_reading(fam, *p))
        gains[fam] = 100 * (p[1]["test_acc"] - p[0]["test_acc"])
        if all(r.get("lambda_max_aug", 0) > 0 for r in p):
            flat[fam] = p[0]["lambda_max_aug"] / p[1]["lambda_max_aug"]
    if len(flat) == 2:
        lines.append(_versus(flat["vit"] > flat["resnet"], "flattens", "not flatten",
                             "around its training images", f"{flat['vit']:.1f}x vs "
                             f"{flat['resnet']:.1f}x lower lambda_max on shifted images"))
    if len(gains) == 2:
        lines.append(_versus(gains["vit"] > gains["resnet"], "helps", "not help", "here",
                             f"{gains['vit']:+.2f} vs {gains['resnet']:+.2f} points; one seed, "
                             "so differences under about a point are within seed noise"))
    return "\n".join(lines)


def _versus(as_paper: bool, does: str, does_not: str, where: str, numbers: str) -> str:
    """'As in the paper, SAM <does> the ViT more than the ResNet ...' or its negation."""
    lead = f"As in the paper, SAM {does}" if as_paper else f"Unlike the paper, SAM does {does_not}"
    return f"{lead} the ViT more than the ResNet {where} ({numbers})."
