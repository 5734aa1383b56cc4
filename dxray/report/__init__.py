"""A self-contained HTML report of a run: ``build_report(run, out)`` (``dxray report RUN -o report.html``)."""

from dxray.report.html import build_report

__all__ = ["build_report"]
