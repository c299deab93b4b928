"""Peak RSS of ``uqseg predict`` on synthetic CT-sized volumes, one process per case.

Each case writes a float32 ``SIZE x SIZE x DEPTH`` volume (``.nii.gz``, smooth noise) and runs
``python -m uqseg.cli predict MEMBERS... vol.nii.gz --out DIR`` under ``/usr/bin/time -v``;
the peak is that process's "Maximum resident set size". All maps are written (two or more
members: segmentation, probabilities, entropy, mutual information). A case with ``--rev REV``
runs the uqseg of that git revision instead (``git archive`` into a temporary folder), for a
before/after comparison.

    python benchmarks/bench_predict_memory.py --depths 16 64 160      # flat in depth?
    python benchmarks/bench_predict_memory.py --depths 600            # the full CT size
    python benchmarks/bench_predict_memory.py --depths 16 64 --rev 7620934
    python benchmarks/bench_predict_memory.py --table                 # print the table

Results are merged into ``benchmarks/results/predict_memory.json`` (one entry per case) and the
table is written into docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine_record, write_doc_section, write_json  # noqa: E402

OUT = RESULTS / "predict_memory.json"
MiB = 2**20


def write_volume(path: Path, size: int, depth: int, seed: int = 0) -> int:
    """A smooth float32 volume, filled slab by slab into a disk-backed array and written by
    the public ``uqseg.io.write_nifti`` (this process stays small too)."""
    sys.path.insert(0, str(ROOT))
    from uqseg.io import write_nifti

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    body = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16).astype(np.float32)
    scratch = path.with_suffix(".raw")
    # Fortran order: NIfTI's own, so the writer streams it without a transposed copy
    vol = np.memmap(scratch, np.float32, "w+", shape=(size, size, depth), order="F")
    try:
        for k0 in range(0, depth, 16):
            k1 = min(depth, k0 + 16)
            noise = rng.standard_normal((size, size, k1 - k0), dtype=np.float32) * 20
            vol[..., k0:k1] = body[..., None] * 1000 - 1000 + noise
        write_nifti(path, vol, np.diag([0.7, 0.7, 1.0, 1.0]))
    finally:
        del vol
        scratch.unlink(missing_ok=True)
    return size * size * depth * 4


def _source_tree(rev: str | None, tmp: Path) -> Path:
    if rev is None:
        return ROOT
    dest = tmp / f"uqseg-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "uqseg"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_case(size: int, depth: int, members: int, rev: str | None) -> dict:
    from uqseg import datasets

    models = datasets.reference_models()[:members]
    with tempfile.TemporaryDirectory(prefix="uqseg-bench-") as tmp:
        tmp = Path(tmp)
        vol = tmp / "ct.nii.gz"
        input_bytes = write_volume(vol, size, depth)
        tree = _source_tree(rev, tmp)
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="2")
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "uqseg.cli", "predict", *models,
               str(vol), "--out", str(tmp / "out"), "--no-progress"]
        if rev is None:  # the zoo's preprocessing would crop and shrink the synthetic CT;
            cmd.append("--no-preprocess")  # this benchmark measures the streaming of voxels
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)  # not ROOT:
        # `python -m` puts the cwd first on sys.path, which would shadow PYTHONPATH
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"predict failed ({res.returncode}): {res.stderr[-2000:]}")
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                                 res.stderr).group(1))
        outputs = {p.name: p.stat().st_size for p in (tmp / "out").iterdir()}
    return {"size": size, "depth": depth, "members": members, "rev": rev or "working tree",
            "input_mib": round(input_bytes / MiB, 1), "peak_rss_mib": round(peak_kib / 1024),
            "wall_s": round(wall, 1), "s_per_slice": round(wall / depth, 3),
            "outputs_mib": {k: round(v / MiB, 1) for k, v in sorted(outputs.items())}}


def table(record: dict) -> str:
    rows = ["| code | volume | members | input (MiB) | peak RSS (MiB) | peak - input (MiB) | "
            "wall (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in sorted(record["cases"].values(), key=lambda c: (c["rev"], c["depth"])):
        code = "this code (streaming)" if c["rev"] == "working tree" else f"{c['rev']} (before)"
        rows.append(f"| {code} | {c['size']}x{c['size']}x{c['depth']} | {c['members']} | "
                    f"{c['input_mib']:.0f} | {c['peak_rss_mib']} | "
                    f"{c['peak_rss_mib'] - c['input_mib']:.0f} | {c['wall_s']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 64, 160])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--members", type=int, default=2, help="reference zoo members (>= 2: MI)")
    ap.add_argument("--rev", help="git revision to measure instead of the working tree")
    ap.add_argument("--table", action="store_true",
                    help="print the stored table (and put it in docs/cli.md), run nothing")
    args = ap.parse_args(argv)
    record = json.loads(OUT.read_text()) if OUT.exists() else {"cases": {}}
    if not args.table:
        if shutil.which("/usr/bin/time") is None:
            raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")
        record["machine"] = machine_record(["numpy", "onnxruntime", "nibabel"])
        for depth in args.depths:
            case = run_case(args.size, depth, args.members, args.rev)
            key = f"{case['rev']}:{args.size}x{args.size}x{depth}:{args.members}"
            record["cases"][key] = case
            print(json.dumps(case), flush=True)
            write_json(OUT, record)
    write_doc_section(ROOT / "docs" / "cli.md", "predict-memory", table(record))
    print(table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
