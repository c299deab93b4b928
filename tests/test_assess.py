"""uqseg.assess: one inference pass for probabilities, maps, OOD score and predicted quality,
equal to the separate calls."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.exceptions import NotFittedError

import uqseg
from uqseg import (
    EnsembleSegmenter,
    KNNOODDetector,
    MahalanobisOODDetector,
    OnnxSegmenter,
    QualityRegressor,
    SpectralOODDetector,
    UncertaintyOODDetector,
)
from uqseg.quality import make_quality_set


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((40, 1, 16, 16)).astype(np.float32)
    X[:, :, 4:12, 4:12] += 1.0  # some structure: classes vary
    y = (X[:, 0] > 0.9).astype(np.int64) + (X[:, 0] > 1.5)
    return X, y


class Counter:
    """Counts ONNX Runtime session runs (the library's own bookkeeping is not trusted)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = ort.InferenceSession.run

        def run(sess, *args, **kwargs):
            self.n += 1
            return real(sess, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "run", run)


def _fresh(seg):
    """A segmenter of the same networks with its result cache off (no shared passes)."""
    if isinstance(seg, EnsembleSegmenter):
        return EnsembleSegmenter(seg.members, weights=seg.weights, tta=seg.tta,
                                 cache_size=0).fit()
    return OnnxSegmenter(seg.model, tta=seg.tta).fit()


def _check_equal(out, seg, X, ood=None, quality=None, kinds=("entropy", "mutual_information")):
    ref = _fresh(seg)
    if isinstance(seg, EnsembleSegmenter):
        proba, maps = ref.predict_with_uncertainty(X, kinds=kinds)
    else:
        proba = ref.predict_proba(X)
        maps = {"entropy": uqseg.uncertainty.entropy(proba)}
    np.testing.assert_allclose(out["proba"], proba, atol=1e-5)
    for k, v in maps.items():
        np.testing.assert_allclose(out[k], v, atol=1e-5)
    if ood is not None:
        s = ood.score_samples(X)
        np.testing.assert_allclose(out["ood_score"], s, atol=1e-5)
        np.testing.assert_array_equal(out["is_outlier"], ood.predict(X) == -1)
    if quality is not None:
        np.testing.assert_allclose(out["quality"], quality.predict(X), atol=1e-5)


def test_ensemble_spectral_quality_in_one_pass(tiny_members, data, monkeypatch):
    X, y = data
    ens = EnsembleSegmenter(tiny_members[:3], cache_size=0).fit()
    det = SpectralOODDetector(ens).fit(X[:24])
    Xq, yq, info = make_quality_set(X[:10], y[:10], severities=(0.5, 1.0), seed=0)
    qr = QualityRegressor(ens).fit(Xq, yq, groups=info["source"])
    counter = Counter(monkeypatch)
    ens.predict_proba(X[24:])
    plain = counter.n
    counter.n = 0
    out = uqseg.assess(X[24:], ens, ood=det, quality=qr)
    assert counter.n == plain  # the same session runs as a bare predict_proba
    assert out["passes"] == 1
    assert set(out) == {"proba", "entropy", "mutual_information", "ood_score", "is_outlier",
                        "quality", "passes"}
    _check_equal(out, ens, X[24:], det, qr)


def test_saved_and_loaded_estimators_still_share_the_pass(tiny_members, data, tmp_path,
                                                          monkeypatch):
    X, _ = data
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    uqseg.save(SpectralOODDetector(ens).fit(X[:24]), tmp_path / "ood")
    det = uqseg.load(tmp_path / "ood")  # its networks are copies inside the folder
    assert det.estimator_ is not ens
    out = uqseg.assess(X[24:], ens, ood=det)
    assert out["passes"] == 1
    _check_equal(out, ens, X[24:], det)


@pytest.mark.parametrize("detector", [KNNOODDetector, MahalanobisOODDetector])
def test_single_network_and_feature_baselines(tiny_2d, data, detector):
    X, y = data
    seg = OnnxSegmenter(tiny_2d).fit()
    det = detector(seg).fit(X[:24])
    qr = QualityRegressor(seg, typicality=False).fit(X[:16], y[:16])
    out = uqseg.assess(X[24:], seg, ood=det, quality=qr)
    assert out["passes"] == 1
    assert "mutual_information" not in out  # one network: entropy only with the default maps
    _check_equal(out, seg, X[24:], det, qr)
    with pytest.raises(ValueError, match="'mutual_information' needs several predictions"):
        uqseg.assess(X[:2], seg, maps=("mutual_information",))


@pytest.mark.parametrize(("score", "shared"), [("entropy", True), ("mutual_information", True),
                                               ("max_softmax", True)])
def test_uncertainty_detector(tiny_members, data, score, shared):
    X, _ = data
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    det = UncertaintyOODDetector(ens, score=score, region="foreground").fit(X[:24])
    out = uqseg.assess(X[24:], ens, ood=det, maps=("entropy",))
    assert out["passes"] == (1 if shared else 2)
    _check_equal(out, ens, X[24:], det, kinds=("entropy",))


def test_estimators_of_other_networks_run_their_own(tiny_members, data):
    X, y = data
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    other = EnsembleSegmenter(tiny_members[1:3]).fit()  # another first member
    det = SpectralOODDetector(other).fit(X[:24])
    qr = QualityRegressor(other, typicality=False).fit(X[:16], y[:16])
    out = uqseg.assess(X[24:], ens, ood=det, quality=qr)
    assert out["passes"] == 3
    _check_equal(out, ens, X[24:], det, qr)
    # a different weighting is a different segmenter for the quality regressor
    weighted = EnsembleSegmenter(tiny_members[:2], weights=[3, 1]).fit()
    assert uqseg.assess(X[24:26], weighted, quality=QualityRegressor(ens, typicality=False).fit(
        X[:16], y[:16]))["passes"] == 2


def test_list_input_and_errors(tiny_members, data):
    X, _ = data
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    det = SpectralOODDetector(ens).fit(X[:24])
    out = uqseg.assess([X[30], X[31, :, :12, :10]], ens, ood=det)
    assert isinstance(out["proba"], list) and out["proba"][1].shape == (3, 12, 10)
    np.testing.assert_allclose(out["ood_score"][0], det.score_samples(X[30:31])[0], atol=1e-5)
    with pytest.raises(NotFittedError):
        uqseg.assess(X[:2], EnsembleSegmenter(tiny_members[:2]))
    with pytest.raises(NotFittedError):
        uqseg.assess(X[:2], ens, ood=SpectralOODDetector(ens))
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        uqseg.assess(X[:2], ens, maps=("margin",))
    with pytest.raises(TypeError, match="OnnxSegmenter or EnsembleSegmenter"):
        uqseg.assess(X[:2], det)
    with pytest.raises(ValueError, match="NaN|finite"):
        bad = X[:2].copy()
        bad[0, 0, 0, 0] = np.nan
        uqseg.assess(bad, ens)
    assert uqseg.assess is uqseg._assess.assess
