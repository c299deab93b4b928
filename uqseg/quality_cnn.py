"""The DeVries & Taylor quality CNN as a file: an ONNX network reading the stacked maps.

A network exported by ``uqseg.training.quality_net`` (or any with the same interface) takes
:func:`uqseg.quality_features.maps_input` ``(N, C + K + 1, *spatial)`` and outputs ``(N, K - 1)``
qualities in ``[0, 1]``. :class:`QualityNetwork` checks that interface and runs the file through
the inference layer (``uqseg._network``); ``QualityRegressor(regressor=<path>)`` uses it.
"""

from __future__ import annotations

import os

import numpy as np

from uqseg._network import OnnxNetwork

__all__ = ["QualityNetwork", "check_quality_output"]


def check_quality_output(out, n_images: int, n_classes: int) -> np.ndarray:
    """``out`` as float64 ``(N, K - 1)`` clipped to ``[0, 1]``; another shape is an error."""
    want = (n_images, n_classes - 1)
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 1 and want[1] == 1:
        out = out[:, None]
    if out.shape != want:
        raise ValueError(f"the quality regressor must output shape (N, K - 1) = {want}, "
                         f"got {out.shape}")
    return np.clip(out, 0.0, 1.0)


class QualityNetwork:
    """A pretrained ONNX quality network (not retrained), loaded on first use.

    Parameters
    ----------
    path : str or path-like
    n_classes : int
        Classes of the segmenter whose maps it reads (it outputs ``n_classes - 1`` qualities).
    """

    def __init__(self, path, n_classes: int):
        self.path = os.fspath(path)
        self.n_classes = int(n_classes)
        self._net = OnnxNetwork(self.path, who=f"the ONNX regressor {self.path!r}", what="maps")

    def check(self, sample: np.ndarray) -> None:
        """Clear errors when the network cannot read maps like ``sample`` (N, C + K + 1, ...)
        or does not output ``(N, K - 1)``."""
        who = f"the ONNX regressor {self.path!r}"
        names = self._net.input_names
        if len(names) != 1:
            raise ValueError(f"{who} must take one input (the stacked maps), it takes {names}")
        want_c = sample.shape[1]
        shape = self._net.input_shape()
        if shape is not None and len(shape) != sample.ndim:
            raise ValueError(f"{who} takes rank-{len(shape)} input, expected "
                             f"(N, C + K + 1, *spatial) of rank {sample.ndim}")
        if shape is not None and shape[1] is not None and shape[1] != want_c:
            raise ValueError(
                f"{who} takes {shape[1]} input channels, expected {want_c} = image channels + "
                f"{self.n_classes} class probabilities + 1 uncertainty map")
        self.predict(sample[:1])

    def predict(self, maps: np.ndarray) -> np.ndarray:
        """Qualities ``(N, K - 1)`` in ``[0, 1]`` of stacked maps ``(N, C + K + 1, *spatial)``."""
        return check_quality_output(self._net(maps), maps.shape[0], self.n_classes)
