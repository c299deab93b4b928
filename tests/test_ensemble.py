"""EnsembleSegmenter and fuse_members against independent numpy computations."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
from scipy.special import xlogy
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from uqseg import backends
from uqseg.backends.fuse import STATS, fuse_members
from uqseg.ensemble import EnsembleSegmenter
from uqseg.metrics import segment_uncertainty
from uqseg.segmenter import OnnxSegmenter

KINDS = ("entropy", "expected_entropy", "mutual_information", "variance")


def _softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ent(p, axis=1):
    return -xlogy(p, p).sum(axis=axis)


def _member_proba(paths, X, **kw):
    return np.stack(
        [_softmax(OnnxSegmenter(p, device="cpu", **kw).fit().transform(X)) for p in paths]
    )


def _stacked(P, w):
    """Weighted ensemble statistics of stacked samples P (S, N, K, *sp), in float64."""
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    wb = w.reshape(-1, *[1] * (P.ndim - 1))
    mean = (wb * P).sum(0)
    ee = (w.reshape(-1, *[1] * (P.ndim - 2)) * _ent(P, axis=2)).sum(0)
    h = _ent(mean)
    var = (wb * (P - mean) ** 2).sum(0).mean(axis=1)
    return mean, {
        "entropy": h,
        "expected_entropy": ee,
        "mutual_information": h - ee,
        "variance": var,
    }


@pytest.fixture
def X():
    return np.random.default_rng(0).standard_normal((5, 1, 8, 12)).astype(np.float32)


@pytest.mark.parametrize("fuse", [False, True])
def test_predict_proba_is_mean_of_member_softmax(tiny_members, X, fuse):
    ens = EnsembleSegmenter(tiny_members, fuse=fuse, device="cpu", batch_size=2).fit()
    assert ens.fused_ is fuse and ens.n_samples_ == 3 and ens.n_classes_ == 3
    want = _member_proba(tiny_members, X).mean(0)
    np.testing.assert_allclose(ens.predict_proba(X), want, atol=1e-5)
    np.testing.assert_array_equal(ens.predict(X), ens.predict_proba(X).argmax(1))
    np.testing.assert_allclose(ens.transform(X), np.log(want), atol=1e-4)
    assert ens.transform(X).dtype == np.float32


@pytest.mark.parametrize("fuse", [False, True])
def test_weights(tiny_members, X, fuse):
    w = [3.0, 1.0, 0.5]
    ens = EnsembleSegmenter(tiny_members, weights=w, fuse=fuse, device="cpu").fit()
    P = _member_proba(tiny_members, X)
    mean, maps = _stacked(P, w)
    proba, got = ens.predict_with_uncertainty(X, kinds=KINDS)
    np.testing.assert_allclose(proba, mean, atol=1e-5)
    for k in KINDS:
        np.testing.assert_allclose(got[k], maps[k], atol=2e-5, err_msg=k)
    np.testing.assert_allclose(ens.weights_, np.array(w) / 4.5)


@pytest.mark.parametrize("fuse", [False, True])
def test_uncertainty_kinds_equal_stacked_formulas(tiny_members, X, fuse):
    ens = EnsembleSegmenter(tiny_members, fuse=fuse, device="cpu").fit()
    P = ens.predict_members(X)
    assert P.shape == (3, *X.shape[:1], 3, *X.shape[2:])
    np.testing.assert_allclose(P, _member_proba(tiny_members, X), atol=1e-6)
    from uqseg import uncertainty as U

    ref = {
        "entropy": U.entropy(P.mean(0).astype(np.float64)),
        "expected_entropy": U.expected_entropy(P.astype(np.float64)),
        "mutual_information": U.mutual_information(P.astype(np.float64)),
        "variance": U.variance(P.astype(np.float64)),
    }
    for k in KINDS:
        got = ens.uncertainty(X, kind=k)
        assert got.shape == (X.shape[0], *X.shape[2:]) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref[k], atol=2e-5, err_msg=k)
    h, mi = ens.uncertainty(X, "entropy"), ens.uncertainty(X, "mutual_information")
    assert (mi >= 0).all() and (mi <= h + 1e-6).all() and mi.max() > 0
    np.testing.assert_allclose(h, ens.uncertainty(X, "expected_entropy") + mi, atol=2e-5)


@pytest.mark.parametrize("stats", ["graph", "numpy"])
@pytest.mark.parametrize("tta", [None, "flips"])
def test_fused_graph_equals_unfused(tiny_members, X, stats, tta):
    a = EnsembleSegmenter(tiny_members, fuse=False, tta=tta, weights=[1, 2, 3], device="cpu")
    b = EnsembleSegmenter(tiny_members, fuse=True, tta=tta, weights=[1, 2, 3], device="cpu",
                          fused_stats=stats)
    a.fit()
    b.fit()
    pa, ma = a.predict_with_uncertainty(X, kinds=KINDS)
    pb, mb = b.predict_with_uncertainty(X, kinds=KINDS)
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    for k in KINDS:
        np.testing.assert_allclose(ma[k], mb[k], atol=1e-5, err_msg=k)


def test_fuse_members_logits_and_stats(tiny_members, make_model, X):
    mc = make_model("fuse_mc", dims=2, mc_mask=True, seed=5)
    paths = [*tiny_members, mc]
    fused = fuse_members(paths, outputs=("logits", *STATS))
    onnx.checker.check_model(fused)
    out = backends.load(fused, device="cpu").run({"image": X})
    for i, p in enumerate(paths):
        want = OnnxSegmenter(p, device="cpu").fit().transform(X)  # mc_mask fed as ones
        np.testing.assert_allclose(out[f"logits_{i}"], want, atol=1e-5)
    mean, maps = _stacked(_member_proba(paths, X), np.ones(4))
    np.testing.assert_allclose(out["proba"], mean, atol=1e-5)
    for k in ("entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose(out[k], maps[k], atol=2e-5, err_msg=k)


def test_fuse_members_errors(tiny_members, make_model):
    with pytest.raises(ValueError, match="member 1 takes input shape"):
        fuse_members([tiny_members[0], make_model("fuse_c2", dims=2, in_channels=2)])
    with pytest.raises(ValueError, match="outputs must be taken from"):
        fuse_members(tiny_members, outputs=("nope",))
    with pytest.raises(ValueError, match="weights must be 3 positive"):
        fuse_members(tiny_members, weights=[1, -1, 1])
    with pytest.raises(TypeError, match="sequence of ONNX models"):
        fuse_members(tiny_members[0])


def test_tta_flips_are_samples(tiny_members, X):
    ens = EnsembleSegmenter(tiny_members[:2], tta="flips", fuse=False, device="cpu").fit()
    assert ens.n_samples_ == 8 and ens.member_samples_ == [4, 4]
    samples = []
    for p in tiny_members[:2]:
        seg = OnnxSegmenter(p, device="cpu").fit()
        for axes in [(), (3,), (2,), (2, 3)]:  # product order of flipped axes
            z = seg.transform(np.ascontiguousarray(np.flip(X, axes)) if axes else X)
            samples.append(_softmax(np.flip(z, axes) if axes else z))
    P = np.stack(samples)
    mean, maps = _stacked(P, np.ones(8))
    proba, got = ens.predict_with_uncertainty(X, kinds=KINDS)
    np.testing.assert_allclose(proba, mean, atol=1e-5)
    for k in KINDS:
        np.testing.assert_allclose(got[k], maps[k], atol=2e-5, err_msg=k)
    per_sample = ens.predict_members(X, per_sample=True)
    np.testing.assert_allclose(per_sample, P, atol=1e-5)


def test_tta_axis_list(tiny_members, X):
    ens = EnsembleSegmenter(tiny_members[:1], tta=[(1,)], device="cpu").fit()
    seg = OnnxSegmenter(tiny_members[0], device="cpu").fit()
    flipped = np.flip(seg.transform(np.ascontiguousarray(np.flip(X, 3))), 3)
    want = (_softmax(seg.transform(X)) + _softmax(flipped)) / 2
    np.testing.assert_allclose(ens.predict_proba(X), want, atol=1e-5)
    with pytest.raises(ValueError, match="tta flips name spatial axes 0..1"):
        EnsembleSegmenter(tiny_members, tta=[(2,)]).fit()
    with pytest.raises(ValueError, match="tta must be None, 'flips'"):
        EnsembleSegmenter(tiny_members, tta="rot90").fit()


def test_mc_samples_reproducible_and_seeded(tiny_mc, tiny_members, X):
    mk = lambda seed, bs=16: EnsembleSegmenter(  # noqa: E731
        [tiny_mc, tiny_members[0]], mc_samples=4, seed=seed, device="cpu", batch_size=bs
    ).fit()
    ens = mk(0)
    assert ens.member_samples_ == [4, 1] and ens.n_samples_ == 5 and not ens.fused_
    a = ens.predict_proba(X)
    np.testing.assert_array_equal(a, mk(0).predict_proba(X))
    np.testing.assert_allclose(a, mk(0, bs=2).predict_proba(X), atol=1e-6)  # chunk-independent
    assert np.abs(a - mk(1).predict_proba(X)).max() > 1e-3
    # the MC member's samples are real dropout passes: mean of 4 masked runs of the member
    S = ens.predict_members(X, per_sample=True)
    assert S.shape == (5, *X.shape[:1], 3, *X.shape[2:])
    assert np.abs(S[0] - S[1]).max() > 1e-3
    masks = ens._engine()._masks(X.shape[0])[0]
    seg = OnnxSegmenter(tiny_mc, device="cpu").fit()
    for t in range(4):
        m = masks[t]
        assert set(np.unique(m)) <= {0.0, 2.0}  # p = 0.5: multipliers 0 or 1/(1-p)
        np.testing.assert_allclose(
            S[t], _softmax(seg.run(X, layers=[], mc_mask=m)["logits"]), atol=1e-5
        )
    want = 0.5 * S[:4].mean(0) + 0.5 * S[4]
    np.testing.assert_allclose(a, want, atol=1e-5)
    with pytest.raises(ValueError, match="none of the 3 members does"):
        EnsembleSegmenter(tiny_members, mc_samples=2).fit()
    with pytest.raises(ValueError, match="cannot be fused: MC dropout"):
        EnsembleSegmenter([tiny_mc], mc_samples=2, fuse=True).fit()


def test_mc_member_without_mc_samples_is_deterministic(tiny_mc, tiny_members, X):
    ens = EnsembleSegmenter([tiny_mc, tiny_members[0]], device="cpu", fuse=True).fit()
    assert ens.fused_  # the mask is fed as ones inside the fused graph
    assert EnsembleSegmenter(tiny_members, device="cpu").fit().fused_  # auto fuses on CPU too
    want = _member_proba([tiny_mc, tiny_members[0]], X).mean(0)
    np.testing.assert_allclose(ens.predict_proba(X), want, atol=1e-5)


def test_mismatch_errors_name_the_member(tiny_members, make_model, tiny_3d, tiny_fixed):
    k4 = make_model("ens_k4", dims=2, n_classes=4)
    with pytest.raises(
        ValueError,
        match=r"member 2 \(.*ens_k4.onnx\) has 4 classes, member 0 "
        r"\(.*\) has 3 classes",
    ):
        EnsembleSegmenter([*tiny_members[:2], k4]).fit()
    c2 = make_model("ens_c2", dims=2, in_channels=2)
    with pytest.raises(ValueError, match=r"member 1 \(.*ens_c2.onnx\) has 2 input channels"):
        EnsembleSegmenter([tiny_members[0], c2]).fit()
    with pytest.raises(ValueError, match="member 1 .* has 3 spatial axes"):
        EnsembleSegmenter([tiny_members[0], tiny_3d]).fit()
    with pytest.raises(ValueError, match=r"member 1 .* has spatial input size \(16, 16\)"):
        EnsembleSegmenter([tiny_members[0], tiny_fixed]).fit()


def test_bad_parameters(tiny_members):
    with pytest.raises(TypeError, match="members must be a list"):
        EnsembleSegmenter(tiny_members[0]).fit()
    with pytest.raises(ValueError, match="members is empty"):
        EnsembleSegmenter([]).fit()
    with pytest.raises(TypeError, match=r"members\[1\] must be a path"):
        EnsembleSegmenter([tiny_members[0], 3]).fit()
    with pytest.raises(FileNotFoundError):
        EnsembleSegmenter([tiny_members[0], "missing.onnx"]).fit()
    with pytest.raises(ValueError, match="weights must have one entry per member \\(3\\), got 2"):
        EnsembleSegmenter(tiny_members, weights=[1, 2]).fit()
    with pytest.raises(ValueError, match="weights must be positive"):
        EnsembleSegmenter(tiny_members, weights=[1, 0, 2]).fit()
    with pytest.raises(ValueError, match="batch_size must be .auto. or a positive integer, got 0"):
        EnsembleSegmenter(tiny_members, batch_size=0).fit()
    with pytest.raises(ValueError, match="mc_samples must be a non-negative integer"):
        EnsembleSegmenter(tiny_members, mc_samples=-1).fit()
    with pytest.raises(ValueError, match="fuse must be 'auto', True or False"):
        EnsembleSegmenter(tiny_members, fuse="yes").fit()
    with pytest.raises(ValueError, match="seed must be"):
        EnsembleSegmenter(tiny_members, seed=1.5).fit()
    ens = EnsembleSegmenter(tiny_members, device="cpu").fit()
    with pytest.raises(ValueError, match="kind must be one of"):
        ens.uncertainty(np.zeros((1, 1, 8, 8), np.float32), kind="std")
    with pytest.raises(ValueError, match="X has 2 channels"):
        ens.predict(np.zeros((1, 2, 8, 8), np.float32))


def test_3d(tiny_3d, make_model):
    other = make_model("ens_3d_b", dims=3, seed=7)
    X3 = np.random.default_rng(1).standard_normal((2, 1, 4, 6, 8)).astype(np.float32)
    for fuse in (False, True):
        ens = EnsembleSegmenter([tiny_3d, other], tta="flips", fuse=fuse, device="cpu").fit()
        assert ens.n_samples_ == 16
        proba, maps = ens.predict_with_uncertainty(X3, kinds=KINDS)
        P = ens.predict_members(X3, per_sample=True)
        mean, ref = _stacked(P, np.ones(16))
        np.testing.assert_allclose(proba, mean, atol=1e-5)
        for k in KINDS:
            np.testing.assert_allclose(maps[k], ref[k], atol=2e-5, err_msg=k)


def test_odd_sizes_are_padded_like_the_members(tiny_members):
    X = np.random.default_rng(3).standard_normal((2, 1, 7, 9)).astype(np.float32)
    want = _member_proba(tiny_members, X).mean(0)
    for fuse in (False, True):
        ens = EnsembleSegmenter(tiny_members, fuse=fuse, device="cpu").fit()
        np.testing.assert_allclose(ens.predict_proba(X), want, atol=1e-5)


def test_list_of_differently_sized_images(tiny_members):
    rng = np.random.default_rng(2)
    imgs = [
        rng.standard_normal((1, 8, 8)).astype(np.float32),
        rng.standard_normal((1, 6, 10)).astype(np.float32),
        rng.standard_normal((1, 8, 8)).astype(np.float32),
    ]
    ens = EnsembleSegmenter(tiny_members, device="cpu").fit()
    proba, maps = ens.predict_with_uncertainty(imgs, kinds=KINDS)
    labels = ens.predict(imgs)
    seg = ens.segment_uncertainty(imgs)
    assert seg.shape == (3, 2)
    for i, x in enumerate(imgs):
        p1, m1 = ens.predict_with_uncertainty(x[None], kinds=KINDS)
        np.testing.assert_allclose(proba[i], p1[0], atol=1e-6)
        np.testing.assert_array_equal(labels[i], p1[0].argmax(0))
        for k in KINDS:
            np.testing.assert_allclose(maps[k][i], m1[k][0], atol=1e-6)
    with pytest.raises(ValueError, match="differently sized images"):
        ens.predict_members(imgs)


def test_segment_uncertainty(tiny_members, X):
    ens = EnsembleSegmenter(tiny_members, device="cpu").fit()
    np.testing.assert_allclose(
        ens.segment_uncertainty(X), segment_uncertainty(ens.predict_proba(X)), equal_nan=True
    )


def test_cache_serves_one_pass(tiny_members, X, monkeypatch):
    ens = EnsembleSegmenter(tiny_members, device="cpu", cache_size=1).fit()
    calls = []
    engine = ens._engine()
    original = engine.compute
    monkeypatch.setattr(engine, "compute", lambda *a: calls.append(1) or original(*a))
    proba = ens.predict_proba(X)
    proba[:] = 0  # returned arrays are copies: the cache stays intact
    for k in ("entropy", "mutual_information", "expected_entropy"):
        ens.uncertainty(X, k)
    ens.predict(X)
    assert len(calls) == 1
    assert ens.predict_proba(X).sum() > 0
    ens.uncertainty(X, "variance")  # not computed by default: one more pass
    assert len(calls) == 2
    X2 = X + 1
    ens.predict_proba(X2)
    ens.predict_proba(X)  # evicted (cache_size=1)
    assert len(calls) == 4
    X[0, 0, 0, 0] += 1  # same object, new content: a new key
    ens.predict_proba(X)
    assert len(calls) == 5
    ens0 = EnsembleSegmenter(tiny_members, device="cpu", cache_size=0).fit()
    ens0.predict_proba(X)
    assert len(ens0._cache) == 0


def test_clone_pickle_not_fitted(tiny_members, X):
    given = OnnxSegmenter(tiny_members[1], device="cpu")
    members = [tiny_members[0], given]
    ens = EnsembleSegmenter(members, device="cpu")
    with pytest.raises(NotFittedError):
        ens.predict_proba(X)
    ens.fit()
    assert ens.members is members and not hasattr(given, "n_classes_")  # user objects untouched
    assert ens.members_[1] is not given
    c = clone(ens)
    cm = c.get_params()["members"]  # clone copies a list of estimators, as for VotingClassifier
    assert cm[0] == tiny_members[0] and cm[1].get_params() == given.get_params()
    assert not hasattr(c, "members_")
    want = ens.predict_proba(X)
    restored = pickle.loads(pickle.dumps(ens))
    np.testing.assert_allclose(restored.predict_proba(X), want, atol=1e-6)
    ens.set_params(weights=[1, 2]).fit()
    np.testing.assert_allclose(ens.weights_, [1 / 3, 2 / 3])


def test_pipeline_with_temperature_calibrator(tiny_members, X):
    from sklearn.pipeline import make_pipeline

    from uqseg import TemperatureCalibrator

    y = EnsembleSegmenter(tiny_members[:1], device="cpu").fit().predict(X)  # learnable labels
    pipe = make_pipeline(EnsembleSegmenter(tiny_members, device="cpu"), TemperatureCalibrator())
    pipe.fit(X, y)
    t = pipe[-1].temperature_
    want = _softmax(np.log(_member_proba(tiny_members, X).mean(0)) / t)
    np.testing.assert_allclose(pipe.predict_proba(X), want, atol=1e-4)


def test_threads_share_one_ensemble(tiny_members, X):
    from concurrent.futures import ThreadPoolExecutor

    ens = EnsembleSegmenter(tiny_members, device="cpu", cache_size=1).fit()
    inputs = [X + i for i in range(4)]
    want = [_member_proba(tiny_members, x).mean(0) for x in inputs]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(ens.predict_proba, inputs * 2))
    for g, w in zip(got, want * 2, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert len(ens._cache) == 1


def test_auto_fuse_runs_large_chunks_member_by_member(tiny_members, X, monkeypatch):
    import uqseg._ensemble_engine as ens_mod

    ref = EnsembleSegmenter(tiny_members, fuse=False, device="cpu").fit()
    want_p, want_m = ref.predict_with_uncertainty(X, kinds=("mutual_information", "variance"))
    calls = []
    auto = EnsembleSegmenter(tiny_members, device="cpu").fit()
    monkeypatch.setattr(auto._engine(), "_chunk_fused", lambda *a, **k: calls.append(1) or 1 / 0)
    monkeypatch.setattr(ens_mod, "_FUSED_BUDGET", 0)  # every chunk is "too large"
    p, m = auto.predict_with_uncertainty(X, kinds=("mutual_information", "variance"))
    assert auto.fused_ and not calls
    np.testing.assert_allclose(p, want_p, atol=1e-6)
    np.testing.assert_allclose(m["variance"], want_m["variance"], atol=1e-6)
    forced = EnsembleSegmenter(tiny_members, fuse=True, device="cpu").fit()
    np.testing.assert_allclose(forced.predict_proba(X), want_p, atol=1e-5)  # True ignores it


@pytest.mark.parametrize("fuse, stats, tta, fm", [
    (True, "numpy", None, 0), (True, "graph", None, 2), (True, "numpy", "flips", 1),
    (False, None, None, 0), (False, None, None, 2)])
def test_run_gives_the_feature_members_features_from_the_same_pass(tiny_members, X, fuse, stats,
                                                                   tta, fm, monkeypatch):
    ens = EnsembleSegmenter(tiny_members, fuse=fuse, tta=tta, device="cpu",
                            fused_stats=stats or "auto", feature_member=fm).fit()
    assert ens.feature_network_ is ens.members_[fm]
    layers = ["bottleneck", "decoder_last"]
    want = ens.members_[fm].run(X, layers=layers)  # X (8 x 12) is padded: features are not
    other = ens.members_[(fm + 1) % 3].run(X, layers=layers)
    assert not np.allclose(want["decoder_last"], other["decoder_last"], atol=1e-3)
    p, m = ens.predict_with_uncertainty(X, kinds=("mutual_information",))
    ens.clear_cache()
    if fuse:  # from the fused call itself: no member runs alone
        for member in ens.members_:
            monkeypatch.setattr(member, "run", lambda *a, **k: 1 / 0)
    out = ens.run(X, layers=layers, maps=["mutual_information"])
    assert sorted(out) == ["bottleneck", "decoder_last", "mutual_information", "proba"]
    for ly in layers:
        assert out[ly].shape == want[ly].shape
        np.testing.assert_allclose(out[ly], want[ly], atol=1e-5)
    np.testing.assert_allclose(out["proba"], p, atol=1e-5)
    np.testing.assert_allclose(out["mutual_information"], m["mutual_information"], atol=1e-5)
    out["proba"][:] = 0  # copies: the cache is not touched
    assert ens.predict_proba(X).max() > 0
    monkeypatch.undo()
    alone = ens.run(X, layers="auto", proba=False)  # the feature member alone
    assert sorted(alone) == ["bottleneck"]
    np.testing.assert_allclose(alone["bottleneck"], want["bottleneck"], atol=1e-5)


def test_fused_stats_is_checked(tiny_members):
    with pytest.raises(ValueError, match="fused_stats must be"):
        EnsembleSegmenter(tiny_members, fused_stats="gpu").fit()


def test_run_errors_and_lists(tiny_members, X):
    with pytest.raises(NotFittedError):
        EnsembleSegmenter(tiny_members).run(X, layers=["bottleneck"])
    ens = EnsembleSegmenter(tiny_members, device="cpu").fit()
    with pytest.raises(ValueError, match=r"'nope' is not a feature layer of the feature member"):
        ens.run(X, layers=["nope"])
    imgs = [X[0], X[1, :, :8, :8]]
    out = ens.run(imgs, layers="bottleneck", maps="entropy")
    for img, f in zip(imgs, out["bottleneck"], strict=True):
        np.testing.assert_allclose(
            f, ens.members_[0].run(img[None], layers=["bottleneck"])["bottleneck"][0], atol=1e-5)
