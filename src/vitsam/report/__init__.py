"""Reports: a study folder or run folders as one self-contained HTML page and a Markdown twin.

``build_report`` is imported on first use: the report's figures need matplotlib, which
``vitsam --help`` (whose parser imports ``vitsam.report.command``) should not pay for.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_report"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from .build import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
