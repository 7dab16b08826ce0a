"""Memory staleness, measured by training and plotted by ``longmem staleness``: it lives in ``longmem.staleness``
(below training and the evaluations); its names stay importable from here."""

from longmem.staleness import plot_staleness, staleness, staleness_curve  # noqa: F401
