"""How an :class:`uqseg.OnnxSegmenter` runs its network: engine sessions (cached per set of
exposed tensors), padding to what the network takes, batches, test-time flips, sliding windows
for inputs larger than a fixed-size model, output checks, and the int8 quantisation with its
drift check. The estimator (``uqseg/segmenter.py``) validates and presents; this engine is the
only part of it that talks to ``uqseg.backends``.
"""

from __future__ import annotations

import threading
import time
import warnings
from itertools import product

import numpy as np
from sklearn.base import clone

from uqseg import backends
from uqseg._inference import resolve_batch_size
from uqseg.backends._checks import check_logits
from uqseg.backends._model import read_model

__all__ = ["NetworkEngine", "gaussian_importance", "window_starts"]

# a quantised member is refused when it changes more labels or probabilities than this on
# the fit images (measured on a zoo member: 99.8% agreement, mean |dp| 0.0013)
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_MEAN_DIFF = 0.01
INT8_MIN_SPEEDUP = 0.95  # below this, fit warns that int8 does not pay


def gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights, highest at the window centre (patch borders are least reliable)."""
    grids = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2
        sigma = max(w * sigma_scale, 1e-3)
        grids.append(np.exp(-0.5 * (x / sigma) ** 2))
    imp = grids[0]
    for g in grids[1:]:
        imp = np.multiply.outer(imp, g)
    imp = imp / imp.max()
    return np.maximum(imp, 1e-3).astype(np.float32)  # never zero: every voxel gets a weight


def window_starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    n = int(np.ceil((size - window) / step)) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


class NetworkEngine:
    """Executes a fitted :class:`uqseg.OnnxSegmenter`'s network; reads the estimator's fitted
    state on each call and owns its engine sessions."""

    def __init__(self, seg):
        self.seg = seg
        self._runners: dict = {}
        self._lock = threading.Lock()

    def _quantize(self, proto, X) -> None:
        """``quantized_model_`` from calibration images ``X``; refuse a drifting model."""
        from uqseg.backends._model import with_external_data
        from uqseg.backends.quantize import quantize_int8

        if isinstance(X, list):  # images of the first size calibrate
            X = np.stack([x for x in X if x.shape == X[0].shape])
        X = self._to_input_size(X)
        _, folder = read_model(self.seg.model)
        full = with_external_data(proto, folder, self.seg._where())
        mc = self.seg.mc_dropout_
        extra = {mc["input"]: np.ones(mc["size"], np.float32)} if mc is not None else None
        path, _ = quantize_int8(full, X, self.seg.input_name_, extra_inputs=extra)
        self.seg.quantized_model_ = str(path)
        self._runners.clear()  # the next sessions load the quantised graph
        n = min(len(X), 16)
        calib = X[np.linspace(0, len(X) - 1, n).round().astype(int)]
        ref = clone(self.seg).set_params(precision="fp32").fit()  # every other setting as ours
        z32, z8 = ref.transform(calib), self.seg.transform(calib)
        agree = float(np.mean(ref._labels(z32) == self.seg._labels(z8)))
        p32, p8 = ref._proba(z32), self.seg._proba(z8)  # labels first: _proba works in place
        diff = np.abs(p32.astype(np.float64) - p8)
        self.seg.int8_drift_ = {"images": int(n), "label_agreement": agree,
                                "mean_abs_proba_diff": float(diff.mean()),
                                "max_abs_proba_diff": float(diff.max())}
        if agree < INT8_MIN_AGREEMENT or diff.mean() > INT8_MAX_MEAN_DIFF:
            self._refuse_int8(n)
        # whether it pays: small networks spend their time outside the convolutions
        t32, t8 = [], []
        for _ in range(3):
            for fn, ts in ((ref.predict_proba, t32), (self.seg.predict_proba, t8)):
                t0 = time.perf_counter()
                fn(calib)
                ts.append(time.perf_counter() - t0)
        speedup = float(np.median(t32) / max(np.median(t8), 1e-12))
        self.seg.int8_drift_["speedup_on_fit_images"] = speedup
        if speedup < INT8_MIN_SPEEDUP:
            warnings.warn(
                f"{self.seg._where()}: int8 ran {speedup:.2f}x as fast as float32 on the fit "
                "images (measured at fit): it does not pay for this network; keep "
                "precision='fp32'",
                UserWarning, stacklevel=3)

    def _refuse_int8(self, n) -> None:
        d = self.seg.int8_drift_
        raise ValueError(
            f"{self.seg._where()}: the int8 model drifts from float32 on {n} of the fit images "
            f"(labels agree on {d['label_agreement']:.2%} of voxels, need "
            f"{INT8_MIN_AGREEMENT:.0%}; mean |p32 - p8| {d['mean_abs_proba_diff']:.4f}, "
            f"allowed {INT8_MAX_MEAN_DIFF}; max {d['max_abs_proba_diff']:.3f}): keep "
            "precision='fp32' for this network")

    def _runner(self, layers: tuple[str, ...] = ()):
        int8 = getattr(self.seg, "quantized_model_", None)
        return backends.cached_runner(self._runners, layers, self._lock, lambda: backends.load(
            int8 or self.seg.model, self.seg.backend, self.seg.device,
            "fp32" if self.seg.precision == "int8" else self.seg.precision,
            outputs=list(layers) or None, threads=self.seg.threads,
            max_batch=resolve_batch_size(self.seg.batch_size, (), "gpu")))

    def _raw_run(self, batch: np.ndarray, outputs: list[str], mask: np.ndarray | None = None):
        hidden = getattr(self.seg, "_hidden_output", False)  # an inner tensor: exposed like a layer
        layers = tuple(o for o in outputs if hidden or o != self.seg.output_name_)
        runner = self._runner(layers)
        feeds = {self.seg.input_name_: batch}
        if self.seg.mc_dropout_ is not None:
            if mask is None:
                mask = np.ones((batch.shape[0], self.seg.mc_dropout_["size"]), dtype=np.float32)
            feeds[self.seg.mc_dropout_["input"]] = mask
        try:
            out = runner.run(feeds, outputs)
        except ValueError:
            raise
        except Exception as exc:  # engine errors on sizes the network cannot take
            raise ValueError(
                f"{self.seg._where()} failed on an input of shape {batch.shape}: {exc}. Check "
                "that the spatial size is one the network accepts"
            ) from exc
        check_logits(out[self.seg.output_name_], n=batch.shape[0],
                     n_classes=getattr(self.seg, "n_classes_", None), spatial=batch.shape[2:],
                     where=self.seg._where(), name=self.seg.output_name_)
        return {k: (v if v.dtype == np.float32 else v.astype(np.float32)) for k, v in out.items()}

    def _run_array(self, X: np.ndarray, layers: list[str], mask) -> dict:
        spatial = X.shape[2:]
        fixed = self.seg.input_shape_[1:]
        if any(f is not None and s > f for s, f in zip(spatial, fixed, strict=True)):
            if layers:
                raise ValueError(
                    f"feature maps need the whole image in one pass, but the image {spatial} is "
                    f"larger than the model input {fixed} (sliding window); crop or resize first"
                )
            return {"logits": self._sliding_window(X, mask)}
        padded = self._to_input_size(X)
        target = padded.shape[2:]
        outputs = [self.seg.output_name_, *layers]
        result = self._batched(padded, outputs, mask)
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
        out = {"logits": result[self.seg.output_name_][crop] if target != spatial
               else result[self.seg.output_name_]}
        for name in layers:
            out[name] = result[name]
        return out

    def _to_input_size(self, X: np.ndarray) -> np.ndarray:
        """``X`` reflect-padded to what the model takes: fixed axes their size (larger
        images cut to it), dynamic ones the next multiple of ``spatial_divisor_``."""
        spatial, d = X.shape[2:], self.seg.spatial_divisor_
        target = tuple(
            f if f is not None else int(np.ceil(s / d) * d)
            for s, f in zip(spatial, self.seg.input_shape_[1:], strict=True))
        if target == spatial:
            return X
        pad = [(0, 0), (0, 0)] + [(0, max(0, t - s)) for s, t in zip(spatial, target, strict=True)]
        X = np.pad(X, pad, mode="reflect" if min(spatial) > 1 else "edge")
        return X[(slice(None), slice(None), *(slice(0, t) for t in target))]

    def _batched(self, X: np.ndarray, outputs: list[str], mask) -> dict:
        """Run in batches (and over flips), filling preallocated outputs without concatenation."""
        flips = self.seg._flips()
        n = X.shape[0]
        bs = resolve_batch_size(self.seg.batch_size, X.shape[2:], self.seg._device())
        result: dict[str, np.ndarray] = {}
        for start in range(0, n, bs):
            batch = X[start:start + bs]
            bmask = None if mask is None else mask[start:start + bs]
            acc: dict[str, np.ndarray] = {}
            for flip in flips:
                inp = np.flip(batch, axis=flip) if flip else batch
                res = self._raw_run(np.ascontiguousarray(inp), outputs, bmask)
                for name, val in res.items():
                    if flip and name == self.seg.output_name_:
                        val = np.flip(val, axis=flip)
                    elif flip:
                        continue  # features of flipped passes do not align voxel-wise
                    if name in acc:
                        acc[name] += val
                    else:
                        acc[name] = val.copy() if flip or len(flips) > 1 else val
            if len(flips) > 1:
                acc[self.seg.output_name_] /= len(flips)
            for name, val in acc.items():
                if n <= bs:  # one batch: the engine's fresh output array is the result
                    result[name] = val
                    continue
                if name not in result:
                    result[name] = np.empty((n, *val.shape[1:]), dtype=np.float32)
                result[name][start:start + bs] = val
        return result

    def _sliding_window(self, X: np.ndarray, mask) -> np.ndarray:
        window = tuple(f if f is not None else s for s, f in zip(
            X.shape[2:], self.seg.input_shape_[1:], strict=True))
        pad = [(0, 0), (0, 0)] + [(0, max(0, w - s)) for s, w in zip(X.shape[2:], window,
                                                                     strict=True)]
        Xp = np.pad(X, pad, mode="constant") if any(p[1] for p in pad) else X
        spatial = Xp.shape[2:]
        steps = [max(1, int(round(w * (1 - float(self.seg.overlap))))) for w in window]
        starts = list(product(*[window_starts(s, w, st)
                                for s, w, st in zip(spatial, window, steps, strict=True)]))
        imp = gaussian_importance(window)
        out = np.zeros((X.shape[0], self.seg.n_classes_, *spatial), dtype=np.float32)
        norm = np.zeros(spatial, dtype=np.float32)
        for st in starts:
            norm[tuple(slice(a, a + w) for a, w in zip(st, window, strict=True))] += imp
        bs = resolve_batch_size(self.seg.batch_size, window, self.seg._device())
        for i in range(X.shape[0]):
            # windows are cut, run and accumulated batch_size at a time: memory stays at one
            # output volume plus one batch of patches, whatever the number of windows
            for first in range(0, len(starts), bs):
                chunk = starts[first:first + bs]
                patches = np.stack([Xp[i][(slice(None),) + tuple(
                    slice(a, a + w) for a, w in zip(st, window, strict=True))]
                    for st in chunk])
                imask = None if mask is None else np.repeat(mask[i:i + 1], len(chunk), axis=0)
                name = self.seg.output_name_
                logits = self._batched(patches, [name], imask)[name]
                for st, lg in zip(chunk, logits, strict=True):
                    region = (slice(None),) + tuple(slice(a, a + w)
                                                    for a, w in zip(st, window, strict=True))
                    lg *= imp
                    out[i][region] += lg
        out /= norm
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in X.shape[2:])
        return out[crop]

