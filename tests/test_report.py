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
