"""Local temperature scaling on the reference zoo and its ensemble (issue 19).

Every calibrator is fitted on the val split and scored on the test split (ECE with 15
equal-width bins, top-label; NLL; Brier): raw network, global temperature fitted by NLL,
global temperature fitted by ECE (``objective="ece"``), class-wise temperatures and the local
map (``mode="local"``, fitted as a user would: ``TemperatureCalibrator(seg, mode="local")``
on the images, so the image intensity is one of its features). Also counted: labels changed by
the local map (argmax of its probabilities vs the network's), and the prediction cost,
``cal.predict_proba(X)`` against the network's own ``seg.predict_proba(X)`` on the test split,
timed round-robin in the same run.

Targets (issue 19, worst member by test ECE and the ensemble): local ECE <= 0.3x raw and
<= 0.5x the global NLL fit's, NLL below the global fit's, no label changed, prediction
<= 1.10x plain inference.

The second, different network: ``--monai-seeds 3`` (default) trains a MONAI ``UNet`` per seed
on the train split (cross-entropy, ``--monai-epochs``), exports it with ``torch.onnx.export``
and scores it like a zoo member (needs the ``train`` extra; skipped without torch/monai).

Run: ``python benchmarks/bench_local_calibration.py`` (about 20 minutes on 2 busy cores) ->
``benchmarks/results/local_calibration.json``, ``docs/figures/local_temperature.png`` and the
tables in ``docs/calibration.md`` (the ``local-results`` and ``local-monai`` blocks).
``--models a.onnx b.onnx`` runs other networks; ``--no-write`` only prints.
``--objective-sweep``: only the top-label weight sweep and the class-wise local probe on the
worst member and the ensemble -> ``local_calibration_objective.json``, ``local-objective``.

Everything runs through the public API, except the class-wise local probe of
``--objective-sweep``: it fits its own per-class map on the local calibrator's feature maps,
which no public call returns, so it reads them from ``uqseg._local.local_features`` (with the
calibrator's ``_scales()``). The local calibrator's scores come from its public
``predict_proba``/``temperature_map`` (the network runs again on the test split).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine_record, time_round_robin, write_doc_section, write_json  # noqa: E402

from uqseg import EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator, datasets, metrics  # noqa: E402
from uqseg.uncertainty import softmax  # noqa: E402

DOC = ROOT / "docs" / "calibration.md"
FIG = ROOT / "docs" / "figures" / "local_temperature.png"
OUT = ROOT / "benchmarks" / "results" / "local_calibration.json"
METHODS = ("raw", "global_nll", "global_ece", "classwise", "local")


class _NoSpin:
    """While active, new ONNX Runtime sessions are built without spinning worker threads
    (``session.intra_op.allow_spinning=0``; uqseg's default spins). Spinning workers keep a
    core busy after each inference call, which slows whatever numpy work follows it."""

    def __enter__(self):
        from uqseg.backends import onnxruntime as ort_backend

        self.cls = ort_backend.OnnxRuntimeRunner
        self.orig = self.cls.__init__
        orig = self.orig

        def init(runner, *args, **kwargs):
            kwargs["spin"] = False
            orig(runner, *args, **kwargs)

        self.cls.__init__ = init

    def __exit__(self, *exc):
        self.cls.__init__ = self.orig


def _without_spinning(seg, local, X):
    """A copy of the segmenter whose sessions do not spin, and of the fitted local
    calibrator reading it (sessions are built lazily: the first call builds them)."""
    from sklearn.base import clone

    seg2 = clone(seg).fit()
    with _NoSpin():
        seg2.transform(X[:1])
    local2 = TemperatureCalibrator(seg2, mode="local")
    local2.__dict__.update({k: v for k, v in local.__dict__.items() if k.endswith("_")})
    local2.estimator_ = seg2
    return seg2, local2


def scores(proba, y):
    return {"ece": metrics.expected_calibration_error(proba, y),
            "nll": metrics.negative_log_likelihood(proba, y),
            "brier": metrics.brier_score(proba, y)}


def evaluate(name, seg, data, repeats, n_time):
    """All calibrators for one segmenter; returns the record and what the figure needs."""
    X_val, y_val, X_te, y_te = data
    z_val, z_te = seg.transform(X_val), seg.transform(X_te)
    raw_labels = z_te.argmax(axis=1)
    rec = {"member": name, "scores": {}, "fit_seconds": {}}
    rec["scores"]["raw"] = scores(softmax(z_te), y_te)
    cals = {"global_nll": TemperatureCalibrator(),
            "global_ece": TemperatureCalibrator(objective="ece"),
            "classwise": TemperatureCalibrator(mode="classwise")}
    for key, cal in cals.items():
        t = time.perf_counter()
        cal.fit(z_val, y_val)
        rec["fit_seconds"][key] = time.perf_counter() - t
        proba = cal.predict_proba(z_te)
        rec["scores"][key] = scores(proba, y_te)
        rec[f"{key}_labels_changed"] = int((proba.argmax(axis=1) != raw_labels).sum())
    rec["global_temperature"] = cals["global_nll"].temperature_
    rec["global_ece_temperature"] = cals["global_ece"].temperature_
    # as a user would: from the segmenter, on the images (the intensity is a feature)
    local = TemperatureCalibrator(seg, mode="local")
    t = time.perf_counter()
    local.fit(X_val, y_val)
    rec["fit_seconds"]["local"] = time.perf_counter() - t
    # the public calls run the network on the test split again (its logits are deterministic)
    tmap = local.temperature_map(X_te)
    proba = local.predict_proba(X_te)
    rec["scores"]["local"] = scores(proba, y_te)
    rec["local_labels_changed"] = int((proba.argmax(axis=1) != raw_labels).sum())
    rec["local"] = {"feature_names": local.feature_names_, "coef": local.coef_.tolist(),
                    "intercept": local.intercept_, "n_iter": local.n_iter_,
                    "temperature_quantiles": np.quantile(tmap, [0.01, 0.25, 0.5, 0.75, 0.99]
                                                         ).tolist()}
    # prediction cost: the public paths on the first n_time test images, round-robin; the
    # global calibrator (no extra work beyond a division) shows the timing noise
    glob = TemperatureCalibrator(seg)
    glob.__dict__.update({k: v for k, v in cals["global_nll"].__dict__.items()
                          if k.endswith("_") and k != "estimator_"})
    glob.estimator_ = seg
    Xs = X_te[:n_time]
    seg2, local2 = _without_spinning(seg, local, Xs)
    timing = time_round_robin({"plain": lambda: seg.predict_proba(Xs),
                               "global": lambda: glob.predict_proba(Xs),
                               "local": lambda: local.predict_proba(Xs),
                               "plain_no_spin": lambda: seg2.predict_proba(Xs),
                               "local_no_spin": lambda: local2.predict_proba(Xs)},
                              repeats=repeats, warmup=1, block=3)
    rec["timing"] = timing
    rec["timing_images"] = int(len(Xs))
    rec["cost_ratio"] = timing["local"]["median_s"] / timing["plain"]["median_s"]
    rec["cost_ratio_global"] = timing["global"]["median_s"] / timing["plain"]["median_s"]
    rec["cost_ratio_no_spin"] = (timing["local_no_spin"]["median_s"]
                                 / timing["plain_no_spin"]["median_s"])
    rec["n_voxels_test"] = int(y_te.size)
    return rec, (softmax(z_te), proba, tmap)


def targets(rec):
    s = rec["scores"]
    loc, raw, glob = s["local"], s["raw"], s["global_nll"]
    return {"ece_vs_raw": loc["ece"] / raw["ece"], "ece_vs_global": loc["ece"] / glob["ece"],
            "nll_local": loc["nll"], "nll_global": glob["nll"],
            "labels_changed": rec["local_labels_changed"], "cost_ratio": rec["cost_ratio"],
            "met": bool(loc["ece"] <= 0.3 * raw["ece"] and loc["ece"] <= 0.5 * glob["ece"]
                        and loc["nll"] < glob["nll"] and rec["local_labels_changed"] == 0),
            "cost_met": bool(rec["cost_ratio"] <= 1.10)}


def figure(X, y, before, after, tmap, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i = int(np.argmax((y > 0).reshape(len(y), -1).sum(axis=1)))  # the slice with most tissue
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.2))
    ax[0].imshow(X[i, 0], cmap="gray")
    ax[0].set_title("test image")
    im = ax[1].imshow(tmap[i], cmap="magma", vmin=0, vmax=np.quantile(tmap, 0.99))
    ax[1].set_title("local temperature T(x)")
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    for a in ax[:2]:
        a.axis("off")
    metrics.plot_reliability_diagram(before, y, ax=ax[2], label="raw")
    metrics.plot_reliability_diagram(after, y, ax=ax[2], label="local")
    handles, labels = ax[2].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax[2].legend(uniq.values(), uniq.keys(), loc="upper left", fontsize=8)
    ax[2].set_title("reliability, test split")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    FIG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIG, dpi=110)
    plt.close(fig)


def table(recs, worst):
    lines = ["| network | raw | global (NLL fit) | global (ECE fit) | class-wise | local "
             "| local / raw | local / global | labels changed (local) | predict cost local "
             "(global) | cost, ORT not spinning |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        s = r["scores"]
        cells = [f"{s[m]['ece']:.4f} / {s[m]['nll']:.4f}" for m in METHODS]
        mark = " (worst)" if r["member"] == worst else ""
        lines.append(
            f"| {r['member']}{mark} | " + " | ".join(cells)
            + f" | {s['local']['ece'] / s['raw']['ece']:.2f} "
            f"| {s['local']['ece'] / s['global_nll']['ece']:.2f} "
            f"| {r['local_labels_changed']} | {r['cost_ratio']:.2f}x "
            f"({r['cost_ratio_global']:.2f}x) | {r['cost_ratio_no_spin']:.2f}x |")
    return "\n".join(lines)


def monai_networks(seeds, epochs, tmp, loss="ce"):
    """MONAI UNets trained on the train split (one per seed) with ``loss`` ("ce" or MONAI's
    "dicece"), exported to ONNX in ``tmp``; None without torch/monai."""
    try:
        import monai  # noqa: F401
        import torch
    except ImportError as exc:
        print(f"MONAI networks skipped: {exc}")
        return None
    from bench_byo_network import _nets, export, train

    torch.set_num_threads(2)
    X_tr, y_tr = datasets.load_brain_tissue("train")
    out = []
    for seed in range(seeds):
        t = time.perf_counter()
        net = train(_nets()["monai_unet"], X_tr, y_tr, epochs, seed=seed, loss=loss)
        name = f"monai_unet_s{seed}" if loss == "ce" else f"monai_unet_{loss}_s{seed}"
        path = export(net, Path(tmp) / f"{name}.onnx")
        print(f"{name}: trained {epochs} epochs ({loss}) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        out.append((name, path))
    return out


TOP_WEIGHTS = (0.0, 0.5, 1.0, 2.0)


def _classwise_local(z_val, f_val, y_val, z_te, f_te, t_glob, alpha=1e-4):
    """The class-wise local variant, probed: ``log T_k(x) = b_k + v . f(x)`` (one map, one
    intercept per class), fitted by NLL with L-BFGS; it scales each class logit by its own
    temperature, so labels can change. Returns test probabilities ``(N, K, *spatial)``."""
    from scipy.optimize import minimize

    from uqseg.calibration import LOG_T_BOUNDS

    k = z_val.shape[1]
    zz = np.moveaxis(z_val, 1, 0).reshape(k, -1)
    yy = y_val.reshape(-1)
    hot = np.zeros(zz.shape, np.float32)
    hot[yy, np.arange(yy.size)] = 1
    mu, sd = f_val.mean(axis=1), f_val.std(axis=1)
    sd[sd < 1e-6] = 1
    fs = ((f_val - mu[:, None]) / sd[:, None]).astype(np.float32)
    c = np.log(t_glob)

    def fun(theta):
        b, v = theta[:k], theta[k:]
        lt = np.clip(b[:, None].astype(np.float32) + (v.astype(np.float32) @ fs)[None],
                     *LOG_T_BOUNDS)
        a = np.exp(-lt)
        u = zz * a
        u -= u.max(axis=0)
        e = np.exp(u)
        tot = e.sum(axis=0)
        nll = np.log(tot) - (u * hot).sum(axis=0)
        g = -(e / tot - hot) * a * zz * ((lt > LOG_T_BOUNDS[0]) & (lt < LOG_T_BOUNDS[1]))
        obj = float(nll.mean()) + alpha * (float(v @ v) + float(((b - c) ** 2).sum()))
        grad = np.concatenate([g.mean(axis=1) + 2 * alpha * (b - c),
                               fs @ g.sum(axis=0) / yy.size + 2 * alpha * v])
        return obj, grad.astype(np.float64)

    x0 = np.concatenate([np.full(k, c), np.zeros(fs.shape[0])])
    res = minimize(fun, x0, jac=True, method="L-BFGS-B")
    b, v = res.x[:k], res.x[k:] / sd
    b = b - v @ mu
    lt = np.clip(b[:, None, None, None] + np.tensordot(v, f_te, 1)[None], *LOG_T_BOUNDS)
    zt = np.moveaxis(z_te, 1, 0) * np.exp(-lt).astype(np.float32)
    return softmax(np.moveaxis(zt, 0, 1))


def objective_sweep(paths, data):
    """Test ECE / NLL of the local map per ``top_label_weight`` (fitted as a user would, from
    the segmenter on the images), and of the class-wise local probe, on the worst zoo member
    and the ensemble."""
    X_val, y_val, X_te, y_te = data
    from uqseg._local import local_features

    rows = []
    for name, seg in (("member_00_dice", OnnxSegmenter(paths[0]).fit()),
                      ("ensemble", EnsembleSegmenter(paths).fit())):
        z_val, z_te = seg.transform(X_val), seg.transform(X_te)
        raw = z_te.argmax(axis=1)
        glob = TemperatureCalibrator().fit(z_val, y_val)
        row = {"network": name, "raw": scores(softmax(z_te), y_te),
               "global_nll": scores(glob.predict_proba(z_te), y_te)}
        for tw in TOP_WEIGHTS:
            cal = TemperatureCalibrator(seg, mode="local", top_label_weight=tw)
            cal.fit(X_val, y_val)
            row[f"top_label_weight={tw:g}"] = scores(cal.predict_proba(X_te), y_te)
        scales = cal._scales()
        f_val = np.concatenate([local_features(z_val[i:i + 8], scales, X_val[i:i + 8])
                                for i in range(0, len(z_val), 8)], axis=1)
        f_te = np.concatenate([local_features(z_te[i:i + 8], scales, X_te[i:i + 8])
                               for i in range(0, len(z_te), 8)], axis=1)
        proba = _classwise_local(z_val, f_val.reshape(f_val.shape[0], -1), y_val, z_te, f_te,
                                 glob.temperature_)
        row["classwise_local"] = scores(proba, y_te)
        row["classwise_local_labels_changed"] = int((proba.argmax(axis=1) != raw).sum())
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else
                              f"{v['ece']:.5f}/{v['nll']:.4f}") for k, v in row.items()}),
              flush=True)
    return rows


def objective_table(rows):
    cols = ["raw", "global_nll"] + [f"top_label_weight={tw:g}" for tw in TOP_WEIGHTS] \
        + ["classwise_local"]
    lines = ["| network | " + " | ".join(cols) + " | labels changed (class-wise local) |",
             "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['network']} | " + " | ".join(
            f"{r[c]['ece']:.4f} / {r[c]['nll']:.4f}" for c in cols)
            + f" | {r['classwise_local_labels_changed']} |")
    return "\n".join(lines)


ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def alpha_sweep(path, data, n_fit_images=(3, 10, 110), seeds=(0, 1, 2)):
    """Test ECE / NLL of local maps fitted on few val images, per penalty ``alpha``: what the
    pull towards the global temperature buys when the fit set is small. Fitted on logits
    (no intensity feature) to keep it quick; the images are drawn at random per seed."""
    X_val, y_val, X_te, y_te = data
    seg = OnnxSegmenter(path).fit()
    z_val, z_te = seg.transform(X_val), seg.transform(X_te)
    rows = []
    for n in n_fit_images:
        for seed in seeds if n < len(X_val) else seeds[:1]:
            idx = np.sort(np.random.default_rng(seed).choice(len(X_val), n, replace=False))
            glob = TemperatureCalibrator().fit(z_val[idx], y_val[idx])
            row = {"n_images": n, "seed": seed,
                   "global": scores(glob.predict_proba(z_te), y_te)}
            for a in ALPHAS:
                cal = TemperatureCalibrator(mode="local", alpha=a).fit(z_val[idx], y_val[idx])
                row[f"alpha={a:g}"] = scores(cal.predict_proba(z_te), y_te)
            rows.append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else
                                  f"{v['ece']:.4f}/{v['nll']:.4f}") for k, v in row.items()}),
                  flush=True)
    return rows


def alpha_table(rows):
    cols = ["global"] + [f"alpha={a:g}" for a in ALPHAS]
    lines = ["| val images | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in sorted({r["n_images"] for r in rows}):
        sel = [r for r in rows if r["n_images"] == n]
        cells = [f"{np.mean([r[c]['ece'] for r in sel]):.4f} / "
                 f"{np.mean([r[c]['nll'] for r in sel]):.4f}" for c in cols]
        lines.append(f"| {n} ({len(sel)} draw{'s' if len(sel) > 1 else ''}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="ONNX files (default: the reference zoo)")
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds per network")
    ap.add_argument("--time-images", type=int, default=32,
                    help="test images per timed call (the ensemble: half)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--monai-seeds", type=int, default=3,
                    help="MONAI UNets trained and scored (0: none)")
    ap.add_argument("--monai-epochs", type=int, default=20)
    ap.add_argument("--monai-losses", nargs="+", default=["ce", "dicece"],
                    choices=["ce", "dicece"],
                    help="training losses of the MONAI UNets (dicece: MONAI's DiceCELoss)")
    ap.add_argument("--objective-sweep", action="store_true",
                    help="only the top-label weight sweep and the class-wise local probe -> "
                         "local_calibration_objective.json and the local-objective docs block")
    ap.add_argument("--alpha-sweep", action="store_true",
                    help="only the penalty sweep on small fit sets (first model) -> "
                         "local_calibration_alpha.json and the local-alpha docs block")
    args = ap.parse_args(argv)
    paths = args.models or datasets.reference_models()
    X_val, y_val = datasets.load_brain_tissue("val")
    X_te, y_te = datasets.load_brain_tissue("test")
    data = (X_val, y_val, X_te, y_te)
    if args.objective_sweep:
        rows = objective_sweep(paths, data)
        text = ("Test split, fitted on val; each cell is ECE / NLL. `top_label_weight=w`: the "
                "local map fitted by NLL + w x top-label log-loss (0: NLL alone); "
                "class-wise local: one map, one intercept per class, fitted by NLL.\n\n"
                + objective_table(rows))
        print(text)
        if not args.no_write:
            write_json(OUT.with_name("local_calibration_objective.json"),
                       {"name": "local_calibration_objective",
                        "machine": machine_record(["numpy", "scipy"]), "rows": rows})
            write_doc_section(DOC, "local-objective", text)
        return
    if args.alpha_sweep:
        rows = alpha_sweep(paths[0], data)
        text = (f"`{Path(paths[0]).stem}`, local maps fitted on the logits of a few random val "
                "images (mean over 3 draws; all 110 once), scored on the whole test split; "
                "each cell is ECE / NLL:\n\n" + alpha_table(rows))
        print(text)
        if not args.no_write:
            write_json(OUT.with_name("local_calibration_alpha.json"),
                       {"name": "local_calibration_alpha", "model": Path(paths[0]).name,
                        "machine": machine_record(["numpy", "scipy"]), "rows": rows})
            write_doc_section(DOC, "local-alpha", text)
        return
    t0 = time.perf_counter()
    recs, figs = [], {}
    segs = [(Path(p).stem, OnnxSegmenter(p).fit()) for p in paths]
    if len(paths) > 1:  # cache_size=0: every call pays for its inference, as in a stream
        segs.append(("ensemble", EnsembleSegmenter(paths, cache_size=0).fit()))
    for name, seg in segs:
        n_time = args.time_images // (2 if name == "ensemble" else 1)
        rec, fig_data = evaluate(name, seg, data, args.repeats, n_time)
        recs.append(rec)
        figs[name] = fig_data
        s = rec["scores"]
        print(f"{name}: " + "  ".join(f"{m} {s[m]['ece']:.4f}/{s[m]['nll']:.4f}"
                                       for m in METHODS)
              + f"  labels changed {rec['local_labels_changed']}"
              f"  cost {rec['cost_ratio']:.2f}x (no spin {rec['cost_ratio_no_spin']:.2f}x)"
              f"  fit {rec['fit_seconds']['local']:.0f} s",
              flush=True)
    monai = []
    if args.monai_seeds > 0 and not args.models:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for loss in args.monai_losses:
                for name, path in monai_networks(args.monai_seeds, args.monai_epochs, tmp,
                                                 loss) or []:
                    rec, _ = evaluate(name, OnnxSegmenter(path).fit(), data, 3,
                                      args.time_images)
                    rec["epochs"] = args.monai_epochs
                    rec["loss"] = loss
                    monai.append(rec)
                s = rec["scores"]
                print(f"{name}: " + "  ".join(f"{m} {s[m]['ece']:.4f}/{s[m]['nll']:.4f}"
                                               for m in METHODS), flush=True)
    members = [r for r in recs if r["member"] != "ensemble"]
    worst = max(members, key=lambda r: r["scores"]["raw"]["ece"])
    verdict = {"worst_member": worst["member"], "chosen_by": "highest test ECE of the raw network",
               "worst": targets(worst)}
    ens = [r for r in recs if r["member"] == "ensemble"]
    if ens:
        verdict["ensemble"] = targets(ens[0])
    if monai:
        verdict["monai_unet"] = [targets(r) for r in monai]
    verdict["all_labels_unchanged"] = all(r["local_labels_changed"] == 0 for r in recs + monai)
    verdict["max_cost_ratio"] = max(r["cost_ratio"] for r in recs)
    verdict["median_cost_ratio"] = float(np.median([r["cost_ratio"] for r in recs]))
    verdict["median_cost_ratio_global"] = float(np.median([r["cost_ratio_global"]
                                                           for r in recs]))
    verdict["max_cost_ratio_no_spin"] = max(r["cost_ratio_no_spin"] for r in recs)
    verdict["median_cost_ratio_no_spin"] = float(np.median([r["cost_ratio_no_spin"]
                                                            for r in recs]))
    wall = time.perf_counter() - t0
    print(json.dumps(verdict, indent=1))
    print(table(recs, worst["member"]))
    if args.no_write:
        return
    before, after, tmap = figs[worst["member"]]
    figure(X_te, y_te, before, after, tmap, f"{worst['member']} (test split), local temperature "
           "fitted on val")
    result = {"name": "local_calibration",
              "machine": machine_record(["numpy", "scipy", "onnxruntime"]),
              "data": {"val": list(X_val.shape), "test": list(X_te.shape)},
              "models": [Path(p).name for p in paths], "wall_seconds": wall,
              "defaults": {k: v for k, v in TemperatureCalibrator().get_params().items()
                           if k in ("alpha", "scales", "use_image", "max_voxels")},
              "networks": recs, "monai_unet": monai, "verdict": verdict}
    write_json(OUT, result)
    text = ("Test split, fitted on val; each cell is ECE / NLL. Predict cost: "
            "`cal.predict_proba(X)` over `seg.predict_proba(X)` on the first "
            f"{args.time_images} test images ({args.time_images // 2} for the ensemble), median "
            f"of {args.repeats} round-robin turns of 3 consecutive calls (each timed after one of "
            "its own kind, as in a stream); in brackets the same ratio for the global "
            "calibrator, whose extra work is one division: how far timing noise alone moves "
            "the ratio. Last column: local over plain when ONNX Runtime's worker threads do not "
            "spin after each call (`session.intra_op.allow_spinning=0`, both sides).\n\n"
            + table(recs, worst["member"]))
    w = verdict["worst"]
    text += (f"\n\nRun {result['machine'].get('date', '')[:10]} ({wall / 60:.1f} min). Worst "
             f"member by raw test ECE: {worst['member']}: local ECE {w['ece_vs_raw']:.2f}x raw, "
             f"{w['ece_vs_global']:.2f}x global, NLL {w['nll_local']:.4f} vs global "
             f"{w['nll_global']:.4f}, labels changed {w['labels_changed']} — accuracy targets "
             f"{'met' if w['met'] else 'NOT met'}; predict cost {w['cost_ratio']:.2f}x "
             f"({'met' if w['cost_met'] else 'NOT met'}).")
    if ens:
        e = verdict["ensemble"]
        text += (f" Ensemble: local ECE {e['ece_vs_raw']:.2f}x raw, {e['ece_vs_global']:.2f}x "
                 f"global, NLL {e['nll_local']:.4f} vs {e['nll_global']:.4f} — "
                 f"{'met' if e['met'] else 'NOT met'}; cost {e['cost_ratio']:.2f}x.")
    write_doc_section(DOC, "local-results", text)
    if monai:
        t = [targets(r) for r in monai]
        mt = (f"MONAI `UNet` (channels 8-16-32-64, one residual unit), trained "
              f"{args.monai_epochs} epochs on the train split with cross-entropy "
              "(`monai_unet_s*`) or MONAI's `DiceCELoss` (`monai_unet_dicece_s*`, MONAI's usual "
              "segmentation recipe), one network per seed, exported with `torch.onnx.export`; "
              "fitted on val, scored on test; each cell is ECE / NLL (predict cost: 3 "
              "round-robin turns of 3 calls).\n\n" + table(monai, None) + "\n")
        for loss in args.monai_losses:
            t = [targets(r) for r in monai if r.get("loss") == loss]
            if not t:
                continue
            label = {"ce": "cross-entropy", "dicece": "`DiceCELoss`"}[loss]
            mt += (f"\n{label}: mean over {len(t)} seeds local ECE "
                   f"{np.mean([x['ece_vs_raw'] for x in t]):.2f}x raw, "
                   f"{np.mean([x['ece_vs_global'] for x in t]):.2f}x global; NLL below global "
                   f"on {sum(x['nll_local'] < x['nll_global'] for x in t)} of {len(t)}; "
                   f"accuracy targets met on {sum(x['met'] for x in t)} of {len(t)}.")
        write_doc_section(DOC, "local-monai", mt)
    print(f"wrote {OUT}, {FIG}")
    print(f"wall {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
