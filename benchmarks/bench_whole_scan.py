"""Whole scans through ``uqseg predict`` with the zoo's preprocessing: Dice, OOD, quality,
time and peak memory, on the MNI template as nilearn ships it and on the same head stored
another way.

Cases: ``template`` (197 x 233 x 189 at 1 mm, RAS, uint8 as shipped) and ``psl`` (the same
head resampled to axes P, S, L at 1.2 x 2 x 1.2 mm, float32; its reference labels come from
the tissue maps resampled the same way, ``uqseg.datasets.load_mni_scan``). Each case runs
``python -m uqseg.cli predict MEMBERS... SCAN --estimators OOD QUALITY`` in a fresh process
under ``/usr/bin/time -v`` (peak RSS, wall time). ``template`` also runs with
``--no-preprocess`` (voxels as stored, slices along axis 2: what predict did before), and
both ways without estimators, the pair that shows what preprocessing adds to predict's peak
memory. Estimators: a ``SpectralOODDetector`` on member 0 fitted on the
``train`` split and a ``QualityRegressor`` on the ensemble fitted on ``make_quality_set``
of the ``val`` split (severities 0.5, 1), saved once under ``--estimators DIR``.

    python benchmarks/bench_whole_scan.py                  # fits estimators first (minutes)
    python benchmarks/bench_whole_scan.py --estimators /tmp/est --render   # + docs/cli.md
    python benchmarks/bench_whole_scan.py --quick          # smoke run (uqseg bench --quick)

Results: ``benchmarks/results/whole_scan.json``; ``--render`` writes the table into
docs/cli.md (section ``whole-scan``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine_record, write_doc_section, write_json  # noqa: E402

OUT = RESULTS / "whole_scan.json"
CASES = {"template": ("RAS", (1.0, 1.0, 1.0)), "psl": ("PSL", (1.2, 2.0, 1.2))}


def fit_estimators(folder: Path, members: list[str], quick: bool = False) -> None:
    import uqseg
    from uqseg import EnsembleSegmenter, QualityRegressor, SpectralOODDetector, datasets
    from uqseg.quality import make_quality_set

    X_tr, _ = datasets.load_brain_tissue("train")
    X_val, y_val = datasets.load_brain_tissue("val")
    print("fitting the OOD detector and the quality regressor (minutes)", file=sys.stderr)
    uqseg.save(SpectralOODDetector(members[0]).fit(X_tr), folder / "ood", overwrite=True)
    step = 4 if quick else 1  # --quick: a quarter of val (the slow test's recipe)
    X_q, y_q, info = make_quality_set(X_val[::step], y_val[::step], severities=(0.5, 1.0))
    qr = QualityRegressor(EnsembleSegmenter(members).fit()).fit(X_q, y_q, groups=info["source"])
    uqseg.save(qr, folder / "quality", overwrite=True)


def dice(seg: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = seg == k, ref == k
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def run_case(name: str, members: list[str], est: Path | None, tmp: Path,
             preprocess: bool = True) -> dict:
    import nibabel as nib

    from uqseg.datasets import load_mni_scan

    codes, spacing = CASES[name]
    t1, labels, affine = load_mni_scan(codes, spacing)
    scan = tmp / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(t1, affine), scan)
    out = tmp / f"out-{name}-{int(preprocess)}-{int(est is not None)}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "uqseg.cli", "predict", *members,
           str(scan), "--out", str(out), "--no-progress"]
    if not preprocess:
        cmd.append("--no-preprocess")
    if est is not None:
        cmd += ["--estimators", str(est / "ood"), str(est / "quality")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"predict failed ({res.returncode}): {res.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    seg_img = nib.load(out / f"{name}_seg.nii.gz")
    seg = np.asarray(seg_img.dataobj)
    scores = json.loads((out / f"{name}_scores.json").read_text())
    rec = {"case": name, "codes": codes, "spacing_mm": list(spacing), "shape": list(t1.shape),
           "dtype": str(t1.dtype), "preprocess": preprocess, "members": len(members),
           "estimators": est is not None,
           "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024),
           "input_mib": round(t1.nbytes / 2**20, 1),
           "same_grid": seg.shape == t1.shape and np.allclose(seg_img.affine, affine),
           "dice_gm": round(dice(seg, labels, 1), 4), "dice_wm": round(dice(seg, labels, 2), 4)}
    if preprocess:
        rec["slices"] = {"n": scores["slices"]["n"], "scored": scores["slices"]["n_scored"]}
    else:
        n = t1.shape[2]
        rec["slices"] = {"n": n, "scored": n}
    for key, s in scores.get("estimators", {}).items():
        if "fraction_outlier" in s:
            rec["fraction_outlier"] = round(s["fraction_outlier"], 4)
            if "volume_inlier" in s:
                rec["volume_ood_inlier"] = s["volume_inlier"]
        elif "volume_predicted_quality" in s:
            rec["predicted_volume_dice"] = [round(v, 4) for v in s["volume_predicted_quality"]]
            rec["volume_dice_gap"] = [round(p - t, 4) for p, t in zip(
                s["volume_predicted_quality"], (rec["dice_gm"], rec["dice_wm"]), strict=True)]
        if "mean_predicted_quality" in s:
            rec["mean_predicted_slice_dice"] = [round(v, 4)
                                                for v in s["mean_predicted_quality"]]
        del key
    return rec


def table(record: dict) -> str:
    rows = ["| scan | voxels (mm) | preprocessing | estimators | Dice GM / WM | scored slices | "
            "OOD-flagged | predicted (volume) / true Dice, GM; WM | wall (s) | peak RSS (MiB) |",
            "|---|---|---|---|---|---:|---:|---|---:|---:|"]
    for c in record["cases"]:
        sp = " x ".join(f"{s:g}" for s in c["spacing_mm"])
        q = c.get("predicted_volume_dice") or c.get("mean_predicted_slice_dice")
        kind = "volume" if "predicted_volume_dice" in c else "mean of slices"
        qtxt = (f"{q[0]:.3f} / {c['dice_gm']:.3f}; {q[1]:.3f} / {c['dice_wm']:.3f} ({kind})"
                if q else "–")
        flagged = (f"{100 * c['fraction_outlier']:.1f} %" if "fraction_outlier" in c else "–")
        rows.append(f"| {c['case']} ({c['codes']}, {'x'.join(map(str, c['shape']))}) | {sp} | "
                    f"{'yes' if c['preprocess'] else 'no (--no-preprocess)'} | "
                    f"{'OOD + quality' if c['estimators'] else 'none'} | "
                    f"{c['dice_gm']:.3f} / {c['dice_wm']:.3f} | "
                    f"{c['slices']['scored']} of {c['slices']['n']} | {flagged} | {qtxt} | "
                    f"{c['wall_s']:.0f} | {c['peak_rss_mib']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=5, help="zoo members (default all 5)")
    ap.add_argument("--estimators", type=Path,
                    help="folder with ood/ and quality/ (uqseg.save); fitted there if absent")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--render", action="store_true", help="write the table into docs/cli.md")
    ap.add_argument("--quick", action="store_true",
                    help="2 members, a small quality set, the template only (smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.members, args.cases = 2, ["template"]
    sys.path.insert(0, str(ROOT))
    from uqseg import datasets

    members = datasets.reference_models()[:args.members]
    with tempfile.TemporaryDirectory(prefix="uqseg-whole-") as tmp:
        tmp = Path(tmp)
        est = args.estimators or tmp / "est"
        if not (est / "quality" / "manifest.json").exists():
            fit_estimators(est, members, quick=args.quick)
        cases = []
        for name in args.cases:
            cases.append(run_case(name, members, est, tmp))
            print(json.dumps(cases[-1]), flush=True)
        if "template" in args.cases and not args.quick:  # as before; then the memory pair
            for e, pre in ((est, False), (None, True), (None, False)):
                cases.append(run_case("template", members, e, tmp, preprocess=pre))
                print(json.dumps(cases[-1]), flush=True)
    record = {"machine": machine_record(["numpy", "scipy", "onnxruntime", "nibabel"]),
              "cases": cases}
    write_json(OUT.with_name("whole_scan_quick.json") if args.quick else OUT, record)
    print(table(record))
    if args.render:
        write_doc_section(ROOT / "docs" / "cli.md", "whole-scan", table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
