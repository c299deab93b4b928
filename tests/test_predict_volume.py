"""``uqseg predict`` with a preprocessing description: whole scans in, maps in the scan's grid."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from uqseg import EnsembleSegmenter, cli
from uqseg.preprocessing import Preprocessing, preprocess, set_preprocessing

# voxel axis 0 -> +A (1.5 mm), 1 -> +S (1.2 mm), 2 -> -R (2 mm)
PERMUTED = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, 1.2, 0, 5], [0, 0, 0, 1]])
TINY_PREP = Preprocessing(orientation="RAS", plane="axial", size=(16, 16),
                          crop={"method": "otsu", "margin": 2.0, "min_area": 0.3},
                          intensity={"method": "percentile"})


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _blob(shape=(20, 24, 18), seed=0):
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (g[0] / 0.6) ** 2 + (g[1] / 0.5) ** 2 + (g[2] / 0.7) ** 2 < 1
    return (inside * 100.0 + rng.normal(0, 3, shape)).astype(np.float32)


@pytest.fixture()
def prep_members(tiny_members, tmp_path):
    """Two tiny 2-D members carrying TINY_PREP."""
    out = []
    for i, m in enumerate(tiny_members[:2]):
        dst = tmp_path / f"m{i}.onnx"
        shutil.copyfile(m, dst)
        set_preprocessing(dst, TINY_PREP)
        out.append(str(dst))
    return out


def test_outputs_are_the_inverted_model_outputs(prep_members, tmp_path, capsys):
    import uqseg
    from uqseg import SpectralOODDetector

    data = _blob()
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    X, inv = preprocess(data, PERMUTED, TINY_PREP)
    uqseg.save(SpectralOODDetector(prep_members[0]).fit(X), tmp_path / "ood")
    code, _, err = run(["predict", *prep_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--estimators", tmp_path / "ood", "--no-progress"],
                       capsys)
    assert code == 0, err
    ens = EnsembleSegmenter(prep_members).fit()
    proba, maps = ens.predict_with_uncertainty(X)
    want = inv.invert(proba, "proba")
    for name, ref in [("proba", want), ("seg", want.argmax(-1)),
                      ("entropy", inv.invert(maps["entropy"], "map")),
                      ("mi", inv.invert(maps["mutual_information"], "map"))]:
        img = nib.load(tmp_path / "o" / f"scan_{name}.nii.gz")
        assert img.shape == ref.shape and img.shape[:3] == data.shape
        np.testing.assert_allclose(img.affine, PERMUTED)
        np.testing.assert_allclose(np.asarray(img.dataobj), ref, atol=1e-5)
    report = json.loads((tmp_path / "o" / "scan_scores.json").read_text())
    assert report["layout"] == "preprocessed"
    assert Preprocessing.from_dict(report["preprocessing"]) == TINY_PREP
    sl = report["slices"]
    assert sl["n"] == len(X) and sl["scored"] == np.flatnonzero(inv.scored).tolist()
    assert 0 < sl["n_scored"] < sl["n"]  # min_area leaves the thin end slices out
    ood = report["estimators"]["ood"]
    det = uqseg.load(tmp_path / "ood")
    ref_scores = det.score_samples(X[inv.scored])
    np.testing.assert_allclose(ood["score_samples"], ref_scores, rtol=1e-5)
    assert ood["fraction_outlier"] == pytest.approx(np.mean(ref_scores < det.offset_))
    assert ood["volume_score"] == pytest.approx(ref_scores.mean(), rel=1e-5)
    assert ood["n_scored"] == sl["n_scored"]


def test_risk_controlled_masks_come_back_to_the_scan_grid(prep_members, tmp_path, capsys):
    import uqseg
    from uqseg import ConformalRiskController

    data = _blob()
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    X, inv = preprocess(data, PERMUTED, TINY_PREP)
    ens = EnsembleSegmenter(prep_members).fit()
    rng = np.random.default_rng(3)
    Xc = np.concatenate([X, X + 0.05 * rng.standard_normal(X.shape).astype(np.float32)])
    yc = ens.predict(Xc)
    yc[:, :3] = rng.integers(0, 3, size=yc[:, :3].shape)
    crc = ConformalRiskController(None, alpha=0.25).fit(ens.predict_proba(Xc), yc)
    uqseg.save(crc, tmp_path / "crc")
    code, _, err = run(["predict", *prep_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--estimators", tmp_path / "crc", "--no-progress"],
                       capsys)
    assert code == 0, err
    img = nib.load(tmp_path / "o" / "scan_crc_mask.nii.gz")
    np.testing.assert_allclose(img.affine, PERMUTED)
    masks = np.asarray(img.dataobj)
    model_masks = crc.predict(ens.predict_proba(X)).astype(np.uint8)  # (n, 2, H, W)
    ref = np.stack([inv.invert(model_masks[:, c], "labels") for c in range(2)], axis=-1)
    assert masks.shape == (*data.shape, 2)
    np.testing.assert_array_equal(masks, ref)
    summary = json.loads((tmp_path / "o" / "scan_scores.json").read_text())["estimators"]["crc"]
    assert summary["mask_voxels"] == ref.reshape(-1, 2).sum(0).tolist()


def test_numpy_without_affine_needs_spacing(prep_members, tmp_path, capsys):
    np.save(tmp_path / "raw.npy", _blob())
    code, _, err = run(["predict", *prep_members, tmp_path / "raw.npy", "--out", tmp_path / "o",
                        "--no-progress"], capsys)
    assert code == 2 and "--spacing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code, _, err = run(["predict", *prep_members, tmp_path / "raw.npy", "--out", tmp_path / "o",
                        "--spacing", "1.2", "1.2", "2", "--no-progress"], capsys)
    assert code == 0, err
    img = nib.load(tmp_path / "o" / "raw_seg.nii.gz")
    assert img.shape == (20, 24, 18)
    np.testing.assert_allclose(img.affine, np.diag([1.2, 1.2, 2.0, 1.0]))


@pytest.mark.parametrize("case, message", [
    ("series", "4-D series"),
    ("zero", "spacing is zero"),
    ("blank", "crop is empty"),
])
def test_bad_scans_are_one_line_errors(prep_members, tmp_path, capsys, case, message):
    data = _blob()
    if case == "series":
        np.savez(tmp_path / "x.npz", image=np.stack([data, data], -1), affine=np.eye(4))
    elif case == "zero":
        np.savez(tmp_path / "x.npz", image=data, affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    else:
        np.savez(tmp_path / "x.npz", image=np.zeros_like(data), affine=np.eye(4))
    code, _, err = run(["predict", *prep_members, tmp_path / "x.npz", "--out", tmp_path / "o",
                        "--no-progress"], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_axis_conflicts_and_no_preprocess(prep_members, tmp_path, capsys):
    data = _blob()
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    code, _, err = run(["predict", *prep_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--axis", "1"], capsys)
    assert code == 2 and "--axis" in err
    code, _, err = run(["predict", *prep_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--axis", "1", "--no-preprocess", "--no-progress"],
                       capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "scan_scores.json").read_text())
    assert report["layout"] == "slices" and report["axis"] == 1


# ---------------------------------------------------------------------- the MNI head, whole
@pytest.fixture(scope="module")
def mni_estimators(tmp_path_factory):
    """Two zoo members, an OOD detector fitted on `train` and a quality regressor fitted on
    a quarter of `val` widened with corruptions (the recipe of docs/cli.md, smaller)."""
    import uqseg
    from uqseg import QualityRegressor, SpectralOODDetector, datasets
    from uqseg.quality import make_quality_set

    folder = tmp_path_factory.mktemp("mni_est")
    members = datasets.reference_models()[:2]
    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, y_val = datasets.load_brain_tissue("val")
    uqseg.save(SpectralOODDetector(members[0]).fit(X_tr), folder / "ood")
    X_q, y_q, info = make_quality_set(X_val[::4], y_val[::4], severities=(0.5, 1.0))
    qr = QualityRegressor(EnsembleSegmenter(members).fit()).fit(X_q, y_q,
                                                                 groups=info["source"])
    uqseg.save(qr, folder / "quality")
    return members, folder


@pytest.mark.slow
@pytest.mark.parametrize("codes, spacing", [("RAS", (1.0, 1.0, 1.0)),   # as nilearn ships it
                                            ("PSL", (1.2, 2.0, 1.2))])  # permuted, flipped
def test_whole_mni_head_in_its_own_grid(mni_estimators, tmp_path, capsys, codes, spacing):
    from uqseg.datasets._scan import mni_scan

    members, est = mni_estimators
    t1, labels, affine = mni_scan(codes, spacing)
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "head.nii.gz")
    code, _, err = run(["predict", *members, tmp_path / "head.nii.gz", "--out", tmp_path / "o",
                        "--estimators", est / "ood", est / "quality", "--no-progress"], capsys)
    assert code == 0, err
    for name in ("seg", "proba", "entropy", "mi"):
        img = nib.load(tmp_path / "o" / f"head_{name}.nii.gz")
        assert img.shape[:3] == t1.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    seg = np.asarray(nib.load(tmp_path / "o" / "head_seg.nii.gz").dataobj)
    true = [2 * ((seg == k) & (labels == k)).sum() / ((seg == k).sum() + (labels == k).sum())
            for k in (1, 2)]
    assert min(true) >= 0.85, true
    report = json.loads((tmp_path / "o" / "head_scores.json").read_text())
    ood, quality = report["estimators"]["ood"], report["estimators"]["quality"]
    assert report["slices"]["n_scored"] >= 0.5 * report["slices"]["n"]
    assert len(ood["score_samples"]) == report["slices"]["n_scored"]
    assert ood["fraction_outlier"] <= 0.10 and ood["volume_inlier"]
    np.testing.assert_allclose(quality["volume_predicted_quality"], true, atol=0.05)
    # the same scan through uqseg.distributed's kernel: the same labels and per-volume scores
    import uqseg
    from uqseg.distributed import score_scan

    qr = uqseg.load(est / "quality")
    row = score_scan({"segmenter": qr.estimator_, "ood": uqseg.load(est / "ood"),
                      "quality": qr}, t1, affine, ("labels", "ood", "quality"))
    np.testing.assert_array_equal(row["labels"], seg)
    assert row["ood"] == pytest.approx(ood["volume_score"], rel=1e-5)
    np.testing.assert_allclose(row["quality"], quality["volume_predicted_quality"], atol=1e-5)


# ---------------------------------------------------------------------- uqseg.distributed
def test_score_scan_equals_predict(prep_members, tmp_path, capsys):
    """distributed.score_scan gives what `uqseg predict` writes for the same scan."""
    from uqseg import SpectralOODDetector
    from uqseg.distributed import score_scan

    data = _blob(seed=3)
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    X, inv = preprocess(data, PERMUTED, TINY_PREP)
    ens = EnsembleSegmenter(prep_members).fit()
    det = SpectralOODDetector(ens).fit(X)
    import uqseg

    uqseg.save(det, tmp_path / "ood")
    code, _, err = run(["predict", *prep_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--estimators", tmp_path / "ood", "--no-progress"],
                       capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "scan_scores.json").read_text())
    row = score_scan({"segmenter": ens, "ood": det}, data, PERMUTED,
                     ("labels", "volumes", "uncertainty", "uncertainty_map", "ood"))
    seg = np.asarray(nib.load(tmp_path / "o" / "scan_seg.nii.gz").dataobj)
    entropy = np.asarray(nib.load(tmp_path / "o" / "scan_entropy.nii.gz").dataobj)
    assert row["labels"].shape == data.shape
    np.testing.assert_array_equal(row["labels"], seg)
    np.testing.assert_array_equal(row["volumes"], report["class_voxels"])
    np.testing.assert_allclose(row["uncertainty_map"], entropy, atol=2e-3)
    assert row["uncertainty"] == pytest.approx(report["mean_entropy"], rel=1e-4)
    assert row["n_scored"] == report["slices"]["n_scored"] < len(X)
    assert row["ood"] == pytest.approx(report["estimators"]["ood"]["volume_score"], rel=1e-5)


def test_image_scorer_preprocesses_whole_scans_only(prep_members, tiny_members,
                                                    tmp_path):
    import uqseg
    from uqseg.distributed import ImageScorer

    data = _blob(seed=4)
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    X, _ = preprocess(data, PERMUTED, TINY_PREP)
    np.save(tmp_path / "slice.npy", X[len(X) // 2])  # already in the model's space
    ens = EnsembleSegmenter(prep_members).fit()
    uqseg.save(ens, tmp_path / "ens")
    batch = {"id": np.array([0, 1]),
             "path": np.array([str(tmp_path / "scan.nii.gz"), str(tmp_path / "slice.npy")])}
    out = ImageScorer(str(tmp_path / "ens"), ("labels", "volumes"))(batch)
    assert out["labels"][0].shape == data.shape and out["labels"][1].shape == X.shape[2:]
    np.testing.assert_array_equal(out["labels"][1], ens.predict(X[len(X) // 2][None])[0])
    assert out["n_scored"][0] > 0 and out["n_scored"][1] is None
    assert out["volumes"][0].sum() == data.size
    # preprocess=True refuses a model-space image; False takes the .npy as it is
    out = ImageScorer(str(tmp_path / "ens"), ("volumes",), on_error="record",
                      preprocess=True)(batch)
    assert out["error"][0] is None and "needs whole 3-D scans" in out["error"][1]
    out = ImageScorer(str(tmp_path / "ens"), ("volumes",), on_error="record",
                      preprocess=False)({"id": batch["id"][1:], "path": batch["path"][1:]})
    assert "n_scored" not in out and out["volumes"][0].sum() == X[0, 0].size
    uqseg.save(EnsembleSegmenter(tiny_members[:1]).fit(), tmp_path / "plain")
    with pytest.raises(ValueError, match="carry no preprocessing"):
        ImageScorer(str(tmp_path / "plain"), ("volumes",), preprocess=True)


# ---------------------------------------------------------------------- sigmoid networks
@pytest.fixture()
def sigmoid_members(tmp_path):
    """Two tiny 3-channel multi-label (sigmoid) networks carrying TINY_PREP."""
    import onnx
    from onnx_models import make_unet_like

    out = []
    for i in range(2):
        m = make_unet_like(n_classes=3, seed=30 + i)
        onnx.helper.set_model_props(m, {"uqseg.activation": "sigmoid"})
        path = tmp_path / f"sig{i}.onnx"
        onnx.save(m, path)
        set_preprocessing(path, TINY_PREP)
        out.append(str(path))
    return out


def test_sigmoid_network_masks_and_maps_per_channel(sigmoid_members, tmp_path, capsys):
    """Whole scan, sigmoid outputs: a mask and maps per channel, nothing outside the crop,
    as predict_proba brought back channel by channel; score_scan gives the same."""
    from uqseg.distributed import score_scan

    data = _blob(seed=5)
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    code, _, err = run(["predict", *sigmoid_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--no-progress"], capsys)
    assert code == 0, err
    ens = EnsembleSegmenter(sigmoid_members).fit()
    assert ens.activation_ == "sigmoid"
    X, inv = preprocess(data, PERMUTED, TINY_PREP)
    proba, maps = ens.predict_with_uncertainty(X)
    want = inv.invert(proba, "channels")
    inside = inv.invert(np.ones((len(X), *X.shape[2:])), "map") > 0
    assert want.shape == (*data.shape, 3) and (want[~inside] == 0).all()
    seg = np.asarray(nib.load(tmp_path / "o" / "scan_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, want >= 0.5)
    for name, kind in (("proba", None), ("entropy", "entropy"), ("mi", "mutual_information")):
        ref = want if kind is None else inv.invert(maps[kind], "channels")
        img = np.asarray(nib.load(tmp_path / "o" / f"scan_{name}.nii.gz").dataobj)
        np.testing.assert_allclose(img, ref, atol=1e-5)
    report = json.loads((tmp_path / "o" / "scan_scores.json").read_text())
    assert report["activation"] == "sigmoid"
    assert report["class_voxels"] == (want >= 0.5).reshape(-1, 3).sum(0).tolist()
    row = score_scan({"segmenter": ens}, data, PERMUTED, ("labels", "volumes", "uncertainty"))
    np.testing.assert_array_equal(row["labels"], seg)
    assert row["volumes"].tolist() == report["class_voxels"]
    assert row["uncertainty"] == pytest.approx(report["mean_entropy"], rel=1e-4)


def test_sigmoid_network_slice_by_slice(sigmoid_members, tmp_path, capsys):
    data = _blob(seed=6)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "scan.nii.gz")
    code, _, err = run(["predict", *sigmoid_members, tmp_path / "scan.nii.gz", "--out",
                        tmp_path / "o", "--no-preprocess", "--no-progress"], capsys)
    assert code == 0, err
    seg = np.asarray(nib.load(tmp_path / "o" / "scan_seg.nii.gz").dataobj)
    ent = np.asarray(nib.load(tmp_path / "o" / "scan_entropy.nii.gz").dataobj)
    assert seg.shape == ent.shape == (*data.shape, 3) and seg.dtype == np.uint8
    report = json.loads((tmp_path / "o" / "scan_scores.json").read_text())
    assert report["class_voxels"] == seg.reshape(-1, 3).sum(0).tolist()
    assert report["mean_entropy"] == pytest.approx(float(ent.mean()), rel=1e-4)


def test_activation_option_reads_logits_as_sigmoid(sigmoid_members, tmp_path, capsys):
    """The same networks without their activation metadata: softmax by default (labels),
    per-channel masks with ``--activation sigmoid``, equal to the metadata's run."""
    import onnx

    bare = []
    for i, path in enumerate(sigmoid_members):
        m = onnx.load(path)
        kept = [p for p in m.metadata_props if p.key != "uqseg.activation"]
        del m.metadata_props[:]
        m.metadata_props.extend(kept)
        bare.append(tmp_path / f"bare{i}.onnx")
        onnx.save(m, bare[-1])
    data = _blob(seed=5)
    nib.save(nib.Nifti1Image(data, PERMUTED), tmp_path / "scan.nii.gz")
    runs = {"meta": (sigmoid_members, []), "auto": (bare, []),
            "flag": (bare, ["--activation", "sigmoid"])}
    seg, report = {}, {}
    for name, (models, extra) in runs.items():
        code, _, err = run(["predict", *models, tmp_path / "scan.nii.gz", "--out",
                            tmp_path / name, "--no-progress", *extra], capsys)
        assert code == 0, err
        seg[name] = np.asarray(nib.load(tmp_path / name / "scan_seg.nii.gz").dataobj)
        report[name] = json.loads((tmp_path / name / "scan_scores.json").read_text())
    assert report["auto"]["activation"] == "softmax" and seg["auto"].shape == data.shape
    assert report["flag"]["activation"] == "sigmoid" and seg["flag"].shape == (*data.shape, 3)
    np.testing.assert_array_equal(seg["flag"], seg["meta"])
