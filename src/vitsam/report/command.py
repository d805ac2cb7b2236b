"""``vitsam report DIR``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_report(sub: Any) -> None:
    s = sub.add_parser("report", help="an HTML + Markdown report of a study or of run folders",
                       description="Read a study folder (or run folders) and write one "
                                   "self-contained HTML file (figures embedded) and its Markdown "
                                   "twin, with the tables as CSV.")
    s.add_argument("dirs", nargs="+", metavar="DIR", help="a study folder, or run folders")
    s.add_argument("--out", help="report folder (default: the study folder, else ./report)")
    s.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> None:
    from .build import build_report

    html, md = build_report([Path(d) for d in args.dirs], Path(args.out) if args.out else None)
    print(f"report -> {html}\nmarkdown -> {md}")
