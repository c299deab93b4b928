"""The ``uqseg demo`` pipeline: every estimator on the embedded data, one table, one report.

On the embedded brain-tissue data (:func:`uqseg.datasets.load_brain_tissue`) and the shipped
reference zoo (or any ``models`` given), with the core install only:

1. every member runs on ``val`` and ``test``; the member with the highest validation ECE is
   the "worst-calibrated" one;
2. a :class:`~uqseg.TemperatureCalibrator` is fitted on that member's validation logits, and
   one on the ensemble's validation probabilities (``input_kind="proba"``);
3. the :class:`~uqseg.EnsembleSegmenter` of all members runs on ``test`` (timed: throughput);
4. a :class:`~uqseg.SpectralOODDetector` and the :class:`~uqseg.UncertaintyOODDetector`
   baseline (ensemble entropy averaged over the image) are fitted on a subset of ``train``
   and scored on test images against every kind of :data:`uqseg.datasets.OOD_KINDS`;
5. a :class:`~uqseg.QualityRegressor` on the ensemble is fitted on ``val`` widened with
   :func:`uqseg.quality.make_quality_set` and evaluated on ``test`` widened the same way with
   other severities and seed.

Calibration metrics (ECE, NLL) are computed inside the foreground bounding box grown by 10
voxels (:func:`uqseg.metrics.foreground_roi`: Mehrtash et al.'s segment-level metrics), so
the easy background does not dominate. Subset sizes are in :data:`FULL` / :data:`QUICK` and
printed with the table.

Sigmoid networks (binary or multi-label) run every step too: their channels are matched to
the embedded labels by count (:mod:`uqseg._demo_outputs`: 1 channel = foreground, ``K - 1``
= one-vs-rest per foreground label, ``K`` = foreground then each label), calibration metrics
pool the channels' binary problems, Dice and predicted quality are per channel, and the
report's uncertainty maps are summed over channels.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from uqseg._demo_outputs import outputs_for

__all__ = ["FULL", "QUICK", "DemoConfig", "format_table", "run_demo"]

CLASS_NAMES = ("grey matter", "white matter")
ROI_MARGIN = 10
CRC_ALPHA = 0.1  # false-negative rate the demo's conformal masks are calibrated to


@dataclass(frozen=True)
class DemoConfig:
    """Subset sizes of the demo (``None`` = the whole split)."""

    n_val: int | None  # calibration fit and member selection
    n_test: int | None  # segmentation / calibration metrics and throughput
    n_train_ood: int | None  # OOD detectors' fit (every k-th training image)
    n_test_ood: int | None  # in-distribution test images scored by the OOD detectors
    n_per_ood_kind: int  # images of each OOD kind
    n_quality_val: int  # val images widened by make_quality_set for the quality fit
    n_quality_test: int  # test images widened for the quality evaluation
    quality_fit_severities: tuple = (0.5, 1.0)
    quality_test_severities: tuple = (0.25, 0.75)
    n_examples: int = 3  # image panels in the report


FULL = DemoConfig(n_val=None, n_test=None, n_train_ood=None, n_test_ood=None, n_per_ood_kind=24,
                  n_quality_val=24, n_quality_test=16)
QUICK = DemoConfig(n_val=8, n_test=8, n_train_ood=12, n_test_ood=8, n_per_ood_kind=4,
                   n_quality_val=4, n_quality_test=3, quality_fit_severities=(1.0,),
                   quality_test_severities=(0.5,), n_examples=2)


def _every(X, n: int | None, *more):
    """``n`` images spread evenly over the split (all when ``n`` is None or too large)."""
    if n is None or n >= len(X):
        idx = np.arange(len(X))
    else:
        idx = np.unique(np.linspace(0, len(X) - 1, n).round().astype(int))
    return (X[idx], *(m[idx] for m in more)) if more else X[idx]


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                disable=not progress)


def _chunks(fn, X, desc: str, progress: bool, chunk: int = 32):
    """Apply ``fn`` to chunks of ``X`` with a progress bar; concatenate along axis 0."""
    out = []
    with _bar(len(X), desc, progress) as bar:
        for i in range(0, len(X), chunk):
            out.append(fn(X[i:i + chunk]))
            bar.update(len(X[i:i + chunk]))
    return np.concatenate(out)


def _dice(outputs, pred, t) -> np.ndarray:
    """Mean over images of the per-image Dice of each class (channel), NaN ones left out."""
    with np.errstate(all="ignore"):
        d = outputs.image_dice(pred, t)
    return np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in d.T])


def run_demo(out="uqseg-demo", models=None, quick: bool = False, backend: str = "auto",
             device: str = "auto", batch_size="auto", progress: bool = True,
             report: bool = True, stream=None, config: DemoConfig | None = None,
             activation: str = "auto") -> dict:
    """Run the demo and write ``summary.json`` (and ``report.html``) into ``out``.

    Parameters
    ----------
    out : str or path-like
        Output folder (created).
    models : list of path, optional
        ONNX members (default: :func:`uqseg.datasets.reference_models`).
    quick : bool
        Use :data:`QUICK` subset sizes (a smoke run) instead of :data:`FULL`.
    backend, device, batch_size
        Passed to the :class:`~uqseg.EnsembleSegmenter`.
    progress : bool
        tqdm progress bars on stderr.
    report : bool
        Write ``report.html`` (needs matplotlib: ``pip install 'uqseg[plot]'``; without it
        the table and ``summary.json`` are still written and a note is printed).
    stream : file, optional
        Where the table goes (default ``sys.stdout``).
    config : DemoConfig, optional
        Overrides the subset sizes.
    activation : {"auto", "softmax", "sigmoid", "none"}, default="auto"
        How the models' outputs are read (``EnsembleSegmenter(activation=...)``): needed for a
        multi-channel sigmoid network with neither a ``Sigmoid`` node nor metadata.

    Returns
    -------
    dict
        The summary (also in ``out/summary.json``).
    """
    from uqseg import datasets, metrics
    from uqseg.calibration import TemperatureCalibrator
    from uqseg.conformal import ConformalRiskController
    from uqseg.ensemble import EnsembleSegmenter
    from uqseg.ood import SpectralOODDetector, UncertaintyOODDetector
    from uqseg.quality import QualityRegressor, make_quality_set

    stream = stream or sys.stdout
    cfg = config or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    paths = [str(m) for m in models] if models else datasets.reference_models()
    names = [Path(p).stem for p in paths]

    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, y_val = datasets.load_brain_tissue("val")
    X_val, y_val = _every(X_val, cfg.n_val, y_val)
    X_te, y_te = datasets.load_brain_tissue("test")
    X_te, y_te = _every(X_te, cfg.n_test, y_te)
    ens = EnsembleSegmenter(paths, backend=backend, device=device, batch_size=batch_size,
                            activation=activation).fit()
    o = outputs_for(ens, len(CLASS_NAMES) + 1, CLASS_NAMES, names)  # softmax or sigmoid
    t_val, t_te = o.targets(y_val), o.targets(y_te)  # labels, or indicator channels
    roi_val = metrics.foreground_roi(y_val, margin=ROI_MARGIN)
    roi_te = metrics.foreground_roi(y_te, margin=ROI_MARGIN)

    # 1. members on val and test ------------------------------------------------------------
    member_rows, worst, worst_ece = [], None, -1.0
    val_sum = None
    seconds_single = 0.0
    logits_val_worst = logits_te_worst = None
    for name, seg in zip(names, ens.members_, strict=True):
        z_val = _chunks(seg.transform, X_val, f"{name} on val", progress)
        p_val = o.proba(z_val)
        val_sum = p_val.astype(np.float32) if val_sum is None else val_sum + p_val
        ece_val = o.ece(p_val, t_val, roi_val)
        t0 = time.perf_counter()
        z_te = _chunks(seg.transform, X_te, f"{name} on test", progress)
        seconds_single += time.perf_counter() - t0
        p_te = o.proba(z_te)
        member_rows.append({"name": name, "val_ece": ece_val,
                            "test_dice": _dice(o, o.pred(p_te), t_te).tolist(),
                            **o.calibration(p_te, t_te, roi_te)})
        if ece_val > worst_ece:
            worst, worst_ece, logits_val_worst, logits_te_worst = name, ece_val, z_val, z_te
    val_ens = val_sum / len(paths)

    # 2. temperature scaling ----------------------------------------------------------------
    cal = TemperatureCalibrator(activation=o.activation).fit(logits_val_worst, t_val)
    p_before = o.proba(logits_te_worst)
    p_after = cal.predict_proba(logits_te_worst)
    cal_ens = TemperatureCalibrator(input_kind="proba", activation=o.activation).fit(val_ens,
                                                                                     t_val)

    # 3. the ensemble on test (timed, after a warm-up that builds the sessions) -------------
    ens.predict_with_uncertainty(X_te[:2])
    t0 = time.perf_counter()
    parts = []
    with _bar(len(X_te), "ensemble on test", progress) as bar:
        for i in range(0, len(X_te), 32):
            parts.append(ens.predict_with_uncertainty(X_te[i:i + 32]))
            bar.update(len(parts[-1][0]))
    seconds_ens = time.perf_counter() - t0
    p_ens = np.concatenate([p for p, _ in parts])
    unc_kind = "mutual_information" if ens.n_samples_ > 1 else "entropy"
    unc_ens = np.concatenate([o.map(m[unc_kind]) for _, m in parts])  # sigmoid: channel sum
    del parts
    p_ens_cal = cal_ens.predict_proba(p_ens)
    pred_ens = o.pred(p_ens)

    # 3b. conformal risk control: thresholds on val, realised false-negative rate on test --
    conformal = _conformal(ConformalRiskController, val_ens, t_val, p_ens, pred_ens, t_te)

    # 4. OOD ------------------------------------------------------------------------------------
    X_fit = _every(X_tr, cfg.n_train_ood)
    X_in = _every(X_te, cfg.n_test_ood)
    ood_sets = {k: _every(datasets.load_ood(k), cfg.n_per_ood_kind) for k in datasets.OOD_KINDS}
    detectors = {
        "spectral": SpectralOODDetector(ens),  # the feature member's maps, one member's pass
        "uncertainty": UncertaintyOODDetector(ens, score="entropy"),
    }
    X_all = np.concatenate([X_in, *ood_sets.values()])
    sizes = [len(X_in), *(len(v) for v in ood_sets.values())]
    ood_scores, ood_auroc = {}, {}
    for dname, det in detectors.items():
        with _bar(len(X_fit), f"fit {dname} OOD", progress) as bar:
            for i in range(0, len(X_fit), 32):
                det.partial_fit(X_fit[i:i + 32])
                bar.update(len(X_fit[i:i + 32]))
        # one pass over the test images and every OOD kind, split afterwards
        all_scores = _chunks(det.score_samples, X_all, f"{dname} OOD scores", progress)
        scores = dict(zip(["in-distribution", *ood_sets],
                          np.split(all_scores, np.cumsum(sizes)[:-1]), strict=True))
        ood_scores[dname] = scores
        ood_auroc[dname] = {k: metrics.ood_auroc(scores["in-distribution"], s)
                            for k, s in scores.items() if k != "in-distribution"}

    # 5. quality ----------------------------------------------------------------------------
    Xq, yq = _every(X_val, cfg.n_quality_val, y_val)
    Xq_fit, yq_fit, info_fit = make_quality_set(Xq, yq, severities=cfg.quality_fit_severities,
                                                seed=0)
    t0 = time.perf_counter()
    with _bar(1, f"fit quality regressor ({len(Xq_fit)} images)", progress) as bar:
        qr = QualityRegressor(ens).fit(Xq_fit, o.targets(yq_fit), groups=info_fit["source"])
        bar.update(1)
    Xt, yt = _every(X_te, cfg.n_quality_test, y_te)
    Xq_te, yq_te, info_te = make_quality_set(Xt, yt, severities=cfg.quality_test_severities,
                                             seed=1)
    true_q, pred_q = [], []
    with _bar(len(Xq_te), "quality on test", progress) as bar:
        for i in range(0, len(Xq_te), 32):
            xb = Xq_te[i:i + 32]
            true_q.append(o.image_dice(ens.predict(xb), o.targets(yq_te[i:i + 32])))
            pred_q.append(qr.predict(xb))
            bar.update(len(xb))
    true_q, pred_q = np.concatenate(true_q), np.concatenate(pred_q)
    # Dice is undefined where a class is absent from both: the regressor's target is 1 there
    true_q = np.where(np.isnan(true_q), qr.empty_score, true_q)
    quality = metrics.quality_report(pred_q, true_q)

    # summary -------------------------------------------------------------------------------
    single = {k: float(np.mean([r[k] for r in member_rows])) for k in ("ece", "nll", "brier")}
    summary = {
        # file names only: summary.json is shared, the installing machine's paths are not
        "models": [Path(p).name for p in paths],
        "n_members": len(paths),
        "data": {"val": len(X_val), "test": len(X_te), "ood_fit_train": len(X_fit),
                 "ood_test_in": len(X_in), "ood_per_kind": {k: len(v) for k, v in
                                                            ood_sets.items()},
                 "quality_fit": len(Xq_fit), "quality_test": len(Xq_te)},
        "config": {**asdict(cfg), "quick": bool(quick)},
        "activation": o.activation,
        "sigmoid_channels": None if o.convention is None else {
            "names": o.names, "convention": o.convention,
            "calibration": "channels pooled, each a binary problem [1 - p, p]",
            "uncertainty_map": f"{unc_kind} summed over channels"},
        "calibration_region": f"foreground bounding box + {ROI_MARGIN} voxels",
        "members": member_rows,
        "test_dice": {"ensemble": _dice(o, pred_ens, t_te).tolist(),
                      "members_mean": np.mean([r["test_dice"] for r in member_rows],
                                              axis=0).tolist(),
                      "classes": o.names},
        "temperature_scaling": {
            "member": worst, "temperature": np.atleast_1d(cal.temperature_).tolist(),
            "before": o.calibration(p_before, t_te, roi_te),
            "after": o.calibration(p_after, t_te, roi_te)},
        "ensemble": {"single_mean": single, "ensemble": o.calibration(p_ens, t_te, roi_te),
                     "ensemble_calibrated": o.calibration(p_ens_cal, t_te, roi_te),
                     "ensemble_temperature": np.atleast_1d(cal_ens.temperature_).tolist()},
        "conformal": conformal,
        "ood_auroc": ood_auroc,
        "quality": {**quality, "target": "dice", "fit_images": len(Xq_fit),
                    "test_images": len(Xq_te)},
        "throughput_images_per_s": {
            "ensemble": len(X_te) / seconds_ens,
            "single_member": len(X_te) * len(paths) / max(seconds_single, 1e-9)},
        "cpus": os.cpu_count(),
    }
    summary["seconds_total"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))

    figure_data = {
        "reliability": {
            f"{worst} (T = 1)": o.curve(p_before, t_te, roi_te),
            f"{worst} + temperature": o.curve(p_after, t_te, roi_te),
            "ensemble": o.curve(p_ens, t_te, roi_te),
            "ensemble + temperature": o.curve(p_ens_cal, t_te, roi_te),
        },
        "examples": _examples(X_te, y_te, t_te, pred_ens, unc_ens, unc_kind, cfg.n_examples,
                              o),
        "ood_scores": ood_scores,
        "quality": {"true": true_q, "predicted": pred_q, "classes": o.names,
                    "corruption": np.asarray(info_te["corruption"])},
    }
    report_path = None
    if report:
        try:
            from uqseg.report import write_report

            report_path = write_report(out, summary, figure_data)
        except ImportError as exc:
            print(f"note: report.html not written: {exc}", file=stream)
    summary["seconds_total"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    print(format_table(summary), file=stream)
    written = [out / "summary.json"] + ([report_path] if report_path else [])
    print("wrote " + ", ".join(str(p) for p in written), file=stream)
    return summary


def _conformal(cls, p_val, y_val, p_te, pred_te, y_te) -> dict:
    """FNR-controlled masks fitted on val, their realised FNR on test (argmax's beside).

    Indicator targets ``(N, C, *spatial)`` (sigmoid outputs): one mask per channel, the
    ``p >= 0.5`` masks ``pred_te`` beside."""
    indicator = np.ndim(y_te) == np.ndim(p_te)
    out = {"risk": "fnr", "alpha": CRC_ALPHA, "baseline": "p >= 0.5" if indicator else "argmax"}
    try:
        crc = cls(risk="fnr", alpha=CRC_ALPHA).fit(p_val, y_val)
    except ValueError as exc:  # e.g. too few val images with --quick
        return {**out, "error": str(exc)}
    masks = crc.predict(p_te)
    out.update({"classes": crc.classes_.tolist(), "lambda": crc.lambda_.tolist(),
                "test_fnr": [], "baseline_fnr": [], "test_images": [],
                "mask_to_truth_volume": []})
    n = len(y_te)
    for i, c in enumerate(crc.classes_):
        truth = (y_te[:, c] if indicator else y_te == c).reshape(n, -1)
        has, size = truth.sum(1) > 0, truth.sum(1)
        for key, m in (("test_fnr", masks[:, i]),
                       ("baseline_fnr", pred_te[:, c] if indicator else pred_te == c)):
            tp = (m.reshape(n, -1) & truth).sum(1)
            out[key].append(float(np.mean(1 - tp[has] / size[has])) if has.any() else None)
        out["test_images"].append(int(has.sum()))
        out["mask_to_truth_volume"].append(float(masks[:, i].sum() / max(size.sum(), 1)))
    if not indicator:
        out["argmax_fnr"] = out["baseline_fnr"]  # the name summary.json had before sigmoid
    return out


def _examples(X, y, t, pred, unc, unc_kind, n, outputs) -> dict:
    """The ``n`` test images with the most foreground, evenly spread over the split; truth
    ``t`` and ``pred`` are label maps, or ``(n, C, H, W)`` masks of sigmoid channels."""
    fg = (y > 0).reshape(len(y), -1).mean(axis=1)
    candidates = np.argsort(-fg)[: max(3 * n, n)]
    idx = np.sort(candidates[np.linspace(0, len(candidates) - 1, n).round().astype(int)])
    idx = np.unique(idx)
    sig = outputs.convention is not None
    return {"image": X[idx, 0], "truth": t[idx], "prediction": pred[idx],
            "uncertainty": unc[idx], "index": idx,
            "uncertainty_kind": f"{unc_kind}, sum over channels" if sig else unc_kind,
            "class_names": list(outputs.names) if sig else ["background", *CLASS_NAMES]}


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def format_table(s: dict) -> str:
    """The compact text table of a demo summary."""
    d = s["data"]
    ts, en = s["temperature_scaling"], s["ensemble"]
    dice = s["test_dice"]
    cls = " / ".join(dice["classes"])
    lines = [
        f"uqseg demo: {s['n_members']} models; test {d['test']} slices, val {d['val']}; "
        f"calibration metrics inside the {s['calibration_region']}",
    ]
    sig = s.get("sigmoid_channels")
    if sig:
        lines.append(f"sigmoid network, {len(sig['names'])} channel(s): {sig['convention']}; "
                     "calibration metrics pool the channels' binary problems")
    lines += [
        "",
        f"{'test Dice (' + cls + ')':<43} "
        f"ensemble {' / '.join(_fmt(v) for v in dice['ensemble'])}, "
        f"mean member {' / '.join(_fmt(v) for v in dice['members_mean'])}",
        f"{'ECE worst member ' + ts['member']:<44}"
        f"{_fmt(ts['before']['ece'], 4)} -> {_fmt(ts['after']['ece'], 4)} after temperature "
        f"scaling (T = {', '.join(_fmt(t, 2) for t in ts['temperature'])})",
        f"{'NLL worst member':<44}{_fmt(ts['before']['nll'], 4)} -> "
        f"{_fmt(ts['after']['nll'], 4)}",
        f"{'NLL single (mean of members) vs ensemble':<44}"
        f"{_fmt(en['single_mean']['nll'], 4)} vs {_fmt(en['ensemble']['nll'], 4)} "
        f"(ensemble + TS {_fmt(en['ensemble_calibrated']['nll'], 4)})",
        f"{'ECE single (mean of members) vs ensemble':<44}"
        f"{_fmt(en['single_mean']['ece'], 4)} vs {_fmt(en['ensemble']['ece'], 4)} "
        f"(ensemble + TS {_fmt(en['ensemble_calibrated']['ece'], 4)})",
        "",
        f"OOD AUROC (fit on {d['ood_fit_train']} train images; {d['ood_test_in']} test images "
        "vs each kind)",
        f"  {'kind':<14}{'n':>4}  {'spectral':>9}  {'uncertainty':>11}",
    ]
    auroc = s["ood_auroc"]
    for kind in auroc["spectral"]:
        lines.append(f"  {kind:<14}{d['ood_per_kind'][kind]:>4}  "
                     f"{_fmt(auroc['spectral'][kind]):>9}  "
                     f"{_fmt(auroc['uncertainty'][kind]):>11}")
    mean = {k: float(np.mean(list(v.values()))) for k, v in auroc.items()}
    lines.append(f"  {'mean':<14}{'':>4}  {_fmt(mean['spectral']):>9}  "
                 f"{_fmt(mean['uncertainty']):>11}")
    q, tp = s["quality"], s["throughput_images_per_s"]
    if "conformal" in s:
        c = s["conformal"]
        head = f"{'FNR-controlled masks (alpha ' + _fmt(c['alpha'], 2) + ')':<44}"
        lines += ["", head + f"not calibrated: {c['error']}" if "error" in c else head +
                  f"test FNR {' / '.join(_fmt(v) for v in c['test_fnr'])} "
                  f"({c.get('baseline', 'argmax')} "
                  f"{' / '.join(_fmt(v) for v in c.get('baseline_fnr', c.get('argmax_fnr')))}),"
                  " mask/truth "
                  f"volume {' / '.join(_fmt(v, 2) for v in c['mask_to_truth_volume'])}"]
    lines += [
        "",
        f"{'quality: predicted vs true Dice':<44}r = {_fmt(q['pearson_r'])}, "
        f"MAE = {_fmt(q['mae'])} ({q['test_images']} corrupted test images, "
        f"fit on {q['fit_images']} from val)",
        f"{'throughput (images/s, ' + str(s['cpus']) + ' CPUs)':<44}"
        f"ensemble {_fmt(tp['ensemble'], 1)}, single member {_fmt(tp['single_member'], 1)}",
        f"{'run time':<44}{_fmt(s['seconds_total'], 1)} s"
        + ("  (--quick: small subsets, rough numbers)" if s["config"]["quick"] else ""),
    ]
    return "\n".join(lines)
