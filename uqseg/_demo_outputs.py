"""How the demo scores a network's outputs: softmax (labels) or sigmoid (indicator channels).

The embedded data has labels ``0 .. K-1`` (0 background). A softmax network predicts them
directly. A sigmoid network's ``C`` channels are matched to them by count (:data:`CONVENTION`):

- ``C = 1``: foreground, ``label > 0``;
- ``C = K - 1``: one foreground label per channel, one-vs-rest (channel ``c`` is label
  ``c + 1``);
- ``C = K``: foreground first, then one channel per foreground label (channel 0 is
  ``label > 0``, channel ``c >= 1`` is label ``c``): overlapping regions, as a nested
  multi-label network (BraTS' whole tumour and its sub-regions) is trained.

Any other count is an error that says so. Sigmoid scores: calibration metrics pool the
channels (each channel's voxels as a binary problem ``[1 - p_c, p_c]``, the channels side by
side, as ``metrics.multilabel_report``'s ``pooled``), Dice and predicted quality are per
channel, and an uncertainty map per image is the sum of the channels' maps (for entropy: the
entropy of the channels' joint distribution, the channels taken as independent).
"""

from __future__ import annotations

import numpy as np

from uqseg._numeric import sigmoid
from uqseg.uncertainty import softmax

CONVENTION = {
    "1": "foreground (label > 0)",
    "K - 1": "one-vs-rest, channel c = label c + 1",
    "K": "channel 0 = foreground (label > 0), channel c >= 1 = label c",
}


class SoftmaxOutputs:
    """Exclusive classes: labels, argmax, top-label calibration inside the ROI."""

    activation = "softmax"

    def __init__(self, n_labels: int, class_names):
        self.k = n_labels
        self.names = list(class_names[:n_labels - 1])  # the foreground classes
        self.convention = None

    def targets(self, y):
        return y

    def proba(self, z):
        return softmax(z)

    def pred(self, p):
        return p.argmax(1)

    def map(self, m):
        return m

    def image_dice(self, pred, t) -> np.ndarray:
        """Per image and foreground class ``(N, K - 1)``, NaN where both are empty."""
        from uqseg import metrics

        return metrics.dice_score(pred, t, n_classes=self.k)

    def ece(self, p, t, roi) -> float:
        from uqseg import metrics

        return metrics.expected_calibration_error(p, t, mask=roi)

    def calibration(self, p, t, roi) -> dict:
        from uqseg import metrics

        return {"ece": metrics.expected_calibration_error(p, t, mask=roi),
                "nll": metrics.negative_log_likelihood(p, t, mask=roi),
                "brier": metrics.brier_score(p, t, mask=roi)}

    def curve(self, p, t, roi) -> dict:
        from uqseg import metrics

        conf, acc, count = metrics.reliability_curve(p, t, mask=roi)
        return {"confidence": conf, "accuracy": acc, "count": count,
                "ece": metrics.expected_calibration_error(p, t, mask=roi)}


class SigmoidOutputs(SoftmaxOutputs):
    """Independent channels: indicator targets, ``p >= 0.5`` masks, pooled binary calibration."""

    activation = "sigmoid"

    def __init__(self, n_labels: int, class_names, n_channels: int, where: str = "the network"):
        fg = list(class_names[:n_labels - 1])
        if n_channels == 1:
            names, self.convention = ["foreground"], CONVENTION["1"]
        elif n_channels == n_labels - 1:
            names, self.convention = fg, CONVENTION["K - 1"]
        elif n_channels == n_labels:
            names, self.convention = ["foreground", *fg], CONVENTION["K"]
        else:
            raise ValueError(
                f"{where} has {n_channels} sigmoid channels; on the embedded data (labels "
                f"0 .. {n_labels - 1}: background, {', '.join(fg)}) the demo reads a sigmoid "
                f"network with 1 channel as {CONVENTION['1']}, with {n_labels - 1} as "
                f"{CONVENTION['K - 1']}, or with {n_labels} as {CONVENTION['K']}")
        self.k, self.c, self.names = n_labels, n_channels, names

    def targets(self, y):
        """Indicator targets ``(N, C, *spatial)`` of labels ``y`` (see :data:`CONVENTION`)."""
        y = np.asarray(y)
        if self.c == 1:
            return (y > 0)[:, None]
        fg = [y == c for c in range(1, self.k)]
        return np.stack(fg if self.c == self.k - 1 else [y > 0, *fg], axis=1)

    def proba(self, z):
        return sigmoid(np.array(z, np.float32))  # a copy: sigmoid works in place

    def pred(self, p):
        return p >= 0.5

    def map(self, m):
        return m.sum(axis=1)

    def image_dice(self, pred, t) -> np.ndarray:
        """Per image and channel ``(N, C)``, NaN where mask and target are both empty."""
        from uqseg.quality_regressors import quality_targets

        return quality_targets(np.asarray(pred, bool), np.asarray(t, bool), self.c, "dice",
                               np.nan)

    @staticmethod
    def pooled(p, t, roi):
        """Two-class probabilities ``(C N, 2, *spatial)``, labels and ROI of the channels'
        binary problems side by side (channel-major, as ``multilabel_report``)."""
        c = p.shape[1]
        pc = np.moveaxis(p, 1, 0).reshape(c * p.shape[0], *p.shape[2:])
        tc = np.moveaxis(t, 1, 0).reshape(pc.shape).astype(np.int64)
        return np.stack([1 - pc, pc], axis=1), tc, np.tile(roi, (c,) + (1,) * (roi.ndim - 1))

    def ece(self, p, t, roi) -> float:
        return super().ece(*self.pooled(p, t, roi))

    def calibration(self, p, t, roi) -> dict:
        out = super().calibration(*self.pooled(p, t, roi))
        out["brier"] /= 2  # the binary Brier score, mean (p_c - t_c)^2 (multilabel_report's)
        return out

    def curve(self, p, t, roi) -> dict:
        return super().curve(*self.pooled(p, t, roi))


def outputs_for(ens, n_labels: int, class_names, names) -> SoftmaxOutputs:
    """The scoring of ``ens``'s outputs; a clear error for a channel count the data cannot
    match or for outputs that are not logits of a softmax or a sigmoid."""
    act = ens.activation_
    if act == "softmax":
        if ens.n_classes_ != n_labels:
            raise ValueError(
                f"the models output {ens.n_classes_} softmax classes; the embedded data has "
                f"{n_labels} labels (background, {', '.join(class_names[:n_labels - 1])})")
        return SoftmaxOutputs(n_labels, class_names)
    if act == "sigmoid":
        return SigmoidOutputs(n_labels, class_names, ens.n_classes_,
                              where=" / ".join(names) if len(names) < 4 else "the models")
    raise ValueError(f"the demo needs networks that output logits of a softmax or a sigmoid; "
                     f"these have activation {act!r} (probabilities): pass a network without "
                     "its final activation, or its activation to OnnxSegmenter")
