"""Metrics for calibration, segmentation, uncertainty, OOD detection and quality prediction.

Pure numpy/scipy; every function takes arrays in the uqseg conventions (probabilities
``(N, K, *spatial)`` with the class axis 1, labels ``(N, *spatial)``).

Modules: :mod:`~uqseg.metrics.streaming` (the chunked :class:`CalibrationAccumulator`),
:mod:`~uqseg.metrics.calibration` (binned metrics: ECE, MCE, adaptive, reliability curve),
:mod:`~uqseg.metrics.scoring` (Brier score, NLL), :mod:`~uqseg.metrics.multilabel` (sigmoid
outputs), :mod:`~uqseg.metrics.segmentation`, :mod:`~uqseg.metrics.uncertainty`,
:mod:`~uqseg.metrics.ood`, :mod:`~uqseg.metrics.quality`. The reliability diagram lives in
:mod:`uqseg.plotting` (presentation) and is re-exported here on first access, so importing the
metrics never imports the plotting layer.
"""

from uqseg.metrics.calibration import (
    adaptive_calibration_error,
    expected_calibration_error,
    foreground_roi,
    maximum_calibration_error,
    reliability_curve,
)
from uqseg.metrics.multilabel import check_multilabel, multilabel_report
from uqseg.metrics.ood import detection_report, fpr_at_tpr, ood_aupr, ood_auroc
from uqseg.metrics.quality import mean_absolute_error, pearson_r, quality_report, spearman_rho
from uqseg.metrics.scoring import brier_score, negative_log_likelihood
from uqseg.metrics.segmentation import dice_score, hausdorff_distance_95, iou_score
from uqseg.metrics.streaming import CalibrationAccumulator
from uqseg.metrics.uncertainty import (
    binary_entropy,
    segment_uncertainty,
    uncertainty_error_overlap,
)

__all__ = [
    "CalibrationAccumulator",
    "adaptive_calibration_error",
    "binary_entropy",
    "brier_score",
    "check_multilabel",
    "detection_report",
    "dice_score",
    "expected_calibration_error",
    "foreground_roi",
    "fpr_at_tpr",
    "hausdorff_distance_95",
    "iou_score",
    "maximum_calibration_error",
    "mean_absolute_error",
    "multilabel_report",
    "negative_log_likelihood",
    "ood_aupr",
    "ood_auroc",
    "pearson_r",
    "plot_reliability_diagram",
    "quality_report",
    "reliability_curve",
    "segment_uncertainty",
    "spearman_rho",
    "uncertainty_error_overlap",
]


def __getattr__(name: str):
    # presentation sits above the metrics: resolved on first use, never at import
    if name == "plot_reliability_diagram":
        from uqseg.plotting import plot_reliability_diagram

        return plot_reliability_diagram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"plot_reliability_diagram"})
