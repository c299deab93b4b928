"""Temperature-scale every reference zoo member on the val split, score it on the test split.

What a new user would do: ``TemperatureCalibrator(path).fit(X_val, y_val)`` then
``predict_proba(X_te)``. For each member it records ECE (15 equal-width bins, top-label),
NLL and Brier before and after, over the whole image and "segment-level" inside the
bounding box of the true foreground (margin 10 voxels, Mehrtash et al.), for global scaling
(the main result), class-wise scaling and global scaling fitted inside the ROI. The issue's
bar: on the worst-calibrated member (highest val ECE), global scaling at least halves the
test ECE, lowers the test NLL and leaves every label unchanged.

Run: ``python benchmarks/calibrate_zoo.py`` -> ``benchmarks/results/calibration_zoo.json``,
``docs/figures/reliability_before_after.png`` and the results table in
``docs/calibration.md`` (between the ``zoo-results`` markers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from uqseg import OnnxSegmenter, TemperatureCalibrator, datasets, metrics  # noqa: E402
from uqseg.uncertainty import softmax  # noqa: E402

DOC = ROOT / "docs" / "calibration.md"
FIG = ROOT / "docs" / "figures" / "reliability_before_after.png"
FIG_CLASS = ROOT / "docs" / "figures" / "reliability_by_class.png"
START, END = "<!-- zoo-results:start -->", "<!-- zoo-results:end -->"


def scores(proba, y, roi):
    return {
        "ece": metrics.expected_calibration_error(proba, y),
        "nll": metrics.negative_log_likelihood(proba, y),
        "brier": metrics.brier_score(proba, y),
        "ece_roi": metrics.expected_calibration_error(proba, y, mask=roi),
        "nll_roi": metrics.negative_log_likelihood(proba, y, mask=roi),
        "brier_roi": metrics.brier_score(proba, y, mask=roi),
    }


def meets_bar(before, after, labels_unchanged) -> bool:
    """Issue 4's bar: test ECE at least halved, NLL lower, no label changed."""
    return bool(
        after["ece"] <= 0.5 * before["ece"] and after["nll"] < before["nll"] and labels_unchanged
    )


def confidence_gap(proba, y):
    """Mean confidence minus accuracy (> 0: over-confident), overall and per predicted class."""
    conf, pred = proba.max(1), proba.argmax(1)
    ok = pred == y
    out = {
        "all": {"n": int(conf.size), "confidence": float(conf.mean()), "accuracy": float(ok.mean())}
    }
    for k in range(proba.shape[1]):
        m = pred == k
        if m.any():
            out[f"pred_{k}"] = {
                "n": int(m.sum()),
                "confidence": float(conf[m].mean()),
                "accuracy": float(ok[m].mean()),
            }
    for v in out.values():
        v["gap"] = v["confidence"] - v["accuracy"]
    return out


def member_report(path, X_val, y_val, X_te, y_te, roi_val, roi_te):
    name = Path(path).stem
    seg = OnnxSegmenter(path).fit()
    logits_val, logits_te = seg.transform(X_val), seg.transform(X_te)
    t = time.perf_counter()
    cal = TemperatureCalibrator(path).fit(X_val, y_val)  # as a user would: from the path
    fit_s = time.perf_counter() - t
    proba_after = cal.predict_proba(X_te)
    rec = {
        "member": name,
        "temperature": cal.temperature_,
        "fit_seconds": fit_s,
        "labels_unchanged": bool((cal.predict(X_te) == logits_te.argmax(1)).all()),
        "val_ece_before": metrics.expected_calibration_error(softmax(logits_val), y_val),
        "before": scores(softmax(logits_te), y_te, roi_te),
        "after": scores(proba_after, y_te, roi_te),
        "confidence_gap_before": confidence_gap(softmax(logits_te), y_te),
    }
    cw = TemperatureCalibrator(mode="classwise").fit(logits_val, y_val)
    rec["classwise_temperature"] = cw.temperature_.tolist()
    rec["after_classwise"] = scores(cw.predict_proba(logits_te), y_te, roi_te)
    rec["classwise_label_change_fraction"] = float(
        (cw.predict(logits_te) != logits_te.argmax(1)).mean()
    )
    ece_cal = TemperatureCalibrator(objective="ece").fit(logits_val, y_val)
    rec["ece_objective_temperature"] = ece_cal.temperature_
    rec["after_ece_objective"] = scores(ece_cal.predict_proba(logits_te), y_te, roi_te)
    rec["ece_objective_labels_unchanged"] = bool(
        (ece_cal.predict(logits_te) == logits_te.argmax(1)).all()
    )
    roi_cal = TemperatureCalibrator(roi="foreground").fit(logits_val, y_val)
    rec["roi_temperature"] = roi_cal.temperature_
    rec["after_roi_fit"] = scores(roi_cal.predict_proba(logits_te), y_te, roi_te)
    return rec, softmax(logits_te), proba_after


def figure(proba_before, proba_after, y, roi, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, mask, where in ((axes[0], None, "whole image"), (axes[1], roi, "foreground ROI")):
        metrics.plot_reliability_diagram(proba_before, y, ax=ax, label="before", mask=mask)
        metrics.plot_reliability_diagram(proba_after, y, ax=ax, label="after", mask=mask)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))  # the diagonal is drawn twice
        ax.legend(uniq.values(), uniq.keys(), loc="upper left", fontsize=8)
        ax.set_title(f"{where}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    FIG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIG, dpi=120)
    plt.close(fig)


def figure_by_class(proba_before, proba_after, y, title):
    """Reliability inside each predicted class (of the uncalibrated network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = proba_before.argmax(1)
    names = ("background", "grey matter", "white matter")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for k, ax in enumerate(axes):
        mask = pred == k
        metrics.plot_reliability_diagram(proba_before, y, ax=ax, label="before", mask=mask)
        metrics.plot_reliability_diagram(proba_after, y, ax=ax, label="after", mask=mask)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), loc="upper left", fontsize=8)
        ax.set_title(f"voxels predicted {names[k]} ({int(mask.sum()):,})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG_CLASS, dpi=110)
    plt.close(fig)


def table(recs, worst):
    lines = [
        "| member | T | ECE before → after | NLL before → after | Brier before → after "
        "| ROI ECE before → after | labels unchanged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        b, a = r["before"], r["after"]
        mark = " (worst)" if r["member"] == worst else ""
        lines.append(
            f"| {r['member']}{mark} | {r['temperature']:.3f} | {b['ece']:.4f} → {a['ece']:.4f} "
            f"| {b['nll']:.4f} → {a['nll']:.4f} | {b['brier']:.4f} → {a['brier']:.4f} "
            f"| {b['ece_roi']:.4f} → {a['ece_roi']:.4f} | {r['labels_unchanged']} |"
        )
    lines += [
        "",
        "Global temperature chosen by the lowest val ECE instead of the NLL "
        '(`objective="ece"`), test split:',
        "",
        "| member | T | ECE before → after | NLL before → after | ROI ECE before → after "
        "| labels unchanged |",
        "|---|---|---|---|---|---|",
    ]
    for r in recs:
        b, a = r["before"], r["after_ece_objective"]
        lines.append(
            f"| {r['member']} | {r['ece_objective_temperature']:.3f} "
            f"| {b['ece']:.4f} → {a['ece']:.4f} | {b['nll']:.4f} → {a['nll']:.4f} "
            f"| {b['ece_roi']:.4f} → {a['ece_roi']:.4f} | {r['ece_objective_labels_unchanged']} |"
        )
    lines += [
        "",
        "Class-wise scaling and a global temperature fitted inside the ROI "
        "(test ECE, whole image / ROI):",
        "",
        "| member | class-wise T | ECE | ROI ECE | labels changed | ROI-fit T | ECE | ROI ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        c, o = r["after_classwise"], r["after_roi_fit"]
        ts = ", ".join(f"{t:.2f}" for t in r["classwise_temperature"])
        lines.append(
            f"| {r['member']} | {ts} | {c['ece']:.4f} | {c['ece_roi']:.4f} "
            f"| {100 * r['classwise_label_change_fraction']:.2f}% | {r['roi_temperature']:.3f} "
            f"| {o['ece']:.4f} | {o['ece_roi']:.4f} |"
        )
    lines += [
        "",
        "Before scaling, test split: mean confidence minus accuracy (> 0 over-confident, "
        "< 0 under-confident), all voxels and by predicted class:",
        "",
        "| member | all | predicted background | predicted grey matter | predicted white matter |",
        "|---|---|---|---|---|",
    ]
    for r in recs:
        g = r["confidence_gap_before"]
        cells = [
            f"{g[k]['gap']:+.3f} ({g[k]['confidence']:.3f} vs {g[k]['accuracy']:.3f})"
            if k in g
            else "—"
            for k in ("all", "pred_0", "pred_1", "pred_2")
        ]
        lines.append(f"| {r['member']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="ONNX files (default: the reference zoo)")
    ap.add_argument(
        "--no-write",
        action="store_true",
        help="print only: no JSON, figure or docs table (smoke runs)",
    )
    args = ap.parse_args(argv)
    paths = args.models or datasets.reference_models()
    X_val, y_val = datasets.load_brain_tissue("val")
    X_te, y_te = datasets.load_brain_tissue("test")
    roi_val = metrics.foreground_roi(y_val, margin=10)
    roi_te = metrics.foreground_roi(y_te, margin=10)
    recs, probas = [], {}
    for p in paths:
        rec, before, after = member_report(p, X_val, y_val, X_te, y_te, roi_val, roi_te)
        recs.append(rec)
        probas[rec["member"]] = (before, after)
        b, a = rec["before"], rec["after"]
        print(
            f"{rec['member']}: T={rec['temperature']:.3f} ECE {b['ece']:.4f} -> {a['ece']:.4f}"
            f"  NLL {b['nll']:.4f} -> {a['nll']:.4f}  Brier {b['brier']:.4f} -> "
            f"{a['brier']:.4f}  labels unchanged: {rec['labels_unchanged']}",
            flush=True,
        )
    worst = max(recs, key=lambda r: r["val_ece_before"])
    ok = meets_bar(worst["before"], worst["after"], worst["labels_unchanged"])
    a_ece = worst["after_ece_objective"]
    ok_ece = meets_bar(worst["before"], a_ece, worst["ece_objective_labels_unchanged"])
    verdict = {
        "worst_member": worst["member"],
        "chosen_by": "highest val-split ECE before",
        "test_ece_ratio": worst["after"]["ece"] / worst["before"]["ece"],
        "test_nll_before": worst["before"]["nll"],
        "test_nll_after": worst["after"]["nll"],
        "labels_unchanged": worst["labels_unchanged"],
        "meets_bar": bool(ok),
        "ece_objective": {
            "test_ece_ratio": a_ece["ece"] / worst["before"]["ece"],
            "test_nll_after": a_ece["nll"],
            "labels_unchanged": worst["ece_objective_labels_unchanged"],
            "meets_bar": bool(ok_ece),
        },
    }
    print(json.dumps(verdict, indent=1))
    print(table(recs, worst["member"]))
    if args.no_write:
        return
    before, after = probas[worst["member"]]
    figure(
        before,
        after,
        y_te,
        roi_te,
        f"{worst['member']} (test split), global T = {worst['temperature']:.2f}",
    )
    figure_by_class(
        before,
        after,
        y_te,
        f"{worst['member']} (test split) by predicted class, global T = {worst['temperature']:.2f}",
    )
    result = {
        "name": "calibration_zoo",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {"numpy": np.__version__},
        "data": {"val": list(X_val.shape), "test": list(X_te.shape)},
        "models": [Path(p).name for p in paths],
        "members": recs,
        "verdict": verdict,
    }
    out = ROOT / "benchmarks" / "results" / "calibration_zoo.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    text = table(recs, worst["member"])
    src = (
        "the reference zoo"
        if not args.models
        else (
            "models given with --models (not the reference zoo): "
            + ", ".join(f"`{p}`" for p in paths)
        )
    )
    text += (
        f"\n\nRun {result['date'][:10]} on {src}. Worst member by val ECE: "
        f"{worst['member']}; test ECE ratio after/before "
        f"{verdict['test_ece_ratio']:.2f}, NLL {verdict['test_nll_before']:.4f} → "
        f"{verdict['test_nll_after']:.4f}, labels unchanged: "
        f"{verdict['labels_unchanged']} — issue bar (ECE at least halved, NLL lower, "
        f"labels unchanged) {'met' if verdict['meets_bar'] else 'NOT met'} with the default "
        f'NLL objective; with `objective="ece"`: ECE ratio '
        f"{verdict['ece_objective']['test_ece_ratio']:.2f}, NLL "
        f"{verdict['ece_objective']['test_nll_after']:.4f}, labels unchanged: "
        f"{verdict['ece_objective']['labels_unchanged']} — "
        f"{'met' if verdict['ece_objective']['meets_bar'] else 'NOT met'}."
    )
    if DOC.exists():
        doc = DOC.read_text()
        if START in doc and END in doc:
            head, rest = doc.split(START, 1)
            DOC.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {out}, {FIG}, {FIG_CLASS}")


if __name__ == "__main__":
    main()
