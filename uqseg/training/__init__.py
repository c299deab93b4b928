"""Training side of uqseg (needs the ``train`` extra: torch).

Networks, losses, a seeded training loop and ONNX export that writes the conventions
:class:`uqseg.OnnxSegmenter` reads. This is the only package of uqseg that imports torch.
"""

from __future__ import annotations

from .._optional import import_optional

import_optional("torch", "train", purpose="uqseg.training")

from .export import export_onnx  # noqa: E402
from .loop import fit_segmenter, predict_logits  # noqa: E402
from .losses import CrossEntropyLoss, DiceCELoss, DiceLoss  # noqa: E402
from .networks import UNet  # noqa: E402

# further modules (VLS, hierarchical U-Net, multi-task) add their names here
__all__ = [
    "UNet",
    "DiceLoss",
    "DiceCELoss",
    "CrossEntropyLoss",
    "fit_segmenter",
    "predict_logits",
    "export_onnx",
]
