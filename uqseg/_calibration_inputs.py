"""What a :class:`~uqseg.calibration.TemperatureCalibrator` reads: scores (logits or
probabilities, from ``X`` or from its segmenter) batch by batch, and the targets paired with
them — class labels ``(N, *spatial)`` for softmax outputs, indicator arrays
``(N, C, *spatial)`` for sigmoid outputs — with the ROI and ``ignore_index`` as a voxel mask.
"""

from __future__ import annotations

import numpy as np

from uqseg._validation import check_labels, check_scores
from uqseg.metrics.calibration import foreground_roi

__all__ = ["ScoreStream"]


class ScoreStream:
    """The input half of :class:`~uqseg.calibration.TemperatureCalibrator` (a mixin)."""

    def _check_scores(self, S, name):
        arr = np.asarray(S)
        sig = self._activation(arr.shape[1] if arr.ndim >= 3 else 2) == "sigmoid"
        if not sig:
            arr = check_scores(S, name=name, kind="logits")  # float, (N, K, ...), finite
        elif not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} must be floating point scores of shape (N, C, *spatial), "
                            f"got dtype {arr.dtype}")
        elif arr.ndim < 3 or not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite scores of shape (N, C, *spatial), got "
                             f"shape {arr.shape}" + (" with NaN or infinite values"
                                                     if arr.ndim >= 3 else ""))
        lo, hi = float(arr.min()), float(arr.max())
        if self.input_kind == "logits":
            if lo >= 0 and hi <= 1 and (sig or float(np.abs(arr.sum(axis=1) - 1).max()) <= 1e-3):
                what = "every value in [0, 1]" if sig else "values in [0, 1] summing to 1 " \
                    "over axis 1"
                raise ValueError(
                    f"{name} looks like probabilities ({what}) but input_kind='logits'; pass "
                    "input_kind='proba' if they are")
        elif lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"input_kind='proba' but {name} holds values in [{lo:.3g}, {hi:.3g}], outside "
                "[0, 1]; pass input_kind='logits' if these are logits")
        return arr

    def _to_log(self, arr):
        """Scores as float32 logits (probabilities become clipped log-probabilities, or for
        sigmoid outputs clipped logits ``log p - log(1 - p)``)."""
        if self.input_kind == "proba":
            out = np.log(np.maximum(arr, self.eps), dtype=np.float32)
            if self._activation(arr.shape[1]) == "sigmoid":
                out -= np.log(np.maximum(1 - arr, self.eps), dtype=np.float32)
            return out
        return arr.astype(np.float32, copy=False)

    def _score_batches(self, X):
        """Yield validated float32 logits ``(n, K, *spatial)`` batch by batch (one image per
        batch for lists of differently sized images)."""
        for z, _ in self._batches(X):
            yield z

    def _batches(self, X):
        """Yield (logits, the images they come from or None) batch by batch."""
        est = getattr(self, "estimator_", None)
        bs = int(self.batch_size)
        if est is None:
            if isinstance(X, (list, tuple)):
                for i, x in enumerate(X):
                    yield self._to_log(self._check_scores(np.asarray(x)[None], f"X[{i}]")), None
                return
            arr = self._check_scores(X, "X")
            for s in range(0, arr.shape[0], bs):
                yield self._to_log(arr[s:s + bs]), None
            return
        n = len(X)
        for s in range(0, n, bs):
            xb = X[s:s + bs]
            out = est.transform(xb)
            if isinstance(out, list):
                parts = [(o[None], np.asarray(x)[None]) for o, x in zip(out, xb, strict=True)]
            else:
                parts = [(out, np.stack([np.asarray(x) for x in xb]) if isinstance(
                    xb, (list, tuple)) else np.asarray(xb))]
            for part, img in parts:
                z = self._to_log(self._check_scores(part, "the estimator's transform output"))
                yield z, img

    def _targets(self, yb, z):
        """Check one batch's targets against its logits ``z``: class labels ``(n, *spatial)``
        for softmax, 0/1 indicators ``(n, C, *spatial)`` for sigmoid (binary labels for
        C = 1 get the channel axis)."""
        n, k = z.shape[:2]
        sig = self._activation(k) == "sigmoid"
        yb = np.asarray(yb)
        if sig and yb.ndim == z.ndim - 1 and k == 1:
            yb = yb[:, None]
        if sig and yb.ndim != z.ndim:
            raise ValueError(
                f"the scores are {k} independent sigmoid channels: y must be indicator targets "
                f"(N, {k}, *spatial), one 0/1 mask per channel; got class labels of shape "
                f"{yb.shape}")
        if not sig and yb.ndim == z.ndim:
            raise ValueError(
                f"the scores are softmax logits over {k} exclusive classes: y must be class "
                f"labels (N, *spatial); got indicator targets of shape {yb.shape} (pass "
                "activation='sigmoid' if the scores are independent per-channel logits)")
        if sig:
            return check_labels(yb, n_classes=2, shapes=(n, k, *z.shape[2:]),
                                ignore_index=self.ignore_index, name="y (indicators)")
        return check_labels(yb, n_classes=k, shapes=(n, *z.shape[2:]),
                            ignore_index=self.ignore_index, name="y")

    def _pairs(self, X, y):
        """Yield (logits, targets, voxel mask or None, images) per batch."""
        if isinstance(y, (list, tuple)):
            y_items = list(y)
        else:
            y_items = np.asarray(y)
            if y_items.ndim < 2:
                raise ValueError(f"y must have shape (N, *spatial), got shape {y_items.shape}")
        pos = 0
        for z, img in self._batches(X):
            n = z.shape[0]
            if pos + n > len(y_items):
                raise ValueError(f"X has more images than y has label maps ({len(y_items)})")
            yb = y_items[pos:pos + n]
            yb = np.stack([np.asarray(v) for v in yb]) if isinstance(yb, list) else yb
            pos += n
            k = getattr(self, "n_classes_", None) or z.shape[1]
            if z.shape[1] != k:
                raise ValueError(f"the scores have {z.shape[1]} classes on axis 1 but the "
                                 f"calibrator was fitted with {k}")
            yb = self._targets(yb, z)
            ign = self.ignore_index
            mask = None
            if self.roi == "foreground":
                fg = yb if ign is None else np.where(yb == ign, 0, yb)
                if yb.ndim == z.ndim:  # indicators: the box of any channel's foreground
                    mask = np.broadcast_to(foreground_roi(fg.any(axis=1).astype(np.int8),
                                                          margin=int(self.margin))[:, None],
                                           yb.shape)
                else:
                    mask = foreground_roi(fg, margin=int(self.margin))
            if ign is not None:
                valid = yb != ign
                mask = valid if mask is None else mask & valid
            yield z, yb, mask, img
        if pos != len(y_items):
            raise ValueError(f"X has {pos} images but y has {len(y_items)} label maps")
