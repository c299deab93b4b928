"""Sigmoid (multi-label) networks: temperature scaling and quality prediction, measured.

Trains a small two-label sigmoid U-Net with BCE on the embedded brain-tissue train split
(64 x 64; labels: brain = GM + WM, and white matter, which overlap), exports it with plain
``torch.onnx.export``, then on the test split (fitted on val):

- ``TemperatureCalibrator``: pooled and per-channel ECE / NLL (``metrics.multilabel_report``)
  of the raw network, and of the same network made over-confident (logits x 4), before and
  after global, per-channel (``mode="classwise"``) and local (a map per channel)
  temperatures (local: scores as X, so without the image feature);
- ``QualityRegressor``: Pearson r and MAE of predicted against true per-channel Dice on
  corrupted copies (``datasets.make_quality_set``, severities 0.5 and 1) of the test split.

Run: ``python benchmarks/bench_sigmoid.py`` (needs the ``train`` extra; about a minute) ->
``benchmarks/results/sigmoid.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch import nn  # noqa: E402

from uqseg import OnnxSegmenter, QualityRegressor, TemperatureCalibrator, datasets  # noqa: E402
from uqseg.datasets import make_quality_set  # noqa: E402
from uqseg.metrics import multilabel_report  # noqa: E402

STEPS = 200
NAMES = ["brain", "white_matter"]


def indicators(y):
    return np.stack([y >= 1, y == 2], axis=1)


def split(name, step=1):
    X, y = datasets.load_brain_tissue(name)
    return X[::step, :, ::2, ::2].copy(), y[::step, ::2, ::2].copy()


def train(path, seed=0):
    torch.manual_seed(seed)

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.b, self.pool = block(1, 8), block(8, 16), nn.MaxPool2d(2)
            self.up, self.d = nn.ConvTranspose2d(16, 8, 2, stride=2), block(16, 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e = self.e1(x)
            return self.head(self.d(torch.cat([self.up(self.b(self.pool(e))), e], 1)))

    X, y = split("train")
    xt, tt = torch.from_numpy(X), torch.from_numpy(indicators(y).astype(np.float32))
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(STEPS):
        idx = torch.randint(0, len(xt), (16,))
        loss = nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), tt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (xt[:1],), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False)


def report(proba, t):
    r = multilabel_report(proba, t, names=NAMES)
    keys = ("ece", "nll", "brier")
    return {name: {k: float(r[name][k]) for k in keys} for name in (*NAMES, "pooled")}


def calibration(seg):
    Xv, yv = split("val")
    Xt, yt = split("test")
    zv, zt = seg.transform(Xv), seg.transform(Xt)
    tv, tt = indicators(yv), indicators(yt)
    out = {}
    for factor in (1.0, 4.0):
        name = "raw" if factor == 1 else "logits x4"
        row = {"uncalibrated": report(expit(factor * zt), tt)}
        for mode in ("global", "classwise", "local"):
            cal = TemperatureCalibrator(mode=mode, activation="sigmoid").fit(factor * zv, tv)
            row[mode] = report(cal.predict_proba(factor * zt), tt)
            if mode != "local":
                row[mode]["temperature"] = np.atleast_1d(cal.temperature_).round(4).tolist()
            assert (cal.predict(factor * zt) == (zt > 0)).all()  # masks unchanged
        out[name] = row
    return out


def quality(seg):
    Xv, yv = split("val", 6)
    Xt, yt = split("test", 6)
    Xw, yw, info = make_quality_set(Xv, yv, severities=(0.5, 1.0))
    Xq, yq, _ = make_quality_set(Xt, yt, severities=(0.5, 1.0), seed=1)
    qr = QualityRegressor(seg).fit(Xw, indicators(yw), groups=info["source"])
    pred = qr.predict(Xq)
    m, t = seg.predict(Xq), indicators(yq)
    inter = (m & t).sum(axis=(2, 3))
    true = 2 * inter / np.maximum(m.sum(axis=(2, 3)) + t.sum(axis=(2, 3)), 1)
    return {name: {"r": float(np.corrcoef(pred[:, c], true[:, c])[0, 1]),
                   "mae": float(np.abs(pred[:, c] - true[:, c]).mean()),
                   "true_dice_mean": float(true[:, c].mean())}
            for c, name in enumerate(NAMES)} | {"n_fit": len(Xw), "n_test": len(Xq)}


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sigmoid.onnx")
        train(path)
        seg = OnnxSegmenter(path, activation="sigmoid").fit()
        Xt, yt = split("test")
        dice = report(seg.predict_proba(Xt), indicators(yt))  # for the record
        m, t = seg.predict(Xt), indicators(yt)
        dice = [float(2 * (m[:, c] & t[:, c]).sum() / (m[:, c].sum() + t[:, c].sum()))
                for c in range(2)]
        res = {"date": datetime.date.today().isoformat(), "steps": STEPS,
               "test_dice": dict(zip(NAMES, dice, strict=True)),
               "calibration": calibration(seg), "quality": quality(seg),
               "seconds": round(time.time() - t0, 1),
               "load_average": os.getloadavg()[0]}
    out = Path(__file__).parent / "results" / "sigmoid.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("| network | calibrator | T | pooled ECE | pooled NLL | ECE brain | ECE WM |")
    print("|---|---|---|---|---|---|---|")
    for net, row in res["calibration"].items():
        for mode, r in row.items():
            t = ", ".join(f"{v:.3g}" for v in r.get("temperature", [])) or (
                "map" if mode == "local" else "1")
            print(f"| {net} | {mode} | {t} | {r['pooled']['ece']:.4f} | "
                  f"{r['pooled']['nll']:.4f} | {r['brain']['ece']:.4f} | "
                  f"{r['white_matter']['ece']:.4f} |")
    print(json.dumps(res["quality"]), res["test_dice"], res["seconds"], "s")


if __name__ == "__main__":
    main()
