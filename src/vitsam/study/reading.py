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
    if "lambda_max" in van and "lambda_max" in sam and sam["lambda_max"] > 0:
        ratio = van["lambda_max"] / sam["lambda_max"]
        verb = "lowered" if ratio > 1 else "raised"
        parts.append(f"SAM {verb} lambda_max {van['lambda_max']:.4g} -> {sam['lambda_max']:.4g} "
                     f"({ratio:.1f}x)" if ratio > 1 else
                     f"SAM {verb} lambda_max {van['lambda_max']:.4g} -> {sam['lambda_max']:.4g}")
    d = 100 * (sam["test_acc"] - van["test_acc"])
    parts.append(f"test accuracy {'+' if d >= 0 else ''}{d:.2f} points")
    fit = van.get("train_acc", 0.0) >= FIT
    regime = (f"vanilla fits its training data ({100 * van['train_acc']:.1f}% train)" if fit else
              f"vanilla still underfits ({100 * van['train_acc']:.1f}% train), where SAM is "
              "expected to cost accuracy")
    return f"{family}: " + ", ".join(parts) + f"; {regime}"


def demo_reading(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's reading: per family, then whether SAM helped the ViT more than the ResNet."""
    lines = []
    gains = {}
    for fam in ("vit", "resnet"):
        p = _pair(rows, fam)
        if p:
            lines.append(pair_reading(fam, *p))
            gains[fam] = 100 * (p[1]["test_acc"] - p[0]["test_acc"])
    if len(gains) == 2:
        more = gains["vit"] > gains["resnet"]
        lines.append(("As in the paper, SAM helps" if more else "Unlike the paper, SAM does not "
                      "help") + f" the ViT more than the ResNet here ({gains['vit']:+.2f} vs "
                      f"{gains['resnet']:+.2f} points; one seed, so differences under about a "
                      "point are within seed noise).")
    return "\n".join(lines)
