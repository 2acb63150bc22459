"""Reports and plots of finished run folders (the top layer: reads what runners wrote)."""

from fedmeerkat.report.metrics import plot_accuracy, plot_run

__all__ = ["plot_accuracy", "plot_run"]
