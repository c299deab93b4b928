"""``uqseg.assess`` against the ensemble's plain ``predict_proba`` and the separate calls.

The shipped ensemble with the default spectral OOD detector and a quality regressor, all
fitted on the embedded data; timed round-robin on test slices with every result cache off
(``cache_size=0``), so each call runs its networks:

- ``predict_proba``: the ensemble's probabilities only (what a user pays for a segmentation);
- ``assess``: probabilities, entropy and mutual information maps, OOD score and predicted
  Dice, from one pass;
- ``separate``: ``predict_with_uncertainty`` + ``score_samples`` + ``QualityRegressor.predict``.

Writes ``benchmarks/results/assess.json`` and the table between the ``bench:assess`` markers
of ``docs/benchmarks.md`` (with ``--render``).

Usage::

    python benchmarks/bench_assess.py --render       # about 4 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
from common import (
    RESULTS,
    ROOT,
    machine_record,
    speedup_ci,
    time_round_robin,
    write_doc_section,
)
from common import write_json as _write

import uqseg
from uqseg import EnsembleSegmenter, QualityRegressor, SpectralOODDetector, datasets
from uqseg.quality import make_quality_set


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32, help="test slices per call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block", type=int, default=3,
                    help="consecutive calls per turn, timed after one untimed call of the same "
                         "kind (a call's busy-waiting threads slow whatever runs next)")
    ap.add_argument("--render", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args(argv)

    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, y_val = datasets.load_brain_tissue("val")
    X_te, _ = datasets.load_brain_tissue("test")
    X = np.ascontiguousarray(X_te[:: max(1, len(X_te) // args.images)][: args.images])
    ens = EnsembleSegmenter(datasets.reference_models(), cache_size=0).fit()
    det = SpectralOODDetector(ens).fit(X_tr[::4])
    Xq, yq, info = make_quality_set(X_val[::8], y_val[::8], seed=0)
    qr = QualityRegressor(ens).fit(Xq, yq, groups=info["source"])

    out = uqseg.assess(X, ens, ood=det, quality=qr)
    proba, maps = ens.predict_with_uncertainty(X)
    diffs = {"proba": float(np.abs(out["proba"] - proba).max()),
             "mutual_information": float(np.abs(out["mutual_information"]
                                                - maps["mutual_information"]).max()),
             "ood_score": float(np.abs(out["ood_score"] - det.score_samples(X)).max()),
             "quality": float(np.abs(out["quality"] - qr.predict(X)).max())}

    def separate():
        ens.predict_with_uncertainty(X)
        det.score_samples(X)
        qr.predict(X)

    def assess_blas_threads():  # what uqseg's one-thread BLAS limit buys
        mods = (uqseg._assess, uqseg.ood._base, uqseg.quality)
        old = [m.one_blas_thread for m in mods]
        for m in mods:
            m.one_blas_thread = contextlib.nullcontext
        try:
            uqseg.assess(X, ens, ood=det, quality=qr)
        finally:
            for m, o in zip(mods, old, strict=True):
                m.one_blas_thread = o

    calls = {"predict_proba": lambda: ens.predict_proba(X),
             "assess": lambda: uqseg.assess(X, ens, ood=det, quality=qr),
             "separate": separate,
             "assess_blas_threads": assess_blas_threads}
    t = time_round_robin(calls, repeats=args.repeats, warmup=1, block=args.block)
    base = t["predict_proba"]["times_s"]
    rows = {}
    for name, rec in t.items():
        med = rec["median_s"]
        lo, hi = speedup_ci(rec["times_s"], base)  # time ratio name / predict_proba
        clo, chi = speedup_ci(rec["cpu_times_s"], t["predict_proba"]["cpu_times_s"])
        rows[name] = {"median_s": med, "images_per_s": len(X) / med,
                      "ratio_to_predict_proba": med / t["predict_proba"]["median_s"],
                      "ratio_ci95": [lo, hi],
                      "cpu_median_s": rec["cpu_median_s"],
                      "cpu_ratio_to_predict_proba": rec["cpu_median_s"]
                      / t["predict_proba"]["cpu_median_s"],
                      "cpu_ratio_ci95": [clo, chi]}
    record = {"images": len(X), "shape": list(X.shape), "members": ens.n_members_,
              "fused": bool(ens.fused_), "passes": out["passes"], "max_abs_diff": diffs,
              "timings": t, "rows": rows, "machine": machine_record(
                  ["numpy", "onnxruntime", "scikit-learn"])}
    _write(RESULTS / "assess.json", record)
    table = ["| call | median s | images/s | time / predict_proba (95% CI) | CPU s | "
             "CPU time / predict_proba (95% CI) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        table.append(f"| `{name}` | {r['median_s']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['ratio_to_predict_proba']:.2f}× "
                     f"({r['ratio_ci95'][0]:.2f}–{r['ratio_ci95'][1]:.2f}) | "
                     f"{r['cpu_median_s']:.3f} | {r['cpu_ratio_to_predict_proba']:.2f}× "
                     f"({r['cpu_ratio_ci95'][0]:.2f}–{r['cpu_ratio_ci95'][1]:.2f}) |")
    table.append("")
    table.append(f"{len(X)} test slices of {X.shape[2]}×{X.shape[3]}, {ens.n_members_} members "
                 f"({'fused' if ens.fused_ else 'separate'} graph), {args.repeats} interleaved "
                 f"rounds of {args.block} consecutive calls each, after one untimed call "
                 "(CPU: process CPU time of the same calls, all threads); "
                 "`assess_blas_threads`: `assess` with BLAS free to use its own threads "
                 "(uqseg keeps it on one); `assess` vs "
                 "the separate calls: largest difference "
                 + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".")
    print("\n".join(table))
    if args.render:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "bench:assess", "\n".join(table))
    return record


if __name__ == "__main__":
    main()
