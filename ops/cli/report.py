"""``feda2v report``: a run's ``report.html`` on demand (also for a crashed or partial run), or a
side-by-side comparison of several runs.

Parses the arguments and calls :mod:`common.report`, which documents what the pages show.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from common.report import write_comparison, write_report

    if len(args.runs) == 1:
        path = write_report(args.runs[0], args.out or None)
    else:
        path = write_comparison(args.runs, args.out or Path.cwd() / "comparison.html")
    print(path)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a run's HTML report, or compare runs side by side",
                       description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory (outputs/<run>); two or more: a comparison")
    p.add_argument("--out", default="", help="output file (one run: <RUN_DIR>/report.html; several: ./comparison.html)")
    p.set_defaults(func=cmd_report)
