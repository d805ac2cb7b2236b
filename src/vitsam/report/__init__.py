"""Reports: a study folder or run folders as one self-contained HTML page and a Markdown twin."""
from .build import build_report

__all__ = ["build_report"]
