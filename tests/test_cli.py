"""The ``uqseg`` command line: help, exit codes, predict round trips, demo, bench wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_io import AFFINE, write_dicom_series

from uqseg import cli

SUBCOMMANDS = ["demo", "predict", "bench", "train", "export"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert "usage: uqseg" in capsys.readouterr().out


def test_version(capsys):
    import uqseg

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"uqseg {uqseg.__version__}"


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--batch-size", "0"], "positive integer"),
    (["predict", "m.onnx", "x.nii"], "--out"),
    (["predict", "--out", "o", "m.onnx", "x.nii", "--mc-samples", "-2"], "integer >= 0"),
    (["predict", "--out", "o", "m.onnx", "x.nii", "--axis", "5"], "invalid choice"),
    (["train", "--dropout", "1.5"], "[0, 1)"),
    (["demo", "--backend", "cuda-magic"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_usage_errors_found_after_parsing_exit_2(tmp_path, tiny_2d, capsys):
    code, _, err = run(["predict", tmp_path / "nothing.nii.gz", "--out", tmp_path], capsys)
    assert code == 2 and "at least one MODEL.onnx" in err
    code, _, err = run(["predict", tiny_2d, tmp_path / "nothing.nii.gz", "--out", tmp_path],
                       capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["demo", "--models", tmp_path / "nope.onnx", "--out", tmp_path], capsys)
    assert code == 2 and "does not exist" in err
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.float32))
    code, _, err = run(["predict", tiny_2d, tmp_path / "x.npy", "--out", tmp_path,
                        "--estimators", tmp_path], capsys)
    assert code == 2 and "uqseg.save" in err
    code, _, err = run(["export", tmp_path / "nope.pt"], capsys)
    assert code == 2 and "does not exist" in err


def test_runtime_failure_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.float32))
    code, _, err = run(["predict", bad, tmp_path / "x.npy", "--out", tmp_path / "o"], capsys)
    assert code == 1
    assert err.startswith("uqseg predict: error:")


def test_core_cli_does_not_import_torch():
    code = ("import sys, uqseg.cli, uqseg.demo, uqseg.io, uqseg.report;"
            "uqseg.cli.build_parser();"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_train_without_torch_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uqseg.training", None)
    code, _, err = run(["train", "--epochs", "1"], capsys)
    assert code == 1
    assert "pip install 'uqseg[train]'" in err


# ---------------------------------------------------------------------- predict
def _outputs(out, stem):
    return {k: nib.load(out / f"{stem}_{k}.nii.gz") for k in ("seg", "proba", "entropy")}


@pytest.mark.parametrize("axis", [0, 2])
def test_predict_nifti_volume_through_2d_model_keeps_affine(tmp_path, tiny_2d, tiny_members,
                                                             axis, capsys):
    shape = (8, 6, 10)
    x = np.random.default_rng(0).random(shape).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(x, AFFINE), tmp_path / "vol.nii.gz")
    out = tmp_path / "out"
    code, stdout, _ = run(["predict", *tiny_members[:2], tmp_path / "vol.nii.gz", "--out", out,
                           "--axis", axis, "--no-progress"], capsys)
    assert code == 0
    imgs = _outputs(out, "vol")
    for img in imgs.values():
        np.testing.assert_allclose(img.affine, AFFINE)
    seg = np.asarray(imgs["seg"].dataobj)
    proba = imgs["proba"].get_fdata(dtype=np.float32)
    assert seg.shape == shape and seg.dtype == np.uint8
    assert seg.max() <= 2
    assert proba.shape == (*shape, 3) and imgs["proba"].get_data_dtype() == np.float32
    np.testing.assert_allclose(proba.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(seg, proba.argmax(-1))
    mi = nib.load(out / "vol_mi.nii.gz")  # two members: mutual information is written
    assert mi.shape == shape
    # slice-wise prediction equals the ensemble on the normalised slices taken along `axis`
    from uqseg import EnsembleSegmenter
    from uqseg.datasets import normalize_intensity

    slices = normalize_intensity(np.moveaxis(x, axis, 0)[:, None])
    expected = EnsembleSegmenter(tiny_members[:2]).fit().predict(slices)
    np.testing.assert_array_equal(np.moveaxis(seg, axis, 0), expected)
    report = json.loads((out / "vol_scores.json").read_text())
    assert report["layout"] == "slices" and report["n_samples"] == 2
    assert sum(report["class_voxels"]) == seg.size
    assert str(out / "vol_seg.nii.gz") in stdout


def test_predict_3d_model_single_member_no_mi(tmp_path, tiny_3d, capsys):
    x = np.random.default_rng(1).random((6, 8, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, AFFINE), tmp_path / "v.nii")
    code, _, _ = run(["predict", tiny_3d, tmp_path / "v.nii", "--out", tmp_path,
                      "--no-progress"], capsys)
    assert code == 0
    imgs = _outputs(tmp_path, "v")
    assert imgs["seg"].shape == (6, 8, 4) and imgs["proba"].shape == (6, 8, 4, 3)
    np.testing.assert_allclose(imgs["seg"].affine, AFFINE)
    assert not (tmp_path / "v_mi.nii.gz").exists()


def test_predict_numpy_2d_input(tmp_path, tiny_2d, capsys):
    x = np.random.default_rng(2).random((12, 10)).astype(np.float32)
    np.save(tmp_path / "img.npy", x)
    code, _, _ = run(["predict", tiny_2d, tmp_path / "img.npy", "--out", tmp_path / "o",
                      "--no-progress"], capsys)
    assert code == 0
    seg = nib.load(tmp_path / "o" / "img_seg.nii.gz")
    assert seg.shape == (12, 10)
    np.testing.assert_array_equal(seg.affine, np.eye(4))
    from uqseg import OnnxSegmenter
    from uqseg.datasets import normalize_intensity

    expected = OnnxSegmenter(tiny_2d).fit().predict(normalize_intensity(x)[None, None])[0]
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)


def test_predict_no_normalize_and_tta(tmp_path, tiny_2d, capsys):
    x = np.random.default_rng(3).random((8, 8)).astype(np.float32) * 3
    np.save(tmp_path / "img.npy", x)
    code, _, _ = run(["predict", tiny_2d, tmp_path / "img.npy", "--out", tmp_path, "--no-normalize",
                      "--tta", "--no-progress"], capsys)
    assert code == 0
    from uqseg import EnsembleSegmenter

    expected = EnsembleSegmenter([tiny_2d], tta="flips").fit().predict_proba(x[None, None])[0]
    proba = nib.load(tmp_path / "img_proba.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_allclose(np.moveaxis(proba, -1, 0), expected, atol=1e-5)
    assert (tmp_path / "img_mi.nii.gz").exists()  # 4 flips = 4 samples


def test_predict_dicom_series(tmp_path, tiny_2d, capsys):
    vol = np.random.default_rng(4).integers(0, 4000, size=(8, 10, 3)).astype(np.uint16)
    orient, spacing = [1, 0, 0, 0, 1, 0], [0.8, 0.6]
    origin, step = np.array([-20.0, 30.0, 10.0]), np.array([0, 0, 2.5])
    write_dicom_series(tmp_path / "dcm", vol, orientation=orient, spacing=spacing,
                       origin=origin, step=step)
    code, _, _ = run(["predict", tiny_2d, tmp_path / "dcm", "--out", tmp_path / "o",
                      "--no-progress"], capsys)
    assert code == 0
    seg = nib.load(tmp_path / "o" / "dcm_seg.nii.gz")
    assert seg.shape == (10, 8, 3)  # (columns, rows, slices)
    lps = np.array([[0.6, 0, 0, -20], [0, 0.8, 0, 30], [0, 0, 2.5, 10], [0, 0, 0, 1]])
    np.testing.assert_allclose(seg.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)
    report = json.loads((tmp_path / "o" / "dcm_scores.json").read_text())
    assert report["input_kind"] == "dicom"


def test_predict_with_saved_estimators(tmp_path, tiny_2d, capsys):
    import uqseg
    from uqseg import SpectralOODDetector

    rng = np.random.default_rng(5)
    X = rng.random((6, 1, 16, 16)).astype(np.float32)
    uqseg.save(SpectralOODDetector(tiny_2d).fit(X), tmp_path / "ood")
    np.save(tmp_path / "img.npy", rng.random((16, 16, 3)).astype(np.float32))
    code, _, _ = run(["predict", tiny_2d, tmp_path / "img.npy", "--out", tmp_path / "o",
                      "--estimators", tmp_path / "ood", "--no-progress"], capsys)
    assert code == 0
    scores = json.loads((tmp_path / "o" / "img_scores.json").read_text())["estimators"]["ood"]
    assert scores["type"] == "SpectralOODDetector"
    assert len(scores["score_samples"]) == 3  # one per slice along axis 2
    det = uqseg.load(tmp_path / "ood")
    from uqseg.datasets import normalize_intensity

    slices = normalize_intensity(np.moveaxis(np.load(tmp_path / "img.npy"), 2, 0)[:, None])
    np.testing.assert_allclose(scores["score_samples"], det.score_samples(slices), rtol=1e-6)


@pytest.mark.parametrize("with_estimator", [True, False])
def test_predict_writes_risk_controlled_masks(tmp_path, tiny_2d, with_estimator, capsys):
    import uqseg
    from uqseg import ConformalRiskController, OnnxSegmenter
    from uqseg.datasets import normalize_intensity

    rng = np.random.default_rng(7)
    Xc = rng.random((30, 1, 16, 16)).astype(np.float32)
    seg = OnnxSegmenter(tiny_2d).fit()
    yc = seg.predict(Xc)
    yc[:, :4] = rng.integers(0, 3, size=yc[:, :4].shape)  # the network is not always right
    crc = ConformalRiskController(seg if with_estimator else None, alpha=0.2)
    crc.fit(Xc if with_estimator else seg.predict_proba(Xc), yc)
    uqseg.save(crc, tmp_path / "crc")
    x = rng.random((16, 16, 5)).astype(np.float32) * 300
    nib.save(nib.Nifti1Image(x, AFFINE), tmp_path / "vol.nii.gz")
    out = tmp_path / "o"
    code, stdout, _ = run(["predict", tiny_2d, tmp_path / "vol.nii.gz", "--out", out,
                           "--estimators", tmp_path / "crc", "--alpha", "0.4",
                           "--no-progress"], capsys)
    assert code == 0
    img = nib.load(out / "vol_crc_mask.nii.gz")
    np.testing.assert_allclose(img.affine, AFFINE)
    masks = np.asarray(img.dataobj)
    assert masks.shape == (16, 16, 5, 2) and masks.dtype == np.uint8
    assert str(out / "vol_crc_mask.nii.gz") in stdout
    # the thresholds are chosen again at alpha=0.4 from the saved statistics
    ref = ConformalRiskController(seg if with_estimator else None, alpha=0.4)
    ref.fit(Xc if with_estimator else seg.predict_proba(Xc), yc)
    slices = normalize_intensity(np.moveaxis(x, 2, 0)[:, None])
    expected = ref.predict(slices if with_estimator else seg.predict_proba(slices))
    np.testing.assert_array_equal(masks, np.moveaxis(expected, (0, 1), (2, 3)))
    summary = json.loads((out / "vol_scores.json").read_text())["estimators"]["crc"]
    assert summary["alpha"] == 0.4 and summary["risk"] == "fnr" and summary["method"] == "crc"
    assert summary["classes"] == [1, 2]
    np.testing.assert_allclose([v if v is not None else np.inf for v in summary["lambda"]],
                               ref.lambda_)
    assert summary["mask_voxels"] == expected.sum(axis=(0, 2, 3)).tolist()
    assert uqseg.load(tmp_path / "crc").alpha == 0.2  # the saved folder is untouched


def test_predict_risk_arguments_are_checked(tmp_path, tiny_2d, capsys):
    import uqseg
    from uqseg import ConformalRiskController, OnnxSegmenter

    rng = np.random.default_rng(8)
    Xc = rng.random((10, 1, 16, 16)).astype(np.float32)
    seg = OnnxSegmenter(tiny_2d).fit()
    uqseg.save(ConformalRiskController(seg, alpha=0.3).fit(Xc, seg.predict(Xc)),
               tmp_path / "crc")
    np.save(tmp_path / "img.npy", rng.random((16, 16)).astype(np.float32))
    base = ["predict", tiny_2d, tmp_path / "img.npy", "--out", tmp_path / "o", "--no-progress"]
    code, _, err = run([*base, "--alpha", "0.1"], capsys)
    assert code == 2 and "--alpha set the level of a ConformalRiskController" in err
    code, _, err = run([*base, "--estimators", tmp_path / "crc", "--risk", "dice"], capsys)
    assert code == 2 and "not monotone" in err and "pass delta" in err
    with pytest.raises(SystemExit) as exc:
        run([*base, "--estimators", tmp_path / "crc", "--alpha", "1.5"], capsys)
    assert exc.value.code == 2 and "expected a number in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_scores_estimators_from_the_ensemble_pass(tmp_path, tiny_2d, capsys,
                                                          monkeypatch):
    import onnxruntime as ort

    import uqseg
    from uqseg import SpectralOODDetector

    rng = np.random.default_rng(5)
    uqseg.save(SpectralOODDetector(tiny_2d).fit(rng.random((6, 1, 16, 16)).astype(np.float32)),
               tmp_path / "ood")
    np.save(tmp_path / "img.npy", rng.random((16, 16, 3)).astype(np.float32))
    calls = []
    real = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run",
                        lambda sess, *a, **k: calls.append(1) or real(sess, *a, **k))
    base = ["predict", tiny_2d, tmp_path / "img.npy", "--no-progress"]
    assert run([*base, "--out", tmp_path / "a"], capsys)[0] == 0
    plain, calls[:] = len(calls), []
    assert run([*base, "--out", tmp_path / "b", "--estimators", tmp_path / "ood"], capsys)[0] == 0
    assert len(calls) == plain  # the detector reads the ensemble's pass, no run of its own


def test_predict_channel_mismatch_is_a_runtime_error(tmp_path, tiny_2d, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 6, 6, 2), np.float32))
    code, _, err = run(["predict", tiny_2d, tmp_path / "x.npy", "--out", tmp_path], capsys)
    assert code == 1 and "1 channel" in err


# ---------------------------------------------------------------------- bench
def test_bench_calls_run_all_main(tmp_path, monkeypatch, capsys):
    script = tmp_path / "run_all.py"
    script.write_text("import json, sys\n"
                      "def main(argv):\n"
                      "    print(json.dumps(argv))\n"
                      "    return 3\n")
    monkeypatch.setattr(cli, "_repo_benchmarks", lambda: script)
    code, out, _ = run(["bench", "--quick", "--only", "ood"], capsys)
    assert code == 3
    assert json.loads(out) == ["--quick", "--only", "ood"]


def test_bench_without_the_repository(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_repo_benchmarks", lambda: None)
    code, _, err = run(["bench"], capsys)
    assert code == 1 and "source repository" in err


# ---------------------------------------------------------------------- demo
def test_demo_quick_end_to_end(tmp_path, tiny_members, capsys):
    pytest.importorskip("matplotlib")
    code, out, _ = run(["demo", "--quick", "--models", *tiny_members[:2], "--out", tmp_path,
                        "--no-progress"], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    from uqseg import datasets

    assert set(summary["ood_auroc"]) == {"spectral", "uncertainty"}
    assert set(summary["ood_auroc"]["spectral"]) == set(datasets.OOD_KINDS)
    for v in summary["ood_auroc"]["spectral"].values():
        assert 0 <= v <= 1
    ts = summary["temperature_scaling"]
    assert ts["temperature"][0] > 0
    assert summary["n_members"] == 2 and len(summary["members"]) == 2
    assert summary["throughput_images_per_s"]["ensemble"] > 0
    assert "OOD AUROC" in out and "quality" in out and "--quick" in out
    crc = summary["conformal"]  # --quick has too few val slices for alpha = 0.1
    assert crc["alpha"] == 0.1 and "calibration images" in crc["error"]
    assert "FNR-controlled masks (alpha 0.10)" in out and "not calibrated" in out
    html = (tmp_path / "report.html").read_text()
    assert "Conformal risk control" in html
    assert summary["models"] == [Path(m).name for m in tiny_members[:2]]  # no machine paths
    assert f"<td>ensemble</td><td>{summary['ensemble']['ensemble_temperature'][0]:.2f}" in html
    assert html.count("data:image/png;base64,") >= 3


# ---------------------------------------------------------------------- train / export
@pytest.mark.torch
@pytest.mark.slow
def test_train_then_export_give_the_same_network(tmp_path, capsys):
    pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = rng.random((16, 16, 10)).astype(np.float32)
    y = (x > 0.5).astype(np.uint8) + (x > 0.8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.uint8))
    code, out, _ = run(["train", "--images", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                        "--epochs", "1", "--width", "2", "--depth", "2", "--device", "cpu",
                        "--out", tmp_path / "a.onnx", "--save-checkpoint", tmp_path / "c.pt",
                        "--no-progress"], capsys)
    assert code == 0, out
    config = json.loads((tmp_path / "c.json").read_text())
    assert config["n_classes"] == 3 and config["width"] == 2
    code, _, _ = run(["export", tmp_path / "c.pt", "--out", tmp_path / "b.onnx"], capsys)
    assert code == 0
    from uqseg import OnnxSegmenter

    slices = rng.random((4, 1, 16, 16)).astype(np.float32)
    za = OnnxSegmenter(str(tmp_path / "a.onnx")).fit().transform(slices)
    zb = OnnxSegmenter(str(tmp_path / "b.onnx")).fit().transform(slices)
    assert za.shape == (4, 3, 16, 16)
    np.testing.assert_allclose(za, zb, atol=1e-5)


def test_train_label_files_must_match(tmp_path, capsys):
    pytest.importorskip("torch")
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.float32))
    code, _, err = run(["train", "--images", tmp_path / "x.npy", "--no-progress"], capsys)
    assert code == 2 and "--labels" in err


def test_demo_activation_option_reads_logits_as_sigmoid(tmp_path, capsys):
    """Three-channel logits without a Sigmoid node or metadata are softmax unless
    ``--activation sigmoid`` says otherwise (then: foreground, then each label)."""
    import onnx
    from onnx_models import make_unet_like

    paths = []
    for seed in (0, 1):
        path = tmp_path / f"ml{seed}.onnx"
        onnx.save(make_unet_like(n_classes=3, metadata=False, seed=seed), path)
        paths.append(str(path))
    for activation, want in (("auto", "softmax"), ("sigmoid", "sigmoid")):
        out = tmp_path / activation
        code, _, err = run(["demo", "--quick", "--no-progress", "--no-report", "--models",
                            *paths, "--activation", activation, "--out", out], capsys)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["activation"] == want
        assert (summary["sigmoid_channels"] is None) == (want == "softmax")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--models", *paths, "--activation", "relu"])
    assert exc.value.code == 2 and "--activation" in capsys.readouterr().err
