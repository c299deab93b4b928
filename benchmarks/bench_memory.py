"""Peak memory (RSS) of sliding-window inference on a 256^3 volume, one subprocess per case.

Each case runs in a fresh interpreter so peaks do not mix; the peak is ``ru_maxrss`` of that
process. ``baseline`` does the same setup (imports, input volume, model load, one 64^3 pass) and
stops, so ``peak - baseline`` is what the inference call itself costs.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory.json
    python benchmarks/bench_memory.py --size 128 --cases baseline onnx_transform

Cases
-----
baseline                  setup only
onnx_transform            OnnxSegmenter(64^3 fixed-size model).transform(X): logits (N, K, 256^3)
onnx_predict              .predict(X): labels
onnx_transform_chunked    the same sliding window, patches run and accumulated ``batch_size`` at a
                          time (the fix proposed in docs/hardening.md); result checked against
                          ``transform``
ensemble_predict_proba    EnsembleSegmenter of 3 such members, .predict_proba(X)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("baseline", "onnx_transform", "onnx_predict", "onnx_transform_chunked",
         "ensemble_predict_proba")
WINDOW = 64
N_CLASSES = 3
MiB = 2**20


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _models(folder: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import onnx
    from onnx_models import make_unet_like

    paths = []
    for seed in range(3):
        path = folder / f"unet3d_{WINDOW}_{seed}.onnx"
        if not path.exists():
            onnx.save(make_unet_like(dims=3, spatial=(WINDOW,) * 3, n_classes=N_CLASSES,
                                     seed=seed), str(path))
        paths.append(str(path))
    return paths


def _gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights, highest at the window centre (as the segmenter's sliding window)."""
    grids = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2
        grids.append(np.exp(-0.5 * (x / max(w * sigma_scale, 1e-3)) ** 2))
    imp = grids[0]
    for g in grids[1:]:
        imp = np.multiply.outer(imp, g)
    return np.maximum(imp / imp.max(), 1e-3).astype(np.float32)


def _window_starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    n = int(np.ceil((size - window) / step)) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


def chunked_sliding_window(seg, X: np.ndarray) -> np.ndarray:
    """Proposed fix for OnnxSegmenter's sliding window: never hold all patches or their logits.

    Same windows, weights and normalisation; patches are cut, run (the public ``transform``
    of window-sized patches) and accumulated ``batch_size`` at a time, so the extra memory is
    O(batch_size * window) instead of O(n_windows * K * window). The window placement and the
    Gaussian weights are this file's copies of the segmenter's; ``max_abs_diff_vs_transform``
    checks them.
    """
    window = tuple(f if f is not None else s for s, f in zip(X.shape[2:], seg.input_shape_[1:],
                                                             strict=True))
    spatial = X.shape[2:]
    steps = [max(1, int(round(w * (1 - float(seg.overlap))))) for w in window]
    starts = list(product(*[_window_starts(s, w, st)
                            for s, w, st in zip(spatial, window, steps, strict=True)]))
    imp = _gaussian_importance(window)
    out = np.zeros((X.shape[0], seg.n_classes_, *spatial), dtype=np.float32)
    norm = np.zeros(spatial, dtype=np.float32)
    bs = int(seg.batch_size)
    for st in starts:
        norm[tuple(slice(a, a + w) for a, w in zip(st, window, strict=True))] += imp
    for i in range(X.shape[0]):
        for b in range(0, len(starts), bs):
            chunk = starts[b:b + bs]
            slices = [tuple(slice(a, a + w) for a, w in zip(st, window, strict=True))
                      for st in chunk]
            patches = np.stack([X[i][(slice(None),) + sl] for sl in slices])
            logits = seg.transform(patches)
            for sl, lg in zip(slices, logits, strict=True):
                lg *= imp
                out[i][(slice(None),) + sl] += lg
    out /= norm
    return out


def run_case(case: str, size: int, model_dir: Path, threads: int) -> dict:
    from uqseg import EnsembleSegmenter, OnnxSegmenter

    paths = _models(model_dir)
    X = np.random.default_rng(0).standard_normal((1, 1, size, size, size), dtype=np.float32)
    seg = OnnxSegmenter(paths[0], batch_size=4, threads=threads).fit()
    # one full batch of patches: the session and its memory arena are part of the baseline
    warm = np.zeros((4, 1, WINDOW, WINDOW, WINDOW), np.float32)
    seg.transform(warm)
    ens = None
    if case == "ensemble_predict_proba":
        ens = EnsembleSegmenter(paths, batch_size=4).fit()
        ens.predict_proba(warm)
        ens.clear_cache()
    start_peak = _peak_bytes()
    t0 = time.perf_counter()
    check = None
    if case == "onnx_transform":
        out = seg.transform(X)
    elif case == "onnx_predict":
        out = seg.predict(X)
    elif case == "onnx_transform_chunked":
        out = chunked_sliding_window(seg, X)
        peak_before_check = _peak_bytes()
        check = float(np.abs(out - seg.transform(X)).max())
    elif case == "ensemble_predict_proba":
        out = ens.predict_proba(X)
    else:
        out = None
    seconds = time.perf_counter() - t0
    peak = peak_before_check if check is not None else _peak_bytes()
    return {"case": case, "size": size, "peak_rss_mib": peak / MiB,
            "peak_before_call_mib": start_peak / MiB, "seconds": seconds,
            "output_shape": None if out is None else list(out.shape),
            "output_dtype": None if out is None else str(out.dtype),
            "max_abs_diff_vs_transform": check}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.size, Path(args.model_dir), args.threads)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _models(Path(tmp))
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--size", str(args.size),
                   "--model-dir", tmp, "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"{case:26s} peak {res['peak_rss_mib']:8.0f} MiB  {res['seconds']:6.1f} s",
                  flush=True)
    base = next((r["peak_rss_mib"] for r in results if r["case"] == "baseline"), None)
    vox = args.size ** 3
    summary = {
        "input_mib": vox * 4 / MiB,
        "one_output_mib": N_CLASSES * vox * 4 / MiB,
        "baseline_mib": base,
        "window": WINDOW, "n_classes": N_CLASSES, "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "cases": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"\ninput {summary['input_mib']:.0f} MiB, one (K={N_CLASSES}, {args.size}^3) float32 "
          f"output {summary['one_output_mib']:.0f} MiB\n")
    print(markdown_table(summary))


def markdown_table(summary: dict) -> str:
    """The docs/hardening.md table from a results dict."""
    lines = ["| case | peak RSS (MiB) | before the call (MiB) | the call adds (MiB) | "
             "adds / one output | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in summary["cases"]:
        extra = r["peak_rss_mib"] - r["peak_before_call_mib"]
        lines.append(f"| {r['case']} | {r['peak_rss_mib']:.0f} | {r['peak_before_call_mib']:.0f} "
                     f"| {extra:.0f} | {extra / summary['one_output_mib']:.2f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
