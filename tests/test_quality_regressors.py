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
