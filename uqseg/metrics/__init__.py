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
    "expected_calibration_error",
    "foreground_roi",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "reliability_curve",
    "segment_uncertainty",
    "uncertainty_error_overlap",
]
