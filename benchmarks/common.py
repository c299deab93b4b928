"""Shared helpers of the benchmark scripts: timing, peak memory, machine description.

Every figure the benchmarks report is a median over repeated runs after warm-up runs.
Competing variants are timed round-robin (one call of each per round) so that load from other
processes on the machine hits them alike; ratios are taken from the same run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------- timing
def time_round_robin(
    calls: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, block: int = 1
) -> dict[str, dict]:
    """Time each callable ``repeats`` times after ``warmup`` calls, interleaved per round.

    ``block > 1``: each turn makes one untimed call and then ``block`` timed ones, so
    ``repeats * block`` timings per callable. The first call after another engine ran pays
    for waking this engine's worker threads and refilling caches (measured: up to 40% on the
    2-core machine); a block measures the steady state a user's stream of calls sees.

    Returns ``{name: {"median_s", "min_s", "max_s", "times_s", "cpu_median_s",
    "cpu_times_s"}}``: ``cpu_*`` is the process CPU time of the same calls (all threads),
    which other jobs on a shared machine disturb far less than the wall time.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        # rotate the order each round: an engine's worker threads keep spinning for a moment
        # after a call and would always slow whichever variant comes next; the short pause
        # lets them go idle
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(0.05)
            if block > 1:
                calls[name]()
            for _ in range(block):
                c0, t0 = time.process_time(), time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: {**summarize(ts), "cpu_median_s": float(np.median(cpu[name])),
                   "cpu_times_s": cpu[name]} for name, ts in times.items()}


def time_one(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Median-after-warm-up timing of one callable."""
    return time_round_robin({"f": fn}, repeats, warmup)["f"]


def speedup_ci(base_times, times, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """Bootstrap interval of the speedup ``median(base_times) / median(times)``.

    Each sample of timings is resampled with replacement; returns ``(low, high)``. An interval
    that contains 1 means the two variants cannot be told apart in this run.
    """
    rng = np.random.default_rng(seed)
    a, b = np.asarray(base_times, float), np.asarray(times, float)
    ra = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
    rb = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
    q = (1 - level) / 2
    lo, hi = np.quantile(ra / rb, [q, 1 - q])
    return float(lo), float(hi)


def summarize(times: list[float]) -> dict:
    ts = [float(t) for t in times]
    return {
        "median_s": float(np.median(ts)),
        "min_s": min(ts),
        "max_s": max(ts),
        "times_s": ts,
    }


# ---------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` as fallback)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_peak(fn: Callable[[], object]) -> dict:
    """Peak RSS while ``fn`` runs: absolute and above the RSS just before the call.

    Meant to run in a fresh subprocess (see :func:`run_probe`) so that allocator caches of
    earlier variants do not hide or inflate the figure. Also records the Python-heap peak
    (tracemalloc), which numpy arrays report to but native engines (ORT, torch) do not.
    """
    import gc
    import tracemalloc

    gc.collect()
    reset_ok = reset_peak_rss()
    before = rss_bytes()
    tracemalloc.start()
    fn()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = peak_rss_bytes()
    return {
        "peak_rss_mb": peak / 2**20,
        "rss_before_mb": before / 2**20,
        "peak_increment_mb": (peak - before) / 2**20 if reset_ok else None,
        "tracemalloc_peak_mb": py_peak / 2**20,
        "peak_reset": reset_ok,
    }


def run_probe(script: Path, args: list[str], timeout: float = 600) -> dict:
    """Run ``script args`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"no JSON from probe: {proc.stdout[-400:]} {proc.stderr[-400:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """CPU model, cores, clock and the nominal fp32 peak FLOP/s derived from its SIMD flags.

    Peak = cores x GHz x fp32 FLOPs/cycle/core, FLOPs/cycle = 2 (FMA) x lanes x FMA units:
    AVX-512 16 lanes, AVX2 8, SSE 4; two FMA units assumed (most server cores since Haswell /
    Zen 2; AMD Zen 4 executes AVX-512 as 2x256-bit, giving the same 32 FLOPs/cycle as AVX2).
    """
    info: dict = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)
    flags_m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_m.group(1).split()) if flags_m else set()
    info["model"] = model.group(1).strip() if model else platform.processor()
    ghz = max(float(m) for m in mhz) / 1000 if mhz else None
    info["ghz"] = ghz
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    info["simd"] = simd
    info["fma"] = "fma" in flags
    lanes = {"avx512f": 16, "avx2": 8, "sse": 4}[simd]
    is_amd = "AMD" in info["model"] or "EPYC" in info["model"]
    if simd == "avx512f" and is_amd:
        lanes = 8  # Zen 4 splits 512-bit ops into two 256-bit halves
    flops_cycle = (2 if info["fma"] else 1) * lanes * 2
    info["fp32_flops_per_cycle_per_core"] = flops_cycle
    cores = info["usable_cpus"] or 1
    info["peak_gflops_fp32"] = cores * ghz * flops_cycle if ghz else None
    info["peak_formula"] = (
        f"{cores} cores x {ghz:.2f} GHz x {flops_cycle} FLOP/cycle "
        f"({simd}{', AMD 2x256-bit' if simd == 'avx512f' and is_amd else ''}, "
        f"{'FMA' if info['fma'] else 'no FMA'}, 2 units)"
        if ghz
        else "unknown clock"
    )
    return info


def gpu_info() -> dict | None:
    """GPU model via nvidia-smi, or None when there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, mem, driver = (s.strip() for s in out.stdout.splitlines()[0].split(","))
    return {"name": name, "memory": mem, "driver": driver}


def versions(packages: list[str]) -> dict:
    found = {"python": platform.python_version()}
    for pkg in packages:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_record(packages: list[str]) -> dict:
    """What readers need to judge the numbers: machine, versions, date and load."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "gpu": gpu_info(),
        "memory_gb": _mem_total_gb(),
        "versions": versions(packages),
        "loadavg_start": loadavg(),
    }


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def write_json(path: Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record.setdefault("loadavg_end", loadavg())
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------- docs
def write_doc_section(doc: Path, name: str, markdown: str) -> None:
    """Replace the ``<!-- name:begin -->`` ... ``<!-- name:end -->`` block of ``doc``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def pm(pair, digits: int = 3) -> str:
    """``mean ± std`` of a (mean, std) pair."""
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"
