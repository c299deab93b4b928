"""The quality regressors' tree-by-tree prediction equals scikit-learn's own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import (
    ExtraTreesRegressor,
    GradientBoostingRegressor,
    RandomForestRegressor,
    VotingRegressor,
)
from sklearn.linear_model import Ridge
from sklearn.multioutput import MultiOutputRegressor

from uqseg.quality_regressors import default_regressor, predict_regressor


class _Halved(RandomForestRegressor):
    """A subclass with its own predict: must be called, not bypassed."""

    def predict(self, X):
        return super().predict(X) / 2


def _data(n_out=1, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(80, 6))
    W = rng.normal(size=(6, n_out))
    y = np.tanh(X @ W) + 0.1 * rng.normal(size=(80, n_out))
    return X, (y[:, 0] if n_out == 1 else y), rng.normal(size=(13, 6))


@pytest.mark.parametrize("make", [
    lambda: MultiOutputRegressor(default_regressor()),
    lambda: default_regressor(),
    lambda: ExtraTreesRegressor(n_estimators=20, random_state=0),
    lambda: RandomForestRegressor(n_estimators=15, max_depth=4, random_state=1),
    lambda: VotingRegressor([("a", RandomForestRegressor(n_estimators=5, random_state=0)),
                             ("b", "drop"), ("c", Ridge())], weights=[2.0, 5.0, 1.0]),
    lambda: GradientBoostingRegressor(n_estimators=10, random_state=0),
    lambda: _Halved(n_estimators=5, random_state=0),
])
def test_equals_sklearn_predict(make):
    reg = make()
    n_out = 3 if isinstance(reg, MultiOutputRegressor) else 1
    X, y, Xt = _data(n_out)
    reg.fit(X, y)
    np.testing.assert_array_equal(predict_regressor(reg, Xt), reg.predict(Xt))


def test_multi_output_forest_and_bad_rows():
    X, y, Xt = _data(2)
    reg = ExtraTreesRegressor(n_estimators=10, random_state=0).fit(X, y)
    out = predict_regressor(reg, Xt)
    assert out.shape == (13, 2)
    np.testing.assert_array_equal(out, reg.predict(Xt))
    # a value float32 cannot hold, or the wrong width: scikit-learn's own errors
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="infinity|too large"):
        predict_regressor(reg, np.full((2, 6), 1e300))
    with pytest.raises(ValueError, match="features"):
        predict_regressor(reg, Xt[:, :4])


def test_rows_split_over_threads_give_the_same_features_bit_for_bit():
    """The per-image quality features depend on their own row only, so the threaded split
    (``uqseg._rows.map_rows``) equals the whole-batch computation. (The atlas agreement is not
    split: its float32 matrix products round differently with the number of rows.)"""
    from uqseg._rows import map_rows
    from uqseg.quality_features import quality_features

    rng = np.random.default_rng(0)
    n, k = 13, 3
    X = rng.normal(size=(n, 1, 32, 32)).astype(np.float32)
    logits = rng.normal(size=(n, k, 32, 32)) * 3
    logits[:, 1, 8:20, 8:20] += 6  # structures of varying size, some images without class 2
    P = np.exp(logits - logits.max(1, keepdims=True))
    P = (P / P.sum(1, keepdims=True)).astype(np.float32)
    U = -(P * np.log(P)).sum(1)
    whole = quality_features(X, P, U, "entropy")
    for threads in (2, 3, 4):
        split = map_rows(lambda *a: quality_features(*a, "entropy"), X, P, U, threads=threads)
        np.testing.assert_array_equal(split, whole)
    # a None entry passes through; too few rows per thread runs in one call
    assert map_rows(lambda a, b: a * 2 if b is None else None, np.arange(9.0), None,
                    threads=2).tolist() == list(np.arange(9.0) * 2)
    calls = []
    map_rows(lambda a: calls.append(len(a)) or a, np.arange(5), threads=4)
    assert calls == [5]
