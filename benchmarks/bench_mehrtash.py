"""Mehrtash et al.'s segment-level claims on the zoo, at the zoo's scale (128², converged).

1. Segment-level uncertainty vs quality: per image and class, the mean binary entropy of p_k over
   the predicted segment (``uqseg.metrics.segment_uncertainty``) against logit(Dice) of that
   segment; Pearson r per class on the corrupted-image quality set (the test split widened with
   every corruption at four severities), for each member and the five-member ensemble. Paper:
   r = -0.78 (brain), -0.77 (heart), -0.92 (prostate).
2. Dice-loss vs cross-entropy members: segment-level ECE (inside the foreground box + 10
   voxels) before and after temperature scaling (fitted on val), on the clean test split; the
   ensembles of the Dice-trained and of the CE-trained members. Paper: Dice-trained networks are
   worse calibrated, ensembling fixes much of it.
3. The ensemble's NLL cut over the mean single member, with its spread over 3 draws of 3 of the
   5 members. Paper: 44-66%.

Writes ``benchmarks/results/mehrtash.json`` and, with ``--render``, the tables between the
``bench:mehrtash`` markers of ``docs/reproductions.md``.

Usage::

    python benchmarks/bench_mehrtash.py --render     # about 6 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse

import numpy as np
from common import RESULTS, ROOT, machine_record, write_doc_section, write_json
from scipy.special import logit
from scipy.stats import pearsonr

from uqseg import EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator, datasets, metrics
from uqseg.quality import make_quality_set
from uqseg.uncertainty import softmax

CLASSES = ("grey matter", "white matter")
DICE_CLIP = 1e-3  # logit(Dice) of a perfect or empty segment is infinite


def _r(unc, dice):
    out = []
    for k in range(unc.shape[1]):
        ok = np.isfinite(unc[:, k]) & np.isfinite(dice[:, k])
        d = np.clip(dice[ok, k], DICE_CLIP, 1 - DICE_CLIP)
        out.append(float(pearsonr(unc[ok, k], logit(d))[0]) if ok.sum() > 2 else float("nan"))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=int, default=3, help="test slices kept for the quality set")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)

    paths = datasets.reference_models()
    names = [p.rsplit("/", 1)[-1].removesuffix(".onnx") for p in paths]
    X_val, y_val = datasets.load_brain_tissue("val")
    X_te, y_te = datasets.load_brain_tissue("test")
    Xq, yq, info = make_quality_set(X_te[:: args.every], y_te[:: args.every], seed=1)
    roi_te = metrics.foreground_roi(y_te, margin=10)

    members = [OnnxSegmenter(p).fit() for p in paths]
    pq = [softmax(m.transform(Xq)) for m in members]           # quality set
    z_val = [m.transform(X_val) for m in members]
    z_te = [m.transform(X_te) for m in members]
    p_te = [softmax(z) for z in z_te]

    # 1. segment-level uncertainty vs logit(Dice) ----------------------------------------------
    corr = {}
    for name, p in [*zip(names, pq, strict=True), ("ensemble (5)", np.mean(pq, axis=0))]:
        unc = metrics.segment_uncertainty(p)
        dice = metrics.dice_score(p.argmax(1), yq, n_classes=3)  # foreground classes
        corr[name] = _r(unc, dice)

    # 2. Dice vs CE members, before/after temperature scaling ----------------------------------
    calib = {}
    groups = {"dice": [i for i, n in enumerate(names) if n.endswith(("_dice", "_dice_bg"))],
              "ce": [i for i, n in enumerate(names) if n.endswith("_ce")]}
    for i, name in enumerate(names):
        cal = TemperatureCalibrator().fit(z_val[i], y_val)
        calib[name] = {
            "loss": name.split("_", 2)[-1],
            "ece": float(metrics.expected_calibration_error(p_te[i], y_te, mask=roi_te)),
            "ece_ts": float(metrics.expected_calibration_error(
                cal.predict_proba(z_te[i]), y_te, mask=roi_te)),
            "nll": float(metrics.negative_log_likelihood(p_te[i], y_te, mask=roi_te)),
            "temperature": float(np.atleast_1d(cal.temperature_)[0]),
            "dice": np.nanmean(metrics.dice_score(p_te[i].argmax(1), y_te, n_classes=3),
                               axis=0).tolist()}
    for g, idx in groups.items():
        p = np.mean([p_te[i] for i in idx], axis=0)
        pv = np.mean([softmax(z_val[i]) for i in idx], axis=0)
        cal = TemperatureCalibrator(input_kind="proba").fit(pv, y_val)
        calib[f"ensemble of {g} members ({len(idx)})"] = {
            "loss": g, "ece": float(metrics.expected_calibration_error(p, y_te, mask=roi_te)),
            "ece_ts": float(metrics.expected_calibration_error(cal.predict_proba(p), y_te,
                                                               mask=roi_te)),
            "nll": float(metrics.negative_log_likelihood(p, y_te, mask=roi_te)),
            "temperature": float(np.atleast_1d(cal.temperature_)[0]),
            "dice": np.nanmean(metrics.dice_score(p.argmax(1), y_te, n_classes=3),
                               axis=0).tolist()}

    # 3. NLL cut of 3-member ensembles over 3 draws --------------------------------------------
    rng = np.random.default_rng(0)
    cuts = []
    for _ in range(3):
        idx = sorted(rng.choice(len(paths), 3, replace=False).tolist())
        single = np.mean([metrics.negative_log_likelihood(p_te[i], y_te, mask=roi_te)
                          for i in idx])
        ens = metrics.negative_log_likelihood(np.mean([p_te[i] for i in idx], axis=0), y_te,
                                              mask=roi_te)
        cuts.append({"members": [names[i] for i in idx], "single_mean_nll": float(single),
                     "ensemble_nll": float(ens), "cut": float(1 - ens / single)})
    all_single = np.mean([calib[n]["nll"] for n in names])
    all_ens = float(metrics.negative_log_likelihood(np.mean(p_te, axis=0), y_te, mask=roi_te))
    # the fused ensemble gives the same probabilities (sanity check of the numpy mean above)
    check = EnsembleSegmenter(paths).fit().predict_proba(X_te[:4])
    assert np.allclose(check, np.mean([p[:4] for p in p_te], axis=0), atol=1e-5)

    record = {"pearson_r_segment_uncertainty_vs_logit_dice": corr, "classes": CLASSES,
              "quality_set_images": len(Xq), "calibration": calib, "nll_cut_draws": cuts,
              "nll_cut_all5": {"single_mean": float(all_single), "ensemble": all_ens,
                               "cut": float(1 - all_ens / all_single)},
              "machine": machine_record(["numpy", "onnxruntime", "scipy"])}
    write_json(RESULTS / "mehrtash.json", record)

    lines = [f"Pearson r, segment-level uncertainty vs logit(Dice), {len(Xq)} corrupted test "
             "slices (paper: −0.77 to −0.92):", "",
             "| network | r grey matter | r white matter |", "|---|---:|---:|"]
    lines += [f"| {n} | {r[0]:.3f} | {r[1]:.3f} |" for n, r in corr.items()]
    lines += ["", "Segment-level ECE (foreground box + 10 voxels), clean test split, before → "
              "after temperature scaling fitted on val:", "",
              "| network | loss | Dice GM / WM | ECE | ECE after TS | T | NLL |",
              "|---|---|---|---:|---:|---:|---:|"]
    for n, c in calib.items():
        lines.append(f"| {n} | {c['loss']} | {c['dice'][0]:.3f} / {c['dice'][1]:.3f} | "
                     f"{c['ece']:.4f} | {c['ece_ts']:.4f} | {c['temperature']:.2f} | "
                     f"{c['nll']:.4f} |")
    cut = np.array([c["cut"] for c in cuts])
    lines += ["", f"NLL cut of the ensemble over the mean member: all five "
              f"{100 * record['nll_cut_all5']['cut']:.1f}%; three draws of three members "
              f"{100 * cut.mean():.1f}% ± {100 * cut.std(ddof=1):.1f}% "
              f"({', '.join(f'{100 * c:.1f}%' for c in cut)}); paper 44–66%."]
    print("\n".join(lines))
    if args.render:
        write_doc_section(ROOT / "docs" / "reproductions.md", "bench:mehrtash", "\n".join(lines))
    return record


if __name__ == "__main__":
    main()
