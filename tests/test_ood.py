"""Tests for uqseg.ood: spectral OOD detector and baselines, against direct computations."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.spatial.distance import cdist, mahalanobis
from sklearn.base import BaseEstimator, clone
from sklearn.covariance import LedoitWolf
from sklearn.exceptions import NotFittedError

from uqseg.ensemble import EnsembleSegmenter
from uqseg.ood import (
    KNNOODDetector,
    Layout,
    MahalanobisOODDetector,
    SpectralOODDetector,
    Spectrum,
    UncertaintyOODDetector,
    adaptive_avg_pool,
    spectral_signature,
)
from uqseg.segmenter import OnnxSegmenter


def blobs(n, size=(16, 16), seed=0):
    """Smooth in-distribution images: a few Gaussian blobs plus mild noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij")
    out = np.empty((n, 1, *size), dtype=np.float32)
    for i in range(n):
        img = np.zeros(size)
        for _ in range(3):
            c = rng.uniform(-0.5, 0.5, len(size))
            r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True))
            img += np.exp(-r2 / 0.1)
        out[i, 0] = img + 0.05 * rng.standard_normal(size)
    return out


class FakeEnsemble(BaseEstimator):
    """Duck-typed EnsembleSegmenter: members_, predict_members, predict_proba."""

    def __init__(self, members):
        self.members = members

    def fit(self, X=None, y=None):
        self.members_ = [OnnxSegmenter(m).fit() for m in self.members]
        self.n_classes_ = self.members_[0].n_classes_
        return self

    def predict_members(self, X):
        return np.stack([m.predict_proba(X) for m in self.members_])

    def predict_proba(self, X):
        return self.predict_members(X).mean(axis=0)


@pytest.fixture(scope="module")
def X_train():
    return blobs(24, seed=1)


@pytest.fixture(scope="module")
def spectral(tiny_2d, X_train):
    return SpectralOODDetector(tiny_2d, layer="decoder_last",
                               descriptors=[Spectrum(grid=8)]).fit(X_train)


def direct_signature(feat, grid_pool, eps=1e-6):
    """One image's feature maps (C, *sp) -> signature through numpy's SVD of (V x C)."""
    c = feat.shape[0]
    A = grid_pool(feat).reshape(c, -1).T.astype(np.float64)  # voxels x channels
    s = np.linalg.svd(A, compute_uv=False)
    s = np.r_[s, np.zeros(c - s.size)]
    v = np.log(s + eps)
    return v / np.linalg.norm(v)


def xfit_kth(A, k, n_folds=5):
    """k-th nearest distance of each row to the rows outside its contiguous block, via cdist."""
    n = len(A)
    block = np.arange(n) * n_folds // n  # 24 images -> blocks of 5, 5, 5, 5, 4
    D = cdist(A, A)
    D[block[:, None] == block[None, :]] = np.inf
    return np.sort(D, axis=1)[:, k - 1]


def pool2(f):  # 16x16 -> 8x8 by 2x2 means, written out
    return 0.25 * (f[:, ::2, ::2] + f[:, 1::2, ::2] + f[:, ::2, 1::2] + f[:, 1::2, 1::2])


# ---------------------------------------------------------------------- signature
def test_signature_equals_numpy_svd(spectral, tiny_2d, X_train):
    X = blobs(5, seed=7)
    feats = OnnxSegmenter(tiny_2d).fit().run(X, layers=["decoder_last"])["decoder_last"]
    want = np.stack([direct_signature(f, pool2) for f in feats])
    np.testing.assert_allclose(spectral.signature(X), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grid", [None, 2, 8])
def test_signature_bottleneck_paths(tiny_2d, X_train, grid):
    # bottleneck (8 channels, 8x8): grid 2 -> 4 voxels < 8 channels (SVD, zero padded);
    # 8 and None -> 64 voxels (Gram eigenvalues)
    det = SpectralOODDetector(tiny_2d, layer="bottleneck",
                              descriptors=[Spectrum(grid=grid), Layout()]).fit(X_train)
    X = blobs(3, seed=8)
    feats = det.estimator_.run(X, layers=["bottleneck"])["bottleneck"]

    def pool(f):
        if grid in (None, 8):
            return f
        return f.reshape(f.shape[0], 2, 4, 2, 4).mean(axis=(2, 4))

    want = np.stack([direct_signature(f, pool) for f in feats])
    np.testing.assert_allclose(det.signature(X), want, rtol=1e-6, atol=1e-7)


def test_signature_invariants(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d, layer=["bottleneck", "decoder_last"]).fit(X_train)
    assert det.layers_ == ["bottleneck", "decoder_last"]
    assert det.signatures_.shape == (24, 8 + 4)  # channels summed over layers
    np.testing.assert_allclose(np.linalg.norm(det.signatures_, axis=1), 1.0, rtol=1e-12)
    single = SpectralOODDetector(tiny_2d, layer="bottleneck").fit(X_train)
    np.testing.assert_allclose(det.signatures_[:, :8] * np.sqrt(2), single.signatures_)
    raw = spectral_signature(np.ones((1, 3, 4, 4)), grid=2, normalize=None)
    # rank-one matrix of ones (4 x 3): s = [sqrt(12), 0, 0]
    np.testing.assert_allclose(raw, np.log(np.array([[np.sqrt(12), 0, 0]]) + 1e-6), rtol=1e-6)


def test_adaptive_pool_matches_loop():
    rng = np.random.default_rng(0)
    f = rng.random((2, 3, 7, 10))
    got = adaptive_avg_pool(f, (3, 4))
    want = np.empty((2, 3, 3, 4))
    for i in range(3):
        for j in range(4):
            r0, r1 = (i * 7) // 3, -(-((i + 1) * 7) // 3)
            c0, c1 = (j * 10) // 4, -(-((j + 1) * 10) // 4)
            want[:, :, i, j] = f[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(adaptive_avg_pool(f[:, :, :6, :8], 2),
                               f[:, :, :6, :8].reshape(2, 3, 2, 3, 2, 4).mean(axis=(3, 5)))


def test_any_image_size_same_signature_length(spectral):
    X = [blobs(1, size=(16, 16), seed=3)[0], blobs(1, size=(24, 20), seed=4)[0]]
    sig = spectral.signature(X)
    assert sig.shape == (2, 4)
    np.testing.assert_allclose(sig[1], spectral.signature(X[1][None])[0])


# ---------------------------------------------------------------------- scores
def test_identical_image_scores_max(spectral, X_train):
    s = spectral.score_samples(X_train[:4])
    np.testing.assert_allclose(s, 0.0, atol=1e-6)
    assert np.all(spectral.score_samples(blobs(6, seed=9)) <= 1e-9)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbour_vs_brute_force(tiny_2d, X_train, k):
    det = SpectralOODDetector(tiny_2d, layer="decoder_last",
                              descriptors=[Spectrum(n_neighbors=k)]).fit(X_train)
    X = blobs(5, seed=11)
    D = cdist(det.signature(X), det.signatures_)
    np.testing.assert_allclose(det.score_samples(X), -np.sort(D, axis=1)[:, k - 1], atol=1e-7)
    # training images are scored against the four other contiguous blocks only
    np.testing.assert_allclose(det.train_scores_, -xfit_kth(det.signatures_, k), atol=1e-7)
    assert not np.allclose(det.train_scores_, -xfit_kth(det.signatures_, k, n_folds=24))


@pytest.mark.parametrize("contamination", [0.1, 0.25])
def test_offset_from_contamination(tiny_2d, X_train, contamination):
    det = SpectralOODDetector(tiny_2d, contamination=contamination).fit(X_train)
    assert det.offset_ == pytest.approx(np.percentile(det.train_scores_, 100 * contamination))
    inlier_frac = np.mean(det.train_scores_ >= det.offset_)
    assert abs(inlier_frac - (1 - contamination)) <= 1.0 / len(X_train) + 1e-12
    assert det.threshold_ == -det.offset_


def test_predict_and_decision_function(spectral):
    X = np.concatenate([blobs(4, seed=12), 5 * np.random.default_rng(0).standard_normal(
        (4, 1, 16, 16)).astype(np.float32)])
    pred = spectral.predict(X)
    assert set(np.unique(pred)) <= {-1, 1}
    dec = spectral.decision_function(X)
    np.testing.assert_allclose(dec, spectral.score_samples(X) - spectral.offset_)
    np.testing.assert_array_equal(pred, np.where(dec < 0, -1, 1))


def test_karimi_threshold(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d, threshold="karimi", descriptors=[Spectrum()]).fit(X_train)
    d = xfit_kth(det.signatures_, 1)
    assert det.threshold_ == pytest.approx(d.mean() + 2.5 * d.std(), rel=1e-9)
    assert det.offset_ == pytest.approx(-(d.mean() + 2.5 * d.std()), rel=1e-9)


def test_partial_fit_equals_fit_on_union(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d, contamination=0.1)
    det.partial_fit(X_train[:10]).partial_fit(X_train[10:])
    full = SpectralOODDetector(tiny_2d, contamination=0.1).fit(X_train)
    for a, b in zip(det.descriptors_, full.descriptors_, strict=True):
        np.testing.assert_allclose(a.features_, b.features_)
    np.testing.assert_allclose(det.train_scores_, full.train_scores_, atol=1e-9)
    assert det.offset_ == pytest.approx(full.offset_)


@pytest.mark.parametrize("layer", ["decoder_last", "bottleneck"])
def test_synthetic_shift_scores_lower(tiny_2d, X_train, layer):
    det = SpectralOODDetector(tiny_2d, layer=layer).fit(X_train)
    X_in = blobs(10, seed=20)
    rng = np.random.default_rng(5)
    X_noise = rng.uniform(-3, 3, (10, 1, 16, 16)).astype(np.float32)
    s_in = det.score_samples(X_in)
    assert s_in.min() > det.score_samples(X_noise).max()


def test_3d_network(tiny_3d):
    X = blobs(12, size=(8, 8, 8), seed=2)
    det = SpectralOODDetector(tiny_3d, layer="decoder_last",
                              descriptors=[Spectrum(grid=4)]).fit(X)
    assert det.signatures_.shape == (12, 4)
    feats = det.estimator_.run(X[:2], layers=["decoder_last"])["decoder_last"]
    pool = lambda f: f.reshape(4, 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6))  # noqa: E731
    want = np.stack([direct_signature(f, pool) for f in feats])
    np.testing.assert_allclose(det.signature(X[:2]), want, rtol=1e-6, atol=1e-7)
    noise = np.random.default_rng(1).uniform(-3, 3, (4, 1, 8, 8, 8)).astype(np.float32)
    assert det.score_samples(blobs(4, size=(8, 8, 8), seed=3)).min() > \
        det.score_samples(noise).max()
    for cls in (MahalanobisOODDetector, KNNOODDetector):
        assert cls(tiny_3d).fit(X).score_samples(X[:3]).shape == (3,)


def test_ensemble_uses_its_feature_member(tiny_members, X_train):
    for k in (0, 2):
        det = SpectralOODDetector(EnsembleSegmenter(tiny_members, feature_member=k)).fit(X_train)
        ref = SpectralOODDetector(tiny_members[k]).fit(X_train)
        np.testing.assert_allclose(det.signatures_, ref.signatures_, rtol=1e-6)
    # an object that is not a segmenter of the protocol gives no features: a clear error,
    # not a reach into its members
    with pytest.raises(TypeError, match="needs a segmenter with run"):
        SpectralOODDetector(FakeEnsemble(tiny_members)).fit(X_train)
    with pytest.raises(ValueError, match="feature_member must be the index of a member"):
        EnsembleSegmenter(tiny_members, feature_member=3).fit()


def test_estimator_forms(tiny_2d, X_train):
    seg = OnnxSegmenter(tiny_2d)
    det = SpectralOODDetector(seg).fit(X_train)
    assert det.estimator is seg and not hasattr(seg, "n_classes_")  # cloned, not mutated
    assert det.layers_ == ["decoder_last", "bottleneck"]  # last decoder block and deepest
    assert det.descriptors_[1].layers_ == ["decoder_last"]  # the layout's
    np.testing.assert_allclose(det.signatures_,
                               SpectralOODDetector(tiny_2d).fit(X_train).signatures_)


# ---------------------------------------------------------------------- spectrum + layout
def direct_combined(path, X_train, X, k=1, n_comp=64, k_layout=1, combine="mean"):
    """Spectrum+layout score written out: numpy SVDs, cdist, explicit cross-fitting."""
    seg = OnnxSegmenter(path).fit()

    def parts(Xs):
        out = seg.run(Xs, layers=["decoder_last", "bottleneck"])
        dl, bn = out["decoder_last"], out["bottleneck"]
        # tiny_2d: decoder_last 16x16 -> grid 16 is itself; bottleneck 8x8 -> grid 16 repeats
        # every cell 2x2 (adaptive pooling of a shorter axis), which scales s by 2
        up = bn.repeat(2, axis=2).repeat(2, axis=3)
        sig = np.concatenate([np.stack([direct_signature(f, lambda a: a) for f in dl]),
                              np.stack([direct_signature(f, lambda a: a) for f in up])], 1)
        lay = dl.reshape(len(dl), dl.shape[1], 4, 4, 4, 4).mean(axis=(3, 5))  # 4x4 cells
        return sig / np.sqrt(2), lay.reshape(len(dl), -1).astype(np.float64)

    S_tr, L_tr = parts(X_train)
    S, L = parts(X)
    mu, sd = L_tr.mean(0), L_tr.std(0)
    sd = np.maximum(sd, 0.01 * sd.max())  # documented floor for dead units
    _, sv, vt = np.linalg.svd((L_tr - mu) / sd, full_matrices=False)
    m = min(n_comp, len(X_train) // 4, int(np.sum(sv >= 1e-3 * sv[0])))
    W = vt[:m] * (np.sqrt(len(X_train)) / sv[:m])[:, None]
    P_tr, P = ((L_tr - mu) / sd) @ W.T, ((L - mu) / sd) @ W.T
    # whitening: unit variance along every kept axis of the training set
    np.testing.assert_allclose(P_tr.var(axis=0), 1.0, rtol=1e-6)
    z_tr, z = [], []
    for A_tr, A, kk in ((S_tr, S, k), (P_tr, P, k_layout)):
        d_tr = xfit_kth(A_tr, kk)
        d = np.sort(cdist(A, A_tr), axis=1)[:, kk - 1]
        z_tr.append((d_tr - d_tr.mean()) / d_tr.std())
        z.append((d - d_tr.mean()) / d_tr.std())
    reduce = {"mean": np.mean, "max": np.max}[combine]
    return -reduce(z, axis=0), -reduce(z_tr, axis=0), S, W


@pytest.mark.parametrize("k, combine", [(1, "mean"), (2, "mean"), (1, "max")])
def test_spectrum_layout_vs_direct(tiny_2d, X_train, k, combine):
    det = SpectralOODDetector(tiny_2d, descriptors=[Spectrum(n_neighbors=k), Layout()],
                              combine=combine).fit(X_train)
    assert det.descriptors_[0].grid == 16 and det.descriptors_[1].grid == 4
    X = np.concatenate([blobs(4, seed=31), np.rot90(blobs(3, seed=32), axes=(2, 3))])
    want, want_train, sig, W = direct_combined(tiny_2d, X_train, X, k=k, combine=combine)
    np.testing.assert_allclose(det.signature(X), sig, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(det.score_samples(X), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.train_scores_, want_train, rtol=1e-5, atol=1e-6)
    assert det.descriptors_[1].components_.shape == (len(W), 4 * 16)  # 4 channels x 4x4 cells
    assert det.offset_ == pytest.approx(np.percentile(want_train, 5))


def test_spectrum_blind_to_rotation_layout_not():
    """Why the layout part exists: singular values ignore where the voxels are."""
    f = np.random.default_rng(3).random((2, 5, 16, 16))
    rot = np.rot90(f, axes=(2, 3)).copy()
    flip = f[:, :, ::-1].copy()
    for g in (4, 8, 16):
        np.testing.assert_allclose(spectral_signature(rot, g), spectral_signature(f, g),
                                   atol=1e-10)
        np.testing.assert_allclose(spectral_signature(flip, g), spectral_signature(f, g),
                                   atol=1e-10)
    assert np.abs(adaptive_avg_pool(rot, 4) - adaptive_avg_pool(f, 4)).max() > 0.05


def test_spectrum_only_is_the_paper(tiny_2d, X_train):
    plain = SpectralOODDetector(tiny_2d, descriptors=[Spectrum()]).fit(X_train)
    both = SpectralOODDetector(tiny_2d).fit(X_train)
    assert len(plain.descriptors_) == 1 and plain.signatures_.shape == (24, 12)
    assert both.descriptors_[1].features_.shape == (24, 4 * 16)
    np.testing.assert_allclose(plain.signatures_, both.signatures_)
    X = blobs(3, seed=40)
    D = cdist(plain.signature(X), plain.signatures_)
    np.testing.assert_allclose(plain.score_samples(X), -D.min(axis=1), atol=1e-7)


def test_spectrum_layout_save_load(tiny_2d, X_train, tmp_path):
    import uqseg

    det = SpectralOODDetector(tiny_2d, contamination=0.1).fit(X_train)
    uqseg.save(det, tmp_path / "ood")
    back = uqseg.load(tmp_path / "ood")
    X = blobs(3, seed=41)
    np.testing.assert_allclose(back.score_samples(X), det.score_samples(X))
    assert back.offset_ == det.offset_


# ---------------------------------------------------------------------- baselines
def pooled(path, X, layer="bottleneck"):
    f = OnnxSegmenter(path).fit().run(X, layers=[layer])[layer]
    return f.mean(axis=(2, 3)).astype(np.float64)


def test_mahalanobis_vs_scipy(tiny_2d, X_train):
    det = MahalanobisOODDetector(tiny_2d).fit(X_train)
    assert det.layers_ == ["bottleneck"]
    F = pooled(tiny_2d, X_train)
    lw = LedoitWolf().fit(F)
    X = blobs(4, seed=30)
    want = [-mahalanobis(f, lw.location_, lw.precision_) for f in pooled(tiny_2d, X)]
    np.testing.assert_allclose(det.score_samples(X), want, rtol=1e-6)
    # cross-fitted training scores: image i scored by a model fitted without its fold
    fold = np.arange(24) % 5
    lw0 = LedoitWolf().fit(F[fold != 0])
    np.testing.assert_allclose(
        det.train_scores_[0], -mahalanobis(F[0], lw0.location_, lw0.precision_), rtol=1e-6)


def test_mahalanobis_pca(tiny_2d, X_train):
    from sklearn.decomposition import PCA

    det = MahalanobisOODDetector(tiny_2d, n_components=3).fit(X_train)
    F = pooled(tiny_2d, X_train)
    pca = PCA(n_components=3).fit(F)
    lw = LedoitWolf().fit(pca.transform(F))
    X = blobs(3, seed=31)
    Z = pca.transform(pooled(tiny_2d, X))
    want = [-mahalanobis(z, lw.location_, lw.precision_) for z in Z]
    np.testing.assert_allclose(det.score_samples(X), want, rtol=1e-5)
    with pytest.raises(ValueError, match="n_components"):
        MahalanobisOODDetector(tiny_2d, n_components=50).fit(X_train)


def test_knn_vs_brute_force(tiny_2d, X_train):
    det = KNNOODDetector(tiny_2d, k=3).fit(X_train)
    F = pooled(tiny_2d, X_train)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    X = blobs(4, seed=32)
    Q = pooled(tiny_2d, X)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    np.testing.assert_allclose(det.score_samples(X), -np.sort(cdist(Q, F), axis=1)[:, 2],
                               atol=1e-7)
    L = cdist(F, F)
    np.fill_diagonal(L, np.inf)
    np.testing.assert_allclose(det.train_scores_, -np.sort(L, axis=1)[:, 2], atol=1e-7)


@pytest.mark.parametrize("score", ["entropy", "max_softmax"])
@pytest.mark.parametrize("region", ["image", "foreground"])
def test_uncertainty_vs_hand_formula(tiny_2d, X_train, score, region):
    det = UncertaintyOODDetector(tiny_2d, score=score, region=region).fit(X_train)
    X = blobs(20, seed=40)
    p = OnnxSegmenter(tiny_2d).fit().predict_proba(X).astype(np.float64)
    if score == "entropy":
        u = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    else:
        u = 1 - p.max(axis=1)
    want = []
    for i in range(len(X)):
        fg = p[i].argmax(axis=0) != 0
        want.append(u[i][fg].mean() if region == "foreground" and fg.any() else u[i].mean())
    np.testing.assert_allclose(det.score_samples(X), -np.array(want), rtol=1e-5)
    assert det.uncertainties_.shape == (24, 1)


def test_uncertainty_mutual_information(tiny_members, X_train):
    ens = FakeEnsemble(tiny_members).fit()
    det = UncertaintyOODDetector(ens, score="mutual_information").fit(X_train)
    X = blobs(3, seed=41)
    P = ens.predict_members(X).astype(np.float64)

    def H(q):
        return -(q * np.log(np.clip(q, 1e-300, None))).sum(axis=1)

    mi = H(P.mean(axis=0)) - np.mean([H(q) for q in P], axis=0)
    np.testing.assert_allclose(det.score_samples(X), -mi.mean(axis=(1, 2)), rtol=1e-5)


# ---------------------------------------------------------------------- errors, clone, pickle
@pytest.mark.parametrize("params, match", [
    ({"contamination": 0.7}, "contamination must be"),
    ({"threshold": "mean"}, "threshold must be one of"),
    ({"descriptors": [Spectrum(grid=0)]}, r"descriptors\[0\] \(Spectrum\): grid must be"),
    ({"descriptors": [Spectrum(n_neighbors=30)]},
     r"descriptors\[0\] \(Spectrum\): n_neighbors=30 needs"),
    ({"descriptors": [Spectrum(normalize="l1")]}, "normalize must be 'l2' or None"),
    ({"descriptors": [Spectrum(eps=0)]}, "eps must be a positive number"),
    ({"descriptors": [Spectrum(metric="nope")]}, "metric must be a scikit-learn"),
    ({"descriptors": [Spectrum(), Layout(grid=0)]}, r"descriptors\[1\] \(Layout\): grid must"),
    ({"descriptors": [Layout(n_components=0)]}, "n_components must be"),
    ({"descriptors": [Spectrum(), Layout(layer="nope")]},
     "layer 'nope' is not a feature layer"),
    ({"descriptors": [Spectrum(layer="nope")]}, "layer 'nope' is not a feature layer"),
    # 24 images in 5 contiguous folds: at most 19 lie outside the largest fold
    ({"descriptors": [Spectrum(), Layout(n_neighbors=20)]},
     r"descriptors\[1\] \(Layout\): n_neighbors=20 needs at least 20 .* \(19 outside"),
    ({"combine": "sum"}, "combine must be 'mean' or 'max'"),
    ({"n_folds": 1}, "n_folds must be at least 2"),
    ({"n_folds": 2.5}, "n_folds must be a positive integer"),
    ({"descriptors": [Spectrum(), Layout(grid=(2, 2, 2))]}, "grid has 3 entries"),
    ({"descriptors": [Spectrum(grid=(2, 2, 2))]}, "grid has 3 entries"),
    ({"layer": "bottleneck", "descriptors": [Spectrum(layer="decoder_last")]},
     "set the layer in one place"),
])
def test_spectral_parameter_errors(tiny_2d, X_train, params, match):
    with pytest.raises(ValueError, match=match):
        SpectralOODDetector(tiny_2d, **params).fit(X_train)


def test_errors(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d)
    with pytest.raises(NotFittedError):
        det.score_samples(X_train)
    with pytest.raises(ValueError, match="layer 'nope' is not a feature layer"):
        SpectralOODDetector(tiny_2d, layer="nope").fit(X_train)
    with pytest.raises(ValueError, match="channels"):
        SpectralOODDetector(tiny_2d).fit(np.zeros((4, 2, 16, 16), np.float32))
    bad = X_train[:4].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SpectralOODDetector(tiny_2d).fit(X_train).score_samples(bad)
    with pytest.raises(ValueError, match="mutual_information.*EnsembleSegmenter"):
        UncertaintyOODDetector(tiny_2d, score="mutual_information").fit(X_train)
    # 19 outside each fold
    SpectralOODDetector(tiny_2d, descriptors=[Spectrum(), Layout(n_neighbors=19)]).fit(X_train)
    with pytest.raises(ValueError, match="score must be one of"):
        UncertaintyOODDetector(tiny_2d, score="variance").fit(X_train)
    with pytest.raises(ValueError, match="region must be one of"):
        UncertaintyOODDetector(tiny_2d, region="boundary").fit(X_train)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KNNOODDetector(tiny_2d, k=0).fit(X_train)
    with pytest.raises(TypeError, match="estimator must be"):
        SpectralOODDetector(3).fit(X_train)


@pytest.mark.parametrize("cls", [SpectralOODDetector, UncertaintyOODDetector,
                                 MahalanobisOODDetector, KNNOODDetector])
def test_clone_and_pickle(tiny_2d, X_train, cls):
    det = cls(tiny_2d, contamination=0.1).fit(X_train)
    c = clone(det)
    assert c.get_params() == det.get_params() and not hasattr(c, "offset_")
    X = blobs(3, seed=50)
    back = pickle.loads(pickle.dumps(det))
    np.testing.assert_allclose(back.score_samples(X), det.score_samples(X))
    assert back.offset_ == det.offset_
    assert np.isin(det.predict(X), [-1, 1]).all()


def test_real_ensemble_mutual_information(tiny_members, X_train):
    ensemble = pytest.importorskip("uqseg.ensemble")
    ens = ensemble.EnsembleSegmenter(tiny_members).fit()
    det = UncertaintyOODDetector(ens, score="mutual_information", region="foreground")
    det.fit(X_train)
    X = blobs(3, seed=42)
    P = ens.predict_members(X).astype(np.float64)

    def H(q):
        return -(q * np.log(np.clip(q, 1e-300, None))).sum(axis=1)

    mi = H(P.mean(axis=0)) - np.mean([H(q) for q in P], axis=0)
    fg = P.mean(axis=0).argmax(axis=1) != 0
    want = [m[f].mean() if f.any() else m.mean() for m, f in zip(mi, fg, strict=True)]
    np.testing.assert_allclose(det.score_samples(X), -np.array(want), rtol=1e-4, atol=1e-7)
    spec = SpectralOODDetector(ens).fit(X_train)
    ref = SpectralOODDetector(tiny_members[0]).fit(X_train)
    np.testing.assert_allclose(spec.signatures_, ref.signatures_)


# ---------------------------------------------------------------------- reference zoo
def test_reference_zoo_defaults_see_orientation_and_keep_false_alarms_low():
    """The documented behaviour on the embedded data with the library defaults."""
    from uqseg import datasets, metrics

    X_tr, _ = datasets.load_brain_tissue("train")
    X_te, _ = datasets.load_brain_tissue("test")
    det = SpectralOODDetector(datasets.reference_models()[0]).fit(X_tr)
    assert det.layers_ == ["dec1", "dec2", "bottleneck"]
    assert [d.layers_ for d in det.descriptors_] == [["dec1", "dec2", "bottleneck"], ["dec2"]]
    s_in = det.score_samples(X_te)
    # cross-fitted training scores: new subjects are not flagged far above contamination
    assert np.mean(s_in < det.offset_) <= 0.08
    for kind, floor in (("orientation", 0.95), ("bias", 0.95), ("ct", 0.99)):
        assert metrics.ood_auroc(s_in, det.score_samples(datasets.load_ood(kind))) >= floor


@pytest.mark.parametrize("shape,grid", [((2, 3, 32, 32), 16), ((2, 3, 64, 64), 16),
                                        ((1, 2, 12, 8), 4), ((1, 2, 8, 12, 16), 4),
                                        ((2, 2, 30, 33), 8)])
def test_adaptive_avg_pool_short_and_long_windows_match_means(shape, grid):
    f = np.random.default_rng(0).random(shape, dtype=np.float32)
    want = f.astype(np.float64)
    for ax in range(2, f.ndim):  # window means one axis at a time, as torch's adaptive pool
        n = want.shape[ax]
        cells = []
        for i in range(grid):
            lo, hi = (i * n) // grid, -((-(i + 1) * n) // grid)
            cells.append(np.take(want, np.arange(lo, hi), axis=ax).mean(axis=ax))
        want = np.stack(cells, axis=ax)
    got = adaptive_avg_pool(f, grid)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_one_blas_thread_limits_and_restores():
    from threadpoolctl import threadpool_info

    from uqseg._numeric import one_blas_thread

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS library found by threadpoolctl")
    before = [i["num_threads"] for i in blas]
    with one_blas_thread():
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_one_blas_thread_nested_uses_restore_the_callers_setting():
    from threadpoolctl import threadpool_info

    from uqseg._numeric import one_blas_thread

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library found by threadpoolctl")
    with one_blas_thread():
        with one_blas_thread():  # e.g. assess -> score_samples
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
