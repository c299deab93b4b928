"""Hierarchical uncertainty U-Net (Bai & Bai) vs a plain U-Net: accuracy, error and OOD maps.

Both arms train with ``uqseg.training.fit_segmenter`` (Dice + CE; the hierarchical arm adds
its KL term), same epochs and seeds. The hierarchical net is scored from T noise samples
(mean probability; entropy and mutual information maps), the U-Net from its softmax (entropy
map). Uncertainty is then checked against errors (UEO, voxel AUROC, per-image correlation)
and against OOD images (``datasets.load_ood``) and corrupted test images
(``datasets.corrupt``): mean uncertainty per image, ratio to the test images, AUROC.
The first seed's hierarchical net is exported twice — the sampling model (noise inputs) run
through ``sample_onnx`` and the mean model run through ``uqseg.OnnxSegmenter`` — and compared.

With ``--dropout P > 0`` the U-Net has channel dropout (``UNet(dropout=P)``) and is scored
twice without training another network: deterministically ("unet") and as MC dropout with
T = ``--samples`` dropout masks ("unet_mc": mean probability, entropy and MI maps).

The JSON is written after every seed (partial results survive a cut-off run); ``--merge``
combines runs of the same configuration with different seeds:

    python benchmarks/train_hierarchical.py             # small: minutes on 2 CPU cores
    python benchmarks/train_hierarchical.py --size 96 96 --width 16 --epochs 30 --samples 16
    python benchmarks/train_hierarchical.py --merge s0.json s1.json s2.json --out all.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from common import pm
from scipy import stats
from sklearn.metrics import roc_auc_score

from uqseg import OnnxSegmenter, datasets, metrics
from uqseg.training import UNet, export_onnx, fit_segmenter, predict_logits
from uqseg.training.hierarchical import (
    HierarchicalLoss,
    HierarchicalUNet,
    aggregate_samples,
    export_hierarchical_onnx,
    sample_onnx,
    sample_torch,
)
from uqseg.uncertainty import entropy, softmax

RESULTS = common.RESULTS
DOC = Path(__file__).resolve().parents[1] / "docs" / "training_methods.md"


def write_doc_section(name: str, markdown: str) -> None:
    common.write_doc_section(DOC, name, markdown)


def render(result: dict) -> str:
    """Markdown tables: accuracy and error detection; OOD uncertainty ratio and AUROC."""
    s, cfg = result["summary_mean_std"], result["config"]
    u, h = s["unet"], s["hierarchical"]
    mc = s.get("unet_mc")
    p = cfg.get("dropout", 0.0)
    unet_label = f"U-Net, dropout {p}, deterministic" if mc else "U-Net"
    seeds = sorted(r["seed"] for r in result["runs"]["unet"])
    lines = [
        f"Test split, {len(seeds)} seed{'s' * (len(seeds) > 1)}, "
        f"{cfg['size'][0]}x{cfg['size'][1]} slices, "
        f"width {cfg['width']} depth {cfg['depth']}, {cfg['epochs']} epochs, "
        f"T = {cfg['samples']} samples, kl_weight = {cfg['kl_weight']}.",
        "",
        "| arm (uncertainty map) | Dice | ECE | NLL | UEO | error AUROC | r(unc, 1 - Dice) |",
        "|---|---|---|---|---|---|---|",
    ]
    arms = [(f"{unet_label} (entropy)", u, "entropy")]
    if mc:
        arms += [
            (f"U-Net + MC dropout, T = {cfg['samples']} (entropy)", mc, "entropy"),
            (f"U-Net + MC dropout, T = {cfg['samples']} (mutual information)", mc, "mi"),
        ]
    arms += [
        ("hierarchical (entropy)", h, "entropy"),
        ("hierarchical (mutual information)", h, "mi"),
    ]
    for label, r, kind in arms:
        lines.append(
            f"| {label} | {pm(r['dice'])} | {pm(r['ece'])} | {pm(r['nll'])} | "
            f"{pm(r[kind + '_ueo'])} | {pm(r[kind + '_error_auroc'])} | "
            f"{pm(r[kind + '_image_r_unc_vs_1_minus_dice'])} |"
        )
    shifted = [k[len("entropy_") : -len("_ratio")] for k in u if k.endswith("_ratio")]
    cols = [("U-Net entropy", u, "entropy", "unet")]
    if mc:
        cols += [
            ("MC dropout entropy", mc, "entropy", "unet_mc"),
            ("MC dropout MI", mc, "mi", "unet_mc"),
        ]
    cols += [("hier. entropy", h, "entropy", "hierarchical"), ("hier. MI", h, "mi", "hierarchical")]
    lines += [
        "",
        "Mean uncertainty per image on shifted images relative to the test images (ratio > 1: "
        "higher on the shifted set) and AUROC of test vs shifted by mean uncertainty:",
        "",
        "| shifted set | " + " | ".join(f"{c[0]} ratio / AUROC" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    # the old toy tables abbreviated the header: keep them byte-identical on --render-only
    if not mc:
        lines[-2] = (
            "| shifted set | U-Net entropy ratio / AUROC | hier. entropy ratio / AUROC | "
            "hier. MI ratio / AUROC |"
        )
    for name in shifted:
        cells = [
            f"{pm(r[f'{k}_{name}_ratio'], 2)} / {pm(r[f'{k}_{name}_auroc'], 2)}"
            for _, r, k, _ in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "seed_seconds" in result:
        # per seed: mean over the shifted sets; then mean ± std over seeds
        cells = []
        for _, _, k, arm in cols:
            rows = result["runs"][arm]
            ratio = mean_std(
                [np.mean([r[f"ood_{k}"][n]["ratio_to_test"] for n in shifted]) for r in rows]
            )
            auc = mean_std([np.mean([r[f"ood_{k}"][n]["auroc"] for n in shifted]) for r in rows])
            cells.append(f"{pm(ratio, 2)} / {pm(auc, 2)}")
        lines.append(f"| mean over the {len(shifted)} sets | " + " | ".join(cells) + " |")
    if "seed_seconds" in result:
        runs = result["runs"]
        names = [("unet", unet_label)]
        if mc:
            names.append(("unet_mc", "U-Net + MC dropout"))
        names.append(("hierarchical", "hierarchical"))
        lines += [
            "",
            "Per seed (Dice / ECE / UEO of the MI map, or of the entropy map for the "
            "deterministic U-Net):",
            "",
            "| arm | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for arm, label in names:
            kind = "entropy" if arm == "unet" else "mi"
            by_seed = {r["seed"]: r for r in runs[arm]}
            cells = [
                f"{by_seed[sd]['dice']:.4f} / {by_seed[sd]['ece']:.4f} / "
                f"{by_seed[sd][f'errors_{kind}']['ueo']:.4f}"
                for sd in seeds
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        secs = ", ".join(
            f"seed {sd} {result['seed_seconds'][str(sd)] / 60:.1f} min" for sd in seeds
        )
        lines += ["", f"CPU wall time per seed (both networks trained and scored): {secs}."]
    o = result["onnx_seed0"]
    which = f" (seed {result['onnx_seed']})" if "onnx_seed" in result else " (seed 0)"
    lines += [
        "",
        f"ONNX{which}: sampling model via `sample_onnx` vs torch, max |diff| of mean "
        f"probability {o['sample_onnx_proba_max_abs_diff_vs_torch']:.1e}, of MI "
        f"{o['sample_onnx_mi_max_abs_diff_vs_torch']:.1e}; mean model through "
        "`OnnxSegmenter` max |diff| "
        f"{o['mean_model_onnxsegmenter_max_abs_diff_vs_torch']:.1e}.",
    ]
    return "\n".join(lines)


# load_ood already holds noise/ghosting/bias/blur faults: corrupt with the other kinds
CORRUPT = {"gamma": 0.7, "contrast": 0.7, "downsample": 0.7, "rotate": 0.7}


def seg_scores(proba: np.ndarray, y: np.ndarray) -> dict:
    d = metrics.dice_score(proba.argmax(1), y, n_classes=proba.shape[1])
    return {
        "dice": float(np.nanmean(d)),
        "ece": float(metrics.expected_calibration_error(proba, y, n_bins=15)),
        "nll": float(metrics.negative_log_likelihood(proba, y)),
    }


def error_scores(unc: np.ndarray, proba: np.ndarray, y: np.ndarray, rng) -> dict:
    """How well an uncertainty map marks errors: UEO, voxel AUROC, per-image Pearson r."""
    pred = proba.argmax(1)
    err = pred != y
    sub = rng.choice(err.size, size=min(err.size, 200_000), replace=False)
    d = metrics.dice_score(pred, y, n_classes=proba.shape[1])
    return {
        "ueo": float(metrics.uncertainty_error_overlap(unc, pred, y)),
        "error_auroc": float(roc_auc_score(err.ravel()[sub], unc.ravel()[sub])),
        "image_r_unc_vs_1_minus_dice": float(
            stats.pearsonr(unc.reshape(len(y), -1).mean(1), 1 - np.nanmean(d, 1))[0]
        ),
    }


def ood_scores(unc_test: np.ndarray, unc_sets: dict[str, np.ndarray]) -> dict:
    """Mean uncertainty per image: ratio to the test images and AUROC (test vs set)."""
    s_in = unc_test.reshape(len(unc_test), -1).mean(1)
    out = {"test_mean": float(s_in.mean())}
    for name, u in unc_sets.items():
        s_out = u.reshape(len(u), -1).mean(1)
        out[name] = {
            "mean": float(s_out.mean()),
            "ratio_to_test": float(s_out.mean() / max(s_in.mean(), 1e-12)),
            "auroc": float(metrics.ood_auroc(-s_in, -s_out)),
        }
    return out


def mean_std(values) -> list[float]:
    v = np.asarray(values, dtype=float)
    return [float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0.0)]


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean ± std over seeds of every score, per arm (``runs``: arm -> per-seed rows)."""
    shifted = [k for k in runs["unet"][0]["ood_entropy"] if k != "test_mean"]

    def collect(rows, path):
        vals = []
        for r in rows:
            v = r
            for key in path:
                v = v[key]
            vals.append(v)
        return mean_std(vals)

    summary: dict = {}
    for arm, rows in runs.items():
        kinds = [k for k in ("entropy", "mi") if f"errors_{k}" in rows[0]]
        s = {k: collect(rows, [k]) for k in ("dice", "ece", "nll")}
        for kind in kinds:
            for m in ("ueo", "error_auroc", "image_r_unc_vs_1_minus_dice"):
                s[f"{kind}_{m}"] = collect(rows, [f"errors_{kind}", m])
            for name in shifted:
                s[f"{kind}_{name}_ratio"] = collect(rows, [f"ood_{kind}", name, "ratio_to_test"])
                s[f"{kind}_{name}_auroc"] = collect(rows, [f"ood_{kind}", name, "auroc"])
        summary[arm] = s
    return summary


# settings that may differ between runs that --merge combines
RUN_ONLY = {"seeds", "out", "doc_section", "render_only", "merge", "threads", "note"}


def merge(paths: list[str], out: str, note: str | None = None) -> dict:
    """Combine result files of one configuration run with different seeds."""
    if len(paths) < 2:
        raise SystemExit("--merge needs at least two result files")
    parts = [(p, json.loads(Path(p).read_text())) for p in paths]
    ref_path, ref = parts[0]
    ref_cfg = {k: v for k, v in ref["config"].items() if k not in RUN_ONLY}
    for path, r in parts[1:]:
        cfg = {k: v for k, v in r["config"].items() if k not in RUN_ONLY}
        diff = sorted(k for k in ref_cfg.keys() | cfg.keys() if ref_cfg.get(k) != cfg.get(k))
        if diff:
            detail = "; ".join(f"{k}: {ref_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in diff)
            raise SystemExit(f"cannot merge {path} with {ref_path}: config differs ({detail})")
        if set(r["runs"]) != set(ref["runs"]):
            raise SystemExit(
                f"cannot merge {path} with {ref_path}: arms {sorted(r['runs'])} vs "
                f"{sorted(ref['runs'])}"
            )
    runs: dict[str, list[dict]] = {arm: [] for arm in ref["runs"]}
    seen: dict[int, str] = {}
    for path, r in parts:
        for row in r["runs"]["unet"]:
            if row["seed"] in seen:
                raise SystemExit(f"seed {row['seed']} is in both {seen[row['seed']]} and {path}")
            seen[row["seed"]] = path
        for arm, rows in r["runs"].items():
            runs[arm] += rows
    for rows in runs.values():
        rows.sort(key=lambda row: row["seed"])
    # the ONNX check ran on each file's first seed: keep the lowest seed's
    first = min(parts, key=lambda pr: pr[1]["runs"]["unet"][0]["seed"])[1]
    notes = [r["note"] for _, r in parts if r.get("note")]
    seed_seconds = {}
    for _, r in parts:
        seed_seconds |= r.get("seed_seconds", {})
    result = {
        "benchmark": ref["benchmark"],
        "config": ref["config"] | {"seeds": sorted(seen), "out": str(out), "merge": None},
        "merged_from": [str(p) for p in paths],
        "runs": runs,
        "summary_mean_std": summarize(runs),
        "onnx_seed0": first["onnx_seed0"],
        "onnx_seed": first["runs"]["unet"][0]["seed"],
        "seed_seconds": seed_seconds,
        "seconds": float(sum(r["seconds"] for _, r in parts)),
    }
    if note or notes:
        result["note"] = note or " ".join(dict.fromkeys(notes))
    return result


def mc_dropout_samples(net, Z: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """Softmax of ``n_samples`` passes with seeded dropout masks ``(T, N, K, *spatial)``."""
    gen = torch.Generator().manual_seed(seed)
    out = None
    for t in range(n_samples):
        mask = net.sample_mc_mask(len(Z), generator=gen).numpy()
        p = softmax(predict_logits(net, Z, 32, "cpu", mc_mask=mask))
        if out is None:
            out = np.empty((n_samples, *p.shape), np.float32)
        out[t] = p
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[48, 48])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="noise draws T at test time")
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="channel dropout of the U-Net; > 0 also scores it as MC dropout (T = --samples)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "training_hierarchical.json"))
    ap.add_argument("--doc-section", default="hierarchical", help="marker name of the docs table")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs table from --out")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="FILE",
        help="combine these result files (same config, different seeds) into --out",
    )
    ap.add_argument("--note", help="free text kept in the JSON (e.g. why a budget was cut)")
    args = ap.parse_args(argv)
    if args.render_only or args.merge:
        if args.merge:
            result = merge(args.merge, args.out, args.note)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        else:
            result = json.loads(Path(args.out).read_text())
        write_doc_section(args.doc_section, render(result))
        return result
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    size = tuple(args.size)
    X, y = datasets.load_brain_tissue("train", size=size)
    Xv, yv = datasets.load_brain_tissue("val", size=size)
    Xt, yt = datasets.load_brain_tissue("test", size=size)
    K = int(y.max()) + 1
    shifted = {f"ood_{k}": datasets.load_ood(k, size=size) for k in datasets.OOD_KINDS}
    shifted |= {f"corrupt_{k}": datasets.corrupt(Xt, k, s, seed=0) for k, s in CORRUPT.items()}
    fit_kw = {
        "epochs": args.epochs,
        "lr": args.lr,
        "patience": None,
        "progress": False,
        "device": "cpu",
    }
    arms = ["unet"] + (["unet_mc"] if args.dropout > 0 else []) + ["hierarchical"]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    onnx_check: dict = {}
    seed_seconds: dict[str, float] = {}
    for seed in args.seeds:
        t_seed = time.perf_counter()
        # per-seed subsampling stream: a seed scores the same alone or with others (--merge)
        rng = np.random.default_rng([0, seed])
        torch.manual_seed(seed)
        unet = UNet(1, K, width=args.width, depth=args.depth, dropout=args.dropout)
        fit_segmenter(unet, X, y, Xv, yv, seed=seed, **fit_kw)
        print(f"unet seed {seed} trained ({time.perf_counter() - t_seed:.0f}s)", flush=True)
        torch.manual_seed(seed)
        hier = HierarchicalUNet(1, K, width=args.width, depth=args.depth)
        fit_segmenter(
            hier,
            X,
            y,
            Xv,
            yv,
            seed=seed,
            loss=HierarchicalLoss(hier, "dice_ce", args.kl_weight),
            **fit_kw,
        )
        print(f"hierarchical seed {seed} trained ({time.perf_counter() - t_seed:.0f}s)", flush=True)

        def unet_maps(Z, net=unet):
            p = softmax(predict_logits(net, Z, 32, "cpu"))
            return p, {"entropy": entropy(p)}

        def unet_mc_maps(Z, net=unet, seed=seed):
            agg = aggregate_samples(mc_dropout_samples(net, Z, args.samples, seed))
            return agg["proba"], {"entropy": agg["entropy"], "mi": agg["mutual_information"]}

        def hier_maps(Z, net=hier, seed=seed):
            agg = aggregate_samples(sample_torch(net, Z, args.samples, seed=seed))
            return agg["proba"], {"entropy": agg["entropy"], "mi": agg["mutual_information"]}

        fns = {"unet": unet_maps, "unet_mc": unet_mc_maps, "hierarchical": hier_maps}
        for arm in arms:
            fn = fns[arm]
            proba, maps = fn(Xt)
            row = {"seed": seed, **seg_scores(proba, yt)}
            if arm == "hierarchical":
                row["mean_model"] = seg_scores(softmax(predict_logits(hier, Xt, 32, "cpu")), yt)
            shifted_maps = {name: fn(Z)[1] for name, Z in shifted.items()}
            for kind, unc in maps.items():
                row[f"errors_{kind}"] = error_scores(unc, proba, yt, rng)
                row[f"ood_{kind}"] = ood_scores(unc, {n: m[kind] for n, m in shifted_maps.items()})
            runs[arm].append(row)
            print(
                f"{arm} seed {seed}: dice {row['dice']:.4f} ece {row['ece']:.4f} "
                f"ueo {row['errors_entropy']['ueo']:.4f}",
                flush=True,
            )
        if seed == args.seeds[0]:
            with tempfile.TemporaryDirectory() as tmp:
                rep = export_hierarchical_onnx(hier, Path(tmp) / "h.onnx", Xt[:2])
                agg = sample_onnx(rep["path"], Xt, args.samples, seed=seed, device="cpu")
                ref = aggregate_samples(sample_torch(hier, Xt, args.samples, seed=seed))
                mean_path = Path(tmp) / "h_mean.onnx"
                export_onnx(hier, mean_path, Xt[:2], feature_layers=["decoder_last"])
                seg = OnnxSegmenter(str(mean_path), backend="onnxruntime", device="cpu").fit()
                p_mean = seg.predict_proba(Xt)
                onnx_check = {
                    "sampling_export_max_abs_diff": rep["max_abs_diff"],
                    "sample_onnx_proba_max_abs_diff_vs_torch": float(
                        np.abs(agg["proba"] - ref["proba"]).max()
                    ),
                    "sample_onnx_mi_max_abs_diff_vs_torch": float(
                        np.abs(agg["mutual_information"] - ref["mutual_information"]).max()
                    ),
                    "sample_onnx_scores": seg_scores(agg["proba"], yt),
                    "mean_model_onnxsegmenter_max_abs_diff_vs_torch": float(
                        np.abs(p_mean - softmax(predict_logits(hier, Xt, 32, "cpu"))).max()
                    ),
                }
            print("onnx:", onnx_check, flush=True)
        seed_seconds[str(seed)] = time.perf_counter() - t_seed
        # write after every seed: a run cut off later keeps the seeds done so far
        result = {
            "benchmark": "training_hierarchical",
            "config": vars(args) | {"n_train": len(X), "n_test": len(Xt), "corruptions": CORRUPT},
            "complete": len(runs["unet"]) == len(args.seeds),
            "runs": runs,
            "summary_mean_std": summarize(runs),
            "onnx_seed0": onnx_check,
            "onnx_seed": args.seeds[0],
            "seed_seconds": seed_seconds,
            "seconds": time.perf_counter() - t0,
        }
        if args.note:
            result["note"] = args.note
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    write_doc_section(args.doc_section, render(result))
    for arm, s in result["summary_mean_std"].items():
        print(arm, {k: f"{m:.3f}±{sd:.3f}" for k, (m, sd) in s.items()})
    return result


if __name__ == "__main__":
    main()
