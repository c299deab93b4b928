"""Does uncertainty survive int8 quantisation? Speed and accuracy of precision="int8".

For every zoo member (width 8) and a width-32 U-Net of ``uqseg.training`` (random weights:
its speed is what matters here; no trained width-32 network ships):

- speed: ``predict_proba`` on 8 test slices (128 x 128, batch 8), float32 vs int8, timed
  round-robin, ratio with a bootstrap interval;
- zoo members only (trained): test Dice per class, top-label ECE after temperature scaling
  fitted on val (each precision its own temperature), spectral OOD AUROC (default detector
  fitted on train slices, test vs every OOD kind, mean).

int8 is calibrated on 32 val slices. Writes ``benchmarks/results/int8.json`` and, with
``--render``, the table between the ``bench:int8`` markers of ``docs/benchmarks.md``.

Usage::

    python benchmarks/bench_int8.py --render      # about 8 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import numpy as np
from common import (
    RESULTS,
    ROOT,
    machine_record,
    speedup_ci,
    time_round_robin,
    write_doc_section,
    write_json,
)

from uqseg import OnnxSegmenter, SpectralOODDetector, TemperatureCalibrator, datasets, metrics

logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice lines


def _speed(model, calib, X, repeats):
    s32 = OnnxSegmenter(model, batch_size=8).fit()
    s8 = OnnxSegmenter(model, batch_size=8, precision="int8").fit(calib)
    t = time_round_robin({"fp32": lambda: s32.predict_proba(X),
                          "int8": lambda: s8.predict_proba(X)}, repeats=repeats, warmup=1,
                         block=3)  # each call after one of its own kind, as in a stream
    lo, hi = speedup_ci(t["fp32"]["times_s"], t["int8"]["times_s"])
    return s32, s8, {"fp32_s": t["fp32"]["median_s"], "int8_s": t["int8"]["median_s"],
                     "speedup": t["fp32"]["median_s"] / t["int8"]["median_s"],
                     "speedup_ci95": [lo, hi], "drift": s8.int8_drift_}


def _quality(seg, data):
    (X_tr, X_val, y_val, X_te, y_te, ood) = data
    roi_te = metrics.foreground_roi(y_te, margin=10)
    cal = TemperatureCalibrator().fit(seg.transform(X_val), y_val)
    z_te = seg.transform(X_te)
    p = cal.predict_proba(z_te)
    dice = np.nanmean(metrics.dice_score(z_te.argmax(1), y_te, n_classes=3), axis=0)
    det = SpectralOODDetector(seg).fit(X_tr)
    s_in = det.score_samples(X_te)
    auroc = {k: metrics.ood_auroc(s_in, det.score_samples(v)) for k, v in ood.items()}
    return {"dice": dice.tolist(),
            "ece_ts": float(metrics.expected_calibration_error(p, y_te, mask=roi_te)),
            "temperature": float(np.atleast_1d(cal.temperature_)[0]),
            "ood_auroc_mean": float(np.mean(list(auroc.values()))), "ood_auroc": auroc}


def render(rows: dict) -> list[str]:
    """The docs table of ``rows`` (int8.json's)."""
    table = ["| network | int8 speed-up (95% CI) | labels agree (fit) | Dice GM / WM fp32 → "
             "int8 | ECE after TS fp32 → int8 | spectral OOD AUROC fp32 → int8 |",
             "|---|---:|---:|---|---|---|"]
    for name, r in rows.items():
        cells = [f"{r['speedup']:.2f}× ({r['speedup_ci95'][0]:.2f}–{r['speedup_ci95'][1]:.2f})",
                 f"{100 * r['drift']['label_agreement']:.2f}%"]
        if "fp32" in r:
            a, b = r["fp32"], r["int8"]
            cells += [f"{a['dice'][0]:.4f} / {a['dice'][1]:.4f} → "
                      f"{b['dice'][0]:.4f} / {b['dice'][1]:.4f}",
                      f"{a['ece_ts']:.4f} → {b['ece_ts']:.4f} ({b['ece_ts'] / a['ece_ts']:.2f}×)",
                      f"{a['ood_auroc_mean']:.3f} → {b['ood_auroc_mean']:.3f}"]
        else:
            cells += ["(untrained: speed only)"] * 3
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    return table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--width32", metavar="MODEL.onnx",
                    help="a trained width-32 U-Net (e.g. `uqseg train --width 32`): its row "
                         "gets Dice, ECE and OOD AUROC too (default: random weights, speed only)")
    ap.add_argument("--width32-label", default=None, help="row name of --width32")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of the existing int8.json that this run does not make")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the docs table from the existing int8.json")
    args = ap.parse_args(argv)
    if args.render_only:
        record = json.loads((RESULTS / "int8.json").read_text())
        write_doc_section(ROOT / "docs" / "benchmarks.md", "bench:int8",
                          "\n".join(render(record["rows"])))
        return record

    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, y_val = datasets.load_brain_tissue("val")
    X_te, y_te = datasets.load_brain_tissue("test")
    ood = {k: datasets.load_ood(k)[::4] for k in datasets.OOD_KINDS}
    data = (X_tr[::6], X_val, y_val, X_te, y_te, ood)
    calib = X_val[:: max(1, len(X_val) // 32)][:32]
    X8 = np.ascontiguousarray(X_te[:: max(1, len(X_te) // 8)][:8])
    rows = {}
    for model in datasets.reference_models()[: args.members]:
        name = model.rsplit("/", 1)[-1].removesuffix(".onnx")
        s32, s8, rec = _speed(model, calib, X8, args.repeats)
        rec["fp32"], rec["int8"] = _quality(s32, data), _quality(s8, data)
        rows[name] = rec
        print(name, {k: rec[k] for k in ("speedup", "speedup_ci95")},
              rec["fp32"]["dice"], rec["int8"]["dice"], flush=True)
    import torch

    from uqseg.training import UNet, export_onnx

    if args.width32:
        name = args.width32_label or "unet_width32 (trained)"
        s32, s8, rec = _speed(args.width32, calib, X8, args.repeats)
        rec["fp32"], rec["int8"] = _quality(s32, data), _quality(s8, data)
        rows[name] = rec
        print(name, {k: rec[k] for k in ("speedup", "speedup_ci95")},
              rec["fp32"]["dice"], rec["int8"]["dice"], flush=True)
    else:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/unet_w32.onnx"
            export_onnx(UNet(1, 3, width=32).eval(), path, X_val[:1])
            _, _, rows["unet_width32 (random weights)"] = _speed(path, calib, X8, args.repeats)
    if args.update and (RESULTS / "int8.json").exists():
        old = json.loads((RESULTS / "int8.json").read_text())
        rows = {**{k: v for k, v in old["rows"].items() if k not in rows}, **rows}
    record = {"rows": rows, "calibration_images": len(calib), "timed_images": len(X8),
              "machine": machine_record(["numpy", "onnxruntime", "onnx"])}
    write_json(RESULTS / "int8.json", record)

    table = render(rows)
    print("\n".join(table))
    if args.render:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "bench:int8", "\n".join(table))
    return record


if __name__ == "__main__":
    main()
