"""Speed and quality of EnsembleSegmenter on the reference zoo (CPU).

Speed: the ensemble's inference with uncertainty maps against the sum of its members' plain
``transform`` times on one batch of test images, for three ways of running the members:
separate sessions with numpy statistics (``fuse=False``), one fused ONNX graph computing the
statistics in the graph (``fuse=True``), and one fused graph returning every member's logits
with the statistics in numpy. ``ensemble_fused_graph_stats_predict_proba`` times the public
``predict_proba`` of the in-graph variant (until issue 22 that row timed the engine's private
probabilities-only pass, which has no public call: ``predict_proba`` also computes the
entropy and MI maps it caches for a following ``uncertainty`` call, in the same graph run).
Variants are timed round-robin (``--repeats`` rounds after
``--warmup`` rounds) so that load from other processes hits them alike; medians are reported.

Quality: NLL, ECE, Brier score and Dice of every member and of the ensemble on the whole test
split (also inside the foreground bounding box, margin 10, as Mehrtash et al. do), the same
after global temperature scaling fitted on the val split (members and ensemble alike, as
Mehrtash et al. also report ensembles with temperature scaling), the MI range check, UEO of
the entropy and MI maps, and a figure of uncertainty maps beside the errors.

Usage::

    python benchmarks/bench_ensemble.py                      # zoo, batch of 32, 7 rounds
    python benchmarks/bench_ensemble.py --models DIR --repeats 3 --no-figure
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uqseg import (  # noqa: E402
    EnsembleSegmenter,
    OnnxSegmenter,
    TemperatureCalibrator,
    datasets,
    metrics,
)
from uqseg.uncertainty import softmax  # noqa: E402

KINDS = ("entropy", "expected_entropy", "mutual_information")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None, help="folder of ONNX members (zoo)")
    p.add_argument("--n-images", type=int, default=32, help="batch of test images timed")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ensemble.json")
    p.add_argument("--figure", type=Path, default=ROOT / "docs/figures/ensemble_uncertainty.png")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs/ensemble.md",
        help="markdown page whose results section is rewritten ('' to skip)",
    )
    return p.parse_args(argv)


def _softmax(z):
    return softmax(z)


def timing(paths, X, args) -> dict:
    n = X.shape[0]
    segs = [OnnxSegmenter(p, device="cpu", batch_size=n, threads=args.threads).fit() for p in paths]
    members = [OnnxSegmenter(p, device="cpu", batch_size=n, threads=args.threads) for p in paths]
    kw = dict(device="cpu", batch_size=n, cache_size=0)
    unfused = EnsembleSegmenter(members, fuse=False, **kw).fit()
    fused = EnsembleSegmenter(members, fuse=True, fused_stats="graph", **kw).fit()
    fused_np = EnsembleSegmenter(members, fuse=True, fused_stats="numpy", **kw).fit()

    calls = {f"member_{i}": (lambda s=s: s.transform(X)) for i, s in enumerate(segs)}
    calls.update(
        {
            "ensemble_unfused": lambda: unfused.predict_with_uncertainty(X, kinds=KINDS),
            "ensemble_fused_graph_stats": lambda: fused.predict_with_uncertainty(X, kinds=KINDS),
            "ensemble_fused_logits_numpy_stats": lambda: fused_np.predict_with_uncertainty(
                X, kinds=KINDS
            ),
            "ensemble_fused_graph_stats_predict_proba": lambda: fused.predict_proba(X),
            "ensemble_unfused_with_variance": lambda: unfused.predict_with_uncertainty(
                X, kinds=(*KINDS, "variance")
            ),
        }
    )
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(args.warmup + args.repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = sum(med[f"member_{i}"] for i in range(len(paths)))
    return {
        "n_images": n,
        "median_s": med,
        "all_s": times,
        "sum_of_members_s": base,
        "overhead": {k: med[k] / base - 1 for k in med if k.startswith("ensemble")},
    }


def quality(paths, X, y) -> tuple[dict, dict]:
    roi = metrics.foreground_roi(y, margin=10)

    def scores(proba):
        pred = proba.argmax(1)
        return {
            "nll": metrics.negative_log_likelihood(proba, y),
            "ece": metrics.expected_calibration_error(proba, y, n_bins=15),
            "brier": metrics.brier_score(proba, y),
            "nll_roi": metrics.negative_log_likelihood(proba, y, mask=roi),
            "ece_roi": metrics.expected_calibration_error(proba, y, n_bins=15, mask=roi),
            "mean_dice": float(np.nanmean(metrics.dice_score(pred, y, n_classes=proba.shape[1]))),
        }

    X_val, y_val = datasets.load_brain_tissue("val")
    rows, rows_t, temps = {}, {}, {}
    for i, p in enumerate(paths):
        seg = OnnxSegmenter(p, device="cpu").fit()
        name = f"member_{i} ({Path(p).name})"
        z = seg.transform(X)
        rows[name] = scores(_softmax(z))
        cal = TemperatureCalibrator().fit(seg.transform(X_val), y_val)
        temps[name] = cal.temperature_
        rows_t[name] = scores(cal.predict_proba(z))
    member_rows = list(rows.values())
    rows["average member"] = {
        k: float(np.mean([r[k] for r in member_rows])) for k in member_rows[0]
    }
    ens = EnsembleSegmenter(paths, device="cpu").fit()
    proba, maps = ens.predict_with_uncertainty(X, kinds=KINDS)
    rows["ensemble"] = scores(proba)
    rows["average member + temperature"] = {
        k: float(np.mean([r[k] for r in rows_t.values()])) for k in member_rows[0]
    }
    cal = TemperatureCalibrator().fit(ens.transform(X_val), y_val)
    temps["ensemble"] = cal.temperature_
    rows["ensemble + temperature"] = scores(cal.predict_proba(ens.transform(X)))
    tta = EnsembleSegmenter(paths, device="cpu", tta="flips").fit()
    rows["ensemble + flips"] = scores(tta.predict_proba(X))
    pred = proba.argmax(1)
    h, mi = maps["entropy"], maps["mutual_information"]
    checks = {
        "mi_min": float(mi.min()),
        "max_mi_minus_entropy": float((mi - h).max()),
        "mi_in_0_entropy": bool((mi >= 0).all() and (mi <= h + 1e-6).all()),
        "ueo_entropy": float(metrics.uncertainty_error_overlap(h, pred, y)),
        "ueo_mutual_information": float(metrics.uncertainty_error_overlap(mi, pred, y)),
        "ueo_expected_entropy": float(
            metrics.uncertainty_error_overlap(maps["expected_entropy"], pred, y)
        ),
        "temperatures_fit_on_val": temps,
    }
    return rows, {"checks": checks, "proba": proba, "maps": maps}


def figure(X, y, proba, maps, path: Path) -> list[int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = proba.argmax(1)
    err = pred != y
    idx = [int(i) for i in np.argsort(err.reshape(len(y), -1).sum(1))[-3:][::-1]]
    cols = [
        ("image", None),
        ("truth", None),
        ("prediction", None),
        ("error", None),
        ("entropy", maps["entropy"]),
        ("mutual information", maps["mutual_information"]),
    ]
    fig, axes = plt.subplots(3, 6, figsize=(13, 6.6))
    for r, i in enumerate(idx):
        panels = [X[i, 0], y[i], pred[i], err[i], maps["entropy"][i], maps["mutual_information"][i]]
        for c, ((title, _), img) in enumerate(zip(cols, panels, strict=True)):
            ax = axes[r, c]
            cmap = {0: "gray", 1: "viridis", 2: "viridis", 3: "Reds"}.get(c, "magma")
            lim = {1: (0, proba.shape[1] - 1), 2: (0, proba.shape[1] - 1), 3: (0, 1)}.get(c)
            im = ax.imshow(
                img,
                cmap=cmap,
                interpolation="nearest",
                vmin=None if lim is None else lim[0],
                vmax=None if lim is None else lim[1],
            )
            if c >= 4:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
        axes[r, 0].set_ylabel(f"test image {i}\n{int(err[i].sum())} wrong px")
    fig.suptitle("EnsembleSegmenter on the reference zoo: uncertainty beside the errors (nats)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return idx


def table(result: dict) -> str:
    t = result["timing"]
    lines = [
        f"Batch of {t['n_images']} test images 128x128, CPU; median of "
        f"{result['settings']['repeats']} rounds after {result['settings']['warmup']} "
        "warm-up rounds.",
        "",
        "| what | median s | overhead vs sum of members |",
        "|---|---:|---:|",
    ]
    for k, v in t["median_s"].items():
        ov = t["overhead"].get(k)
        lines.append(f"| {k} | {v:.4f} | {'' if ov is None else f'{100 * ov:+.1f}%'} |")
    lines.append(f"| sum of members' transform | {t['sum_of_members_s']:.4f} | |")
    lines += [
        "",
        "| model | NLL | ECE | Brier | NLL (ROI) | ECE (ROI) | mean Dice |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["quality"].items():
        lines.append(
            f"| {name} | {r['nll']:.4f} | {r['ece']:.4f} | {r['brier']:.4f} | "
            f"{r['nll_roi']:.4f} | {r['ece_roi']:.4f} | {r['mean_dice']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.models is not None:
        paths = sorted(str(p) for p in args.models.glob("*.onnx"))
    else:
        paths = datasets.reference_models()
    X, y = datasets.load_brain_tissue("test")
    rng = np.random.default_rng(0)
    sel = np.sort(rng.choice(len(X), size=min(args.n_images, len(X)), replace=False))
    t = timing(paths, np.ascontiguousarray(X[sel]), args)
    rows, extra = quality(paths, X, y)
    import onnxruntime

    result = {
        "benchmark": "ensemble",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "note": "2 CPU cores shared with other processes; timings are noisy",
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "settings": {
            "models": [Path(p).name for p in paths],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
        },
        "timing": t,
        "quality": rows,
        "checks": extra["checks"],
    }
    if not args.no_figure:
        result["figure_images"] = figure(X, y, extra["proba"], extra["maps"], args.figure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    c = result["checks"]
    text += (
        f"\n\nMI in [0, entropy] on every test voxel: {c['mi_in_0_entropy']} (min MI "
        f"{c['mi_min']:.2e}). UEO (Jungo & Reyes) of entropy {c['ueo_entropy']:.3f}, "
        f"expected entropy {c['ueo_expected_entropy']:.3f}, MI "
        f"{c['ueo_mutual_information']:.3f}."
    )
    if not args.no_figure:
        text += (
            "\n\n![uncertainty beside errors](figures/ensemble_uncertainty.png)\n\n"
            f"Test images {result['figure_images']} (the three with the most wrong pixels)."
        )
    if str(args.doc) and args.doc.exists():
        page = args.doc.read_text()
        start, end = "<!-- results:start", "<!-- results:end -->"
        if start in page and end in page:
            head = page[: page.index(start)]
            first = page[page.index(start) :].split("\n", 1)[0]
            tail = page[page.index(end) :]
            args.doc.write_text(f"{head}{first}\n{text}\n{tail}")
    print(text)
    print(json.dumps(result["checks"], indent=2))
    return result


if __name__ == "__main__":
    main()
