"""Speed and memory of TemperatureCalibrator.fit on 1e7 and 1e8 voxels (3-D, 3 classes).

The logits are streamed from a stand-in segmenter (``transform`` hands out synthetic 100^3
volumes from a pool of ten), exactly as ``TemperatureCalibrator(seg).fit(X, y)`` streams a
real network's output batch by batch. Labels are drawn from ``softmax(z)`` and the calibrator
sees ``z * T0`` (T0 = 2.5), so the fitted temperature should be 2.5.

Run: ``python benchmarks/bench_calibration.py`` -> ``benchmarks/results/calibration.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
import sklearn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from uqseg.calibration import TemperatureCalibrator  # noqa: E402

T0 = 2.5
SIDE = 100  # 1e6 voxels per volume
POOL = 10
K = 3


def make_pool(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(POOL, K, SIDE, SIDE, SIDE)).astype(np.float32) * 2
    z[:, 0] += 2.0  # dominant background, as in segmentation
    y = np.empty((POOL, SIDE, SIDE, SIDE), np.int8)
    for i in range(POOL):  # one volume at a time keeps the float64 temporaries small
        p = np.exp(z[i].astype(np.float64))
        cum = np.cumsum(p / p.sum(axis=0), axis=0)[:-1]
        y[i] = (cum < rng.random((1, SIDE, SIDE, SIDE))).sum(axis=0)
    z *= T0
    return z, y


class PoolSegmenter:
    """Stand-in segmenter: image i is a dummy scalar, its logits are pool volume i % POOL."""

    def __init__(self, pool):
        self.pool = pool
        self.fitted_ = True

    def transform(self, X):
        idx = np.asarray(X).reshape(len(X)).astype(int) % POOL
        return self.pool[idx]


def run(n_volumes, z, y_pool, memory):
    seg = PoolSegmenter(z)
    X = np.arange(n_volumes, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    y = y_pool[np.arange(n_volumes) % POOL]  # allocated before the measurement
    cal = TemperatureCalibrator(seg, batch_size=2)
    if memory:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    cal.fit(X, y)
    secs = time.perf_counter() - t
    peak = None
    if memory:
        peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()
    return cal, secs, peak


DOC = Path(__file__).resolve().parents[1] / "docs" / "calibration.md"
START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def write_doc(result):
    """Put the results table between the bench markers of docs/calibration.md."""
    lines = ["Fit from a streaming segmenter (3-D 100^3 volumes, K = 3, `max_voxels=2e6`, "
             "`batch_size=2`), regenerate with `python benchmarks/bench_calibration.py` "
             "(`benchmarks/results/calibration.json`):", "",
             "| voxels | fit time (median) | voxels / s | peak traced memory | sample | "
             "T (true 2.5) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_voxels']:.0e} | {r['fit_seconds_median']:.1f} s "
            f"({r['repeats']} run{'s' if r['repeats'] > 1 else ''}) "
            f"| {r['voxels_per_second'] / 1e6:.2f} M | {r['peak_traced_MiB']:.0f} MiB "
            f"| {r['n_voxels_sampled']:,} | {r['temperature']:.4f} |")
    ex = result["exact_vs_sampled"]
    m = result["machine"]
    lines += ["", f"Exact fit on the same 1e7 voxels (all kept): T = "
              f"{ex['temperature_exact']:.4f} vs {ex['temperature_sampled']:.4f} from the "
              f"2e6-voxel sample. Machine: {m['cpu_count']} shared CPU cores "
              f"(load average {m['load_average_1min']:.1f} during the run, so times are "
              f"pessimistic), {result['date'][:10]}. Peak memory is what the fit allocates "
              "beyond its inputs (tracemalloc); it does not grow with the number of voxels."]
    doc = DOC.read_text()
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        DOC.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END
                       + rest.split(END, 1)[1])


def main():
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    if "--doc-only" in sys.argv:  # rewrite the docs table from the last results
        write_doc(json.loads((out_dir / "calibration.json").read_text()))
        return
    t = time.perf_counter()
    z, y_pool = make_pool()
    print(f"pool of {POOL} volumes made in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for n_volumes, repeats in ((10, 3), (100, 1)):
        if repeats > 1:
            run(n_volumes, z, y_pool, memory=False)  # warm-up
        times = []
        for _ in range(repeats):
            cal, secs, _ = run(n_volumes, z, y_pool, memory=False)
            times.append(secs)
        cal, secs_mem, peak = run(n_volumes, z, y_pool, memory=True)
        row = {
            "n_voxels": cal.n_voxels_fit_, "n_volumes": n_volumes,
            "volume": [SIDE] * 3, "n_classes": K, "max_voxels": cal.max_voxels,
            "n_voxels_sampled": cal.n_voxels_sampled_, "repeats": repeats,
            "fit_seconds_median": statistics.median(times), "fit_seconds_all": times,
            "voxels_per_second": cal.n_voxels_fit_ / statistics.median(times),
            "peak_traced_MiB": peak, "seconds_with_tracemalloc": secs_mem,
            "temperature": cal.temperature_, "true_temperature": T0,
            "n_iter": cal.n_iter_,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    # sampling error: the same 1e7 voxels fitted exactly (every voxel kept)
    X = np.arange(POOL, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    t = time.perf_counter()
    exact = TemperatureCalibrator(PoolSegmenter(z), max_voxels=POOL * SIDE**3).fit(X, y_pool)
    exact_row = {"n_voxels": exact.n_voxels_fit_, "temperature_exact": exact.temperature_,
                 "temperature_sampled": rows[0]["temperature"],
                 "fit_seconds": time.perf_counter() - t}
    print(json.dumps(exact_row), flush=True)
    result = {
        "name": "calibration_fit",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min": os.getloadavg()[0]},
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__,
                     "sklearn": sklearn.__version__},
        "note": "shared 2-core machine; other jobs were running (see load_average_1min)",
        "rows": rows, "exact_vs_sampled": exact_row,
        "max_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    path = out_dir / "calibration.json"
    path.write_text(json.dumps(result, indent=2))
    write_doc(result)
    print(f"wrote {path} and the table in {DOC}")


if __name__ == "__main__":
    main()
