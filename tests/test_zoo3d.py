"""The shipped 3-D reference member: its data description, accuracy, sliding window, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uqseg import OnnxSegmenter, cli, datasets
from uqseg.datasets._zoo import MODELS_DIR, ZOO3D_PREPROCESSING
from uqseg.preprocessing import Preprocessing, preprocess

# measured on the test split (benchmarks/train_zoo3d.py, zoo.json "member_3d"): GM 0.940,
# WM 0.927; on the whole 1 mm template through `predict --models 3d`: GM 0.926, WM 0.920
TEST_FLOOR = {1: 0.93, 2: 0.92}
SCAN_FLOOR = {1: 0.915, 2: 0.91}


def dice(seg, ref, k) -> float:
    a, b = seg == k, ref == k
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def member():
    return OnnxSegmenter(datasets.reference_models(dims=3)[0]).fit()


def test_reference_models_dims():
    two = datasets.reference_models()
    assert two == datasets.reference_models(dims=2)
    assert len(two) == 5 and all(Path(p).parent == MODELS_DIR for p in two)
    (three,) = datasets.reference_models(dims=3)
    assert Path(three).parent == MODELS_DIR / "3d" and three not in two
    assert Path(three).stat().st_size < 1_500_000
    for bad in (1, 4, True, "3"):
        with pytest.raises(ValueError, match="dims must be 2"):
            datasets.reference_models(dims=bad)
    info = datasets.reference_model_info()["member_3d"]
    assert info["file"] == "3d/unet3d.onnx" and info["test_mean_dice"] > 0.9


def test_member_interface_and_preprocessing(member):
    assert member.input_shape_ == (1, 64, 64, 64) and member.spatial_dims_ == 3
    assert member.n_classes_ == 3 and member.activation_ == "softmax"
    assert member.feature_layers_[:2] == ["decoder_last", "bottleneck"]
    assert member.preprocessing_ == Preprocessing.from_dict(ZOO3D_PREPROCESSING)


def test_preprocessing_rebuilds_the_training_grid(member):
    """The template through the member's description lands on the grid the training volumes
    were sampled on (the brain box +6 mm cut in 64 along z, y reversed, x)."""
    from uqseg.datasets._brain import _axis_coords, load_template
    from uqseg.datasets._scan import mni_scan

    t1, _, affine = mni_scan()
    X, inv = preprocess(t1, affine, member.preprocessing_)
    assert X.shape == (1, 1, 64, 64, 64)
    lo, hi = load_template()["bbox"]
    want = [_axis_coords(lo[2], hi[2], 64, False), _axis_coords(lo[1], hi[1], 64, True),
            _axis_coords(lo[0], hi[0], 64, False)]
    idx = np.arange(64.0)
    for k, scan_axis in enumerate((2, 1, 0)):  # model axis k runs along template axis
        got = inv.matrix[scan_axis, k] * idx + inv.matrix[scan_axis, 3]
        # Otsu on the image vs the tissue maps: the boxes differ by a few voxels at most
        np.testing.assert_allclose(got, want[k], atol=3.0)


def test_member_dice_on_the_test_split(member):
    X, y = datasets.load_brain_tissue("test", dims=3)
    seg = member.predict(X)
    for k, floor in TEST_FLOOR.items():
        d = np.mean([dice(s, t, k) for s, t in zip(seg, y, strict=True)])
        assert d >= floor, (k, d)


def _direct_copy(path):
    """The member's graph with dynamic spatial axes (only Conv, ReLU, MaxPool, ConvTranspose
    and Concat: nothing depends on the size), so one pass covers any multiple of 8."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Relu", "MaxPool",
                                                     "ConvTranspose", "Concat"}
    for vi in [*proto.graph.input, *proto.graph.output]:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k >= 2:
                d.dim_param = f"s{k}"
    del proto.graph.value_info[:]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"image": x})[0]


def test_sliding_window_equals_a_direct_pass(member):
    from scipy.special import softmax

    direct = _direct_copy(member.model)
    X, y = datasets.load_brain_tissue("test", dims=3)
    x = X[:1]
    # the model's own size: no window, both are the same single pass
    np.testing.assert_allclose(member.transform(x), direct(x), atol=1e-5)
    # a wider field of view (16 background voxels on each side of the R axis): two windows
    big = np.pad(x, [(0, 0)] * 4 + [(16, 16)])
    ref = np.pad(y[:1], [(0, 0)] * 3 + [(16, 16)])
    slid, whole = member.transform(big), direct(big)
    assert slid.shape == whole.shape == (1, 3, 64, 64, 96)
    ps, pw = softmax(slid, axis=1), softmax(whole, axis=1)
    # measured: 99.94 % labels agree, mean |dp| 4e-4, Dice equal to 1e-4
    assert (slid.argmax(1) == whole.argmax(1)).mean() >= 0.998
    assert np.abs(ps - pw).mean() <= 2e-3
    for k in (1, 2):
        assert abs(dice(slid.argmax(1), ref, k) - dice(whole.argmax(1), ref, k)) <= 3e-3


def test_predict_models_3d_on_the_whole_template(tmp_path, capsys):
    from uqseg.datasets._scan import mni_scan

    t1, labels, affine = mni_scan()  # the 1 mm template as nilearn ships it (uint8)
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "head.nii.gz")
    code, out, err = run(["predict", "--models", "3d", tmp_path / "head.nii.gz", "--out",
                          tmp_path / "o", "--no-progress"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    # one member: no mutual information map
    assert names == ["head_entropy.nii.gz", "head_proba.nii.gz", "head_scores.json",
                     "head_seg.nii.gz"]
    for name in ("seg", "proba", "entropy"):
        img = nib.load(tmp_path / "o" / f"head_{name}.nii.gz")
        assert img.shape[:3] == t1.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    proba = np.asarray(nib.load(tmp_path / "o" / "head_proba.nii.gz").dataobj)
    np.testing.assert_allclose(proba.sum(-1), 1.0, atol=1e-4)
    seg = np.asarray(nib.load(tmp_path / "o" / "head_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, proba.argmax(-1))
    for k, floor in SCAN_FLOOR.items():
        assert dice(seg, labels, k) >= floor, (k, dice(seg, labels, k))
    report = json.loads((tmp_path / "o" / "head_scores.json").read_text())
    assert report["models"] == datasets.reference_models(dims=3)
    assert report["model_space"]["shape"] == [64, 64, 64]
    assert report["model_space"]["orientation"] == "SPR"


@pytest.mark.parametrize("models, message", [
    ("2d", "--models must name a shipped model set: 'zoo'"),
    ("model.onnx", "'3d' (the 3-D U-Net member), got 'model.onnx'"),
])
def test_bad_models_value_is_a_usage_error(tmp_path, capsys, models, message):
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((8, 8, 8), dtype=np.float32))
    code, _, err = run(["predict", "--models", models, scan, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_models_and_onnx_paths_together_are_refused(tmp_path, capsys):
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((8, 8, 8), dtype=np.float32))
    onnx_path = datasets.reference_models()[0]
    code, _, err = run(["predict", "--models", "3d", onnx_path, scan, "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and "both name the models" in err
    with pytest.raises(SystemExit) as exc:  # no input: argparse's own usage error
        run(["predict", "--models", "3d", "--out", tmp_path / "o"], capsys)
    assert exc.value.code == 2 and "required: PATH" in capsys.readouterr().err


def test_models_zoo_is_the_2d_ensemble(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_plan(models, inputs, out, **kw):
        seen["models"] = models
        raise cli.UsageError("stop")

    monkeypatch.setattr("uqseg._predict.plan_predict", fake_plan)
    code, _, err = run(["predict", "--models", "zoo", tmp_path / "s.npy", "--out",
                        tmp_path / "o"], capsys)
    assert code == 2 and "stop" in err
    assert seen["models"] == datasets.reference_models()


def test_predict_no_preprocess_slides_over_a_larger_volume(member, tmp_path, capsys):
    """As stored (--no-preprocess), a volume larger than 64^3 goes through the sliding
    window: the written labels are the member's on the normalised array."""
    from uqseg.datasets import normalize_intensity

    X, _ = datasets.load_brain_tissue("test", dims=3)
    big = np.pad(X[0, 0], [(0, 0), (0, 0), (16, 16)])
    np.save(tmp_path / "vol.npy", big)
    code, _, err = run(["predict", "--models", "3d", tmp_path / "vol.npy", "--out",
                        tmp_path / "o", "--no-preprocess", "--no-progress"], capsys)
    assert code == 0, err
    seg = np.asarray(nib.load(tmp_path / "o" / "vol_seg.nii.gz").dataobj)
    want = member.predict(normalize_intensity(big)[None, None])[0]
    assert seg.shape == big.shape
    np.testing.assert_array_equal(seg, want)
