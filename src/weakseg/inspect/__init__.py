"""Looking at a run: per-image panels of every stage (``panels``), a static HTML report (``report``)
and the stage names they share (``stages``). Imported lazily: ``stages`` alone stays light."""

__all__ = ["render_panel", "run_inspect", "write_report"]


def __getattr__(name):
    if name in ("render_panel", "run_inspect"):
        from weakseg.inspect import panels

        return getattr(panels, name)
    if name == "write_report":
        from weakseg.inspect.report import write_report

        return write_report
    raise AttributeError(name)
