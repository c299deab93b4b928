"""The stratified, weighted voxel sample a :class:`~uqseg.calibration.TemperatureCalibrator`
fits on.

The calibrator streams the segmenter's output batch by batch and keeps a *stratified,
weighted voxel sample* of bounded size instead of all logits (a 3-D validation set of 100
volumes holds ~1e9 voxels). Strata are (target, uncalibrated confidence bin); inside each
stratum the sample is uniform (priority sampling: each voxel draws a random key and the
stratum keeps its smallest keys, which merges exactly across batches); every sampled voxel is
weighted by ``stratum size / stratum sample size``, so the weighted NLL is an unbiased
estimate of the NLL over all voxels. Rare strata (wrong or unsure voxels, small classes),
which decide the temperature, are kept whole; only the huge confident-background strata are
thinned. When the data hold at most ``max_voxels`` voxels, nothing is dropped and the fit is
exact.

Softmax outputs: a sampled voxel holds its ``K`` logits (``scores`` ``(K, n)``), its target is
its true class and its confidence the top softmax probability. Sigmoid outputs: a sampled
entry is one (voxel, channel) pair holding that channel's logit (``scores`` ``(1, n)``), its
target is ``2 c + y`` (channel ``c``, indicator ``y``) and its confidence
``max(p, 1 - p)``; the strata are then (channel, indicator, confidence bin).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from uqseg import _local

__all__ = ["CONFIDENCE_EDGES", "VoxelSample"]

#: Upper edges of the uncalibrated-confidence bins used as strata (the last bin is open).
CONFIDENCE_EDGES = (0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9999)
_CHUNK = 1 << 20  # voxels per streaming step: bounds temporaries to ~K * 8 MiB


def _water_fill(counts: np.ndarray, budget: int) -> float:
    """Per-stratum cap ``c`` with ``sum(min(counts, c)) <= budget`` (inf if all fit)."""
    if counts.sum() <= budget:
        return np.inf
    srt = np.sort(counts)
    left = budget
    for j, n in enumerate(srt):
        rest = srt.size - j
        if n * rest >= left:
            return float(max(left // rest, 1))
        left -= n
    return np.inf  # pragma: no cover - the first test above returns


class VoxelSample:
    """The sample half of :class:`~uqseg.calibration.TemperatureCalibrator` (a mixin): the
    sample lives in ``self.sample_`` so that it is saved with the estimator."""

    def _sigmoid(self):
        return getattr(self, "activation_", "softmax") == "sigmoid"

    def _reset_sample(self, k):
        sig = self._sigmoid()
        n_strata = (2 * k if sig else k) * (len(CONFIDENCE_EDGES) + 1)
        self.sample_ = {
            "scores": np.zeros((1 if sig else k, 0), np.float32),
            "labels": np.zeros(0, np.int32),
            "strata": np.zeros(0, np.int32), "keys": np.zeros(0, np.float32),
            "counts": np.zeros(n_strata, np.int64),
        }
        if self.mode == "local":  # each voxel's local features, computed on its whole image
            self.sample_["features"] = np.zeros((len(self.feature_names_), 0), np.float32)
        self._thresh = np.full(n_strata, np.inf, np.float32)

    def _rng(self):
        # a fresh stream per call, keyed on the voxels seen so far (saved with the sample)
        seen = int(self.sample_["counts"].sum()) if hasattr(self, "sample_") else 0
        seed = None if self.random_state is None else [int(self.random_state), seen]
        return np.random.default_rng(seed)

    def _softmax_chunks(self, z, yb, mask, img):
        """(scores (K, v), targets, confidences, features or None) of the valid voxels."""
        n, k = z.shape[:2]
        local = self.mode == "local"
        if local:
            img = self._image(z, img)
        z3, y2 = z.reshape(n, k, -1), yb.reshape(n, -1)
        m2 = None if mask is None else mask.reshape(n, -1)
        vox = z3.shape[2]
        for i in range(n):
            if local:  # one image at a time bounds the feature stack's memory
                f2 = _local.local_features(z[i:i + 1], self._scales(),
                                           None if img is None else img[i:i + 1])
                f2 = f2.reshape(f2.shape[0], -1)
            for s in range(0, vox, _CHUNK):
                zc = z3[i, :, s:s + _CHUNK]  # (K, v) view
                yc = y2[i, s:s + _CHUNK]
                fc = f2[:, s:s + _CHUNK] if local else None
                if m2 is not None:
                    keep = m2[i, s:s + _CHUNK]
                    zc, yc = zc[:, keep], yc[keep]
                    fc = fc[:, keep] if local else None
                if yc.size == 0:
                    continue
                # max softmax probability = 1 / sum exp(z - max)
                conf = 1.0 / np.exp(zc - zc.max(axis=0)).sum(axis=0)
                yield zc, yc.astype(np.int32), conf, fc

    def _sigmoid_chunks(self, z, yb, mask, img):
        """(logits (1, v), targets 2 c + y, confidences max(p, 1 - p), features or None) of
        the valid (voxel, channel) entries, channel by channel."""
        n, k = z.shape[:2]
        local = self.mode == "local"
        if local:
            img = self._image(z, img)
        z3, y3 = z.reshape(n, k, -1), yb.reshape(n, k, -1)
        m3 = None if mask is None else mask.reshape(n, k, -1)
        vox = z3.shape[2]
        for i in range(n):
            for c in range(k):
                f2 = self._sigmoid_features(z, img, i, c) if local else None
                for s in range(0, vox, _CHUNK):
                    zc, yc = z3[i, c, s:s + _CHUNK], y3[i, c, s:s + _CHUNK]
                    fc = f2[:, s:s + _CHUNK] if local else None
                    if m3 is not None:
                        keep = m3[i, c, s:s + _CHUNK]
                        zc, yc = zc[keep], yc[keep]
                        fc = fc[:, keep] if local else None
                    if yc.size == 0:
                        continue
                    conf = expit(np.abs(zc))
                    yield zc[None], yc.astype(np.int32) + np.int32(2 * c), conf, fc

    def _ingest(self, z, yb, mask, rng, img=None):
        """Add one batch's valid voxels to the sample (chunk by chunk, bounded memory)."""
        chunks = self._sigmoid_chunks(z, yb, mask, img) if self._sigmoid() else \
            self._softmax_chunks(z, yb, mask, img)
        edges = np.asarray(CONFIDENCE_EDGES, np.float32)
        nb = edges.size + 1
        counts = self.sample_["counts"]
        if not hasattr(self, "_thresh"):  # after unpickling: rebuilt at the next merge
            self._thresh = np.full(counts.size, np.inf, np.float32)
        buf = []
        n_buf = 0
        flush = max(int(self.max_voxels) // 2, 1 << 16)
        for zc, yc, conf, fc in chunks:
            strata = yc * nb + np.searchsorted(edges, conf).astype(np.int32)
            counts += np.bincount(strata, minlength=counts.size)
            keys = rng.random(yc.size, dtype=np.float32)
            cand = keys < self._thresh[strata]  # a full stratum keeps only smaller keys
            if cand.any():
                buf.append((zc[:, cand], yc[cand], strata[cand], keys[cand],
                            None if fc is None else fc[:, cand]))
                n_buf += int(cand.sum())
            if n_buf >= flush:
                self._merge(buf)
                buf, n_buf = [], 0
        self._merge(buf)

    def _merge(self, buf):
        smp = self.sample_
        if buf:
            smp["scores"] = np.concatenate([smp["scores"], *[b[0] for b in buf]], axis=1)
            smp["labels"] = np.concatenate([smp["labels"], *[b[1] for b in buf]])
            smp["strata"] = np.concatenate([smp["strata"], *[b[2] for b in buf]])
            smp["keys"] = np.concatenate([smp["keys"], *[b[3] for b in buf]])
            if "features" in smp:
                smp["features"] = np.concatenate([smp["features"], *[b[4] for b in buf]],
                                                 axis=1)
        cap = _water_fill(smp["counts"], int(self.max_voxels))
        n_strata = smp["counts"].size
        self._thresh = np.full(n_strata, np.inf, np.float32)
        if not np.isfinite(cap):
            return
        cap = int(cap)
        held = np.bincount(smp["strata"], minlength=n_strata)
        strata = smp["strata"]
        # group by stratum: a stable sort of small ints is numpy's O(n) radix sort
        order = np.argsort(strata.astype(np.int16) if n_strata < 2**15 else strata,
                           kind="stable")
        stops = np.cumsum(held)
        kept = []
        for st in np.flatnonzero(held):
            idx = order[stops[st] - held[st]:stops[st]]
            if held[st] >= cap:
                if held[st] > cap:  # keep the stratum's `cap` smallest keys
                    idx = idx[np.argpartition(smp["keys"][idx], cap - 1)[:cap]]
                # a full stratum admits only keys below its largest kept key
                self._thresh[st] = smp["keys"][idx].max()
            kept.append(idx)
        if held.max() > cap:
            kept = np.concatenate(kept)
            smp["scores"] = smp["scores"][:, kept]
            if "features" in smp:
                smp["features"] = smp["features"][:, kept]
            for key in ("labels", "strata", "keys"):
                smp[key] = smp[key][kept]

    def _weights(self):
        smp = self.sample_
        held = np.bincount(smp["strata"], minlength=smp["counts"].size)
        w = np.divide(smp["counts"], held, out=np.zeros(held.size), where=held > 0)
        return w[smp["strata"]]

