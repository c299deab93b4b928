"""uqseg.report: the self-contained HTML report and its figures."""

from __future__ import annotations

import base64
import re
import sys

import numpy as np
import pytest


def _data(rng):
    n, h, w = 2, 16, 16
    y = rng.integers(0, 3, (n, h, w))
    curve = {"confidence": np.linspace(0.4, 0.95, 15), "accuracy": np.linspace(0.3, 0.9, 15),
             "count": np.arange(15), "ece": 0.05}
    figure_data = {
        "reliability": {"before": curve, "after": {**curve, "ece": 0.01}},
        "examples": {"image": rng.random((n, h, w)), "truth": y,
                     "prediction": np.where(rng.random((n, h, w)) < 0.1, 0, y),
                     "uncertainty": rng.random((n, h, w)), "uncertainty_kind": "entropy"},
        "ood_scores": {"spectral": {"in-distribution": rng.normal(0, 1, 20),
                                    "ct": rng.normal(-3, 1, 10)}},
        "quality": {"true": rng.random((30, 2)), "predicted": rng.random((30, 2)),
                    "classes": ["gm", "wm"], "corruption": np.array(["none", "blur"] * 15)},
        "temperature": {"image": rng.random((n, h, w)),
                        "temperature": rng.uniform(0.5, 4, (n, h, w))},
    }
    summary = {"ood_auroc": {"spectral": {"ct": 0.97}},
               "quality": {"pearson_r": 0.5, "spearman_rho": 0.4, "mae": 0.1, "n": 60}}
    return summary, figure_data


def test_report_embeds_one_png_per_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from uqseg.report import write_report

    summary, figure_data = _data(np.random.default_rng(0))
    path = write_report(tmp_path / "r", summary, figure_data)
    html = path.read_text(encoding="utf-8")
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 5
    assert "Local temperature" in html
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "OOD detection (AUROC)" in html and "0.970" in html
    assert not list((tmp_path / "r").glob("*.png"))  # self-contained: nothing next to it


def test_report_skips_missing_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from uqseg.report import write_report

    summary, figure_data = _data(np.random.default_rng(1))
    path = write_report(tmp_path, summary, {"quality": figure_data["quality"]}, "q.html")
    assert path.name == "q.html"
    assert path.read_text(encoding="utf-8").count("data:image/png;base64,") == 1


def test_report_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from uqseg.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"uqseg\[plot\]"):
        write_report(tmp_path, {}, {})
    assert not (tmp_path / "report.html").exists()


def test_demo_without_matplotlib_still_prints_the_table(tmp_path, tiny_members, monkeypatch,
                                                        capsys):
    from uqseg import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    cfg = demo.DemoConfig(n_val=4, n_test=4, n_train_ood=6, n_test_ood=4, n_per_ood_kind=2,
                          n_quality_val=2, n_quality_test=2, quality_fit_severities=(1.0,),
                          quality_test_severities=(0.5,), n_examples=1)
    summary = demo.run_demo(tmp_path, models=tiny_members[:1], quick=True, progress=False,
                            config=cfg)
    out = capsys.readouterr().out
    assert "report.html not written" in out and "uqseg[plot]" in out
    assert "OOD AUROC" in out
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "report.html").exists()
    assert summary["n_members"] == 1


def test_demo_conformal_step_against_a_hand_count():
    from uqseg import ConformalRiskController
    from uqseg.demo import _conformal

    rng = np.random.default_rng(3)
    y_val = rng.integers(0, 3, (40, 8, 8))
    y_te = rng.integers(0, 3, (10, 8, 8))
    y_te[0][y_te[0] == 2] = 0  # an image without class 2 does not count for its FNR

    def proba(y):
        p = rng.random((len(y), 3, 8, 8)) + 2.0 * np.moveaxis(np.eye(3)[y], -1, 1)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    p_val, p_te = proba(y_val), proba(y_te)
    out = _conformal(ConformalRiskController, p_val, y_val, p_te, p_te.argmax(1), y_te)
    lam = ConformalRiskController(alpha=0.1).fit(p_val, y_val).lambda_
    np.testing.assert_allclose(out["lambda"], lam)
    for i, c in enumerate((1, 2)):
        fnrs = [1 - ((p_te[j, c] >= lam[i] - 1e-9) & (y_te[j] == c)).sum() / (y_te[j] == c).sum()
                for j in range(10) if (y_te[j] == c).any()]
        assert out["test_images"][i] == len(fnrs)
        assert out["test_fnr"][i] == pytest.approx(np.mean(fnrs), abs=0.02)
    assert out["test_images"] == [10, 9]


def test_ood_histogram_clips_far_kinds_and_examples_have_a_label_legend():
    pytest.importorskip("matplotlib")
    from uqseg.report import examples_figure, ood_histograms_figure

    rng = np.random.default_rng(0)
    scores = {"spectral": {"in-distribution": rng.normal(0, 1, 200),
                           "far": rng.normal(-1e4, 10, 50)}}
    fig = ood_histograms_figure(scores)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo > -20  # the far kind does not stretch the axis over 4 orders of magnitude
    assert "leftmost bin" in ax.get_xlabel()
    y = rng.integers(0, 3, (2, 8, 8))
    fig = examples_figure(rng.random((2, 8, 8)), y, y, rng.random((2, 8, 8)), "entropy",
                          ["background", "grey matter", "white matter"])
    texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert texts == ["background", "grey matter", "white matter"]
    assert any(a.get_ylabel() == "nats" for a in fig.axes)


# ---------------------------------------------------------------------- sigmoid networks
def _ece_ref(p, t, n_bins=15):
    """Top-label ECE of binary problems ``[1 - p, p]`` against ``t``, plain numpy."""
    p, t = np.ravel(p).astype(np.float64), np.ravel(t).astype(bool)
    conf = np.maximum(p, 1 - p)
    correct = (p > 0.5) == t  # the top label is the positive class where p > 1 - p
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return sum(abs(correct[b == i].mean() - conf[b == i].mean()) * (b == i).sum()
               for i in range(n_bins) if (b == i).any()) / p.size


def test_sigmoid_channels_follow_the_convention():
    from uqseg._demo_outputs import SigmoidOutputs

    y = np.array([[[0, 1, 2], [2, 1, 0]]])  # (1, 2, 3)
    names = ("grey matter", "white matter")
    one = SigmoidOutputs(3, names, 1)
    np.testing.assert_array_equal(one.targets(y), (y > 0)[:, None])
    two = SigmoidOutputs(3, names, 2)
    np.testing.assert_array_equal(two.targets(y)[0], [[[0, 1, 0], [0, 1, 0]],
                                                      [[0, 0, 1], [1, 0, 0]]])
    three = SigmoidOutputs(3, names, 3)
    np.testing.assert_array_equal(three.targets(y)[0], [[[0, 1, 1], [1, 1, 0]],
                                                        [[0, 1, 0], [0, 1, 0]],
                                                        [[0, 0, 1], [1, 0, 0]]])
    assert (one.names, two.names, three.names) == (
        ["foreground"], list(names), ["foreground", *names])
    with pytest.raises(ValueError, match=r"net\.onnx has 4 sigmoid channels.*1 channel as "
                                         r"foreground.*with 2 as one-vs-rest.*or with 3 as"):
        SigmoidOutputs(3, names, 4, where="net.onnx")


def test_sigmoid_calibration_pools_channels_inside_the_roi():
    from uqseg import metrics
    from uqseg._demo_outputs import SigmoidOutputs

    rng = np.random.default_rng(4)
    p = rng.random((3, 2, 10, 12)).astype(np.float32)
    t = rng.random((3, 2, 10, 12)) < p  # calibrated-ish targets
    roi = np.zeros((3, 10, 12), bool)
    roi[:, 2:8, 3:11] = True
    o = SigmoidOutputs(3, ("a", "b"), 2)
    got = o.calibration(p, t, roi)
    sel = np.broadcast_to(roi[:, None], p.shape)
    pi, ti = p[sel].astype(np.float64), t[sel]
    assert got["ece"] == pytest.approx(_ece_ref(pi, ti), abs=1e-9)
    assert got["nll"] == pytest.approx(-np.mean(np.log(np.where(ti, pi, 1 - pi))), rel=1e-6)
    assert got["brier"] == pytest.approx(np.mean((pi - ti) ** 2), rel=1e-6)
    everywhere = o.calibration(p, t, np.ones_like(roi))  # = multilabel_report's pooled
    pooled = metrics.multilabel_report(p, t)["pooled"]
    for k in ("ece", "nll", "brier"):
        assert everywhere[k] == pytest.approx(pooled[k], rel=1e-6)
    curve = o.curve(p, t, roi)
    assert curve["count"].sum() == sel.sum() and curve["ece"] == pytest.approx(got["ece"])
    assert o.map(np.ones((3, 2, 4, 4))).shape == (3, 4, 4)  # channels summed
    assert float(o.map(np.ones((3, 2, 4, 4)))[0, 0, 0]) == 2.0


def test_demo_conformal_step_on_sigmoid_channels_against_a_hand_count():
    from uqseg import ConformalRiskController
    from uqseg.demo import _conformal

    rng = np.random.default_rng(5)
    t_val = rng.random((40, 2, 8, 8)) < 0.4
    t_te = rng.random((10, 2, 8, 8)) < 0.4
    t_te[0, 1] = False  # an image without channel 1 does not count for its FNR

    def proba(t):
        return np.clip(0.5 * rng.random(t.shape) + 0.45 * t, 0, 1).astype(np.float32)

    p_val, p_te = proba(t_val), proba(t_te)
    out = _conformal(ConformalRiskController, p_val, t_val, p_te, p_te >= 0.5, t_te)
    lam = ConformalRiskController(alpha=0.1).fit(p_val, t_val).lambda_
    np.testing.assert_allclose(out["lambda"], lam)
    assert out["baseline"] == "p >= 0.5" and "argmax_fnr" not in out
    for c in range(2):
        has = [j for j in range(10) if t_te[j, c].any()]
        fnr = [1 - ((p_te[j, c] >= lam[c] - 1e-9) & t_te[j, c]).sum() / t_te[j, c].sum()
               for j in has]
        half = [1 - ((p_te[j, c] >= 0.5) & t_te[j, c]).sum() / t_te[j, c].sum() for j in has]
        assert out["test_images"][c] == len(has)
        assert out["test_fnr"][c] == pytest.approx(np.mean(fnr), abs=0.02)
        assert out["baseline_fnr"][c] == pytest.approx(np.mean(half))
    assert out["test_images"] == [10, 9]


def test_examples_figure_draws_per_channel_masks():
    pytest.importorskip("matplotlib")
    from uqseg.report import examples_figure

    rng = np.random.default_rng(6)
    truth = np.zeros((2, 3, 16, 16), bool)
    truth[:, 0, 2:14, 2:14] = True
    truth[:, 1, 4:10, 4:10] = True
    truth[:, 2, 8:12, 6:13] = True  # overlaps channel 1
    pred = truth.copy()
    pred[1, 2] = False  # image 1: channel 2 missed
    fig = examples_figure(rng.random((2, 16, 16)), truth, pred, rng.random((2, 16, 16)),
                          "entropy, sum over channels", ["fg", "a", "b"])
    texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert texts == ["fg", "a", "b"]
    axes = np.array(fig.axes[:10]).reshape(2, 5)  # panels, then the colour bars
    # truth panels: one contour per channel; image 1's prediction lacks channel 2's
    n_contours = [[len(ax.collections) for ax in row[1:3]] for row in axes]
    assert n_contours == [[3, 3], [3, 2]]
    wrong = (pred[1] != truth[1]).any(0).mean()
    assert axes[0, 3].get_xlabel() == "0.0% wrong"
    assert axes[1, 3].get_xlabel() == f"{wrong:.1%} wrong"
    with pytest.raises(ValueError, match="per-channel masks"):
        examples_figure(rng.random((2, 16, 16)), truth, pred[:, :2], rng.random((2, 16, 16)))


def test_quality_scatter_has_one_panel_per_channel():
    pytest.importorskip("matplotlib")
    from uqseg.report import quality_scatter_figure

    rng = np.random.default_rng(7)
    true = rng.random((20, 3))
    pred = np.clip(true + 0.05 * rng.standard_normal((20, 3)), 0, 1)
    fig = quality_scatter_figure(true, pred, ["foreground", "gm", "wm"])
    titles = [ax.get_title() for ax in fig.axes]
    r = np.corrcoef(true[:, 2], pred[:, 2])[0, 1]
    assert [t.split(":")[0] for t in titles] == ["foreground", "gm", "wm"]
    mae = np.abs(true[:, 2] - pred[:, 2]).mean()
    assert titles[2] == f"wm: r = {r:.2f}, MAE = {mae:.3f}"
    with pytest.raises(ValueError, match="2 classes for 3 columns"):
        quality_scatter_figure(true, pred, ["gm", "wm"])


def test_report_says_when_the_network_is_sigmoid(tmp_path):
    pytest.importorskip("matplotlib")
    from uqseg.report import write_report

    summary, figure_data = _data(np.random.default_rng(8))
    summary["sigmoid_channels"] = {"names": ["foreground"], "convention": "foreground (label > 0)"}
    html = write_report(tmp_path, summary, {"quality": figure_data["quality"]}).read_text()
    assert "Sigmoid network: channels foreground (foreground (label &gt; 0))" in html
    assert "one panel per sigmoid channel" in html


def test_demo_refuses_a_softmax_class_count_the_data_does_not_have(tmp_path, make_model):
    from uqseg import demo

    path = make_model("four_classes", n_classes=4)
    with pytest.raises(ValueError, match="4 softmax classes; the embedded data has 3 labels"):
        demo.run_demo(tmp_path, models=[path], quick=True, progress=False)
    assert not (tmp_path / "summary.json").exists()
