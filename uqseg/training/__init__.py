"""Training side of uqseg (needs the ``train`` extra: torch).

Networks, losses, a seeded training loop and ONNX export that writes the conventions
:class:`uqseg.OnnxSegmenter` reads. This is the only package of uqseg that imports torch.
"""

from __future__ import annotations

from .._optional import import_optional

import_optional("torch", "train", purpose="uqseg.training")

from .export import export_onnx  # noqa: E402
from .hierarchical import (  # noqa: E402
    HierarchicalLoss,
    HierarchicalUNet,
    export_hierarchical_onnx,
    sample_onnx,
)
from .loop import fit_segmenter, predict_logits  # noqa: E402
from .losses import CrossEntropyLoss, DiceCELoss, DiceLoss  # noqa: E402
from .multitask import fit_multitask, restrict_to_task, sample_probabilities  # noqa: E402
from .networks import UNet  # noqa: E402
from .vls import (  # noqa: E402
    VariationalLabelSmoothing,
    fit_soft_targets,
    fit_vls,
    smooth_labels,
    vls_soft_labels,
)

# the quality network's estimator needs scikit-learn: loaded on first use, so that training
# and export run where only torch and onnx are installed (e.g. a bare GPU image)
_LAZY = {"QualityNet", "QualityNetRegressor", "train_quality_net", "export_quality_net"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import quality_net

        return getattr(quality_net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY)


__all__ = [
    "UNet",
    "DiceLoss",
    "DiceCELoss",
    "CrossEntropyLoss",
    "fit_segmenter",
    "predict_logits",
    "export_onnx",
    "HierarchicalUNet",
    "HierarchicalLoss",
    "export_hierarchical_onnx",
    "sample_onnx",
    "VariationalLabelSmoothing",
    "fit_vls",
    "vls_soft_labels",
    "fit_soft_targets",
    "smooth_labels",
    "fit_multitask",
    "sample_probabilities",
    "restrict_to_task",
    "QualityNet",
    "QualityNetRegressor",
    "train_quality_net",
    "export_quality_net",
]
