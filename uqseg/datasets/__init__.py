"""Data that ship with uqseg, and the reference ONNX model zoo (no torch needed).

- :func:`load_brain_tissue`: grey/white matter segmentation built from the real MNI ICBM152
  2009a template (in the nilearn wheel), with distinct augmented subjects per split.
- :func:`load_ood` / :data:`OOD_KINDS`: real out-of-distribution images (CT, other MR,
  ultrasound, natural images from pydicom and scikit-image) and acquisition faults.
- :func:`corrupt` / :data:`CORRUPTIONS`: image corruptions with a severity knob.
- :func:`normalize_intensity`: the per-image robust intensity scaling every loader applies.
- :func:`load_mni_scan`: the template as a whole scan in any orientation and voxel size, with
  its labels (whole-scan checks of ``uqseg predict`` and of a model's preprocessing).
- :func:`make_quality_set`: a labelled split widened with corrupted copies (a spread of
  segmentation quality, to fit :class:`uqseg.QualityRegressor`).
- :func:`reference_models` / :func:`reference_model_info`: the shipped ONNX networks (the
  2-D ensemble; ``dims=3``: the 3-D U-Net member).

Generated arrays are cached in ``$UQSEG_DATA_DIR`` (default ``~/.cache/uqseg``).
See ``uqseg/datasets/README.md`` for construction details and licences.
"""

from ._brain import load_brain_tissue
from ._corrupt import CORRUPTIONS, corrupt
from ._intensity import normalize_intensity
from ._ood import OOD_KINDS, load_ood
from ._quality_set import make_quality_set
from ._scan import load_mni_scan
from ._zoo import reference_model_info, reference_models

__all__ = [
    "CORRUPTIONS",
    "OOD_KINDS",
    "corrupt",
    "load_brain_tissue",
    "load_mni_scan",
    "load_ood",
    "make_quality_set",
    "normalize_intensity",
    "reference_model_info",
    "reference_models",
]
