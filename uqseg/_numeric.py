"""Small numeric kernels shared across layers (numpy only)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = 1, *, copy: bool = True) -> np.ndarray:
    """Numerically stable softmax in float32; ``copy=False`` overwrites ``logits``."""
    if copy:
        out = logits - logits.max(axis=axis, keepdims=True)
    else:
        out = logits
        out -= logits.max(axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


TINY = np.float32(np.finfo(np.float32).tiny)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in place on float32 logits (exact at saturation, no overflow)."""
    from scipy.special import expit

    return expit(z, out=z) if z.dtype == np.float32 and z.flags.writeable else expit(
        z).astype(np.float32)


def categorical_entropy(proba: np.ndarray) -> np.ndarray:
    """Entropy over the class axis 1 of probabilities ``(N, K, ...)`` -> ``(N, ...)`` (nats)."""
    tmp = np.maximum(proba, TINY)
    np.log(tmp, out=tmp)
    tmp *= proba
    h = tmp.sum(axis=1)
    np.negative(h, out=h)
    return np.maximum(h, 0, out=h)


def softmax_entropy(z: np.ndarray, need_h: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax of logits ``z`` (overwritten) and, from the logits, each voxel's entropy.

    ``H = log(sum exp z') - sum_k p_k z'_k`` with ``z' = z - max z``: no log of a probability,
    so saturated voxels give exactly 0 and no extra full-size log pass is needed.
    """
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    s = p.sum(axis=1, keepdims=True)
    p /= s
    if not need_h:
        return p, None
    z *= p
    h = np.log(s[:, 0])
    h -= z.sum(axis=1)
    np.maximum(h, 0, out=h)
    return p, h


def probabilities(z: np.ndarray, activation: str,
                  need_h: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of a network's output ``z`` for its ``activation`` and, when asked, their
    entropy: categorical ``(N, ...)`` for softmax (and multi-channel probabilities), per
    channel ``(N, C, ...)`` for sigmoid (and one-channel probabilities). ``z`` is overwritten
    for softmax/sigmoid; given probabilities (``"none"``) are copied."""
    if activation == "softmax":
        return softmax_entropy(z, need_h)
    if activation == "sigmoid":
        return sigmoid_entropy(z, need_h)
    p = np.array(z, dtype=np.float32)
    if not need_h:
        return p, None
    from uqseg.metrics.uncertainty import binary_entropy

    return p, binary_entropy(p) if p.shape[1] == 1 else categorical_entropy(p)


def sigmoid_entropy(z: np.ndarray, need_h: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Sigmoid of logits ``z`` (overwritten) and each channel's binary entropy, from the
    logits: ``H = softplus(-|z|) + |z| sigmoid(-|z|)`` (exact 0 at saturation)."""
    from scipy.special import expit

    if not need_h:
        return sigmoid(z), None
    a = np.abs(z)
    h = np.logaddexp(np.float32(0), -a)  # softplus(-|z|) = -log sigmoid(|z|)
    h += a * expit(-a)
    np.maximum(h, 0, out=h)
    return sigmoid(z), h


_BLAS = None


def one_blas_thread():
    """Context manager keeping BLAS/LAPACK on one thread for uqseg's small products and
    eigen-decompositions between inference batches. OpenBLAS's workers busy-wait after each
    call and take the cores ONNX Runtime's next batch needs (measured: the spectral detector's
    ``score_samples`` 137 ms -> 90 ms for 32 slices of which inference is 67 ms); matrices
    this small gain nothing from more threads. The limit is set on entry and the previous
    setting restored on exit by the same thread (OpenBLAS keeps a thread's own setting when
    another thread restores it); nested uses restore in order."""
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")
