"""Local temperature scaling inside :class:`~uqseg.calibration.TemperatureCalibrator` (a
mixin): the image the features read, the map's log-temperature, and its fit on the voxel
sample. The features and the objective are in :mod:`uqseg._local`."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import NotFittedError

from uqseg import _local
from uqseg._temperature_objectives import LOG_T_BOUNDS, two_class

__all__ = ["LOCAL_MIN_VOXELS_PER_PARAMETER", "LocalMap"]

#: a local fit needs at least this many sampled voxels per parameter
LOCAL_MIN_VOXELS_PER_PARAMETER = 10


class LocalMap:
    """``mode="local"`` of :class:`~uqseg.calibration.TemperatureCalibrator`."""

    def _scales(self):
        return tuple(float(v) for v in self.scales)

    def _wants_image(self):
        return bool(self.use_image) and getattr(self, "estimator_", None) is not None

    def _image(self, z, img):
        """The image batch the local features read (None when they read none), checked
        against the logits."""
        c = sum(n.startswith("intensity[") for n in self.feature_names_)
        if c == 0:
            return None
        if img is None:
            raise ValueError("the local temperature was fitted with the image intensity as a "
                             "feature, but no image reaches the calibrator")
        img = np.asarray(img)
        if img.ndim != z.ndim or img.shape[0] != z.shape[0] or img.shape[1] != c \
                or img.shape[2:] != z.shape[2:]:
            raise ValueError(
                f"use_image=True needs images (n, {c}, *spatial) on the grid of the logits "
                f"{z.shape}, got {img.shape}; pass use_image=False for networks whose output "
                "grid differs from their input's")
        return img

    def _log_temperature(self, z, img):
        if not hasattr(self, "coef_"):
            raise NotFittedError("mode='local' but no local map was fitted (mode was changed "
                                 "after fit); call fit")
        img = self._image(z, img)
        if not self._sigmoid():
            lt = _local.log_temperature(z, self._scales(), img, self.coef_, self.intercept_)
            return np.clip(lt, *LOG_T_BOUNDS, out=lt)
        # sigmoid: one map per channel, from the channel's two-class problem (n, C, *spatial)
        k = z.shape[1]
        coef = np.asarray(self.coef_)
        f0 = coef.size - (k - 1)
        out = np.empty_like(z)
        for c in range(k):
            b = self.intercept_ + (float(coef[f0 + c - 1]) if c else 0.0)
            out[:, c] = _local.log_temperature(self._two_class(z, c), self._scales(), img,
                                               coef[:f0], b)
        return np.clip(out, *LOG_T_BOUNDS, out=out)

    @staticmethod
    def _two_class(z, c):
        """Channel ``c`` of sigmoid logits as two-class logits ``[0, z_c]`` ``(n, 2, ...)``."""
        return np.stack([np.zeros_like(z[:, c]), z[:, c]], axis=1)

    def _sigmoid_features(self, z, img, i, c):
        """Local features ``(F, voxels)`` of channel ``c`` of image ``i`` (sigmoid outputs):
        the two-class features plus the channel indicators."""
        f = _local.local_features(self._two_class(z[i:i + 1], c), self._scales(),
                                  None if img is None else img[i:i + 1])
        f = f.reshape(f.shape[0], -1)
        ind = np.zeros((z.shape[1] - 1, f.shape[1]), np.float32)
        if c:
            ind[c - 1] = 1
        return np.concatenate([f, ind])

    def _local_sample(self):
        """The sample's scores ``(K, n)`` and targets as the local objective reads them
        (sigmoid entries: the two-class problem on ``[0, z]`` and the indicator)."""
        smp = self.sample_
        if self._sigmoid():
            return two_class(smp["scores"]), smp["labels"] & 1
        return smp["scores"], smp["labels"]

    def _solve_local(self, w):
        """Fit ``log T = intercept_ + coef_ . features`` by penalised NLL, from the global
        temperature (or the previous map, in ``partial_fit``)."""
        smp = self.sample_
        feats = smp["features"]
        n_par = feats.shape[0] + 1
        if smp["labels"].size < LOCAL_MIN_VOXELS_PER_PARAMETER * n_par:
            raise ValueError(
                f"mode='local' fits {n_par} parameters and needs at least "
                f"{LOCAL_MIN_VOXELS_PER_PARAMETER * n_par} voxels, got {smp['labels'].size}")
        # standardised features: the penalty then weighs every feature alike
        wn = (w / w.sum()).astype(np.float32)
        mu = (feats @ wn).astype(np.float64)
        sd = np.sqrt(np.maximum((feats * feats) @ wn - mu * mu, 0))
        sd[sd < 1e-6] = 1.0  # a constant feature: its weight stays 0
        fs = ((feats - mu[:, None].astype(np.float32)) / sd[:, None].astype(np.float32))
        coef = getattr(self, "coef_", None)
        if coef is not None and np.size(coef) == n_par - 1:  # warm start (partial_fit)
            x0 = np.concatenate([[self.intercept_ + float(coef @ mu)], coef * sd])
        else:
            x0 = np.zeros(n_par)
            x0[0] = np.log(self.temperature_)
        # the penalty's centre: the global NLL temperature (alpha -> inf gives global scaling)
        z, y = self._local_sample()
        fun = _local.local_objective(z, fs, y, w, float(self.alpha),
                                     LOG_T_BOUNDS, float(self.top_label_weight),
                                     np.log(self.temperature_))
        res = minimize(fun, x0, jac=True, method="L-BFGS-B")
        v = res.x[1:]
        self.coef_ = v / sd
        self.intercept_ = float(res.x[0] - self.coef_ @ mu)
        nll = _local.local_objective(z, fs, y, w, 0.0, LOG_T_BOUNDS)
        self.nll_after_ = float(nll(res.x)[0])
        self.ece_after_ = _local.local_ece(z, fs, y, w, res.x, LOG_T_BOUNDS, int(self.n_bins))
        self.n_iter_ = int(res.nit)

