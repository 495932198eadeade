"""Looking at a run: per-image panels of every stage (``panels``) and a static HTML report (``report``)."""
from weakseg.inspect.panels import render_panel, run_inspect
from weakseg.inspect.report import write_report

__all__ = ["render_panel", "run_inspect", "write_report"]
