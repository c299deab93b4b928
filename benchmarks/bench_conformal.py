"""Empirical validity of ConformalRiskController on the embedded brain-tissue data.

The shipped five-member ensemble runs once over the test split (109 slices) and over the test
split corrupted by all eight corruptions at severity 0.75 (872 slices); the controller's fit
keeps its per-image histograms (``stats_``). Then 200 random calibration/test splits (half /
half) are solved on those statistics through the public API: a copy of the fitted controller
whose ``stats_`` holds the calibration half only, and its ``recalibrate`` (no network runs;
checked equal to ``ConformalRiskController.fit`` on the first split of every configuration).
The realised risk is the mean loss over the test half at the chosen threshold, computed here
from the test half's histograms (the losses' definitions, independent of the solver). MAPIE's
``SemanticSegmentationController`` runs on the same splits of the 2-D binary white-matter task
(fewer splits: its calibration loops in Python over images and thresholds).

    python benchmarks/bench_conformal.py           # ~7 min on 2 cores (see below)
    python benchmarks/bench_conformal.py --quick   # smoke run, writes nothing

The ~7 min were measured when the splits were solved with the private solver on loss curves
computed once; each ``recalibrate`` recomputes them from the half's histograms, about 1.4 s
per split on the corrupted set's statistics (16 settings; synthetic statistics of the same
size), so expect roughly 6 minutes more. ``--quick`` gives results identical to the old way.

Writes ``benchmarks/results/conformal.json``, ``docs/figures/conformal_*.png`` and the tables
of ``docs/conformal.md`` (between the ``bench`` markers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine_record, write_doc_section, write_json  # noqa: E402

from uqseg import ConformalRiskController, EnsembleSegmenter, datasets  # noqa: E402
from uqseg.quality import make_quality_set  # noqa: E402

NB = 1000
CONFIGS = [  # (risk, alpha, delta)
    ("fnr", 0.1, None), ("fnr", 0.1, 0.1), ("fdr", 0.1, None), ("fdr", 0.1, 0.1),
    ("dice", 0.15, 0.1), ("volume", 0.15, 0.1)]
ALPHAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
CLASS_NAMES = {1: "grey matter", 2: "white matter"}


def fitted_controller(est, X, y, **params):
    t0 = time.perf_counter()
    crc = ConformalRiskController(est, n_bins=NB, batch_size=16, **params).fit(X, y)
    return crc, time.perf_counter() - t0


def calibrated_on(crc, images):
    """A copy of the fitted controller whose statistics (its documented ``stats_``) hold only
    the calibration ``images``: its ``recalibrate`` chooses thresholds on them alone."""
    sub = copy.copy(crc)
    sub.stats_ = {k: v[images] for k, v in crc.stats_.items()}
    return sub


def split_thresholds(crc, perms, n_cal, configs, classes=(1, 2)):
    """``{(risk, alpha, delta, c): [threshold index per split, None: no threshold]}`` for the
    ``(risk, alpha, delta)`` in ``configs``: one ``recalibrate`` solves every class (class by
    class only where one of them has no threshold)."""
    out = {(*cfg, c): [] for cfg in configs for c in classes}
    for perm in perms:
        sub = calibrated_on(crc, perm[:n_cal])
        for risk, alpha, delta in configs:
            try:
                sub.recalibrate(risk=risk, alpha=alpha, delta=delta, classes=list(classes))
                found = dict(zip(classes, sub.threshold_index_.tolist(), strict=True))
            except ValueError:  # a class without a threshold on this half: each on its own
                found = {}
                for c in classes:
                    try:
                        sub.recalibrate(risk=risk, alpha=alpha, delta=delta, classes=[c])
                        found[c] = int(sub.threshold_index_[0])
                    except ValueError:
                        found[c] = None
            for c in classes:
                out[risk, alpha, delta, c].append(found[c])
    return out


def _tail(hist):
    """``out[..., j]`` = voxels in bins ``>= j`` (``j = 0 .. n_bins + 1``): the mask
    ``{p >= j / n_bins}`` of a class histogram."""
    h = np.asarray(hist, dtype=np.int64)
    rev = np.cumsum(h[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([rev, np.zeros(h.shape[:-1] + (1,), np.int64)], axis=-1)


def loss_curves(true_hist, all_hist, risk):
    """Per-image losses of every mask ``{bin >= j}`` of one class, and which images have a
    defined loss (FNR and volume error need the class present; docs/conformal.md)."""
    tp, pos = _tail(true_hist).astype(float), _tail(all_hist).astype(float)
    g = tp[:, :1]  # the true volume: the mask of every voxel holds all of it
    if risk in ("fnr", "volume"):
        ok = g[:, 0] > 0
        tp, pos, g = tp[ok], pos[ok], g[ok]
        return (1.0 - tp / g if risk == "fnr" else np.minimum(np.abs(pos - g) / g, 1.0)), ok
    ok = np.ones(len(tp), bool)
    if risk == "fdr":  # an empty mask discovers nothing, so nothing false
        return np.divide(pos - tp, pos, out=np.zeros_like(tp), where=pos > 0), ok
    denom = g + pos  # 1 - Dice; two empty masks agree
    return 1.0 - np.divide(2 * tp, denom, out=np.ones_like(tp), where=denom > 0), ok


_CURVES: dict = {}


def _curves(stats, c, risk):
    key = (id(stats), c, risk)  # each loss curve once per set, class and risk
    if key not in _CURVES:
        losses, elig = loss_curves(stats["true"][:, c], stats["all"][:, c], risk)
        _CURVES[key] = (losses, elig, _tail(stats["all"][:, c]), _tail(stats["true"][:, c])[:, 0])
    return _CURVES[key]


def one_config(stats, perms, n_cal, indices, risk, c):
    """Realised test risk, threshold and mask/truth volume of every split (NaN: no threshold)
    at the threshold ``indices`` chosen on each split's calibration half."""
    losses, elig, pos, truth = _curves(stats, c, risk)
    row = np.cumsum(elig) - 1
    out = {"realised": [], "lambda": [], "size_ratio": [], "index": []}
    for perm, j in zip(perms, indices, strict=True):
        test = perm[n_cal:]
        test_rows = row[test[elig[test]]]
        if j is None:
            for key in out:
                out[key].append(np.nan)
            continue
        out["index"].append(j)
        out["realised"].append(float(losses[test_rows, j].mean()))
        out["lambda"].append(j / NB if j <= NB else np.inf)
        out["size_ratio"].append(float(pos[test, j].sum() / max(truth[test].sum(), 1)))
    return {k: np.asarray(v, float) for k, v in out.items()}


def summary(res, alpha, delta):
    r = res["realised"][np.isfinite(res["realised"])]
    ok = r.size
    return {
        "splits": int(res["realised"].size), "no_threshold": int(res["realised"].size - ok),
        "mean_risk": float(r.mean()) if ok else None,
        "mc_se": float(r.std(ddof=1) / np.sqrt(ok)) if ok > 1 else None,
        "frac_above_alpha": float((r > alpha).mean()) if ok else None,
        "mean_lambda": float(np.nanmean(res["lambda"])) if ok else None,
        "size_ratio": float(np.nanmean(res["size_ratio"])) if ok else None,
        "alpha": alpha, "delta": delta, "realised": r.round(5).tolist()}


def check_api(P, y, perm, n_cal, risk, alpha, delta, c, j):
    """The study's solver gives what ConformalRiskController.fit gives."""
    cal = np.sort(perm[:n_cal])
    try:
        crc = ConformalRiskController(risk=risk, alpha=alpha, delta=delta, classes=[c],
                                      n_bins=NB).fit(P[cal], y[cal])
    except ValueError:
        assert np.isnan(j)
        return
    assert crc.threshold_index_[0] == j, (risk, alpha, delta, c, crc.threshold_index_, j)


def set_study(crc, perms, n_cal, alpha, score):
    return {score: _set_runs(crc, perms, n_cal, alpha, False),
            f"{score}_mondrian": _set_runs(crc, perms, n_cal, alpha, True)}


def _set_runs(crc, perms, n_cal, alpha, mondrian):
    stats = crc.stats_
    st, sa, nv = stats["set_true"], stats["set_all"], stats["n_voxels"]
    miss = _tail(st)
    cov, cls_cov, size = [], [], []
    for perm in perms:
        cal, test = perm[:n_cal], perm[n_cal:]
        sub = calibrated_on(crc, cal).recalibrate(alpha=alpha, mondrian=mondrian)
        if sub.set_error_ is not None:  # no quantile gives the coverage on this half
            continue
        q = sub.set_threshold_index_
        out = np.take_along_axis(miss[test], (q + 1)[None, :, None], axis=2)[..., 0]  # (n, K)
        cov.append(float((1 - out.sum(1) / nv[test]).mean()))
        g = miss[test][:, :, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            cls_cov.append(np.nanmean(np.where(g > 0, 1 - out / g, np.nan), axis=0).tolist())
        size.append(_size(sa[test], nv[test], q))
    return {"coverage": float(np.mean(cov)), "coverage_se": float(np.std(cov, ddof=1)
                                                                   / np.sqrt(len(cov))),
            "class_coverage": np.mean(cls_cov, axis=0).round(4).tolist(),
            "mean_set_size": float(np.mean(size)), "splits": len(cov)}


def _size(set_all, n_voxels, q):
    inside = n_voxels[:, None] - np.take_along_axis(_tail(set_all), (q + 1)[None, :, None],
                                                    axis=2)[..., 0]
    return float(inside.sum() / n_voxels.sum())


def mapie_compare(P, y, perms, n_cal, n_splits):
    """White matter vs the rest, 2-D binary: MAPIE's controller and ours on the same splits."""
    from mapie.risk_control import SemanticSegmentationController

    p = np.ascontiguousarray(P[:, 2:3])
    truth = y == 2
    binary = np.concatenate([1 - p, p], axis=1)
    grid = np.round(np.arange(0, 1, 0.01), 2)

    def realised(masks, test, risk):
        t = truth[test]
        tp = (masks & t).sum((1, 2))
        if risk == "fnr":
            return float((1 - tp / t.sum((1, 2))).mean())
        pos = masks.sum((1, 2))
        return float(np.where(pos > 0, (pos - tp) / np.maximum(pos, 1), 0).mean())

    rows = {k: {"realised": [], "size_ratio": [], "lambda": [], "seconds": []} for k in
            ("uqseg_fnr", "mapie_recall", "uqseg_fdr", "mapie_precision")}
    for perm in perms[:n_splits]:
        cal, test = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        for key, risk, delta in (("uqseg_fnr", "fnr", None), ("uqseg_fdr", "fdr", 0.1)):
            t0 = time.perf_counter()
            try:
                crc = ConformalRiskController(risk=risk, alpha=0.1, delta=delta, n_bins=100).fit(
                    binary[cal], truth[cal].astype(int))
            except ValueError:  # too few images for the guarantee
                for v in ("realised", "lambda", "size_ratio"):
                    rows[key][v].append(np.nan)
                continue
            finally:
                rows[key]["seconds"].append(time.perf_counter() - t0)
            m = crc.predict(binary[test])[:, 0]
            rows[key]["realised"].append(realised(m, test, risk))
            rows[key]["lambda"].append(float(crc.lambda_[0]))
            rows[key]["size_ratio"].append(float(m.sum() / truth[test].sum()))
        for key, risk, conf in (("mapie_recall", "fnr", None), ("mapie_precision", "fdr", 0.9)):
            t0 = time.perf_counter()
            ctl = SemanticSegmentationController(
                predict_function=lambda X: X, risk="recall" if conf is None else "precision",
                target_level=0.9, confidence_level=conf, predict_params=grid)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MAPIE warns when it cannot control the risk
                ctl.calibrate(p[cal], truth[cal].astype(int))
                m = ctl.predict(p[test])[:, 0]
            rows[key]["seconds"].append(time.perf_counter() - t0)
            lam = float(np.asarray(ctl.best_predict_param).ravel()[0])
            rows[key]["lambda"].append(lam)
            if not np.isfinite(lam):
                rows[key]["realised"].append(np.nan)
                rows[key]["size_ratio"].append(np.nan)
                continue
            rows[key]["realised"].append(realised(m, test, risk))
            rows[key]["size_ratio"].append(float(m.sum() / truth[test].sum()))
    out = {}
    for key, r in rows.items():
        real = np.asarray(r["realised"], float)
        fin = real[np.isfinite(real)]
        out[key] = {"mean_risk": float(fin.mean()) if fin.size else None,
                    "mc_se": float(fin.std(ddof=1) / np.sqrt(fin.size)) if fin.size > 1 else None,
                    "frac_above_alpha": float((fin > 0.1).mean()) if fin.size else None,
                    "no_threshold": int(real.size - fin.size),
                    "mean_lambda": _nanmean(r["lambda"]),
                    "size_ratio": _nanmean(r["size_ratio"]),
                    "median_fit_s": float(np.median(r["seconds"])), "splits": int(real.size)}
    return out


def _nanmean(values):
    v = np.asarray(values, float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few images and splits; no output")
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--mapie-splits", type=int, default=20)
    args = ap.parse_args(argv)
    n_splits = 6 if args.quick else args.splits
    t_start = time.perf_counter()

    X, y = datasets.load_brain_tissue("test")
    if args.quick:
        X, y = X[:30], y[:30]
    ens = EnsembleSegmenter(datasets.reference_models()).fit()
    t0 = time.perf_counter()
    P = ens.predict_proba(X)
    t_clean = time.perf_counter() - t0
    crc_clean, _ = fitted_controller(None, P, y)
    Xw, yw, _ = make_quality_set(X[:4] if args.quick else X, y[:4] if args.quick else y,
                                 severities=(0.75,), include_clean=False)
    crc_corr, t_corr = fitted_controller(ens, Xw, yw)
    # APS histograms need their own statistics pass (on the stored clean probabilities)
    aps_clean, _ = fitted_controller(None, P, y, set_score="aps")

    results = {"machine": machine_record(["numpy", "scipy", "onnxruntime", "mapie"]),
               "n_bins": NB, "splits": n_splits,
               "sets": {"clean": {}, "corrupted": {}}, "risks": {}, "alpha_curves": {},
               "timing_s": {"ensemble_clean": t_clean, "fit_corrupted_streamed": t_corr}}
    for name, crc in (("clean", crc_clean), ("corrupted", crc_corr)):
        stats = crc.stats_
        n = stats["n_voxels"].size
        n_cal = n // 2
        rng = np.random.default_rng(0)
        perms = [rng.permutation(n) for _ in range(n_splits)]
        results["risks"][name] = {"n_images": n, "n_calibration": n_cal}
        configs = list(dict.fromkeys([*CONFIGS, *(("fnr", alpha, delta) for delta in (None, 0.1)
                                                  for alpha in ALPHAS)]))
        js = split_thresholds(crc, perms, n_cal, configs)
        for risk, alpha, delta in CONFIGS:
            for c in (1, 2):
                res = one_config(stats, perms, n_cal, js[risk, alpha, delta, c], risk, c)
                if name == "clean":
                    check_api(P, y, perms[0], n_cal, risk, alpha, delta, c, res["index"][0])
                key = f"{risk}|{'crc' if delta is None else 'ltt'}|{c}"
                results["risks"][name][key] = summary(res, alpha, delta)
        curves = {}
        for delta in (None, 0.1):
            for c in (1, 2):
                for alpha in ALPHAS:
                    res = one_config(stats, perms, n_cal, js["fnr", alpha, delta, c], "fnr", c)
                    s = summary(res, alpha, delta)
                    s.pop("realised")
                    curves[f"{'crc' if delta is None else 'ltt'}|{c}|{alpha}"] = s
        results["alpha_curves"][name] = curves
        results["sets"][name] = set_study(crc, perms, n_cal, 0.1, "lac")
        if name == "clean":
            results["sets"][name].update(set_study(aps_clean, perms, n_cal, 0.1, "aps"))
            results["mapie"] = mapie_compare(P, y, perms, n_cal,
                                             2 if args.quick else args.mapie_splits)
    results["timing_s"]["total"] = time.perf_counter() - t_start
    if args.quick:
        print("quick run ok:", {k: v for k, v in results["timing_s"].items()})
        return results
    write_json(RESULTS / "conformal.json", results)
    _figures(results)
    _write_tables(results)
    print(f"done in {results['timing_s']['total']:.0f} s")
    return results


# ---------------------------------------------------------------------- outputs
def _figures(res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = ROOT / "docs" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    panels = [("fnr|crc", "FNR, CRC (alpha 0.1)"), ("fnr|ltt", "FNR, LTT (alpha 0.1, delta 0.1)"),
              ("fdr|crc", "FDR, CRC (alpha 0.1)"), ("fdr|ltt", "FDR, LTT (alpha 0.1, delta 0.1)")]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for row, name in enumerate(("clean", "corrupted")):
        for ax, (key, title) in zip(axes[row], panels, strict=True):
            for c, col in ((1, "tab:orange"), (2, "tab:blue")):
                r = res["risks"][name][f"{key}|{c}"]
                ax.hist(r["realised"], bins=25, alpha=0.6, color=col, label=CLASS_NAMES[c])
                alpha = r["alpha"]
            ax.axvline(alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_title(f"{title}\n{name} test split", fontsize=9)
            ax.set_xlabel("realised risk on the test half")
        axes[row][0].set_ylabel("splits")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "conformal_risk_hist.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, ls in (("clean", "-"), ("corrupted", ":")):
        for method, marker in (("crc", "o"), ("ltt", "s")):
            for c, col in ((1, "tab:orange"), (2, "tab:blue")):
                pts = [(a, res["alpha_curves"][name][f"{method}|{c}|{a}"]) for a in ALPHAS]
                pts = [(a, s) for a, s in pts if s["mean_risk"] is not None]
                xs = [a for a, _ in pts]
                axes[0].plot(xs, [s["mean_risk"] for _, s in pts], ls=ls, marker=marker,
                             color=col, label=f"{method.upper()} {CLASS_NAMES[c]} ({name})")
                axes[1].plot(xs, [s["size_ratio"] for _, s in pts], ls=ls, marker=marker,
                             color=col)
    axes[0].plot(ALPHAS, ALPHAS, "k--", lw=1, label="risk = alpha")
    axes[0].set(xlabel="alpha", ylabel="mean realised FNR", title="FNR control: realised risk")
    axes[1].set(xlabel="alpha", ylabel="mask volume / true volume",
                title="FNR control: mask size")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "conformal_alpha_curves.png", dpi=110)
    plt.close(fig)


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _write_tables(res):
    lines = []
    for name in ("clean", "corrupted"):
        r = res["risks"][name]
        lines += [f"**{name.capitalize()} set** ({r['n_images']} images, "
                  f"{r['n_calibration']} calibration / {r['n_images'] - r['n_calibration']} "
                  f"test per split, {res['splits']} splits)", "",
                  "| risk | method | class | alpha | delta | mean realised risk ± MC s.e. | "
                  "splits with test risk > alpha | mean lambda | mask / truth volume | "
                  "no threshold |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, s in r.items():
            if "|" not in key:
                continue
            risk, method, c = key.split("|")
            mean = "–" if s["mean_risk"] is None else \
                f"{s['mean_risk']:.4f} ± {s['mc_se']:.4f}"
            lines.append(f"| {risk} | {method.upper()} | {CLASS_NAMES[int(c)]} | {s['alpha']} | "
                         f"{s['delta'] if s['delta'] is not None else '–'} | {mean} | "
                         f"{_fmt(s['frac_above_alpha'], 3)} | {_fmt(s['mean_lambda'], 3)} | "
                         f"{_fmt(s['size_ratio'], 3)} | {s['no_threshold']} |")
        lines.append("")
    lines += ["**FNR control across alpha** (mean realised FNR / mask-to-truth volume ratio)", "",
              "| set | method | class | " + " | ".join(f"alpha={a}" for a in ALPHAS) + " |",
              "|---|---|---|" + "---|" * len(ALPHAS)]
    for name in ("clean", "corrupted"):
        for method in ("crc", "ltt"):
            for c in (1, 2):
                cells = []
                for a in ALPHAS:
                    s = res["alpha_curves"][name][f"{method}|{c}|{a}"]
                    cells.append("no threshold" if s["mean_risk"] is None else
                                 f"{s['mean_risk']:.3f} / {s['size_ratio']:.2f}")
                lines.append(f"| {name} | {method.upper()} | {CLASS_NAMES[c]} | "
                             + " | ".join(cells) + " |")
    lines += ["", "**Prediction sets** (alpha = 0.1; coverage = mean over test images of the "
              "fraction of voxels whose true class is in the set)", "",
              "| set | score | mean coverage ± MC s.e. | coverage per class (bg, GM, WM) | "
              "mean set size |", "|---|---|---|---|---|"]
    for name in ("clean", "corrupted"):
        for key, s in res["sets"][name].items():
            lines.append(f"| {name} | {key} | {s['coverage']:.4f} ± {s['coverage_se']:.4f} | "
                         f"{', '.join(f'{v:.3f}' for v in s['class_coverage'])} | "
                         f"{s['mean_set_size']:.3f} |")
    m = res["mapie"]
    lines += ["", f"**MAPIE vs uqseg** (white matter vs rest, clean set, alpha = 0.1, "
              f"{m['uqseg_fnr']['splits']} splits, 100-point threshold grid for both)", "",
              "| controller | guarantee | mean realised risk ± MC s.e. | splits with test risk > "
              "alpha | mean lambda | mask / truth volume | no threshold | median fit time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    names = {"uqseg_fnr": ("uqseg fnr, CRC", "E[FNR] <= 0.1"),
             "mapie_recall": ("MAPIE recall, CRC", "E[1 - recall] <= 0.1"),
             "uqseg_fdr": ("uqseg fdr, LTT (delta 0.1)", "P(FDR risk <= 0.1) >= 0.9"),
             "mapie_precision": ("MAPIE precision, LTT (confidence 0.9)",
                                 "P(1 - precision risk <= 0.1) >= 0.9")}
    for key, (label, guar) in names.items():
        s = m[key]
        mean = "–" if s["mean_risk"] is None else f"{s['mean_risk']:.4f} ± {s['mc_se']:.4f}"
        lines.append(f"| {label} | {guar} | {mean} | {_fmt(s['frac_above_alpha'])} | "
                     f"{_fmt(s['mean_lambda'])} | {_fmt(s['size_ratio'])} | {s['no_threshold']} "
                     f"| {s['median_fit_s']:.3f} |")
    write_doc_section(ROOT / "docs" / "conformal.md", "bench", "\n".join(lines))


if __name__ == "__main__":
    main()
