"""Voxel-wise uncertainty maps from one network or an ensemble of members.

Conventions: probabilities ``(N, K, *spatial)`` with the class axis 1; member probabilities
``(M, N, K, *spatial)`` with the member axis 0. All logarithms are natural (nats).

:class:`MemberAccumulator` gives the ensemble maps from running sums, one member at a time, so
an ensemble never holds ``M`` stacked copies of the probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy

from uqseg._numeric import softmax as _softmax
from uqseg._validation import check_scores
from uqseg.metrics.uncertainty import binary_entropy, segment_uncertainty

__all__ = [
    "KINDS",
    "MemberAccumulator",
    "binary_entropy",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "segment_level_uncertainty",
    "softmax",
    "variance",
]

#: Ensemble uncertainty kinds known to :class:`MemberAccumulator` and ``EnsembleSegmenter``.
KINDS = ("entropy", "expected_entropy", "mutual_information", "variance")


def softmax(logits, axis: int = 1, *, copy: bool = True) -> np.ndarray:
    """Numerically stable softmax in float32.

    Parameters
    ----------
    logits : array_like
        Real scores; the class axis is ``axis``.
    axis : int, default=1
    copy : bool, default=True
        False computes in place when ``logits`` is already a float32 array (no extra
        full-size buffer).

    Returns
    -------
    ndarray of float32, same shape as ``logits``; sums to 1 along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([[[0.0]], [[np.log(3.0)]]]), axis=0).ravel()
    array([0.25, 0.75], dtype=float32)
    """
    x = np.asarray(logits)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"logits must hold real numbers, got dtype {x.dtype}")
    if x.dtype != np.float32:
        return _softmax(x.astype(np.float32), axis, copy=False)
    return _softmax(x, axis, copy=copy)


def entropy(proba, axis: int = 1) -> np.ndarray:
    """Shannon entropy ``-sum_k p_k log p_k`` along ``axis`` (``0 log 0 = 0``).

    Parameters
    ----------
    proba : array_like
        Probabilities; the class axis is ``axis``.
    axis : int, default=1

    Returns
    -------
    ndarray
        The input shape without ``axis``; values in ``[0, log K]``.

    Examples
    --------
    >>> import numpy as np
    >>> entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4)
    array([0.6931, 0.    ])
    """
    p = np.asarray(proba)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    h = -xlogy(p, p).sum(axis=axis)
    return np.maximum(h, 0, out=h) if isinstance(h, np.ndarray) else np.maximum(h, 0)


def _check_members(member_proba) -> np.ndarray:
    arr = np.asarray(member_proba)
    if arr.ndim < 4:
        raise ValueError(f"member_proba must have shape (M, N, K, *spatial), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("member_proba has no members (axis 0 is empty)")
    for m in range(arr.shape[0]):
        check_scores(arr[m], name=f"member_proba[{m}]", kind="proba")
    return arr


def expected_entropy(member_proba) -> np.ndarray:
    """Mean over members of each member's entropy (the aleatoric part).

    Parameters
    ----------
    member_proba : array_like of shape (M, N, K, *spatial)

    Returns
    -------
    ndarray of shape (N, *spatial)

    Examples
    --------
    >>> import numpy as np
    >>> P = np.array([[[[1.0], [0.0]]], [[[0.0], [1.0]]]])  # two confident members disagree
    >>> expected_entropy(P)
    array([[0.]])
    """
    arr = _check_members(member_proba)
    total = entropy(arr[0])
    for m in range(1, arr.shape[0]):
        total = total + entropy(arr[m])
    return total / arr.shape[0]


def mutual_information(member_proba) -> np.ndarray:
    """Mutual information between prediction and member (the epistemic part, BALD).

    ``MI = entropy(mean_m p_m) - mean_m entropy(p_m)``. Mathematically ``MI >= 0``; the result is
    clipped at 0 so that float rounding never gives a negative value.

    Parameters
    ----------
    member_proba : array_like of shape (M, N, K, *spatial)

    Returns
    -------
    ndarray of shape (N, *spatial), values in ``[0, entropy(mean)]``.

    Examples
    --------
    >>> import numpy as np
    >>> P = np.array([[[[1.0], [0.0]]], [[[0.0], [1.0]]]])
    >>> mutual_information(P).round(4)
    array([[0.6931]])
    """
    arr = _check_members(member_proba)
    mi = entropy(arr.mean(axis=0)) - expected_entropy(arr)
    return np.maximum(mi, 0, out=mi)


def variance(member_proba, *, per_class: bool = False) -> np.ndarray:
    """Variance of the class probabilities over members.

    The population variance (``ddof=0``) over the member axis, per voxel and class; by default
    averaged over the ``K`` classes into one map.

    Parameters
    ----------
    member_proba : array_like of shape (M, N, K, *spatial)
    per_class : bool, default=False
        True returns the per-class variances ``(N, K, *spatial)``.

    Returns
    -------
    ndarray of shape (N, *spatial), or (N, K, *spatial) when ``per_class``.

    Examples
    --------
    >>> import numpy as np
    >>> P = np.array([[[[1.0], [0.0]]], [[[0.0], [1.0]]]])
    >>> variance(P)
    array([[0.25]])
    """
    arr = _check_members(member_proba)
    v = arr.var(axis=0)
    return v if per_class else v.mean(axis=1)


def segment_level_uncertainty(proba, pred=None, region: str = "segment") -> np.ndarray:
    """Mean binary entropy of ``p_k`` over the predicted segment ``S_k`` (Mehrtash et al.).

    Same as :func:`uqseg.metrics.segment_uncertainty`.

    Parameters
    ----------
    proba : array_like of shape (N, K, *spatial)
    pred : array_like of int, shape (N, *spatial), optional
        Default ``proba.argmax(axis=1)``.
    region : {"segment", "boundary"}, default="segment"

    Returns
    -------
    ndarray of shape (N, K - 1); NaN for empty segments.

    Examples
    --------
    >>> import numpy as np
    >>> proba = np.stack([np.full((1, 2, 2), 0.1), np.full((1, 2, 2), 0.9)], axis=1)
    >>> segment_level_uncertainty(proba).round(4)
    array([[0.3251]])
    """
    return segment_uncertainty(proba, pred, region=region)


class MemberAccumulator:
    """Ensemble uncertainty from member probabilities added one at a time.

    Keeps weighted running statistics (mean and sum of squared deviations by West's weighted
    Welford update, and the weighted sum of member entropies) in float64, so memory does not grow
    with the number of members and results equal the stacked computation.

    Parameters
    ----------
    kinds : sequence of str, default=KINDS
        What must be available afterwards, from ``"entropy"``, ``"expected_entropy"``,
        ``"mutual_information"``, ``"variance"``. The mean is always available; leaving out
        ``"variance"`` saves one full-size buffer, leaving out ``"expected_entropy"`` and
        ``"mutual_information"`` saves the entropy sum.

    Attributes
    ----------
    n_members : int
        Members added so far.
    total_weight : float
        Sum of their weights.

    Examples
    --------
    >>> import numpy as np
    >>> acc = MemberAccumulator()
    >>> acc.add(np.array([[[1.0], [0.0]]])).add(np.array([[[0.0], [1.0]]]))
    MemberAccumulator(kinds=('entropy', 'expected_entropy', 'mutual_information', 'variance'))
    >>> acc.mean().ravel(), acc.mutual_information().round(4)
    (array([0.5, 0.5], dtype=float32), array([[0.6931]]))
    """

    def __init__(self, kinds=KINDS):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in (*KINDS, "mean")]
        if bad:
            raise ValueError(f"kinds must be taken from {KINDS}, got unknown {bad}")
        self.kinds = tuple(k for k in kinds if k != "mean")
        self._track_var = "variance" in self.kinds
        self._track_ent = bool({"expected_entropy", "mutual_information"} & set(self.kinds))
        self.n_members = 0
        self.total_weight = 0.0
        self._mean = None
        self._m2 = None
        self._ent = None

    def __repr__(self) -> str:
        return f"MemberAccumulator(kinds={self.kinds!r})"

    def add(self, proba, weight: float = 1.0) -> MemberAccumulator:
        """Add one member's probabilities ``(N, K, *spatial)`` with a positive ``weight``.

        Returns ``self``.
        """
        p = check_scores(proba, name="proba", kind="proba")
        w = float(weight)
        if not np.isfinite(w) or w <= 0:
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if self._mean is not None and p.shape != self._mean.shape:
            raise ValueError(
                f"proba has shape {p.shape} but earlier members had {self._mean.shape}"
            )
        p64 = p.astype(np.float64)
        if self._mean is None:
            self._mean = p64.copy()
            self._m2 = np.zeros_like(p64) if self._track_var else None
            self._ent = w * entropy(p64) if self._track_ent else None
        else:
            new_total = self.total_weight + w
            delta = p64 - self._mean
            self._mean += (w / new_total) * delta
            if self._track_var:
                # West (1979): M2 += w * (x - old_mean) * (x - new_mean)
                self._m2 += w * delta * (p64 - self._mean)
            if self._track_ent:
                self._ent += w * entropy(p64)
        self.total_weight += w
        self.n_members += 1
        return self

    def merge(self, other: MemberAccumulator) -> MemberAccumulator:
        """Fold another accumulator (same shapes, e.g. from another worker) into this one."""
        if not isinstance(other, MemberAccumulator):
            raise TypeError(f"other must be a MemberAccumulator, got {type(other).__name__}")
        if other.n_members == 0:
            return self
        if self.n_members == 0:
            if self._track_var and not other._track_var or self._track_ent and not other._track_ent:
                raise ValueError("other does not track every kind this accumulator needs")
            self._mean = other._mean.copy()
            self._m2 = other._m2.copy() if self._track_var else None
            self._ent = other._ent.copy() if self._track_ent else None
            self.n_members, self.total_weight = other.n_members, other.total_weight
            return self
        if other._mean.shape != self._mean.shape:
            raise ValueError(f"cannot merge shapes {other._mean.shape} and {self._mean.shape}")
        if self._track_var and not other._track_var or self._track_ent and not other._track_ent:
            raise ValueError("other does not track every kind this accumulator needs")
        wa, wb = self.total_weight, other.total_weight
        delta = other._mean - self._mean
        if self._track_var:
            # Chan et al. parallel combination of sums of squared deviations
            self._m2 += other._m2 + delta**2 * (wa * wb / (wa + wb))
        self._mean += delta * (wb / (wa + wb))
        if self._track_ent:
            self._ent += other._ent
        self.total_weight += wb
        self.n_members += other.n_members
        return self

    def _need(self, kind: str) -> None:
        if self.n_members == 0:
            raise ValueError("no member has been added yet; call add() first")
        if kind != "mean" and kind not in self.kinds:
            raise ValueError(f"{kind!r} was not requested: construct with kinds including it")

    def mean(self) -> np.ndarray:
        """Weighted mean probability ``(N, K, *spatial)``, float32."""
        self._need("mean")
        return self._mean.astype(np.float32)

    def entropy(self) -> np.ndarray:
        """Entropy of the mean probability ``(N, *spatial)``."""
        self._need("entropy")
        return entropy(self._mean)

    def expected_entropy(self) -> np.ndarray:
        """Weighted mean of the members' entropies ``(N, *spatial)``."""
        self._need("expected_entropy")
        return self._ent / self.total_weight

    def mutual_information(self) -> np.ndarray:
        """Entropy of the mean minus expected entropy, clipped at 0 ``(N, *spatial)``."""
        self._need("mutual_information")
        mi = entropy(self._mean) - self._ent / self.total_weight
        return np.maximum(mi, 0, out=mi)

    def variance(self, *, per_class: bool = False) -> np.ndarray:
        """Weighted population variance over members, averaged over classes unless ``per_class``."""
        self._need("variance")
        v = np.maximum(self._m2 / self.total_weight, 0)
        return v if per_class else v.mean(axis=1)

    def uncertainty(self, kind: str) -> np.ndarray:
        """The map named ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return getattr(self, kind)()
