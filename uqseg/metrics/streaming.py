"""Streaming calibration statistics: :class:`CalibrationAccumulator`.

The accumulator walks the voxels in chunks (``2**16`` voxels by default) and keeps only per-bin
sums, so memory stays bounded for any volume size and results merge across batches and workers.
Every calibration metric and proper scoring rule of :mod:`uqseg.metrics` is a thin wrapper
over it.

Binning follows Guo et al. (2017): bin ``b`` holds the confidences in ``(e_b, e_{b+1}]`` (the
first bin also holds 0). ECE is the count-weighted mean of ``|accuracy - confidence|`` over the
bins, MCE the largest gap over non-empty bins. "Top-label" uses the confidence
``max_k p_k`` and the correctness of ``argmax_k p_k``; "class-wise" uses, for each class ``k``,
``p_k`` against ``1[y == k]`` and averages over classes.
"""

from __future__ import annotations

import numpy as np

from uqseg._numeric import softmax
from uqseg._validation import check_labels, check_scores
from uqseg.metrics._binning import (
    ceil_multiplier,
    fused_histogram,
    packed_histogram,
    packed_run_log2,
    rows_look_valid,
    separate_histogram,
    top_label,
    uniform_bins,
)
from uqseg.metrics._chunks import (
    DEFAULT_CHUNK,
    _blocks,
    _check_edges,
    _check_mask,
    _check_scores_chunked,
    _collect,
    _quantile_edges,
)

__all__ = ["CalibrationAccumulator"]


class CalibrationAccumulator:
    """Streaming histogram statistics for ECE, MCE, Brier score, NLL and reliability curves.

    Parameters
    ----------
    n_bins : int, default=15
        Number of equal-width bins on ``[0, 1]`` (ignored when ``edges`` is given).
    n_classes : int, optional
        Number of classes; inferred from the first update when None.
    edges : array_like of shape (n_bins + 1,), optional
        Explicit bin edges for the top-label (and, unless ``class_edges``, class-wise) statistics.
    classwise : bool, default=False
        Also keep per-class one-vs-rest histograms (needed for ``classwise_ece``/``classwise_mce``).
    class_edges : array_like of shape (n_classes, n_bins + 1), optional
        Per-class bin edges for the class-wise histograms.
    ignore_index : int, optional
        Label value whose voxels are skipped.
    eps : float, default=1e-7
        NLL clips ``p_y`` below at ``eps`` (so a zero probability costs ``-log(eps)``).
    chunk_size : int, default=2**16
        Voxels handled at once; bounds the temporary memory.
    scores : bool, default=True
        Also accumulate the Brier score and NLL. ``False`` keeps only the binned statistics
        (ECE, MCE, reliability curve) and skips their per-voxel work (about 2x faster).

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)   # (1, 2, 2)
    >>> acc = CalibrationAccumulator(n_bins=10).update(p, np.array([[0, 1]]))
    >>> round(acc.ece, 3), round(acc.brier, 3)
    (0.4, 0.4)
    """

    def __init__(
        self,
        n_bins: int = 15,
        n_classes: int | None = None,
        *,
        edges=None,
        classwise: bool = False,
        class_edges=None,
        ignore_index: int | None = None,
        eps: float = 1e-7,
        chunk_size: int = DEFAULT_CHUNK,
        scores: bool = True,
    ):
        if edges is None:
            if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
                raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
            edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
        self.edges = _check_edges(edges, "edges")
        if self.edges.ndim != 1:
            raise ValueError(f"edges must be 1-D, got shape {self.edges.shape}")
        self.n_bins = self.edges.size - 1
        self._uniform = bool(np.array_equal(self.edges, np.linspace(0.0, 1.0, self.n_bins + 1)))
        if n_classes is not None and (
            not isinstance(n_classes, (int, np.integer)) or n_classes < 2
        ):
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
        if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not (0 < eps < 1):
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        self.classwise = bool(classwise or class_edges is not None)
        self.class_edges = None if class_edges is None else _check_edges(class_edges, "class_edges")
        if self.class_edges is not None and (
            self.class_edges.ndim != 2 or self.class_edges.shape[1] != self.n_bins + 1
        ):
            raise ValueError(
                f"class_edges must have shape (n_classes, {self.n_bins + 1}), "
                f"got {self.class_edges.shape}"
            )
        self.ignore_index = ignore_index
        self.eps = float(eps)
        self.chunk_size = int(chunk_size)
        self.n_classes = None
        self.n_voxels = 0
        self._count = np.zeros(self.n_bins)
        self._conf = np.zeros(self.n_bins)
        self._acc = np.zeros(self.n_bins)
        self._brier = 0.0
        self._nll = 0.0
        self._ccount = self._cconf = self._cacc = None
        self._scores = bool(scores)  # False: binned statistics only (no Brier/NLL work)
        if n_classes is not None:
            self._set_classes(int(n_classes))

    def _set_classes(self, k: int) -> None:
        if self.class_edges is not None and self.class_edges.shape[0] != k:
            raise ValueError(f"class_edges has {self.class_edges.shape[0]} rows for {k} classes")
        self.n_classes = k
        if self.classwise:
            self._ccount = np.zeros(k * self.n_bins)
            self._cconf = np.zeros(k * self.n_bins)
            self._cacc = np.zeros(k * self.n_bins)

    def __repr__(self) -> str:
        return (
            f"CalibrationAccumulator(n_bins={self.n_bins}, n_classes={self.n_classes}, "
            f"n_voxels={self.n_voxels})"
        )

    # ------------------------------------------------------------------ updates
    def _check_inputs(self, scores, y, mask, kind):
        name = "proba" if kind == "proba" else "logits"
        if kind == "logits":
            scores = _check_scores_chunked(scores, name, kind, self.chunk_size)
        else:
            # dtype, rank and class count here; values are checked block by block as they
            # are consumed (one pass over the data instead of two)
            scores = np.asarray(scores)
            if scores.ndim < 3 or scores.size == 0:
                check_scores(scores, name=name, kind=kind)
            check_scores(
                scores[(slice(0, 1), slice(None)) + (slice(0, 1),) * (scores.ndim - 2)],
                name=name,
                kind=kind,
            )
        k = scores.shape[1]
        if self.n_classes is None:
            self._set_classes(k)
        elif k != self.n_classes:
            raise ValueError(f"{name} has {k} classes on axis 1, expected {self.n_classes}")
        shape = (scores.shape[0], *scores.shape[2:])
        y = check_labels(y, n_classes=k, shapes=shape, ignore_index=self.ignore_index)
        return scores, y, _check_mask(mask, shape)

    def update(self, proba, y, mask=None) -> CalibrationAccumulator:
        """Add probabilities ``(N, K, *spatial)`` with labels ``(N, *spatial)``; returns self.

        ``mask`` (boolean, ``(N, *spatial)``) keeps only the voxels where it is True.
        """
        proba, y, mask = self._check_inputs(proba, y, mask, "proba")
        self._consume(proba, y, mask, logits=False)
        return self

    def update_logits(self, logits, y, mask=None) -> CalibrationAccumulator:
        """Like :meth:`update` with logits; the softmax is taken chunk by chunk."""
        logits, y, mask = self._check_inputs(logits, y, mask, "logits")
        self._consume(logits, y, mask, logits=True)
        return self

    def _consume(self, scores, y, mask, logits):
        n, k = scores.shape[:2]
        s3 = scores.reshape(n, k, -1)
        y2 = y.reshape(n, -1)
        m2 = None if mask is None else mask.reshape(n, -1)
        saved = self._snapshot()
        try:
            for si, sv in _blocks(n, s3.shape[2], self.chunk_size):
                p = s3[si, :, sv]
                if logits:
                    p = softmax(p.astype(np.float32), copy=False)  # a block-sized copy
                yy = y2[si, sv]
                keep = None if m2 is None else m2[si, sv]
                if self.ignore_index is not None:
                    valid = yy != self.ignore_index
                    keep = valid if keep is None else keep & valid
                    yy = np.where(valid, yy, 0)  # any in-range index; these voxels are dropped
                self._add_block(p, yy, keep, check=not logits)
        except Exception:
            self._restore(saved)  # a bad block leaves the statistics as they were
            raise

    _STATE = ("_count", "_conf", "_acc", "_brier", "_nll", "n_voxels", "_ccount", "_cconf", "_cacc")

    def _snapshot(self):
        return {
            a: (v.copy() if isinstance(v, np.ndarray) else v)
            for a in self._STATE
            for v in [getattr(self, a)]
        }

    def _restore(self, saved):
        for a, v in saved.items():
            setattr(self, a, v)

    def _bins(self, conf):
        """Bin index of each confidence; bins are ``(lo, hi]`` compared in the data's dtype."""
        e = self.edges.astype(conf.dtype)
        if not self._uniform:
            return np.searchsorted(e[1:-1], conf, side="left")
        # arithmetic binning is ~10x faster than searchsorted, and equal to it
        return uniform_bins(conf, self.n_bins, e[1:-1])

    def _add_block(self, p, yy, keep, check=False):
        # p: (b, K, v). Each class plane p[:, c] is contiguous: loop over the K planes (few)
        # instead of reducing along the strided class axis
        k = p.shape[1]
        full = self._scores
        planes = [p[:, c] for c in range(k)]
        wd = p.dtype if p.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        conf, pred = top_label(planes, wd)
        if check and not rows_look_valid(p, planes, conf, wd):
            # the same messages as check_scores, only now that the block is in hand
            check_scores(p, name="proba", kind="proba")
        small = pred.dtype
        # labels are validated in 0..K-1: a same-size integer view compares without a copy
        same = yy.dtype.kind in "iu" and yy.dtype.itemsize == small.itemsize
        yk = yy.view(small) if same else yy.astype(small)
        correct = np.equal(pred, yk)
        if full:
            sq = planes[0] * planes[0]
            p_y = np.array(planes[0], dtype=sq.dtype)
            for c in range(1, k):
                sq += planes[c] * planes[c]
                np.copyto(p_y, planes[c], where=yk == c)
        if keep is not None:
            conf, correct, yy = conf[keep], correct[keep], yy[keep]
            if full:
                p_y, sq = p_y[keep], sq[keep]
            if self.classwise:
                pk = p.transpose(0, 2, 1)[keep]  # (n_kept, K)
        elif self.classwise:
            pk = p.transpose(0, 2, 1).reshape(-1, p.shape[1])
        conf, correct = conf.ravel(), correct.ravel()
        n_kept = conf.size
        if n_kept == 0:
            return
        q = packed_run_log2(conf)
        m = ceil_multiplier(self.n_bins) if self._uniform and q is not None else None
        if m is not None:  # float32 (packable): binning, packing and histogram fused
            counts, conf_sums = fused_histogram(conf, correct, self.n_bins, q, m)
        elif q is not None:  # one bincount gives counts, correct counts and confidence sums
            counts, conf_sums = packed_histogram(self._bins(conf), correct, conf, self.n_bins, q)
        else:
            counts, conf_sums = separate_histogram(self._bins(conf), correct, conf, self.n_bins)
        self._count += counts.sum(axis=1)
        self._acc += counts[:, 1]
        self._conf += conf_sums
        self.n_voxels += n_kept
        if full:
            # multi-class Brier: sum_k (p_k - onehot_k)^2 = sum_k p_k^2 - 2 p_y + 1
            self._brier += float(
                sq.sum(dtype=np.float64) - 2.0 * p_y.sum(dtype=np.float64) + n_kept
            )
            np.maximum(p_y, self.eps, out=p_y)
            np.log(p_y, out=p_y)
            self._nll -= float(p_y.sum(dtype=np.float64))
        if self.classwise:
            self._add_classwise(pk, yy.ravel())

    def _add_classwise(self, pk, yy):
        k, nb = pk.shape[1], self.n_bins
        for c in range(k):
            e = self.edges if self.class_edges is None else self.class_edges[c]
            pc = pk[:, c]
            idx = np.searchsorted(e[1:-1].astype(pc.dtype), pc, side="left") + c * nb
            pc = pc.astype(np.float64)
            size = k * nb
            self._ccount += np.bincount(idx, minlength=size)
            self._cconf += np.bincount(idx, weights=pc, minlength=size)
            self._cacc += np.bincount(idx, weights=yy == c, minlength=size)

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Add the statistics of ``other`` (same bins and classes); returns self."""
        if not isinstance(other, CalibrationAccumulator):
            raise TypeError(f"other must be a CalibrationAccumulator, got {type(other).__name__}")
        if other.edges.shape != self.edges.shape or not np.array_equal(other.edges, self.edges):
            raise ValueError("cannot merge accumulators with different bin edges")
        if self._scores and not other._scores and other.n_voxels:
            raise ValueError("other was built with scores=False: it has no Brier/NLL statistics")
        if self.classwise and not other.classwise and other.n_voxels:
            raise ValueError("other does not keep class-wise histograms")
        if other.n_classes is None:
            return self
        if self.n_classes is None:
            self._set_classes(other.n_classes)
        elif other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes} classes into {self.n_classes}")
        self._count += other._count
        self._conf += other._conf
        self._acc += other._acc
        self._brier += other._brier
        self._nll += other._nll
        self.n_voxels += other.n_voxels
        if self.classwise and other._ccount is not None:
            self._ccount += other._ccount
            self._cconf += other._cconf
            self._cacc += other._cacc
        return self

    # ------------------------------------------------------------------ results
    @staticmethod
    def _gaps(count, conf, acc):
        gap = np.zeros_like(count)
        np.divide(np.abs(conf - acc), count, out=gap, where=count > 0)
        return gap

    def _need_scores(self):
        if not self._scores:
            raise ValueError("Brier score and NLL need CalibrationAccumulator(scores=True)")

    def _need_classwise(self):
        if not self.classwise:
            raise ValueError("class-wise metrics need CalibrationAccumulator(classwise=True)")

    @property
    def ece(self) -> float:
        """Top-label expected calibration error (NaN before any voxel)."""
        if self.n_voxels == 0:
            return float("nan")
        return float(np.abs(self._conf - self._acc).sum() / self.n_voxels)

    @property
    def mce(self) -> float:
        """Top-label maximum calibration error over non-empty bins (NaN before any voxel)."""
        if self.n_voxels == 0:
            return float("nan")
        return float(self._gaps(self._count, self._conf, self._acc).max())

    def _class_tables(self):
        shape = (self.n_classes, self.n_bins)
        return (self._ccount.reshape(shape), self._cconf.reshape(shape), self._cacc.reshape(shape))

    @property
    def classwise_ece(self) -> float:
        """Mean over classes of the one-vs-rest ECE of ``p_k`` against ``y == k``."""
        self._need_classwise()
        if self.n_voxels == 0:
            return float("nan")
        _, conf, acc = self._class_tables()
        return float((np.abs(conf - acc).sum(axis=1) / self.n_voxels).mean())

    @property
    def classwise_mce(self) -> float:
        """Mean over classes of the one-vs-rest MCE."""
        self._need_classwise()
        if self.n_voxels == 0:
            return float("nan")
        return float(self._gaps(*self._class_tables()).max(axis=1).mean())

    @property
    def brier(self) -> float:
        """Mean over voxels of ``sum_k (p_k - 1[y == k])^2`` (range ``[0, 2]``)."""
        self._need_scores()
        return float(self._brier / self.n_voxels) if self.n_voxels else float("nan")

    @property
    def nll(self) -> float:
        """Mean over voxels of ``-log(max(p_y, eps))``."""
        self._need_scores()
        return float(self._nll / self.n_voxels) if self.n_voxels else float("nan")

    def reliability_curve(self):
        """Per-bin ``(confidence, accuracy, count)``; NaN confidence/accuracy for empty bins."""
        c = self._count
        conf = np.divide(self._conf, c, out=np.full(self.n_bins, np.nan), where=c > 0)
        acc = np.divide(self._acc, c, out=np.full(self.n_bins, np.nan), where=c > 0)
        return conf, acc, c.astype(np.int64)


def _accumulate(
    proba,
    y,
    n_bins,
    strategy,
    classwise,
    mask,
    ignore_index,
    eps=1e-7,
    chunk_size=DEFAULT_CHUNK,
    scores=True,
):
    """A :class:`CalibrationAccumulator` filled with whole arrays (the metric functions' core);
    ``strategy="quantile"`` first takes the exact equal-mass edges of the kept voxels."""
    if strategy not in ("uniform", "quantile"):
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    proba = np.asarray(proba)
    if proba.ndim < 3 or proba.size == 0 or strategy == "quantile":
        proba = _check_scores_chunked(proba, "proba", "proba", chunk_size)
    else:  # values are validated block by block while they are consumed
        check_scores(
            proba[(slice(0, 1), slice(None)) + (slice(0, 1),) * (proba.ndim - 2)],
            name="proba",
            kind="proba",
        )
    shape = (proba.shape[0], *proba.shape[2:])
    y = check_labels(y, n_classes=proba.shape[1], shapes=shape, ignore_index=ignore_index)
    mask = _check_mask(mask, shape)
    edges = class_edges = None
    if strategy == "quantile":
        # exact equal-mass edges: one extra pass per statistic, one float per kept voxel
        edges = _quantile_edges(_collect(proba, y, mask, ignore_index, chunk_size, -1), n_bins)
        if classwise:
            class_edges = np.stack(
                [
                    _quantile_edges(_collect(proba, y, mask, ignore_index, chunk_size, c), n_bins)
                    for c in range(proba.shape[1])
                ]
            )
    acc = CalibrationAccumulator(
        n_bins,
        proba.shape[1],
        edges=edges,
        classwise=classwise,
        class_edges=class_edges,
        ignore_index=ignore_index,
        eps=eps,
        chunk_size=chunk_size,
    )
    acc._scores = bool(scores)
    acc._consume(proba, y, mask, logits=False)
    return acc

