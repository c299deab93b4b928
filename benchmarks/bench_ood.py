"""OOD detection on the embedded brain data: setting ablation, evaluation table, overhead.

1. Ablation (choosing defaults): every detector setting is fitted on the train split of the
   zoo's first member and scored with the **val** split as in-distribution against **synthetic
   tuning shifts**: the val split corrupted with every ``datasets.CORRUPTIONS`` kind at
   severities other than the repository's OOD faults (``TUNE_SHIFTS``). Defaults are chosen on
   that tuning mean only. All ``datasets.OOD_KINDS`` (foreign modalities, the faults, wrong
   orientation) are held out: the "held-out" columns confirm, they never choose. The test split
   is not used for choosing.
2. Evaluation: each detector with its library defaults (the uncertainty baseline also on the
   whole ensemble, with mutual information) is fitted on train and scored with the **test**
   split against every ``datasets.OOD_KINDS``: AUROC, AUPR-Out, FPR at 95% TPR, and the
   fraction flagged at ``offset_``.
3. Overhead: ``score_samples`` of the default spectral detector vs plain ``transform`` of the
   same network on the test split (medians of interleaved repeats after warm-up).

The ablation extracts each split's feature maps once and computes the detectors' scores from
them with this file's own functions (spectral signatures from the public
``uqseg.ood.adaptive_avg_pool``/``singular_values``; neighbour distances and the
Mahalanobis score with scikit-learn, as the detectors define them), not through each
detector's ``fit``: that would run the network again for every setting. The evaluation (2)
and the overhead (3) call the detectors' public ``fit``/``score_samples``.

Writes ``benchmarks/results/ood.json``, ``docs/figures/ood_scores.png`` and the tables between
the ``<!-- bench:... -->`` markers of ``docs/ood.md``.

Usage::

    python benchmarks/bench_ood.py            # about 6 min on 2 busy CPU cores
    python benchmarks/bench_ood.py --model m.onnx --no-docs   # another network, no doc update
"""

from __future__ import annotations

import argparse
import contextlib
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
from common import time_round_robin
from sklearn.neighbors import NearestNeighbors

from uqseg import datasets, metrics
from uqseg.ensemble import EnsembleSegmenter
from uqseg.ood import (
    KNNOODDetector,
    MahalanobisOODDetector,
    SpectralOODDetector,
    Spectrum,
    UncertaintyOODDetector,
    adaptive_avg_pool,
    singular_values,
)
from uqseg.segmenter import OnnxSegmenter

ROOT = Path(__file__).resolve().parents[1]
# synthetic tuning shifts of the val split: (corruption, severity); the repository's faults use
# noise 0.6, ghosting 0.8, bias 1.0, blur 0.75 and 90-degree rotations/flips (held out)
TUNE_SHIFTS = {"noise": 0.3, "ghosting": 0.4, "bias": 0.5, "blur": 0.4, "gamma": 0.5,
               "contrast": 0.5, "downsample": 0.5, "rotate": 0.5}
TUNE_SEED = 100
HELD_OUT_KINDS = tuple(datasets.OOD_KINDS)
# the zoo exports every block by name; a model exported with only decoder_last and bottleneck
# named is reached through the other blocks' graph tensor names (checked by shape)
LAYER_TENSORS = {"enc1": "relu_1", "enc2": "relu_3", "enc3": "relu_5", "bottleneck": "bottleneck",
                 "dec1": "relu_9", "dec2": "relu_11", "decoder_last": "decoder_last"}
LAYER_SHAPES = {"enc1": (8, 128), "enc2": (16, 64), "enc3": (32, 32), "bottleneck": (64, 16),
                "dec1": (32, 32), "dec2": (16, 64), "decoder_last": (8, 128)}
BASE = 16  # feature maps are cached pooled to 16x16 (exact for grids 16, 8, 4)
GRIDS = (4, 8, 16)
CHUNK = 32
FOLDS = 5  # training distances cross-fitted over contiguous blocks, as SpectralOODDetector
SPECTRAL_SETS = [("decoder_last", "bottleneck"), ("dec2", "bottleneck"),
                 ("dec1", "dec2", "bottleneck"), tuple(LAYER_TENSORS)]
DOC_ROWS = 12  # ablation rows per detector in the docs (best tuning mean first; JSON has all)


# ---------------------------------------------------------------------- ablation features
def tensor_of(seg, name):
    """The graph tensor of block ``name``: its exported name, else the zoo's tensor name."""
    return name if name in seg.feature_layers_ else LAYER_TENSORS[name]


def collect(seg, X, names):
    """Feature maps of every ablation layer, adaptive-average-pooled to BASE x BASE."""
    acc = {n: [] for n in names}
    for i in range(0, len(X), CHUNK):
        out = seg.run(X[i:i + CHUNK], layers=[tensor_of(seg, n) for n in names])
        for n in names:
            f = out[tensor_of(seg, n)]
            if i == 0 and (f.shape[1], f.shape[-1]) != LAYER_SHAPES[n]:
                raise ValueError(f"{n} ({tensor_of(seg, n)}) has shape {f.shape}, expected "
                                 f"{LAYER_SHAPES[n]}: not the reference zoo's graph")
            acc[n].append(adaptive_avg_pool(f, BASE))
    return {n: np.concatenate(v) for n, v in acc.items()}


def spectral_sig(F, layers, grid, regions=1, eps=1e-6):
    """L2-normalised log singular values per layer (and per region block), concatenated."""
    parts = []
    for ly in layers:
        p = F[ly] if grid == BASE else adaptive_avg_pool(F[ly], grid)
        n, c = p.shape[:2]
        b = grid // regions
        blocks = p.reshape(n, c, regions, b, regions, b).transpose(0, 2, 4, 1, 3, 5)
        s = np.log(singular_values(blocks.reshape(n * regions ** 2, c, b * b)) + eps)
        s /= np.linalg.norm(s, axis=1, keepdims=True)
        parts.append(s.reshape(n, -1) / regions)
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def layout_desc(F_tr, F, layer, grid, n_comp):
    """Standardised, whitened PCA coordinates of features pooled to grid x grid."""
    def flat(f):
        return adaptive_avg_pool(f, grid).reshape(len(f), -1)
    L_tr = flat(F_tr[layer])
    mu, sd = L_tr.mean(0), L_tr.std(0)
    sd = np.maximum(sd, 0.01 * sd.max())
    _, sv, vt = np.linalg.svd((L_tr - mu) / sd, full_matrices=False)
    m = min(n_comp, len(L_tr) // 4, int(np.sum(sv >= 1e-3 * sv[0])))
    W = vt[:m] * (np.sqrt(len(L_tr)) / sv[:m])[:, None]
    return ((L_tr - mu) / sd) @ W.T, ((flat(F[layer]) - mu) / sd) @ W.T


def _knn_distance(train, query, k, metric):
    """Distance of each query row to its k-th nearest training row (scikit-learn, brute force:
    the k-NN and spectral detectors' neighbour distance)."""
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(train)
    return nn.kneighbors(query, n_neighbors=k)[0][:, k - 1]


def mahalanobis_scores(train, others, n_components):
    """MahalanobisOODDetector's score (minus the Ledoit-Wolf Mahalanobis distance, after a PCA
    fitted on the training rows when ``n_components`` is set) of pooled features extracted
    once, computed with scikit-learn so that the sweep needs no network pass per setting."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    proj = (lambda F: F) if n_components is None else PCA(
        n_components, svd_solver="full").fit(train).transform
    lw = LedoitWolf().fit(proj(train))
    return {n: -np.sqrt(np.maximum(lw.mahalanobis(proj(g)), 0.0)) for n, g in others.items()}


def xfit_distances(train, k):
    """k-th nearest distance of each training row to the other contiguous folds."""
    folds = np.arange(len(train)) * FOLDS // len(train)
    d = np.empty(len(train))
    for f in range(FOLDS):
        out = folds == f
        d[out] = _knn_distance(train[~out], train[out], k, "euclidean")
    return d


def dists(train, others, k):
    """(cross-fitted training distances, {name: distance to k-th nearest training row})."""
    return (xfit_distances(train, k),
            {n: _knn_distance(train, v, k, "euclidean") for n, v in others.items()})


def z(d, ref):
    """Distances as z-scores of the training (reference) distances."""
    return (d - ref.mean()) / ref.std()


def ablation(seg, data):
    names = list(LAYER_TENSORS)
    feats = {name: collect(seg, X, names) for name, X in data.items()}
    tr = feats.pop("train")
    rows = []
    layer_sets = [(n,) for n in names] + SPECTRAL_SETS
    spec_cache = {}
    for layers, grid, k in product(layer_sets, GRIDS, (1, 5)):
        S = {n: spectral_sig(f, layers, grid) for n, f in feats.items()}
        ref, d = dists(spectral_sig(tr, layers, grid), S, k)
        spec_cache[layers, grid, k] = (ref, d)
        rows.append(summary("spectrum", dict(layer=lname(layers), grid=grid, n_neighbors=k),
                            {n: -v for n, v in d.items()}, -ref))
    for layers, (grid, reg) in product([("decoder_last",), ("decoder_last", "bottleneck")],
                                       ((8, 2), (16, 2), (16, 4))):
        S = {n: spectral_sig(f, layers, grid, reg) for n, f in feats.items()}
        _, d = dists(spectral_sig(tr, layers, grid, reg), S, 1)
        rows.append(summary("spectrum, regions", dict(layer=lname(layers), grid=grid,
                                                      regions=reg, n_neighbors=1),
                            {n: -v for n, v in d.items()}))
    layouts = {}
    for lay, (g, nc), kl in product(("decoder_last", "dec2", "bottleneck"),
                                    ((2, 16), (4, 32), (4, 64)), (1, 5)):
        P_tr, _ = layout_desc(tr, tr, lay, g, nc)
        layouts[lay, g, nc, kl] = dists(P_tr, {n: layout_desc(tr, f, lay, g, nc)[1]
                                               for n, f in feats.items()}, kl)
        rows.append(summary("layout only", dict(layout_layer=lay, layout_grid=g,
                                                 layout_components=nc, layout_neighbors=kl),
                            {n: -v for n, v in layouts[lay, g, nc, kl][1].items()}))
    for layers, (lay, g, nc, kl), comb in product(SPECTRAL_SETS, layouts, ("mean", "max")):
        reduce = np.mean if comb == "mean" else np.max
        parts = [spec_cache[layers, 16, 1], layouts[lay, g, nc, kl]]
        score = {n: -reduce([z(d[n], ref) for ref, d in parts], axis=0) for n in feats}
        train = -reduce([z(ref, ref) for ref, _ in parts], axis=0)
        rows.append(summary("spectrum+layout", dict(layer=lname(layers), grid=16,
                                                     layout_layer=lay, layout_grid=g,
                                                     layout_components=nc, layout_neighbors=kl,
                                                     combine=comb),
                            score, train))
    gap = {n: {ly: f[ly].mean(axis=(2, 3)) for ly in ("bottleneck", "decoder_last")}
           for n, f in feats.items()}
    gap_tr = {ly: tr[ly].mean(axis=(2, 3)) for ly in ("bottleneck", "decoder_last")}
    for ly, k in product(("bottleneck", "decoder_last"), (1, 5, 10)):
        def unit(v):
            return v / np.linalg.norm(v, axis=1, keepdims=True)
        _, d = dists(unit(gap_tr[ly]), {n: unit(g[ly]) for n, g in gap.items()}, k)
        rows.append(summary("knn", dict(layer=ly, k=k), {n: -v for n, v in d.items()}))
    for ly, nc in product(("bottleneck", "decoder_last"), (None, 4, 8, 16)):
        if nc is not None and nc > gap_tr[ly].shape[1]:
            continue
        score = mahalanobis_scores(gap_tr[ly], {n: g[ly] for n, g in gap.items()}, nc)
        rows.append(summary("mahalanobis", dict(layer=ly, n_components=nc), score))
    return rows


def lname(layers):
    return "all 7" if len(layers) == len(LAYER_TENSORS) else "+".join(layers)


def summary(detector, setting, score, train=None):
    a = {k: metrics.ood_auroc(score["val"], score[k])
         for k in ["syn_" + t for t in TUNE_SHIFTS] + list(HELD_OUT_KINDS)}
    return {"detector": detector, "setting": setting, "auroc": a,
            "tune_mean": float(np.mean([a["syn_" + t] for t in TUNE_SHIFTS])),
            "held_out_mean": float(np.mean([a[k] for k in HELD_OUT_KINDS])),
            "held_out_min": float(min(a[k] for k in HELD_OUT_KINDS)),
            # fraction of val flagged at the contamination-0.05 offset (target 0.05)
            "val_flagged": None if train is None else float(
                np.mean(score["val"] < np.percentile(train, 5)))}


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


BLOCK = 3  # consecutive calls timed together in the overhead measurement


def overhead(seg, X_fit, X, repeats):
    """``score_samples`` vs ``transform``, interleaved; also ``score_samples`` with BLAS left
    free to use its own threads (uqseg keeps it on one: ``uqseg._numeric.one_blas_thread``),
    to show what that limit buys. Wall and process CPU time."""
    from uqseg import _numeric
    from uqseg.ood import _base

    det = SpectralOODDetector(seg).fit(X_fit)

    def free_blas():
        with _patched(_base, "one_blas_thread", contextlib.nullcontext):
            return det.score_samples(X)

    calls = {"transform": lambda: seg.transform(X), "score_samples": lambda: det.score_samples(X),
             "score_samples_blas_threads": free_blas}
    # blocks: each call is timed after one of its own kind, as in a stream (a call's
    # busy-waiting threads slow the next call, whatever it is)
    t = time_round_robin(calls, repeats=repeats, warmup=1, block=BLOCK)
    wall = {k: v["times_s"] for k, v in t.items()}
    p, s = t["transform"]["median_s"], t["score_samples"]["median_s"]
    b = t["score_samples_blas_threads"]["median_s"]
    pc, sc = t["transform"]["cpu_median_s"], t["score_samples"]["cpu_median_s"]
    return {"n_images": len(X), "repeats": repeats, "block": BLOCK, "transform_s": p,
            "score_samples_s": s,
            "overhead": s / p - 1, "score_samples_blas_threads_s": b,
            "overhead_blas_threads": b / p - 1, "transform_cpu_s": pc,
            "score_samples_cpu_s": sc, "overhead_cpu": sc / pc - 1,
            "blas_limit": _numeric.__name__ + ".one_blas_thread",
            "transform_all_s": wall["transform"], "score_samples_all_s": wall["score_samples"],
            "score_samples_blas_threads_all_s": wall["score_samples_blas_threads"]}


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# ---------------------------------------------------------------------- outputs
def fmt_setting(s):
    return ", ".join(f"{k}={v}" for k, v in s.items())


def tables(res) -> dict:
    ev = res["evaluation"]
    head = "| kind | " + " | ".join(ev) + " |\n|---|" + "---|" * len(ev) + "\n"

    def cells(key, fmt):
        return "".join(f"| {kind} | " + " | ".join(
            format(ev[d]["kinds"][kind][key], fmt) for d in ev) + " |\n"
            for kind in datasets.OOD_KINDS)

    mean = "| **mean** | " + " | ".join(
        f"**{np.mean([v['auroc'] for v in ev[d]['kinds'].values()]):.3f}**" for d in ev) + " |\n"
    flagged = "| test flagged at offset_ | " + " | ".join(
        f"{ev[d]['test_flagged']:.2f}" for d in ev) + " |\n"
    sp = ev["spectral"]
    det = "| kind | flagged at offset_ (contamination 0.05) | flagged at karimi threshold |\n" \
          "|---|---|---|\n" + f"| test (in-distribution) | {sp['test_flagged']:.2f} | " \
          f"{sp['karimi']['test_flagged']:.2f} |\n" + "".join(
              f"| {k} | {sp['kinds'][k]['flagged']:.2f} | {sp['karimi'][k]:.2f} |\n"
              for k in datasets.OOD_KINDS)
    abl = ("| detector | setting | tune: val vs synthetic shifts | held-out mean | held-out min "
           "| orientation | val flagged at offset_ |\n|---|---|---|---|---|---|---|\n")
    rows = sorted(res["ablation"], key=lambda r: (r["detector"], -r["tune_mean"]))
    rows = [r for i, r in enumerate(rows)
            if i < DOC_ROWS or rows[i - DOC_ROWS]["detector"] != r["detector"]]
    abl += "".join(f"| {r['detector']} | {fmt_setting(r['setting'])} | {r['tune_mean']:.3f} | "
                   f"{r['held_out_mean']:.3f} | {r['held_out_min']:.3f} | "
                   f"{r['auroc']['orientation']:.3f} | "
                   f"{'-' if r.get('val_flagged') is None else format(r['val_flagged'], '.2f')} |\n"
                   for r in rows)
    o = res["overhead"]
    ovh = ("| transform (s) | spectral score_samples (s) | overhead | overhead, process CPU "
           "time | score_samples with BLAS on its own threads (s) | its overhead |\n"
           "|---|---|---|---|---|---|\n"
           f"| {o['transform_s']:.3f} | {o['score_samples_s']:.3f} | "
           f"{100 * o['overhead']:+.1f}% | {100 * o.get('overhead_cpu', float('nan')):+.1f}% | "
           f"{o.get('score_samples_blas_threads_s', float('nan')):.3f} | "
           f"{100 * o.get('overhead_blas_threads', float('nan')):+.1f}% |\n")
    return {"eval": head + cells("auroc", ".3f") + mean + flagged,
            "aupr": head + cells("aupr", ".3f"), "fpr": head + cells("fpr95", ".2f"),
            "detection": det, "ablation": abl, "overhead": ovh}


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

    dets = [d for d in ("spectral", "spectral_karimi", "ensemble_mi") if d in res["evaluation"]]
    fig, axes = plt.subplots(1, len(dets), figsize=(5 * len(dets), 4))
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
    p.add_argument("--overhead-only", action="store_true",
                   help="only (3): updates the overhead entry of --out and its docs table")
    args = p.parse_args(argv)
    paths = datasets.reference_models() if args.model is None else [args.model]
    seg = OnnxSegmenter(paths[0]).fit()
    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, _ = datasets.load_brain_tissue("val")
    X_te, _ = datasets.load_brain_tissue("test")
    if args.overhead_only:
        res = json.loads(args.out.read_text(encoding="utf-8"))
        res["overhead"] = overhead(seg, X_tr, X_te, args.repeats)
        res["overhead"]["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        print(json.dumps({k: v for k, v in res["overhead"].items() if not k.endswith("all_s")},
                         indent=1))
        args.out.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
        if not args.no_docs:
            write_docs(res, ROOT / "docs" / "ood.md")
        return
    ood = {k: datasets.load_ood(k) for k in datasets.OOD_KINDS}
    res = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                       "sklearn": sklearn.__version__},
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "model": Path(paths[0]).name, "feature_layers": seg.feature_layers_,
           "tune_shifts": TUNE_SHIFTS, "tune_seed": TUNE_SEED, "held_out_kinds": HELD_OUT_KINDS,
           "layer_tensors": LAYER_TENSORS}
    print("ablation ...", flush=True)
    syn = {"syn_" + k: datasets.corrupt(X_val, k, v, seed=TUNE_SEED)
           for k, v in TUNE_SHIFTS.items()}
    res["ablation"] = ablation(seg, {"train": X_tr, "val": X_val, **syn, **ood})
    for d in sorted({r["detector"] for r in res["ablation"]}):
        best = max((r for r in res["ablation"] if r["detector"] == d),
                   key=lambda r: r["tune_mean"])
        print(f"best {d} on val vs tune kinds: {fmt_setting(best['setting'])} "
              f"tune {best['tune_mean']:.3f} held-out {best['held_out_mean']:.3f}", flush=True)
    detectors = {
        "spectral": SpectralOODDetector(seg),
        "spectrum_only": SpectralOODDetector(seg, descriptors=[Spectrum()]),
        "spectral_karimi": SpectralOODDetector(seg, layer="decoder_last",
                                               descriptors=[Spectrum(grid=8)]),
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
        print(f"  mean AUROC {res['evaluation'][name]['mean_auroc']:.3f}  " + " ".join(
            f"{k}={v['auroc']:.3f}" for k, v in res["evaluation"][name]["kinds"].items()),
            flush=True)
    print("overhead ...", flush=True)
    res["overhead"] = overhead(seg, X_tr, X_te, args.repeats)
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
