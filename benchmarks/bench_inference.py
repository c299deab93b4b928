"""Inference speed of one U-Net through torch and ONNX Runtime, and uqseg's own path.

The network is :class:`uqseg.training.UNet` with the reference zoo's configuration (width and
depth from ``uqseg/datasets/models/zoo.json`` when present, else the zoo script's defaults
8 and 4), randomly initialised (speed does not depend on the weights), exported with
:func:`uqseg.training.export_onnx` exactly as the zoo members are. Configurations: 2-D
128x128 and 256x256, and a 3-D U-Net of the same width/depth on 96^3 patches (smaller batch).

Variants (same weights, same input, timed round-robin in blocks: per round and variant one
untimed call, then ``--block`` timed calls):

- ``torch_eager``: ``model(x)`` under ``torch.inference_mode``.
- ``torch_compile``: ``torch.compile(model)`` (inductor); compile time recorded, skipped with
  the error when compilation fails.
- ``ort_default``: a bare ``onnxruntime.InferenceSession(path)`` with default settings.
- ``uqseg``: ``OnnxSegmenter(path).fit().transform(X)``.
- GPU only (skipped with a reason here when absent): ``ort_cuda``, ``ort_tensorrt`` (ONNX
  Runtime providers) and ``trt_fp32`` / ``trt_fp16`` (uqseg's native TensorRT backend).

Reported per variant: images/s at the configuration's batch, latency at batch 1 (medians
after warm-up), peak memory (a fresh subprocess per variant: peak RSS above the RSS with the
libraries imported and the input allocated), and achieved FLOP/s = nominal FLOPs (Conv,
ConvTranspose, MatMul, Gemm: 2 x MACs from ONNX shape inference at the concrete shape) / time,
also as a fraction of the machine's nominal fp32 peak.

Usage::

    python benchmarks/bench_inference.py                  # full run (~10 min on 2 busy cores)
    python benchmarks/bench_inference.py --quick          # tiny smoke run
    python benchmarks/bench_inference.py --configs 2d128 --variants torch_eager,uqseg
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

# the ONNX exporter logs one warning per torchvision op it cannot register: noise here
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

CPU_VARIANTS = ("torch_eager", "torch_compile", "ort_default", "uqseg")
GPU_VARIANTS = ("ort_cuda", "ort_tensorrt", "trt_fp32", "trt_fp16")
VARIANTS = CPU_VARIANTS + GPU_VARIANTS
# name: (dims, spatial size, batch)
CONFIGS = {
    "2d128": (2, 128, 16),
    "2d256": (2, 256, 8),
    "3d96": (3, 96, 2),
}
QUICK_CONFIGS = {"2d32": (2, 32, 4), "3d16": (3, 16, 1)}
PACKAGES = ["numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "uqseg"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny network and sizes, 1 repeat")
    p.add_argument("--configs", default=None, help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=3,
                   help="timed calls per variant and round, after one untimed call")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory probes")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-configs", default="2d128",
                   help="configs where torch.compile runs (compiling takes minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "inference.json")
    # internal: one variant's memory probe in a fresh interpreter
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- the network
def zoo_config() -> dict:
    """Width/depth of the reference zoo (zoo.json), else the zoo script's defaults."""
    cfg = {"width": 8, "depth": 4, "source": "benchmarks/train_zoo.py defaults"}
    try:
        from uqseg.datasets import reference_model_info

        info = reference_model_info()
    except Exception:  # noqa: BLE001 - no zoo: defaults
        info = {}
    members = info.get("members") if isinstance(info, dict) else None
    first = members[0] if isinstance(members, list) and members else info
    if isinstance(first, dict):
        arch = first.get("architecture", first)
        if isinstance(arch, dict) and "width" in arch and "depth" in arch:
            cfg = {"width": int(arch["width"]), "depth": int(arch["depth"]), "source": "zoo.json"}
    return cfg


def build_model(dims: int, width: int, depth: int):
    import torch

    from uqseg.training import UNet

    torch.manual_seed(0)
    model = UNet(1, 3, dims=dims, width=width, depth=depth).eval()
    # non-trivial BatchNorm statistics so that folding them is real work, as after training
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export(model, dims: int, size: int, path: Path) -> dict:
    import torch

    from uqseg.training import export_onnx

    example = torch.randn(1, 1, *([size] * dims))
    return export_onnx(model, path, example, feature_layers=["decoder_last", "bottleneck"])


# ---------------------------------------------------------------------- FLOPs
def _concrete(proto: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    for dim, value in zip(inp.type.tensor_type.shape.dim, shape, strict=True):
        dim.Clear()
        dim.dim_value = value
    return onnx.shape_inference.infer_shapes(m, data_prop=True)


def count_flops(proto: onnx.ModelProto, shape: tuple[int, ...]) -> dict:
    """Nominal FLOPs (2 x MACs) of Conv/ConvTranspose/MatMul/Gemm at a concrete input shape."""
    m = _concrete(proto, shape)
    shapes: dict[str, list[int]] = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    macs = {"Conv": 0, "ConvTranspose": 0, "MatMul": 0, "Gemm": 0}
    unknown = 0
    for node in m.graph.node:
        if node.op_type not in macs:
            continue
        ins = [shapes.get(n) for n in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(s is None for s in ins) or out is None:
            unknown += 1
            continue
        x, w = ins
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":  # w: (C_out, C_in/g, *k); each output: C_in/g * k MACs
            macs["Conv"] += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # w: (C_in, C_out/g, *k); each input scatters
            macs["ConvTranspose"] += int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type == "MatMul":
            macs["MatMul"] += int(np.prod(out)) * int(x[-1])
        else:
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs["Gemm"] += int(np.prod(out)) * int(x[0] if trans_a else x[1])
        del group  # grouped convs are covered by the weight's C_in/g axis
    total = 2 * sum(macs.values())
    return {"flops": total, "macs_by_op": macs, "nodes_without_shapes": unknown}


# ---------------------------------------------------------------------- variants
def make_call(variant: str, spec: dict, X: np.ndarray):
    """Set up one variant; return ``(call, info)`` or raise ``_Skip`` with the reason."""
    if variant in ("torch_eager", "torch_compile"):
        import torch

        torch.set_num_threads(common.cpu_info()["usable_cpus"])
        model = build_model(spec["dims"], spec["width"], spec["depth"])
        model.load_state_dict(torch.load(spec["weights"], weights_only=True))
        xt = torch.from_numpy(X)
        info = {}
        if variant == "torch_compile":
            if spec.get("no_compile"):
                raise _Skip("not compiled in this run (--no-compile / --compile-configs)")
            try:
                model = torch.compile(model)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(xt)
                info["compile_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - record why it failed
                raise _Skip(f"torch.compile failed: {type(exc).__name__}: {exc}"[:500]) from exc

        def call():
            with torch.inference_mode():
                return model(xt)

        return call, info
    if variant == "ort_default":
        import onnxruntime as ort

        sess = ort.InferenceSession(spec["onnx"])
        name = sess.get_inputs()[0].name
        return (lambda: sess.run(None, {name: X})), {"providers": sess.get_providers()}
    if variant == "uqseg":
        from uqseg import OnnxSegmenter

        seg = OnnxSegmenter(spec["onnx"], device="cpu").fit()
        return (lambda: seg.transform(X)), {"batch_size": seg.batch_size}
    return _gpu_call(variant, spec, X)


class _Skip(Exception):
    pass


def _gpu_call(variant: str, spec: dict, X: np.ndarray):
    gpu = common.gpu_info()
    if gpu is None:
        raise _Skip("no NVIDIA GPU (nvidia-smi absent or reports none)")
    from uqseg import OnnxSegmenter, backends

    available = backends.available_backends()
    want = {
        "ort_cuda": (("onnxruntime", "cuda"), "cuda", "onnxruntime", "fp32"),
        "ort_tensorrt": (("onnxruntime", "tensorrt"), "tensorrt", "onnxruntime", "fp32"),
        "trt_fp32": (("tensorrt", "cuda"), "cuda", "tensorrt", "fp32"),
        "trt_fp16": (("tensorrt", "cuda"), "cuda", "tensorrt", "fp16"),
    }[variant]
    if want[0] not in available:
        raise _Skip(f"{want[0]} not available here (have {available}); install uqseg[gpu]/[trt]")
    seg = OnnxSegmenter(spec["onnx"], backend=want[2], device=want[1], precision=want[3],
                        batch_size=max(16, X.shape[0])).fit()
    t0 = time.perf_counter()
    seg.transform(X)  # first call builds engines
    return (lambda: seg.transform(X)), {"build_s": time.perf_counter() - t0, "gpu": gpu}


# ---------------------------------------------------------------------- probes
def probe(variant: str, spec: dict) -> dict:
    """Memory of one variant in this (fresh) process: setup plus two batch inferences."""
    if variant.startswith("torch"):
        import torch  # noqa: F401 - library RSS belongs to the baseline
    import onnxruntime  # noqa: F401

    from uqseg import OnnxSegmenter  # noqa: F401 - sklearn/scipy RSS belongs to the baseline

    X = _input(spec["dims"], spec["size"], spec["batch"])

    def work():
        call, _ = make_call(variant, spec, X)
        call()
        call()

    try:
        return common.measure_peak(work)
    except _Skip as exc:
        return {"skipped": str(exc)}


def _input(dims: int, size: int, batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 1, *([size] * dims)), dtype=np.float32)


# ---------------------------------------------------------------------- main
def bench_config(name, dims, size, batch, args, arch, workdir: Path, peak_gflops) -> dict:
    import torch

    model = build_model(dims, arch["width"], arch["depth"])
    weights = workdir / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    onnx_path = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    report = export(model, dims, size, onnx_path)
    export_s = time.perf_counter() - t0
    proto = onnx.load(str(onnx_path))
    flops = count_flops(proto, (batch, 1, *([size] * dims)))
    flops1 = count_flops(proto, (1, 1, *([size] * dims)))
    spec = {"dims": dims, "size": size, "batch": batch, "width": arch["width"],
            "depth": arch["depth"], "weights": str(weights), "onnx": str(onnx_path),
            "no_compile": args.no_compile or name not in args.compile_configs.split(",")}
    X = _input(dims, size, batch)
    X1 = np.ascontiguousarray(X[:1])
    calls, calls1, results = {}, {}, {}
    for v in args.variants:
        try:
            call, info = make_call(v, spec, X)
            call1, _ = make_call(v, spec, X1)
        except _Skip as exc:
            results[v] = {"skipped": str(exc)}
            print(f"  {name} {v}: skipped ({exc})", flush=True)
            continue
        calls[v], calls1[v], results[v] = call, call1, dict(info)
    # correctness: every variant computes the same logits
    ref = None
    for v, call in calls.items():
        out = call()
        out = out[0] if isinstance(out, list) else out
        out = out.detach().numpy() if hasattr(out, "detach") else np.asarray(out)
        if ref is None:
            ref = out
        results[v]["max_abs_diff_vs_first"] = float(np.max(np.abs(out - ref)))
    t_batch = common.time_round_robin(calls, args.repeats, args.warmup, args.block)
    t_one = common.time_round_robin(calls1, args.repeats, args.warmup, args.block)
    for v in calls:
        tb, t1 = t_batch[v]["median_s"], t_one[v]["median_s"]
        results[v].update({
            "batch_median_s": tb,
            "batch_times_s": t_batch[v]["times_s"],
            "images_per_s": batch / tb,
            "latency_b1_ms": 1000 * t1,
            "latency_b1_times_s": t_one[v]["times_s"],
            "gflops_per_s": flops["flops"] / tb / 1e9,
            "fraction_of_peak": flops["flops"] / tb / 1e9 / peak_gflops if peak_gflops else None,
        })
        print(f"  {name} {v}: {batch / tb:.1f} img/s, b1 {1000 * t1:.1f} ms", flush=True)
    if not args.no_memory:
        for v in calls:
            mem = common.run_probe(Path(__file__), ["--probe", v, "--probe-spec", json.dumps(spec)])
            results[v]["memory"] = mem
    eager = results.get("torch_eager", {}).get("images_per_s")
    ort_def = results.get("ort_default", {}).get("images_per_s")
    ratios = {}
    for r in results.values():
        if "images_per_s" in r:
            if eager:
                r["speedup_vs_torch_eager"] = r["images_per_s"] / eager
            if ort_def:
                r["speedup_vs_ort_default"] = r["images_per_s"] / ort_def
    if "uqseg" in calls:
        ratios = {k: results["uqseg"].get(k) for k in
                  ("speedup_vs_torch_eager", "speedup_vs_ort_default")}
    return {
        "dims": dims, "spatial": [size] * dims, "batch": batch,
        "flops_per_batch": flops, "flops_per_image": flops1["flops"],
        "export": {"seconds": export_s, "dynamic_spatial": report["dynamic_spatial"],
                   "size_bytes": report["size_bytes"], "opset": report["opset"]},
        "variants": results, "uqseg_ratios": ratios,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, json.loads(args.probe_spec))))
        return {}
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    arch = zoo_config()
    configs = CONFIGS
    if args.quick:
        configs, arch = QUICK_CONFIGS, {"width": 4, "depth": 3, "source": "--quick"}
        args.repeats, args.warmup, args.block, args.no_compile = 1, 1, 1, True
    if args.configs:
        pool = {**CONFIGS, **QUICK_CONFIGS}
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in pool]
        if unknown:
            raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(pool)}")
        configs = {c: pool[c] for c in names}
    record = common.machine_record(PACKAGES)
    peak = record["cpu"]["peak_gflops_fp32"]
    record.update({
        "benchmark": "inference",
        "quick": args.quick,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "block": args.block,
                     "variants": args.variants, "network": arch},
        "peak": {"gflops_fp32": peak, "formula": record["cpu"]["peak_formula"],
                 "note": "nominal FLOPs count direct convolution MACs; Winograd/FFT "
                         "convolutions do fewer real operations, so achieved nominal FLOP/s "
                         "can exceed the peak"},
        "configs": {},
    })
    with tempfile.TemporaryDirectory(prefix="uqseg_bench_") as tmp:
        for name, (dims, size, batch) in configs.items():
            print(f"[inference] {name}: {dims}-D {size}^{dims}, batch {batch}", flush=True)
            record["configs"][name] = bench_config(name, dims, size, batch, args, arch,
                                                   Path(tmp), peak)
    record["loadavg_end"] = common.loadavg()
    common.write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
