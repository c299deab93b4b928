"""Figures of uqseg's metrics (presentation, kept apart from the numeric metrics).

Needs matplotlib (``pip install 'uqseg[plot]'``), imported only when a figure is drawn.
"""

from __future__ import annotations

from uqseg._optional import import_optional
from uqseg.metrics.streaming import _accumulate

__all__ = ["plot_reliability_diagram"]


def plot_reliability_diagram(
    proba, y, n_bins: int = 15, ax=None, label=None, *, mask=None, ignore_index=None
):
    """Draw a reliability diagram (accuracy against confidence per bin) on ``ax``.

    Needs matplotlib (``pip install 'uqseg[plot]'``).

    Parameters
    ----------
    proba, y, n_bins, mask, ignore_index
        As in :func:`reliability_curve`.
    ax : matplotlib Axes, optional
        Default: a new figure's axes.
    label : str, optional
        Legend label of the curve; the ECE is appended.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import numpy as np, matplotlib
    >>> matplotlib.use("Agg")
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)
    >>> ax = plot_reliability_diagram(p, np.array([[0, 1]]), n_bins=5, label="net")
    >>> ax.get_xlabel()
    'confidence'
    """
    plt = import_optional("matplotlib.pyplot", extra="plot", purpose="reliability diagrams")
    acc = _accumulate(proba, y, n_bins, "uniform", False, mask, ignore_index, scores=False)
    conf, accuracy, count = acc.reliability_curve()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ok = count > 0
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    text = f"ECE {acc.ece:.3f}"
    ax.plot(conf[ok], accuracy[ok], marker="o", label=f"{label} ({text})" if label else text)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    return ax

