"""Run reports: ``<run>/report.html`` (one run) and a side-by-side comparison of runs.

:mod:`~common.report.run_data` reads a run directory tolerantly, :mod:`~common.report.plots` draws
curves, :mod:`~common.report.html` writes the self-contained pages. The ServerApp writes a run's
report when the run ends (completed or failed); ``feda2v report`` writes one on demand.
"""

from common.report.html import REPORT_NAME, write_comparison, write_report
from common.report.run_data import ReportError, RunData

__all__ = ["REPORT_NAME", "ReportError", "RunData", "write_comparison", "write_report"]
