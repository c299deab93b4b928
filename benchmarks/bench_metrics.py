"""Speed and memory of uqseg's calibration metrics and temperature fit against other libraries.

Data: ``N`` images of ``K = 3`` classes at 256x256 (65,536 voxels each), float32 softmax
probabilities of random logits (scale 3) with labels drawn from those probabilities, made
chunk-wise (16 images = 1,048,576 voxels per chunk) from a fixed seed before timing.

- ``--voxels`` (default 1e8, i.e. 1,526 images, 1.2 GB of probabilities): uqseg's streaming
  ``CalibrationAccumulator`` fed chunk by chunk, from probabilities (``update``) and from logits
  (``update_logits``, softmax fused chunk-wise). One pass gives ECE, Brier score and NLL.
  The machine's memory bandwidth on the same bytes is timed alongside (``read_copy``: each chunk
  copied into one reused buffer; ``read_max``: a read-only max pass), and the ECE's time is
  given as a multiple of each.
- ``--compare-voxels`` (default 1e7): every library on the same data. netcal needs one
  ``(n, K)`` array (prepared outside the timing), torchmetrics / torch-uncertainty are fed the
  chunks through their ``update`` (zero-copy ``torch.from_numpy``). uqseg is timed here too, so
  the ratios come from the same run and the same data.
- Temperature fit on ``--fit-voxels`` (default 1e6): uqseg ``TemperatureCalibrator`` (from
  logits) against netcal ``TemperatureScaling`` (from probabilities).

Memory: a fresh subprocess per method; peak RSS above the RSS with the data already in memory.

Usage::

    python benchmarks/bench_metrics.py                    # full run
    python benchmarks/bench_metrics.py --quick            # tiny smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

SIDE, K, CHUNK_IMAGES, N_BINS = 256, 3, 16, 15
PACKAGES = ["numpy", "scipy", "uqseg", "netcal", "torchmetrics", "torch-uncertainty", "torch"]
# metric -> methods, timed round-robin at the comparison size
GROUPS = {
    "ece": ["uqseg", "uqseg_logits", "netcal", "torchmetrics", "torch_uncertainty"],
    "brier": ["uqseg", "torch_uncertainty"],
    "nll": ["uqseg", "torch_uncertainty"],
    "temperature_fit": ["uqseg", "netcal"],
}
SKIPPED = {
    ("brier", "netcal"): "netcal has no classification Brier score",
    ("brier", "torchmetrics"): "torchmetrics has no multiclass Brier score",
    ("nll", "netcal"): "netcal.metrics.NLL is for regression (Gaussian) outputs",
    ("temperature_fit", "torch_uncertainty"): (
        "TemperatureScaler needs torch_uncertainty.post_processing's package import, which "
        "imports torchvision; the PyPI torchvision for torch 2.13 fails to load against the "
        "CPU-only torch"
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat")
    p.add_argument("--voxels", type=float, default=1e8)
    p.add_argument("--compare-voxels", type=float, default=1e7)
    p.add_argument("--fit-voxels", type=float, default=1e6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--repeats-large", type=int, default=3, help="repeats at --voxels")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS / "metrics.json")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- data
def make_chunks(n_voxels: float, seed: int = 0, label_dtype=np.int64) -> list[tuple]:
    """``[(proba (b, K, 256, 256) float32, labels (b, 256, 256)), ...]`` covering n_voxels."""
    n_img = max(1, int(round(n_voxels / SIDE**2)))
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_img, CHUNK_IMAGES):
        b = min(CHUNK_IMAGES, n_img - start)
        z = rng.standard_normal((b, K, SIDE, SIDE), dtype=np.float32)
        z *= 3.0
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        u = rng.random((b, SIDE, SIDE), dtype=np.float32)
        # labels drawn from the probabilities: a calibrated "model" up to float rounding
        y = (u > z[:, 0]).astype(label_dtype) + (u > z[:, 0] + z[:, 1])
        chunks.append((z, y))
    return chunks


def n_voxels_of(chunks) -> int:
    return sum(y.size for _, y in chunks)


# ---------------------------------------------------------------------- libraries
def import_torch_uncertainty():
    """torch_uncertainty's metrics without its package ``__init__`` (which needs torchvision)."""
    if "torch_uncertainty" not in sys.modules:
        spec = importlib.util.find_spec("torch_uncertainty")
        if spec is None:
            raise ImportError("torch-uncertainty is not installed")
        root = spec.submodule_search_locations[0]
        for name, sub in (("torch_uncertainty", ""), ("torch_uncertainty.metrics", "metrics")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = pkg
    from torch_uncertainty.metrics import classification

    return classification


def make_call(metric: str, method: str, chunks, flat=None):
    """A zero-argument callable computing ``metric`` with ``method`` over all chunks."""
    warnings.simplefilter("ignore")  # library deprecation chatter
    if method.startswith("uqseg"):
        from uqseg.metrics.calibration import CalibrationAccumulator

        if metric == "temperature_fit":
            from uqseg.calibration import TemperatureCalibrator

            # the images as logits (log-probabilities), the calibrator's own input layout
            z = np.log(np.maximum(np.concatenate([c for c, _ in chunks]), 1e-30))
            yz = np.concatenate([y for _, y in chunks])
            return lambda: TemperatureCalibrator().fit(z, yz).temperature_

        def run():
            # ECE needs only the binned statistics; Brier/NLL need the per-voxel scores
            acc = CalibrationAccumulator(N_BINS, K, scores=metric != "ece")
            for p, y in chunks:
                if method == "uqseg_logits":
                    acc.update_logits(p, y)  # probabilities are valid logits: same cost
                else:
                    acc.update(p, y)
            return getattr(acc, {"ece": "ece", "brier": "brier", "nll": "nll"}[metric])

        return run
    if method == "netcal":
        if metric == "ece":
            from netcal.metrics import ECE

            return lambda: ECE(bins=N_BINS).measure(flat[0], flat[1])
        if metric == "temperature_fit":
            from netcal.scaling import TemperatureScaling

            return lambda: TemperatureScaling().fit(flat[0], flat[1]).temperature
    import torch

    torch.set_num_threads(common.cpu_info()["usable_cpus"])
    tchunks = [(torch.from_numpy(p), torch.from_numpy(y)) for p, y in chunks]
    if method == "torchmetrics" and metric == "ece":
        from torchmetrics.classification import MulticlassCalibrationError

        def run_tm():
            m = MulticlassCalibrationError(num_classes=K, n_bins=N_BINS, norm="l1")
            for p, y in tchunks:
                m.update(p, y)
            return float(m.compute())

        return run_tm
    if method == "torch_uncertainty":
        tu = import_torch_uncertainty()

        def run_tu():
            if metric == "ece":
                m = tu.CalibrationError(task="multiclass", num_classes=K, num_bins=N_BINS)
            elif metric == "brier":
                m = tu.BrierScore(num_classes=K)
            else:
                m = tu.CategoricalNLL()
            for p, y in tchunks:
                if metric == "ece":
                    m.update(p, y)
                else:  # these take (n, K) rows
                    m.update(p.permute(0, 2, 3, 1).reshape(-1, K), y.reshape(-1))
            return float(m.compute())

        return run_tu
    raise ValueError(f"no {method} implementation of {metric}")


READS = {
    "read_copy": "np.copyto of each chunk into one chunk-sized buffer (reads every byte once)",
    "read_max": "max of each array (a read-only pass over every byte)",
}


def read_calls(chunks):
    """The machine's memory bandwidth on the same bytes: what one pass over the data costs."""
    bufs = {}
    for p, y in chunks:
        bufs.setdefault((p.shape, y.shape), (np.empty_like(p), np.empty_like(y)))

    def copy():
        for p, y in chunks:
            bp, by = bufs[(p.shape, y.shape)]
            np.copyto(bp, p)
            np.copyto(by, y)

    def read():
        return [(p.max(), y.max()) for p, y in chunks]

    return {"read_copy": copy, "read_max": read}


def flatten(chunks):
    """netcal's input: one (n, K) float32 array and (n,) labels."""
    p = np.concatenate([c.transpose(0, 2, 3, 1).reshape(-1, K) for c, _ in chunks])
    y = np.concatenate([yy.ravel() for _, yy in chunks])
    return p, y


# ---------------------------------------------------------------------- probes
def probe(name: str, spec: dict) -> dict:
    metric, method = name.split(":")
    if not method.startswith("uqseg"):
        import torch  # noqa: F401 - library RSS belongs to the baseline
    label_dtype = np.uint8 if spec.get("uint8_labels") else np.int64
    chunks = make_chunks(spec["voxels"], label_dtype=label_dtype)
    flat = flatten(chunks) if method == "netcal" or metric == "temperature_fit" else None
    try:
        call = make_call(metric, method, chunks, flat)
    except ImportError as exc:
        return {"skipped": str(exc)}
    call()  # imports and first-call caches belong to the baseline
    return common.measure_peak(call)


def _probe(name, spec):
    return common.run_probe(Path(__file__), ["--probe", name, "--probe-spec", json.dumps(spec)])


# ---------------------------------------------------------------------- main
def bench_group(metric, chunks, flat, args, results):
    calls, out = {}, {}
    for method in GROUPS[metric]:
        try:
            calls[method] = make_call(metric, method, chunks, flat)
            out[method] = {"value": float(np.asarray(calls[method]()).ravel()[0])}
        except Exception as exc:  # noqa: BLE001 - a comparison library failed: record it
            out[method] = {"skipped": f"{type(exc).__name__}: {exc}"[:400]}
            calls.pop(method, None)
    for (m, method), why in SKIPPED.items():
        if m == metric:
            out[method] = {"skipped": why}
    times = common.time_round_robin(calls, args.repeats, args.warmup)
    n = n_voxels_of(chunks) if metric != "temperature_fit" else flat[1].size
    for method, t in times.items():
        out[method].update({"median_s": t["median_s"], "times_s": t["times_s"],
                            "mvoxels_per_s": n / t["median_s"] / 1e6})
    base = out.get("uqseg", {}).get("median_s")
    for r in out.values():
        if base and "median_s" in r:
            r["time_vs_uqseg"] = r["median_s"] / base  # > 1: slower than uqseg
    if not args.no_memory:
        spec = {"voxels": n}
        for method in calls:
            out[method]["memory"] = _probe(f"{metric}:{method}", spec)
    results[metric] = {"voxels": n, "methods": out}
    summary = ", ".join(f"{m} {r['median_s']:.3f}s" for m, r in out.items() if "median_s" in r)
    print(f"  {metric} @ {n:.3g} voxels: {summary}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, json.loads(args.probe_spec))))
        return {}
    if args.quick:
        args.voxels, args.compare_voxels, args.fit_voxels = 2**18, 2**17, 2**16
        args.repeats, args.repeats_large, args.warmup = 1, 1, 0
    record = common.machine_record(PACKAGES)
    record.update({
        "benchmark": "metrics",
        "quick": args.quick,
        "settings": {"n_classes": K, "image": [SIDE, SIDE], "chunk_images": CHUNK_IMAGES,
                     "n_bins": N_BINS, "repeats": args.repeats,
                     "repeats_large": args.repeats_large, "warmup": args.warmup},
        "skipped": {f"{m}:{lib}": why for (m, lib), why in SKIPPED.items()},
        "compare": {},
    })
    print(f"[metrics] comparison at {args.compare_voxels:.3g} voxels", flush=True)
    chunks = make_chunks(args.compare_voxels)
    flat = flatten(chunks)
    for metric in ("ece", "brier", "nll"):
        bench_group(metric, chunks, flat, args, record["compare"])
    del chunks, flat
    fit_chunks = make_chunks(args.fit_voxels, seed=1)
    bench_group("temperature_fit", fit_chunks, flatten(fit_chunks), args, record["compare"])
    del fit_chunks

    print(f"[metrics] uqseg streaming at {args.voxels:.3g} voxels", flush=True)
    big = make_chunks(args.voxels, seed=2, label_dtype=np.uint8)
    n_big = n_voxels_of(big)
    calls = {m: make_call("ece", m, big) for m in ("uqseg", "uqseg_logits")}
    calls.update(read_calls(big))
    times = common.time_round_robin(calls, args.repeats_large, args.warmup)
    large = {"voxels": n_big, "data_gb": sum(p.nbytes + y.nbytes for p, y in big) / 1e9,
             "label_dtype": "uint8", "methods": {}, "bandwidth": {}}
    for m, t in times.items():
        if m in READS:
            large["bandwidth"][m] = {"median_s": t["median_s"], "times_s": t["times_s"],
                                     "gb_per_s": large["data_gb"] / t["median_s"]}
            continue
        large["methods"][m] = {"median_s": t["median_s"], "times_s": t["times_s"],
                               "mvoxels_per_s": n_big / t["median_s"] / 1e6}
    for r in large["bandwidth"].values():  # > 1: the ECE takes that many reads of the data
        r["uqseg_time_ratio"] = large["methods"]["uqseg"]["median_s"] / r["median_s"]
    del big, calls
    if not args.no_memory:
        for m in ("uqseg", "uqseg_logits"):
            large["methods"][m]["memory"] = _probe(
                f"ece:{m}", {"voxels": n_big, "uint8_labels": True})
    record["large"] = large
    ece = record["compare"]["ece"]["methods"]
    # netcal at the large size: linear in voxels (it is: one histogram pass), stated as such
    if "median_s" in ece.get("netcal", {}):
        scale = n_big / record["compare"]["ece"]["voxels"]
        large["netcal_extrapolated_s"] = ece["netcal"]["median_s"] * scale
        large["speedup_vs_netcal_extrapolated"] = (
            large["netcal_extrapolated_s"] / large["methods"]["uqseg"]["median_s"])
    print("  large: " + ", ".join(f"{m} {r['median_s']:.2f}s" for m, r in
                                  {**large["methods"], **large["bandwidth"]}.items()), flush=True)
    record["loadavg_end"] = common.loadavg()
    common.write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
