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
