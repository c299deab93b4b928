"""The 3-D reference member: Dice on the test split and on whole scans, speed and memory.

- ``test split``: the member (``datasets.reference_models(dims=3)``) on the five 64^3 test
  volumes of ``load_brain_tissue("test", dims=3)``: Dice per class (mean over volumes) and
  seconds per 64^3 pass.
- ``sliding window``: the same volumes with 16 background voxels added on each side of the R
  axis (64 x 64 x 96, larger than the fixed 64^3 input): OnnxSegmenter's Gaussian-weighted
  sliding window (overlap 0.5, two windows) against one direct pass of the same graph with
  dynamic spatial axes (label agreement, mean |p difference|, Dice of both).
- ``whole scans``: ``uqseg predict --models 3d SCAN`` in a fresh process under
  ``/usr/bin/time -v`` (peak RSS, wall time; ``predict_s`` excludes Python's start and the
  imports) on the MNI template as nilearn ships it (197 x 233 x 189, 1 mm, uint8) and the same
  head stored P, S, L at 1.2 x 2 x 1.2 mm (``uqseg.datasets.load_mni_scan``); Dice in the
  scan's own grid against the template's tissue maps transformed the same way. (Until
  issue 22 the imports timed apart also held the CLI's private ``_predict_volume``, whose
  import, about 8 ms, now counts in ``predict_s``.) The 2-D zoo
  (five members) runs on the template too, for comparison under the same load.

    python benchmarks/bench_zoo3d.py --render   # results/zoo3d.json + table in docs/cli.md
    python benchmarks/bench_zoo3d.py --quick    # template only, no 2-D comparison
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

OUT = RESULTS / "zoo3d.json"
CASES = {"template": ("RAS", (1.0, 1.0, 1.0)), "psl": ("PSL", (1.2, 2.0, 1.2))}
# times predict after the imports (python's start and the imports are the rest of the wall)
TIMED = ("import json, sys, time; t0 = time.perf_counter(); from uqseg import cli; "
         "import uqseg.ensemble, onnxruntime, nibabel; "
         "t1 = time.perf_counter(); code = cli.main(sys.argv[1:]); "
         "print(json.dumps({'import_s': t1 - t0, 'predict_s': time.perf_counter() - t1}), "
         "file=sys.stderr); sys.exit(code)")


def dice(seg: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = seg == k, ref == k
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def direct_copy(path: str):
    """The member's graph with dynamic spatial axes: one pass over any multiple of 8."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    for vi in [*proto.graph.input, *proto.graph.output]:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k >= 2:
                d.dim_param = f"s{k}"
    del proto.graph.value_info[:]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"image": x})[0]


def split_figures(path: str) -> dict:
    from scipy.special import softmax

    from uqseg import OnnxSegmenter, datasets

    seg = OnnxSegmenter(path).fit()
    X, y = datasets.load_brain_tissue("test", dims=3)
    seg.transform(X[:1])  # warm-up
    times, labels = [], []
    for x in X:
        t = time.perf_counter()
        labels.append(seg.predict(x[None])[0])
        times.append(time.perf_counter() - t)
    per = [[dice(s, t, k) for k in (1, 2)] for s, t in zip(labels, y, strict=True)]
    direct = direct_copy(path)
    agree, dp, d_sw, d_dir, t_sw, t_dir = [], [], [], [], [], []
    for x, t in zip(X, y, strict=True):
        big = np.pad(x[None], [(0, 0)] * 4 + [(16, 16)])
        ref = np.pad(t, [(0, 0)] * 2 + [(16, 16)])
        t0 = time.perf_counter()
        a = seg.transform(big)
        t_sw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = direct(big)
        t_dir.append(time.perf_counter() - t0)
        agree.append(float((a.argmax(1) == b.argmax(1)).mean()))
        dp.append(float(np.abs(softmax(a, 1) - softmax(b, 1)).mean()))
        d_sw.append([dice(a.argmax(1)[0], ref, k) for k in (1, 2)])
        d_dir.append([dice(b.argmax(1)[0], ref, k) for k in (1, 2)])
    return {
        "file": Path(path).name, "size_bytes": Path(path).stat().st_size,
        "input_shape": list(seg.input_shape_),
        "test": {"n_volumes": len(X), "dice_gm": round(float(np.mean(per, 0)[0]), 4),
                 "dice_wm": round(float(np.mean(per, 0)[1]), 4),
                 "per_volume": np.round(per, 4).tolist(),
                 "seconds_per_volume": round(float(np.median(times)), 3)},
        "sliding_window": {
            "shape": list(big.shape[2:]), "label_agreement": round(float(np.mean(agree)), 5),
            "mean_abs_proba_diff": float(np.mean(dp)),
            "dice_sliding": np.round(np.mean(d_sw, 0), 4).tolist(),
            "dice_direct": np.round(np.mean(d_dir, 0), 4).tolist(),
            "seconds_sliding": round(float(np.median(t_sw)), 3),
            "seconds_direct": round(float(np.median(t_dir)), 3)},
    }


def run_case(name: str, models: str, tmp: Path) -> dict:
    import nibabel as nib

    from uqseg.datasets import load_mni_scan

    codes, spacing = CASES[name]
    t1, labels, affine = load_mni_scan(codes, spacing)
    scan = tmp / f"{name}.nii.gz"
    if not scan.exists():
        nib.save(nib.Nifti1Image(t1, affine), scan)
    out = tmp / f"out-{name}-{models}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", TIMED, "predict", "--models", models,
           str(scan), "--out", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"predict failed ({res.returncode}): {res.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    timed = json.loads(next(ln for ln in res.stderr.splitlines() if '"predict_s"' in ln))
    seg_img = nib.load(out / f"{name}_seg.nii.gz")
    seg = np.asarray(seg_img.dataobj)
    return {"case": name, "models": models, "codes": codes, "spacing_mm": list(spacing),
            "shape": list(t1.shape), "dtype": str(t1.dtype), "wall_s": round(wall, 1),
            "predict_s": round(timed["predict_s"], 1), "import_s": round(timed["import_s"], 1),
            "peak_rss_mib": round(peak / 1024),
            "same_grid": seg.shape == t1.shape and bool(np.allclose(seg_img.affine, affine)),
            "dice_gm": round(dice(seg, labels, 1), 4), "dice_wm": round(dice(seg, labels, 2), 4)}


def table(record: dict) -> str:
    m = record["member"]
    sw = m["sliding_window"]
    rows = ["| data | models | Dice GM / WM | predict (s) | wall (s) | peak RSS (MiB) |",
            "|---|---|---|---:|---:|---:|",
            f"| test split, {m['test']['n_volumes']} volumes of 64³ | 3-D member | "
            f"{m['test']['dice_gm']:.3f} / {m['test']['dice_wm']:.3f} | "
            f"{m['test']['seconds_per_volume']:.2f} per volume | – | – |",
            f"| same, 64 x 64 x 96 (sliding window, 2 windows) | 3-D member | "
            f"{sw['dice_sliding'][0]:.3f} / {sw['dice_sliding'][1]:.3f} (direct pass: "
            f"{sw['dice_direct'][0]:.3f} / {sw['dice_direct'][1]:.3f}) | "
            f"{sw['seconds_sliding']:.2f} per volume | – | – |"]
    for c in record["cases"]:
        sp = " x ".join(f"{s:g}" for s in c["spacing_mm"])
        who = "3-D member" if c["models"] == "3d" else "2-D zoo (5 members)"
        rows.append(f"| {c['case']} ({c['codes']}, {'x'.join(map(str, c['shape']))}, {sp} mm) "
                    f"| {who} | {c['dice_gm']:.3f} / {c['dice_wm']:.3f} | "
                    f"{c['predict_s']:.1f} | {c['wall_s']:.1f} | {c['peak_rss_mib']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="write the table into docs/cli.md")
    ap.add_argument("--quick", action="store_true", help="template only, no 2-D comparison")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from uqseg import datasets

    member = split_figures(datasets.reference_models(dims=3)[0])
    print(json.dumps(member), flush=True)
    runs = [("template", "3d")] if args.quick else [("template", "3d"), ("psl", "3d"),
                                                     ("template", "zoo")]
    cases = []
    with tempfile.TemporaryDirectory(prefix="uqseg-zoo3d-") as tmp:
        for name, models in runs:
            cases.append(run_case(name, models, Path(tmp)))
            print(json.dumps(cases[-1]), flush=True)
    record = {"machine": machine_record(["numpy", "scipy", "onnxruntime", "nibabel"]),
              "member": member, "cases": cases}
    write_json(OUT.with_name("zoo3d_quick.json") if args.quick else OUT, record)
    print(table(record))
    if args.render:
        write_doc_section(ROOT / "docs" / "cli.md", "zoo3d", table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
