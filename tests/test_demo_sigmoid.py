"""``uqseg demo --models`` and its report on sigmoid networks (issue 17), end to end.

The networks are the binary and the three-channel multi-label sigmoid U-Nets of the
foreign-network registry (``tests/test_byo_network.py``), exported by plain
``torch.onnx.export``. Every number checked is recomputed here from the networks' own ONNX
Runtime outputs with numpy: pooled ECE / NLL inside the foreground box, Dice per channel,
the temperature-scaled ECE, the ensemble's summed mutual information and the quality
targets.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import expit, logit

from uqseg import datasets, demo
from uqseg.cli import main

torch = pytest.importorskip("torch")
from test_byo_network import REGISTRY, DeepSupervisionUNet, export  # noqa: E402

pytestmark = pytest.mark.torch

CFG = demo.DemoConfig(n_val=12, n_test=4, n_train_ood=6, n_test_ood=4, n_per_ood_kind=2,
                      n_quality_val=2, n_quality_test=2, quality_fit_severities=(1.0,),
                      quality_test_severities=(0.5,), n_examples=2)
# name -> (builder, the exported "prob" output is already a probability)
NETS = {"binary": (REGISTRY["sigmoid_binary"][0], False),
        "multilabel": (REGISTRY["sigmoid_multilabel"][0], True),
        "five": (lambda: DeepSupervisionUNet(5, heads=False, final=torch.nn.Sigmoid()), True)}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """name -> two members (different seeds) exported to ONNX."""
    folder = tmp_path_factory.mktemp("sigmoid_demo")
    paths = {}
    for name, (build, _) in NETS.items():
        paths[name] = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = build()
            with torch.no_grad():  # untrained heads give logits within [0, 1], which the
                model.head.weight.mul_(10)  # calibrator rightly takes for probabilities
            paths[name].append(export(model, folder / f"{name}_{seed}.onnx", ["prob"]))
    return paths


# ---------------------------------------------------------------------- numpy references
def _subset(X, y, n):
    idx = np.unique(np.linspace(0, len(X) - 1, n).round().astype(int))
    return X[idx], y[idx]


def _proba(name, path, X):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(["prob"], {"image": X})[0].astype(np.float64)
    return out if NETS[name][1] else expit(out)


def _targets(y, c):
    return (y > 0)[:, None] if c == 1 else np.stack([y > 0, y == 1, y == 2], axis=1)


def _roi(y, m=10):
    out = np.zeros(y.shape, bool)
    for i, yi in enumerate(y):
        r, c = np.nonzero(yi)
        if r.size:
            out[i, max(r.min() - m, 0):r.max() + m + 1, max(c.min() - m, 0):c.max() + m + 1] = 1
    return out


def _in_roi(a, roi):
    return a[np.broadcast_to(roi[:, None], a.shape)]


def _ece(p, t, n_bins=15):
    p, t = p.astype(np.float64), t.astype(bool)
    conf, correct = np.maximum(p, 1 - p), (p > 0.5) == t
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return sum(abs(correct[b == i].mean() - conf[b == i].mean()) * (b == i).sum()
               for i in range(n_bins) if (b == i).any()) / p.size


def _image_dice(mask, t):
    inter = (mask & t).sum(axis=(2, 3))
    tot = mask.sum(axis=(2, 3)) + t.sum(axis=(2, 3))
    with np.errstate(all="ignore"):
        return np.where(tot > 0, 2 * inter / tot, np.nan)


def _entropy(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


# ---------------------------------------------------------------------- the demo run
@pytest.mark.parametrize("name, channels", [("binary", ["foreground"]),
                                            ("multilabel", ["foreground", "grey matter",
                                                            "white matter"])])
def test_demo_on_sigmoid_networks(nets, name, channels, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from uqseg import report

    captured = {}
    write = report.write_report

    def keep(out, summary, figure_data, *a, **k):
        captured.update(figure_data)
        return write(out, summary, figure_data, *a, **k)

    monkeypatch.setattr(report, "write_report", keep)
    summary = demo.run_demo(tmp_path, models=nets[name], quick=True, progress=False,
                            config=CFG)
    out = capsys.readouterr().out
    c = len(channels)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert on_disk["activation"] == summary["activation"] == "sigmoid"
    assert on_disk["sigmoid_channels"]["names"] == channels == summary["test_dice"]["classes"]
    assert f"sigmoid network, {c} channel(s)" in out
    assert html.count("data:image/png;base64,") == 4 and "Sigmoid network: channels" in html

    # members and ensemble on test, pooled calibration inside the foreground box
    X_te, y_te = _subset(*datasets.load_brain_tissue("test"), CFG.n_test)
    X_val, y_val = _subset(*datasets.load_brain_tissue("val"), CFG.n_val)
    t_te, t_val, roi_te = _targets(y_te, c), _targets(y_val, c), _roi(y_te)
    p_te = [_proba(name, m, X_te) for m in nets[name]]
    val_ece = [_ece(_in_roi(_proba(name, m, X_val), _roi(y_val)), _in_roi(t_val, _roi(y_val)))
               for m in nets[name]]
    for row, p, e_val in zip(summary["members"], p_te, val_ece, strict=True):
        assert row["val_ece"] == pytest.approx(e_val, abs=1e-4)
        assert row["ece"] == pytest.approx(_ece(_in_roi(p, roi_te), _in_roi(t_te, roi_te)),
                                           abs=1e-4)
        pi, ti = _in_roi(p, roi_te), _in_roi(t_te, roi_te)
        assert row["nll"] == pytest.approx(-np.mean(np.log(np.where(ti, pi, 1 - pi))),
                                           rel=1e-4)
        assert row["brier"] == pytest.approx(np.mean((pi - ti) ** 2), rel=1e-4)
        np.testing.assert_allclose(row["test_dice"],
                                   np.nanmean(_image_dice(p >= 0.5, t_te), axis=0), atol=1e-6)
    worst = int(np.argmax(val_ece))
    ts = summary["temperature_scaling"]
    assert ts["member"] == summary["members"][worst]["name"]
    scaled = expit(logit(p_te[worst]) / ts["temperature"][0])
    assert ts["after"]["ece"] == pytest.approx(
        _ece(_in_roi(scaled, roi_te), _in_roi(t_te, roi_te)), abs=1e-4)
    p_ens = np.mean(p_te, axis=0)
    assert summary["ensemble"]["ensemble"]["ece"] == pytest.approx(
        _ece(_in_roi(p_ens, roi_te), _in_roi(t_te, roi_te)), abs=1e-4)
    np.testing.assert_allclose(summary["test_dice"]["ensemble"],
                               np.nanmean(_image_dice(p_ens >= 0.5, t_te), axis=0), atol=1e-6)

    # the report's maps: mutual information of the two members, summed over channels
    ex = captured["examples"]
    mi = _entropy(p_ens) - np.mean([_entropy(p) for p in p_te], axis=0)
    np.testing.assert_allclose(ex["uncertainty"], mi.sum(axis=1)[ex["index"]], atol=1e-4)
    np.testing.assert_array_equal(ex["truth"], t_te[ex["index"]])
    assert ex["class_names"] == channels

    # quality: true Dice per channel of the ensemble's masks on the corrupted test images
    Xq, yq = _subset(X_te, y_te, CFG.n_quality_test)
    Xq, yq, _ = datasets.make_quality_set(Xq, yq, severities=CFG.quality_test_severities,
                                          seed=1)
    pq = np.mean([_proba(name, m, Xq) for m in nets[name]], axis=0)
    true_q = np.nan_to_num(_image_dice(pq >= 0.5, _targets(yq, c)), nan=1.0)
    q = captured["quality"]
    np.testing.assert_allclose(q["true"], true_q, atol=1e-6)
    assert q["predicted"].shape == (len(Xq), c) and q["classes"] == channels
    assert summary["quality"]["n"] == true_q.size
    assert summary["quality"]["mae"] == pytest.approx(np.abs(q["predicted"] - true_q).mean())

    # conformal masks: one threshold per channel, p >= 0.5 masks as the baseline
    crc = summary["conformal"]
    assert crc["baseline"] == "p >= 0.5" and crc["classes"] == list(range(c))
    for k, lam in enumerate(crc["lambda"]):
        has = t_te[:, k].reshape(len(t_te), -1).any(1)
        tk, pk = t_te[has, k], p_ens[has, k]
        fnr = 1 - ((pk >= lam - 1e-6) & tk).sum(axis=(1, 2)) / tk.sum(axis=(1, 2))
        assert crc["test_fnr"][k] == pytest.approx(fnr.mean(), abs=0.02)
        half = 1 - ((pk >= 0.5) & tk).sum(axis=(1, 2)) / tk.sum(axis=(1, 2))
        assert crc["baseline_fnr"][k] == pytest.approx(half.mean(), abs=1e-6)


def test_demo_refuses_a_sigmoid_channel_count_it_cannot_match(nets, tmp_path, capsys):
    code = main(["demo", "--quick", "--no-progress", "--models", nets["five"][0],
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "has 5 sigmoid channels" in err
    assert "1 channel as foreground (label > 0), with 2 as one-vs-rest" in err
    assert "or with 3 as channel 0 = foreground" in err
    assert not (tmp_path / "out" / "summary.json").exists()
