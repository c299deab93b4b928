"""Hierarchical uncertainty U-Net (Bai & Bai) vs a plain U-Net: accuracy, error and OOD maps.

Both arms train with ``uqseg.training.fit_segmenter`` (Dice + CE; the hierarchical arm adds
its KL term), same epochs and seeds. The hierarchical net is scored from T noise samples
(mean probability; entropy and mutual information maps), the U-Net from its softmax (entropy
map). Uncertainty is then checked against errors (UEO, voxel AUROC, per-image correlation)
and against OOD images (``datasets.load_ood``) and corrupted test images
(``datasets.corrupt``): mean uncertainty per image, ratio to the test images, AUROC.
Seed 0's hierarchical net is exported twice — the sampling model (noise inputs) run through
``sample_onnx`` and the mean model run through ``uqseg.OnnxSegmenter`` — and compared.

    python benchmarks/train_hierarchical.py             # small: minutes on 2 CPU cores
    python benchmarks/train_hierarchical.py --size 96 96 --width 16 --epochs 30 --samples 16
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
    lines = [
        f"Test split, {len(cfg['seeds'])} seeds, {cfg['size'][0]}x{cfg['size'][1]} slices, "
        f"width {cfg['width']} depth {cfg['depth']}, {cfg['epochs']} epochs, "
        f"T = {cfg['samples']} samples, kl_weight = {cfg['kl_weight']}.",
        "",
        "| arm (uncertainty map) | Dice | ECE | NLL | UEO | error AUROC | r(unc, 1 - Dice) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, kind in (
        ("U-Net (entropy)", u, "entropy"),
        ("hierarchical (entropy)", h, "entropy"),
        ("hierarchical (mutual information)", h, "mi"),
    ):
        lines.append(
            f"| {label} | {pm(r['dice'])} | {pm(r['ece'])} | {pm(r['nll'])} | "
            f"{pm(r[kind + '_ueo'])} | {pm(r[kind + '_error_auroc'])} | "
            f"{pm(r[kind + '_image_r_unc_vs_1_minus_dice'])} |"
        )
    shifted = [k[len("entropy_") : -len("_ratio")] for k in u if k.endswith("_ratio")]
    lines += [
        "",
        "Mean uncertainty per image on shifted images relative to the test images (ratio > 1: "
        "higher on the shifted set) and AUROC of test vs shifted by mean uncertainty:",
        "",
        "| shifted set | U-Net entropy ratio / AUROC | hier. entropy ratio / AUROC | "
        "hier. MI ratio / AUROC |",
        "|---|---|---|---|",
    ]
    for name in shifted:
        cells = [
            f"{pm(r[f'{k}_{name}_ratio'], 2)} / {pm(r[f'{k}_{name}_auroc'], 2)}"
            for r, k in ((u, "entropy"), (h, "entropy"), (h, "mi"))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    o = result["onnx_seed0"]
    lines += [
        "",
        "ONNX (seed 0): sampling model via `sample_onnx` vs torch, max |diff| of mean "
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[48, 48])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="noise draws T at test time")
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "training_hierarchical.json"))
    ap.add_argument("--doc-section", default="hierarchical", help="marker name of the docs table")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs table from --out")
    args = ap.parse_args(argv)
    if args.render_only:
        result = json.loads(Path(args.out).read_text())
        write_doc_section(args.doc_section, render(result))
        return result
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
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict]] = {"unet": [], "hierarchical": []}
    onnx_check: dict = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        unet = UNet(1, K, width=args.width, depth=args.depth)
        fit_segmenter(unet, X, y, Xv, yv, seed=seed, **fit_kw)
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

        def unet_maps(Z, net=unet):
            p = softmax(predict_logits(net, Z, 32, "cpu"))
            return p, {"entropy": entropy(p)}

        def hier_maps(Z, net=hier, seed=seed):
            agg = aggregate_samples(sample_torch(net, Z, args.samples, seed=seed))
            return agg["proba"], {"entropy": agg["entropy"], "mi": agg["mutual_information"]}

        for arm, fn in (("unet", unet_maps), ("hierarchical", hier_maps)):
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

    def collect(arm, path):
        vals = []
        for r in runs[arm]:
            v = r
            for key in path:
                v = v[key]
            vals.append(v)
        return mean_std(vals)

    summary: dict = {}
    for arm in runs:
        kinds = ["entropy"] + (["mi"] if arm == "hierarchical" else [])
        s = {k: collect(arm, [k]) for k in ("dice", "ece", "nll")}
        for kind in kinds:
            for m in ("ueo", "error_auroc", "image_r_unc_vs_1_minus_dice"):
                s[f"{kind}_{m}"] = collect(arm, [f"errors_{kind}", m])
            for name in shifted:
                s[f"{kind}_{name}_ratio"] = collect(arm, [f"ood_{kind}", name, "ratio_to_test"])
                s[f"{kind}_{name}_auroc"] = collect(arm, [f"ood_{kind}", name, "auroc"])
        summary[arm] = s
    result = {
        "benchmark": "training_hierarchical",
        "config": vars(args) | {"n_train": len(X), "n_test": len(Xt), "corruptions": CORRUPT},
        "runs": runs,
        "summary_mean_std": summary,
        "onnx_seed0": onnx_check,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_doc_section(args.doc_section, render(result))
    for arm, s in summary.items():
        print(arm, {k: f"{m:.3f}±{sd:.3f}" for k, (m, sd) in s.items()})
    return result


if __name__ == "__main__":
    main()
