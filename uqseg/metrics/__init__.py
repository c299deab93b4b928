"""Metrics for calibration, segmentation, uncertainty, OOD detection and quality prediction.

Pure numpy/scipy; every function takes arrays in the uqseg conventions (probabilities
``(N, K, *spatial)`` with the class axis 1, labels ``(N, *spatial)``).
"""

from uqseg.metrics.calibration import (
    CalibrationAccumulator,
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    foreground_roi,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_curve,
)
from uqseg.metrics.multilabel import check_multilabel, multilabel_report
from uqseg.metrics.ood import detection_report, fpr_at_tpr, ood_aupr, ood_auroc
from uqseg.metrics.quality import mean_absolute_error, pearson_r, quality_report, spearman_rho
from uqseg.metrics.segmentation import dice_score, hausdorff_distance_95, iou_score
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
