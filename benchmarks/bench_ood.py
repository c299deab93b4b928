"""OOD detection on the embedded brain data: setting ablation, evaluation table, overhead.

1. Ablation (choosing defaults): every detector setting is fitted on the train split of the
   zoo's first member and scored with the **val** split as in-distribution against the tuning
   kinds (``TUNE_KINDS``); the held-out kinds confirm. The test split is not used for choosing.
2. Evaluation: each detector with its library defaults (and the uncertainty baseline also on
   the whole ensemble, with mutual information) is fitted on train and scored with the **test**
   split against every ``datasets.OOD_KINDS``: AUROC, AUPR-Out, FPR at 95% TPR, and the
   fraction flagged at ``offset_``.
3. Overhead: ``score_samples`` of the default spectral detector vs plain ``transform`` of the
   same network on the test split (medians after warm-up).

Writes ``benchmarks/results/ood.json``, ``docs/figures/ood_scores.png`` and the tables between
the ``<!-- bench:... -->`` markers of ``docs/ood.md``.

Usage::

    python benchmarks/bench_ood.py            # about 5 min on 2 busy CPU cores
    python benchmarks/bench_ood.py --model m.onnx --no-docs   # another network, no doc update
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import time
from itertools import product
from pathlib import Path

import numpy as np
import onnxruntime
import sklearn

from uqseg import datasets, metrics
from uqseg.ensemble import EnsembleSegmenter
from uqseg.ood import (
    KNNOODDetector,
    MahalanobisOODDetector,
    SpectralOODDetector,
    UncertaintyOODDetector,
    _knn_distance,
    adaptive_avg_pool,
    singular_values,
)
from uqseg.segmenter import OnnxSegmenter

ROOT = Path(__file__).resolve().parents[1]
TUNE_KINDS = ("ct", "noise", "blur", "orientation")
HELD_OUT_KINDS = tuple(k for k in datasets.OOD_KINDS if k not in TUNE_KINDS)
LAYERS = ("decoder_last", "bottleneck")
GRIDS = (4, 8, 16, None)
CHUNK = 32


def auroc(s_in, outs: dict) -> dict:
    return {k: metrics.ood_auroc(s_in, s) for k, s in outs.items()}


# ---------------------------------------------------------------------- ablation features
def collect(seg, X, layers):
    """Singular values per (layer, grid) and global-average-pooled features per layer."""
    sv = {(ly, g): [] for ly in layers for g in GRIDS}
    gap = {ly: [] for ly in layers}
    for i in range(0, len(X), CHUNK):
        out = seg.run(X[i:i + CHUNK], layers=list(layers))
        for ly in layers:
            f = out[ly]
            gap[ly].append(f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2, dtype=np.float64))
            for g in GRIDS:
                p = f if g is None else adaptive_avg_pool(f, g)
                sv[ly, g].append(singular_values(p.reshape(p.shape[0], p.shape[1], -1)))
    return ({k: np.concatenate(v) for k, v in sv.items()},
            {k: np.concatenate(v) for k, v in gap.items()})


def signature(sv, layers, grid, normalize, eps=1e-6):
    parts = []
    for ly in layers:
        s = np.log(sv[ly, grid] + eps)
        if normalize == "l2":
            s = s / np.linalg.norm(s, axis=1, keepdims=True)
        parts.append(s)
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def ablation(seg, data):
    feats = {name: collect(seg, X, LAYERS) for name, X in data.items()}
    rows = []
    layer_sets = [("decoder_last",), ("bottleneck",), ("bottleneck", "decoder_last")]
    for layers, grid, norm, k in product(layer_sets, GRIDS, ("l2", None), (1, 3, 5)):
        sig = {n: signature(f[0], layers, grid, norm) for n, f in feats.items()}
        score = {n: -_knn_distance(sig["train"], s, k, "euclidean") for n, s in sig.items()
                 if n != "train"}
        rows.append(summary("spectral", dict(layer="+".join(layers), grid=grid,
                                             normalize=norm, n_neighbors=k), score))
    for ly, k in product(LAYERS, (1, 5, 10)):
        g = {n: f[1][ly] / np.linalg.norm(f[1][ly], axis=1, keepdims=True)
             for n, f in feats.items()}
        score = {n: -_knn_distance(g["train"], v, k, "euclidean") for n, v in g.items()
                 if n != "train"}
        rows.append(summary("knn", dict(layer=ly, k=k), score))
    for ly, nc in product(LAYERS, (None, 4, 8, 16)):
        F = {n: f[1][ly] for n, f in feats.items()}
        if nc is not None and nc > F["train"].shape[1]:
            continue
        stats = MahalanobisOODDetector._fit_stats(F["train"], nc)
        score = {n: -MahalanobisOODDetector._distance(v, *stats) for n, v in F.items()
                 if n != "train"}
        rows.append(summary("mahalanobis", dict(layer=ly, n_components=nc), score))
    return rows


def summary(detector, setting, score):
    a = auroc(score["val"], {k: score[k] for k in datasets.OOD_KINDS})
    return {"detector": detector, "setting": setting, "auroc": a,
            "tune_mean": float(np.mean([a[k] for k in TUNE_KINDS])),
            "held_out_mean": float(np.mean([a[k] for k in HELD_OUT_KINDS]))}


# ---------------------------------------------------------------------- evaluation
def evaluate(det, X_tr, X_te, ood):
    t0 = time.perf_counter()
    det.fit(X_tr)
    s_in = det.score_samples(X_te)
    res = {"fit_s": time.perf_counter() - t0, "offset": det.offset_,
           "scores_test": s_in.tolist(), "kinds": {}}
    for kind, X in ood.items():
        s = det.score_samples(X)
        res["kinds"][kind] = {
            "auroc": metrics.ood_auroc(s_in, s), "aupr": metrics.ood_aupr(s_in, s),
            "fpr95": metrics.fpr_at_tpr(s_in, s, tpr=0.95),
            "flagged": float(np.mean(s < det.offset_)), "scores": s.tolist()}
    res["test_flagged"] = float(np.mean(s_in < det.offset_))
    karimi = float(det.train_scores_.mean() - 2.5 * det.train_scores_.std())
    res["karimi"] = {"test_flagged": float(np.mean(s_in < karimi)), **{
        k: float(np.mean(np.array(v["scores"]) < karimi)) for k, v in res["kinds"].items()}}
    res["mean_auroc"] = float(np.mean([v["auroc"] for v in res["kinds"].values()]))
    return res


def overhead(seg, X, repeats):
    det = SpectralOODDetector(seg).fit(X[:40])
    seg.transform(X[:8])
    det.score_samples(X[:8])  # warm-up: sessions with and without feature outputs
    t_plain, t_spec = [], []
    for _ in range(repeats):  # interleaved so both see the same machine load
        t0 = time.perf_counter()
        seg.transform(X)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        det.score_samples(X)
        t_spec.append(time.perf_counter() - t0)
    p, s = float(np.median(t_plain)), float(np.median(t_spec))
    return {"n_images": len(X), "repeats": repeats, "transform_s": p, "score_samples_s": s,
            "overhead": s / p - 1, "transform_all_s": t_plain, "score_samples_all_s": t_spec}


# ---------------------------------------------------------------------- outputs
def fmt_setting(s):
    return ", ".join(f"{k}={v}" for k, v in s.items())


def tables(res) -> dict:
    ev = res["evaluation"]
    head = "| kind | " + " | ".join(ev) + " |\n|---|" + "---|" * len(ev) + "\n"
    body = ""
    for kind in datasets.OOD_KINDS:
        cells = [f"{ev[d]['kinds'][kind]['auroc']:.3f} / {ev[d]['kinds'][kind]['fpr95']:.2f}"
                 for d in ev]
        tag = " (tune)" if kind in TUNE_KINDS else ""
        body += f"| {kind}{tag} | " + " | ".join(cells) + " |\n"
    body += "| **mean AUROC** | " + " | ".join(f"**{ev[d]['mean_auroc']:.3f}**" for d in ev) + \
        " |\n"
    body += "| test flagged at offset_ | " + " | ".join(
        f"{ev[d]['test_flagged']:.2f}" for d in ev) + " |\n"
    aupr = "| kind | " + " | ".join(ev) + " |\n|---|" + "---|" * len(ev) + "\n" + "".join(
        f"| {kind} | " + " | ".join(f"{ev[d]['kinds'][kind]['aupr']:.3f}" for d in ev) + " |\n"
        for kind in datasets.OOD_KINDS)
    sp = ev["spectral"]
    det = "| kind | flagged at offset_ (contamination 0.05) | flagged at karimi threshold |\n" \
          "|---|---|---|\n" + f"| test (in-distribution) | {sp['test_flagged']:.2f} | " \
          f"{sp['karimi']['test_flagged']:.2f} |\n" + "".join(
              f"| {k} | {sp['kinds'][k]['flagged']:.2f} | {sp['karimi'][k]:.2f} |\n"
              for k in datasets.OOD_KINDS)
    abl = "| detector | setting | val vs tune kinds | val vs held-out kinds |\n|---|---|---|---|\n"
    rows = sorted(res["ablation"], key=lambda r: (r["detector"], -r["tune_mean"]))
    abl += "".join(f"| {r['detector']} | {fmt_setting(r['setting'])} | {r['tune_mean']:.3f} | "
                   f"{r['held_out_mean']:.3f} |\n" for r in rows)
    o = res["overhead"]
    ovh = ("| transform (s) | spectral score_samples (s) | overhead |\n|---|---|---|\n"
           f"| {o['transform_s']:.3f} | {o['score_samples_s']:.3f} | "
           f"{100 * o['overhead']:+.1f}% |\n")
    return {"eval": head + body, "aupr": aupr, "detection": det, "ablation": abl, "overhead": ovh}


def write_docs(res, path):
    text = path.read_text(encoding="utf-8")
    for name, table in tables(res).items():
        text = re.sub(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)",
                      lambda m, t=table: m.group(1) + t + m.group(2), text, flags=re.S)
    path.write_text(text, encoding="utf-8")


def figure(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = ["spectral", "uncertainty_entropy"]
    fig, axes = plt.subplots(1, len(dets), figsize=(12, 4))
    for ax, d in zip(axes, dets, strict=True):
        ev = res["evaluation"][d]
        allv = np.concatenate([ev["scores_test"]] + [v["scores"] for v in ev["kinds"].values()])
        bins = np.linspace(allv.min(), allv.max(), 40)
        ax.hist(ev["scores_test"], bins=bins, color="k", alpha=0.6, label="test (in-dist.)")
        for kind, v in ev["kinds"].items():
            ax.hist(v["scores"], bins=bins, histtype="step", label=kind)
        ax.axvline(ev["offset"], color="r", ls="--", label="offset_")
        ax.set_title(f"{d}: score_samples")
        ax.set_xlabel("score (higher = more in-distribution)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="ONNX network (default: the zoo's first)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ood.json")
    args = p.parse_args(argv)
    paths = datasets.reference_models() if args.model is None else [args.model]
    seg = OnnxSegmenter(paths[0]).fit()
    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, _ = datasets.load_brain_tissue("val")
    X_te, _ = datasets.load_brain_tissue("test")
    ood = {k: datasets.load_ood(k) for k in datasets.OOD_KINDS}
    res = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                       "sklearn": sklearn.__version__},
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "model": Path(paths[0]).name, "feature_layers": seg.feature_layers_,
           "tune_kinds": TUNE_KINDS, "held_out_kinds": HELD_OUT_KINDS}
    print("ablation ...", flush=True)
    res["ablation"] = ablation(seg, {"train": X_tr, "val": X_val, **ood})
    for d in ("spectral", "knn", "mahalanobis"):
        best = max((r for r in res["ablation"] if r["detector"] == d),
                   key=lambda r: r["tune_mean"])
        print(f"best {d} on val vs tune kinds: {fmt_setting(best['setting'])} "
              f"tune {best['tune_mean']:.3f} held-out {best['held_out_mean']:.3f}", flush=True)
    detectors = {
        "spectral": SpectralOODDetector(seg),
        "spectral_karimi_layers": SpectralOODDetector(seg, layer=["bottleneck", "decoder_last"]),
        "mahalanobis": MahalanobisOODDetector(seg),
        "knn": KNNOODDetector(seg),
        "uncertainty_entropy": UncertaintyOODDetector(seg),
        "uncertainty_fg_entropy": UncertaintyOODDetector(seg, region="foreground"),
        "uncertainty_msp": UncertaintyOODDetector(seg, score="max_softmax"),
    }
    if len(paths) > 1:
        ens = EnsembleSegmenter(paths).fit()
        detectors["ensemble_entropy"] = UncertaintyOODDetector(ens)
        detectors["ensemble_mi"] = UncertaintyOODDetector(ens, score="mutual_information")
    res["evaluation"] = {}
    for name, det in detectors.items():
        print(f"evaluate {name} ...", flush=True)
        res["evaluation"][name] = evaluate(det, X_tr, X_te, ood)
        print(f"  mean AUROC {res['evaluation'][name]['mean_auroc']:.3f}", flush=True)
    print("overhead ...", flush=True)
    res["overhead"] = overhead(seg, X_te, args.repeats)
    print(f"  transform {res['overhead']['transform_s']:.3f}s, score_samples "
          f"{res['overhead']['score_samples_s']:.3f}s ({100 * res['overhead']['overhead']:+.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    if not args.no_docs:
        figure(res, ROOT / "docs" / "figures" / "ood_scores.png")
        write_docs(res, ROOT / "docs" / "ood.md")
    for name, table in tables(res).items():
        if name != "ablation":
            print(table)


if __name__ == "__main__":
    main()
