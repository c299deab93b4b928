"""Image-level out-of-distribution detectors on top of a segmentation network.

Every detector follows scikit-learn's outlier-detector convention (as ``IsolationForest``):
``score_samples`` is higher for more in-distribution images, ``decision_function`` is
``score_samples - offset_``, ``predict`` gives ``+1`` (inlier) or ``-1`` (outlier), and
``offset_`` comes from ``contamination`` (the ``contamination`` quantile of the training scores)
or, with ``threshold="karimi"``, from mean - 2.5 std of the training scores (Karimi & Gholipour).
Training scores are cross-fitted (spectral, Mahalanobis) or leave-one-out (k-NN), so a training
image is never scored against itself.

- :class:`SpectralOODDetector`: singular-value signatures of one (or several) feature layers
  and the distance to the nearest training signature (Karimi & Gholipour, arXiv 2004.06569),
  combined with the activations' layout; each part is a descriptor object (:class:`Spectrum`,
  :class:`Layout`) with its own parameters.
- :class:`UncertaintyOODDetector`: mean predictive entropy, 1 - max softmax or mutual
  information over the image or the predicted foreground.
- :class:`MahalanobisOODDetector`: Mahalanobis distance of global-average-pooled features with a
  Ledoit-Wolf covariance, optionally after PCA (Woodland et al. 2023).
- :class:`KNNOODDetector`: k-th nearest-neighbour distance of L2-normalised pooled features.

The base class owns fitting, thresholds and prediction; subclasses only turn images into
per-image descriptors (``_descriptors``) and descriptors into scores (``_score``).
"""

from __future__ import annotations

from uqseg.ood._base import KARIMI_STD, THRESHOLDS, _kth_euclidean  # noqa: F401
from uqseg.ood._baselines import KNNOODDetector, MahalanobisOODDetector, UncertaintyOODDetector
from uqseg.ood._descriptors import Layout, Spectrum
from uqseg.ood._signatures import adaptive_avg_pool, singular_values, spectral_signature  # noqa: F401
from uqseg.ood._spectral import DESCRIPTORS, SpectralOODDetector  # noqa: F401

__all__ = [
    "KNNOODDetector",
    "Layout",
    "MahalanobisOODDetector",
    "SpectralOODDetector",
    "Spectrum",
    "UncertaintyOODDetector",
    "adaptive_avg_pool",
    "spectral_signature",
]

# the public home of the detectors (saved folders and the docs name them uqseg.ood.<class>)
for _cls in (KNNOODDetector, Layout, MahalanobisOODDetector, SpectralOODDetector, Spectrum,
             UncertaintyOODDetector):
    _cls.__module__ = __name__
del _cls
