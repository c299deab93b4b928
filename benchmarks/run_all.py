"""Run uqseg's benchmarks; with ``--render``, render their results into ``docs/benchmarks.md``.

This is what ``uqseg bench`` calls. Every ``benchmarks/bench_<name>.py`` is a benchmark
(``inference``, ``metrics``, and whichever of ``ensemble``, ``ood``, ``quality``,
``calibration``, ``memory`` exist); each runs as its own subprocess with a timeout and writes
``<out>/<name>.json``. The docs page keeps its hand-written text; only the part between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers is regenerated.

Usage::

    python benchmarks/run_all.py                          # every benchmark, full settings
    python benchmarks/run_all.py --render                 # ... and update docs/benchmarks.md
    python benchmarks/run_all.py --quick --only inference,metrics
    python benchmarks/run_all.py --render-only            # tables from existing JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def available() -> dict[str, Path]:
    """``{name: script}`` for every ``benchmarks/bench_<name>.py``."""
    return {p.stem[len("bench_"):]: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="uqseg bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run)")
    p.add_argument("--only", default=None,
                   help="comma list of benchmarks (default: all of " +
                   ",".join(available()) + ")")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                   help="folder for the results JSON")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown page to update")
    p.add_argument("--render", action="store_true",
                   help="also regenerate the results section of the docs page (default: the "
                        "docs are left untouched)")
    p.add_argument("--render-only", action="store_true", help="only render existing JSON")
    return p.parse_args(argv)


def run_one(name: str, script: Path, out_dir: Path, quick: bool, timeout: float) -> dict:
    """Run one benchmark script; flags it does not define are not passed."""
    text = script.read_text(encoding="utf-8")
    cmd = [sys.executable, str(script)]
    if quick and '"--quick"' in text:
        cmd.append("--quick")
    if '"--out"' in text:
        suffix = "_quick" if quick else ""
        cmd += ["--out", str(out_dir / f"{name}{suffix}.json")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "seconds": timeout}
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    res = {"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr.strip()[-2000:]
    return res


# ---------------------------------------------------------------------- rendering
def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _conditions(r: dict) -> str:
    cpu = r.get("cpu", {})
    v = r.get("versions", {})
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    gpu = r.get("gpu")
    return (f"{r.get('date', '?')}; {cpu.get('model', '?')}, {cpu.get('usable_cpus', '?')} "
            f"usable cores, {r.get('memory_gb', '?')} GB; GPU: "
            f"{gpu['name'] if gpu else 'none'}; load average at start/end "
            f"{r.get('loadavg_start')} / {r.get('loadavg_end')}; {vers}")


def render_inference(r: dict) -> list[str]:
    peak = r.get("peak", {})
    lines = [f"Conditions: {_conditions(r)}.", "",
             f"Network: U-Net width {r['settings']['network'].get('width')}, depth "
             f"{r['settings']['network'].get('depth')} ({r['settings']['network'].get('source')})"
             f"; medians of {r['settings']['repeats']} runs after {r['settings']['warmup']} "
             "warm-up, variants interleaved.", "",
             f"Peak used: {_fmt(peak.get('gflops_fp32'))} GFLOP/s fp32 = {peak.get('formula')}. "
             f"{peak.get('note', '')}.", ""]
    skipped = {}
    for cname, c in r["configs"].items():
        shape = "x".join(map(str, c["spatial"]))
        lines += [f"**{cname}** ({c['dims']}-D {shape}, batch {c['batch']}, "
                  f"{c['flops_per_image'] / 1e9:.2f} GFLOP/image nominal)", "",
                  "| variant | images/s | vs torch eager | vs ORT default | latency b=1 (ms) "
                  "| GFLOP/s | % of peak | peak mem. increment (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, res in c["variants"].items():
            if "skipped" in res:
                skipped.setdefault(v, res["skipped"])
                continue
            mem = res.get("memory", {})
            frac = res.get("fraction_of_peak")
            lines.append(
                f"| {v} | {_fmt(res['images_per_s'])} | {_fmt(res.get('speedup_vs_torch_eager'))}"
                f"x | {_fmt(res.get('speedup_vs_ort_default'))}x | {_fmt(res['latency_b1_ms'])} "
                f"| {_fmt(res['gflops_per_s'])} | {_fmt(100 * frac if frac else None)} | "
                f"{_fmt(mem.get('peak_increment_mb'))} |")
        lines.append("")
    if skipped:
        lines += ["Skipped variants:", ""]
        lines += [f"- `{v}`: {why}" for v, why in skipped.items()]
        lines.append("")
    return lines


def render_metrics(r: dict) -> list[str]:
    s = r["settings"]
    lines = [f"Conditions: {_conditions(r)}.", "",
             f"Data: (N, {s['n_classes']}, {s['image'][0]}, {s['image'][1]}) float32 "
             f"probabilities in chunks of {s['chunk_images']} images, {s['n_bins']} bins; "
             f"medians of {s['repeats']} runs after {s['warmup']} warm-up; methods of one "
             "metric interleaved.", "",
             "| metric | voxels | method | time (s) | Mvoxel/s | time / uqseg | "
             "peak mem. increment (MB) | value |",
             "|---|---|---|---|---|---|---|---|"]
    for metric, g in r["compare"].items():
        for m, res in g["methods"].items():
            if "skipped" in res:
                continue
            mem = res.get("memory", {})
            lines.append(
                f"| {metric} | {g['voxels']:.3g} | {m} | {_fmt(res['median_s'])} | "
                f"{_fmt(res['mvoxels_per_s'])} | {_fmt(res.get('time_vs_uqseg'))} | "
                f"{_fmt(mem.get('peak_increment_mb'))} | {_fmt(res.get('value'), 5)} |")
    big = r.get("large")
    if big:
        lines += ["", f"Streaming at {big['voxels']:.4g} voxels ({big['data_gb']:.2f} GB of "
                  f"probabilities and {big.get('label_dtype')} labels in memory):", "",
                  "| method | time (s) | Mvoxel/s | peak mem. increment (MB) |",
                  "|---|---|---|---|"]
        for m, res in big["methods"].items():
            mem = res.get("memory", {})
            lines.append(f"| {m} | {_fmt(res['median_s'])} | {_fmt(res['mvoxels_per_s'])} | "
                         f"{_fmt(mem.get('peak_increment_mb'))} |")
        bw = big.get("bandwidth", {})
        if bw:
            lines += ["", "Memory bandwidth on the same bytes (one pass over the data):", "",
                      "| read | time (s) | GB/s | uqseg ECE time / read time |",
                      "|---|---|---|---|"]
            for m, res in bw.items():
                lines.append(f"| {m} | {_fmt(res['median_s'])} | {_fmt(res['gb_per_s'])} | "
                             f"{_fmt(res['uqseg_time_ratio'])} |")
        if "netcal_extrapolated_s" in big:
            lines += ["", f"netcal extrapolated linearly to this size: "
                      f"{_fmt(big['netcal_extrapolated_s'])} s, i.e. uqseg "
                      f"{_fmt(big['speedup_vs_netcal_extrapolated'])}x faster."]
    skipped = {f"{metric}:{m}": res["skipped"] for metric, g in r["compare"].items()
               for m, res in g["methods"].items() if "skipped" in res}
    if skipped:
        lines += ["", "Not compared:", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()]
    lines.append("")
    return lines


def render_generic(r) -> list[str]:
    """Other benchmarks: conditions plus their numeric leaves (first 40)."""
    lines = [f"Conditions: {_conditions(r)}.", ""] if isinstance(r, dict) and "date" in r else []
    rows = []

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("cpu", "versions", "gpu", "times_s") or k.startswith("loadavg"):
                    continue
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            rows.append((path, obj))

    walk(r, "")
    lines += ["| quantity | value |", "|---|---|"]
    lines += [f"| {p} | {_fmt(float(v))} |" for p, v in rows[:40]]
    if len(rows) > 40:
        lines.append(f"| … {len(rows) - 40} more in the JSON | |")
    lines.append("")
    return lines


def render_gpu_torch(r: dict) -> list[str]:
    peak = r.get("peak_tflops", {})
    lines = [f"GPU: {r['gpu']} (compute capability {'.'.join(map(str, r['capability']))}), "
             f"torch {r['versions']['torch']}, CUDA {r['versions']['cuda']}, cuDNN "
             f"{r['versions']['cudnn']}, {r['date'][:10]}; medians of "
             f"{r['settings']['repeats']} CUDA-synchronised runs after {r['settings']['warmup']} "
             "warm-up; cuDNN autotuning on, TF32 convolutions "
             f"{'allowed' if r['settings'].get('tf32_convolutions') else 'off'}.", ""]
    if peak.get("model"):
        lines += [f"Peaks used ({peak['model']}, dense, NVIDIA data sheet): fp32 "
                  f"{peak['fp32']} TFLOP/s, TF32 tensor {peak['tf32_tensor']}, fp16 tensor "
                  f"{peak['fp16_tensor']}. % of peak below is against the fp16 tensor peak for "
                  "fp16 rows and the TF32 tensor peak for fp32 rows.", ""]
    lines += ["| config | variant | images/s | vs eager fp32 | latency b=1 (ms) "
              "| TFLOP/s | % of peak | peak CUDA MB |", "|---|---|---|---|---|---|---|---|"]
    for cname, c in r["configs"].items():
        for v, res in c["variants"].items():
            if "error" in res:
                lines.append(f"| {cname} | {v} | failed: {res['error'][:80]} | | | | | |")
                continue
            tf = res.get("tflops_per_s")
            ref = peak.get("fp16_tensor" if "fp16" in v else "tf32_tensor")
            lines.append(
                f"| {cname} (b={c['batch']}) | {v} | {_fmt(res['images_per_s'])} | "
                f"{_fmt(res.get('speedup_vs_eager_fp32'))}x | {_fmt(res['latency_b1_ms'])} | "
                f"{_fmt(tf)} | {_fmt(100 * tf / ref if tf and ref else None)} | "
                f"{_fmt(res['peak_cuda_mb'])} |")
    lines.append("")
    return lines


RENDERERS = {"inference": render_inference, "metrics": render_metrics,
             "bench_gpu_torch.py": render_gpu_torch}


def render(out_dir: Path, docs: Path) -> str:
    """Regenerate the results section of ``docs`` from every JSON in ``out_dir``."""
    lines = [START, "", "_Generated by `python benchmarks/run_all.py --render-only` from "
             f"`{_rel(out_dir)}/*.json`; do not edit by hand._", ""]
    files = sorted(Path(out_dir).glob("*.json"))
    # full runs first; quick runs only where no full run exists
    names = {f.stem for f in files}
    for f in files:
        if f.stem.endswith("_quick") and f.stem[: -len("_quick")] in names:
            continue
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            lines += [f"### {f.stem}", "", f"Unreadable: {exc}", ""]
            continue
        kind = r.get("benchmark", f.stem) if isinstance(r, dict) else f.stem
        lines += [f"### {f.stem} (`{_rel(f)}`)", ""]
        try:
            lines += RENDERERS.get(kind, render_generic)(r)
        except (KeyError, TypeError, ValueError) as exc:
            lines += [f"Could not render ({type(exc).__name__}: {exc}); see the JSON.", ""]
    lines += verdict(out_dir)
    lines.append(END)
    block = "\n".join(lines)
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text, encoding="utf-8")
    return text


def verdict(out_dir: Path) -> list[str]:
    """The issue's floors, checked against the full (else quick) inference/metrics JSON."""
    rows = []
    for stem in ("inference", "metrics"):
        path = next((Path(out_dir) / f"{stem}{s}.json" for s in ("", "_quick")
                     if (Path(out_dir) / f"{stem}{s}.json").exists()), None)
        if path is None:
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        if stem == "inference":
            for name, c in r.get("configs", {}).items():
                u = c["variants"].get("uqseg", {})
                for key, base, floor, label in (
                        ("speedup_vs_torch_eager", "torch_eager", 1.8, "vs torch eager"),
                        ("speedup_vs_ort_default", "ort_default", 1.0, "vs bare ORT")):
                    if key not in u:
                        continue
                    ok = "holds" if u[key] >= floor else "**does not hold**"
                    ci = ""
                    ref = c["variants"].get(base, {}).get("batch_times_s")
                    if ref and u.get("batch_times_s"):
                        lo, hi = common.speedup_ci(ref, u["batch_times_s"])
                        ci = f" (95% CI {lo:.2f}–{hi:.2f})"
                        if u[key] < floor <= hi:
                            ok = "parity: not below the floor within this run's noise"
                    rows.append(f"| uqseg throughput {label}, {name} | >= {floor}x | "
                                f"{u[key]:.2f}x{ci} | {ok} |")
        else:
            ece = r.get("compare", {}).get("ece", {})
            t = ece.get("methods", {}).get("netcal", {}).get("time_vs_uqseg")
            if t is not None:
                ok = "holds" if t >= 10 else "**does not hold**"
                rows.append(f"| ECE vs netcal, {ece['voxels']:.3g} voxels | >= 10x | {t:.2f}x | "
                            f"{ok} |")
            big = r.get("large", {})
            if "speedup_vs_netcal_extrapolated" in big:
                t = big["speedup_vs_netcal_extrapolated"]
                ok = "holds" if t >= 20 else "**does not hold**"
                rows.append(f"| ECE vs netcal, {big['voxels']:.3g} voxels (netcal "
                            f"extrapolated) | >= 20x | {t:.2f}x | {ok} |")
            copy = big.get("bandwidth", {}).get("read_copy")
            if copy:
                t = copy["uqseg_time_ratio"]
                ok = "holds" if t <= 3 else "**does not hold**"
                rows.append(f"| streaming ECE, {big['voxels']:.3g} voxels, vs one copy of the "
                            f"data | <= 3x | {t:.2f}x | {ok} |")
    gpu = Path(out_dir) / "gpu_torch.json"
    if gpu.exists():
        g = json.loads(gpu.read_text(encoding="utf-8"))
        rows.append(f"| native TensorRT fp16 vs torch eager fp32 ({g.get('gpu')}) | >= 3x | "
                    "not measured: the GPU image has no TensorRT (torch rows above) | — |")
    if not rows:
        return []
    return ["### Verdict", "", "| floor | target | measured | |", "|---|---|---|---|",
            *rows, ""]


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    status = []
    if not args.render_only:
        scripts = available()
        names = list(scripts) if not args.only else [
            n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in scripts]
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {sorted(scripts)}",
                  file=sys.stderr)
            return 2
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            res = run_one(name, scripts[name], args.out, args.quick, args.timeout)
            print(f"[bench] {name}: {res['status']} in {res['seconds']} s", flush=True)
            if "stderr_tail" in res:
                print(res["stderr_tail"], file=sys.stderr)
            status.append(res)
    if args.render or args.render_only:
        render(args.out, args.docs)
        print(f"[bench] rendered {args.docs}")
    return 0 if all(s["status"] == "ok" for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
