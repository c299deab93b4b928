"""The parameters of :class:`~uqseg.calibration.TemperatureCalibrator` (a mixin): their
checks, the segmenter they name, and the output kind (softmax or sigmoid logits) they
resolve to."""

from __future__ import annotations

import numbers
import os

import numpy as np

from uqseg.segmenter import resolve_segmenter

__all__ = ["CalibratorParams"]


class CalibratorParams:
    """Parameter checks and resolution of :class:`~uqseg.calibration.TemperatureCalibrator`."""

    def _check_params(self):
        if self.mode not in ("global", "classwise", "local"):
            raise ValueError("mode must be 'global' or 'classwise' (one temperature, one per "
                             f"class) or 'local' (a map), got {self.mode!r}")
        if self.objective not in ("nll", "ece"):
            raise ValueError(f"objective must be 'nll' or 'ece', got {self.objective!r}")
        if self.objective == "ece" and self.mode != "global":
            raise ValueError("objective='ece' fits one global temperature; use mode='global' "
                             "(class-wise temperatures are fitted by NLL)")
        if self.input_kind not in ("logits", "proba"):
            raise ValueError(f"input_kind must be 'logits' or 'proba', got {self.input_kind!r}")
        if self.activation not in ("auto", "softmax", "sigmoid"):
            raise ValueError("activation must be 'auto', 'softmax' or 'sigmoid' (what the scores "
                             f"are logits of), got {self.activation!r}")
        if self.roi not in (None, "foreground"):
            raise ValueError(f"roi must be None or 'foreground', got {self.roi!r}")
        for name, low in (("margin", 0), ("max_voxels", 1), ("batch_size", 1), ("n_bins", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
        if self.ignore_index is not None and (
                isinstance(self.ignore_index, bool)
                or not isinstance(self.ignore_index, numbers.Integral)):
            raise TypeError(f"ignore_index must be an integer or None, got {self.ignore_index!r}")
        if self.random_state is not None and (
                isinstance(self.random_state, bool)
                or not isinstance(self.random_state, numbers.Integral)):
            raise TypeError(f"random_state must be an integer or None, got {self.random_state!r}")
        if not (isinstance(self.eps, numbers.Real) and 0 < self.eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        for name in ("alpha", "top_label_weight"):
            a = getattr(self, name)
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a < np.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {a!r}")
        sc = self.scales
        if not isinstance(sc, (list, tuple)) or len(sc) > 4 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.5 <= v <= 64
                for v in sc) or len(set(map(float, sc))) != len(sc):
            raise ValueError("scales must be a list of at most 4 distinct smoothing widths in "
                             f"[0.5, 64] voxels, got {sc!r}")
        if not isinstance(self.use_image, (bool, np.bool_)):
            raise TypeError(f"use_image must be True or False, got {self.use_image!r}")

    def _make_estimator(self, X):
        est = self.estimator
        if est is None:
            return None
        if not isinstance(est, (str, os.PathLike)) and not callable(
                getattr(est, "transform", None)):
            raise TypeError("estimator must be None, a path to an ONNX file or a segmenter with "
                            f"transform(X) -> logits; got {type(est).__name__}")
        seg = resolve_segmenter(est, X, requires=("transform",))
        act = getattr(seg, "activation_", "softmax")
        if act not in ("softmax", "sigmoid"):
            raise ValueError(
                f"the segmenter outputs probabilities (activation_={act!r}), not logits; pass "
                "them as X with estimator=None and input_kind='proba'")
        if self.activation != "auto" and self.activation != act:
            raise ValueError(f"activation={self.activation!r} but the segmenter's outputs are "
                             f"{act} logits (activation_={act!r}); use activation='auto'")
        return seg

    def _activation(self, k):
        """What the scores (``k`` channels) are logits of: the fitted ``activation_``, else the
        parameter, the estimator's, or by the channel count."""
        act = getattr(self, "activation_", None)
        if act is None:
            act = self.activation if self.activation != "auto" else getattr(
                getattr(self, "estimator_", None), "activation_",
                "sigmoid" if k == 1 else "softmax")
        if act == "softmax" and k < 2:
            raise ValueError("softmax scores need at least 2 classes on axis 1, got 1; one "
                             "channel is a sigmoid output (activation='sigmoid')")
        return act
