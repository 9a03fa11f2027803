"""Analysis of run directories: tidy frames, figures, reports, notebooks.

Reads files only (docs/architecture.md): nothing here imports torch or the trainer, so a
laptop without the training stack can analyse runs copied off a testbed. Entry points:
:func:`analysis.load.load_runs` (frames), :func:`analysis.figures.plot_all`,
:func:`analysis.report.write_report`, and ``testbed plot`` / ``testbed report``.
"""

from analysis.load import Run, RunSet, TruncatedRecordWarning, load_run, load_runs

__all__ = ["Run", "RunSet", "TruncatedRecordWarning", "load_run", "load_runs"]
