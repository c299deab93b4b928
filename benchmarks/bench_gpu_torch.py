"""GPU side of the inference benchmark: the reference U-Net through torch on CUDA.

Runs where a CUDA GPU and torch are present but neither ONNX Runtime's GPU build nor
TensorRT is (the lent GPU machine's image): torch eager in fp32 (cuDNN, TF32 convolutions
allowed as torch's default), eager fp16 (``model.half()``), channels-last fp16, and
``torch.compile`` for the 2-D 128x128 configuration. Same networks, sizes and batches as
``bench_inference.py``; images/s at the configuration's batch, latency at batch 1 (medians
of CUDA-synchronised wall times after warm-up), peak CUDA memory per variant. Nominal FLOPs
come from ``inference.json`` (ONNX shape inference) when the CPU run is present.

Usage::

    python benchmarks/bench_gpu_torch.py --out benchmarks/results/gpu_torch.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_inference import CONFIGS, build_model  # noqa: E402  (same networks and sizes)

# dense (no sparsity) peaks from NVIDIA's H100/H200 data sheets, TFLOP/s
PEAKS = {
    "H100 SXM": {"fp32": 67.0, "tf32_tensor": 494.7, "fp16_tensor": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32_tensor": 378.0, "fp16_tensor": 756.0},
    "H200": {"fp32": 67.0, "tf32_tensor": 494.7, "fp16_tensor": 989.4},
}


def peak_for(name: str) -> tuple[str | None, dict | None]:
    if "H200" in name:
        return "H200", PEAKS["H200"]
    if "H100" in name:
        key = "H100 PCIe" if "PCIe" in name else "H100 SXM"
        return key, PEAKS[key]
    return None, None


def timed(fn, x, repeats: int, warmup: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return times


def variants(base: torch.nn.Module, dims: int, compile_: bool):
    """``(name, model on the GPU, input dtype, memory format)`` for each variant."""
    fresh = lambda: copy.deepcopy(base).cuda()  # noqa: E731
    cl = torch.channels_last if dims == 2 else torch.channels_last_3d
    yield "torch_eager_fp32", fresh(), torch.float32, None
    yield "torch_eager_fp16", fresh().half(), torch.float16, None
    yield "torch_eager_fp16_channels_last", fresh().half().to(memory_format=cl), torch.float16, cl
    if compile_:
        yield "torch_compile_fp32", torch.compile(fresh()), torch.float32, None
        yield "torch_compile_fp16", torch.compile(fresh().half()), torch.float16, None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_torch.json")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-configs", default="2d128")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return {}
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name()
    peak_key, peak = peak_for(gpu)
    flops = {}
    cpu_json = ROOT / "benchmarks/results/inference.json"
    if cpu_json.exists():
        cpu = json.loads(cpu_json.read_text(encoding="utf-8"))
        flops = {k: v.get("flops_per_image") for k, v in cpu.get("configs", {}).items()}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "benchmark": "bench_gpu_torch.py",
        "platform": platform.platform(),
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability()),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        },
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "width": args.width,
            "depth": args.depth,
            "cudnn_benchmark": True,
            "tf32_convolutions": torch.backends.cudnn.allow_tf32,
        },
        "peak_tflops": {"model": peak_key, **(peak or {})},
        "configs": {},
    }
    compile_cfgs = set(filter(None, args.compile_configs.split(",")))
    for name, (dims, size, batch) in CONFIGS.items():
        base = build_model(dims, args.width, args.depth)
        rows = {}
        for vname, model, dtype, fmt in variants(base, dims, name in compile_cfgs):
            x = torch.randn(batch, 1, *([size] * dims), device="cuda", dtype=dtype)
            x1 = x[:1].contiguous()
            if fmt is not None:
                x, x1 = x.to(memory_format=fmt), x1.to(memory_format=fmt)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    model(x)  # first call: compilation for torch.compile
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - record and go on
                rows[vname] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                print(name, vname, "failed:", rows[vname]["error"], flush=True)
                continue
            first = time.perf_counter() - t0
            tb = timed(model, x, args.repeats, args.warmup)
            t1 = timed(model, x1, args.repeats, args.warmup)
            med = statistics.median(tb)
            row = {
                "first_call_s": first,
                "batch_median_s": med,
                "images_per_s": batch / med,
                "latency_b1_ms": 1e3 * statistics.median(t1),
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20,
            }
            if flops.get(name):
                row["tflops_per_s"] = flops[name] * batch / med / 1e12
            rows[vname] = row
            print(name, vname, {k: round(v, 3) for k, v in row.items()}, flush=True)
            del model
            torch.cuda.empty_cache()
        ref = rows.get("torch_eager_fp32", {}).get("images_per_s")
        for row in rows.values():
            if ref and "images_per_s" in row:
                row["speedup_vs_eager_fp32"] = row["images_per_s"] / ref
        result["configs"][name] = {"dims": dims, "size": size, "batch": batch, "variants": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
