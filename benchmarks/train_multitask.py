"""Multi-task training (Karimi & Gholipour) vs one network per data set vs fine-tuning.

Three segmentation data sets from the embedded brain data, one global label space:

- ``axial_tissue``: grey/white matter (labels 1, 2) on axial slices, all training subjects;
- ``coronal_tissue_small``: the same classes on coronal slices, only ``--small-subjects``
  training subjects (the small-data task);
- ``sagittal_brain``: a binary whole-brain mask (label 3) on sagittal slices.

Arms, same seeds, U-Net and loop (``fit_multitask``, Dice + CE, ``--steps`` gradient steps
per data set): ``single`` (one network per data set, ``steps`` each), ``joint`` (one network
on all three, ``3 * steps``, samples drawn with probability 1/(K sqrt(n_k))), ``finetune``
(the axial single network fine-tuned on each other data set for ``steps`` at lr / 3).
Scores per data set on its test split, over that task's classes (the mass of other tasks'
classes counts as background). Seed 0's joint network is exported to ONNX and scored again
through ``uqseg.OnnxSegmenter``.

    python benchmarks/train_multitask.py                 # small: minutes on 2 CPU cores
    python benchmarks/train_multitask.py --size 96 96 --width 16 --steps 600
    # one process per seed, then one table:
    python benchmarks/train_multitask.py --seeds 0 --out s0.json --no-doc ...
    python benchmarks/train_multitask.py --merge s0.json s1.json s2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from common import pm

from uqseg import OnnxSegmenter, datasets, metrics
from uqseg.training import UNet, export_onnx, predict_logits
from uqseg.training.multitask import dataset_probabilities, fit_multitask, restrict_to_task
from uqseg.uncertainty import softmax

RESULTS = common.RESULTS
DOC = Path(__file__).resolve().parents[1] / "docs" / "training_methods.md"


def write_doc_section(name: str, markdown: str) -> None:
    common.write_doc_section(DOC, name, markdown)


def render(result: dict) -> str:
    """Markdown table: Dice / ECE / NLL per data set and arm (test split, mean ± std)."""
    s, cfg = result["summary_mean_std"], result["config"]
    lines = [
        f"Test split, {len(cfg['seeds'])} seeds, {cfg['size'][0]}x{cfg['size'][1]} slices, "
        f"width {cfg['width']} depth {cfg['depth']}, {cfg['steps']} steps of "
        f"{cfg['batch_size']} per data set (joint: {len(TASKS)} x {cfg['steps']}). "
        f"Training sizes {cfg['train_sizes']}; joint draw probabilities per data set "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["dataset_probabilities"].items())
        + ".",
        "",
        "| data set | arm | Dice | ECE | NLL |",
        "|---|---|---|---|---|",
    ]
    for n in TASKS:
        for arm in ("single", "single_long", "joint", "finetune"):
            if arm in s and n in s[arm]:
                r = s[arm][n]
                lines.append(f"| {n} | {arm} | {pm(r['dice'])} | {pm(r['ece'])} | {pm(r['nll'])} |")
    o = result["onnx_seed0_joint"]
    if not o:
        return "\n".join(lines)
    diff = max(o[n]["proba_max_abs_diff_vs_torch"] for n in TASKS)
    lines += [
        "",
        f"ONNX (seed 0 joint network) through `OnnxSegmenter`: max |p_onnx - p_torch| "
        f"= {diff:.1e}.",
    ]
    return "\n".join(lines)


N_GLOBAL = 4  # 0 background, 1 grey matter, 2 white matter, 3 brain (mask task)
TASKS = {
    "axial_tissue": {"plane": "axial", "classes": [0, 1, 2]},
    "coronal_tissue_small": {"plane": "coronal", "classes": [0, 1, 2]},
    "sagittal_brain": {"plane": "sagittal", "classes": [0, 3]},
}


def load(name: str, split: str, size, small_subjects: int):
    X, y = datasets.load_brain_tissue(split, plane=TASKS[name]["plane"], size=size)
    if name == "sagittal_brain":
        y = np.where(y > 0, 3, 0).astype(y.dtype)
    if name == "coronal_tissue_small" and split == "train":
        n = small_subjects * (len(X) // 12)  # 12 training subjects, equal slices each
        X, y = X[:n], y[:n]
    return X, y


def task_scores(proba_global: np.ndarray, y_global: np.ndarray, classes: list[int]) -> dict:
    proba = restrict_to_task(proba_global, classes)
    lut = np.zeros(N_GLOBAL, dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    y = lut[y_global]
    d = metrics.dice_score(proba.argmax(1), y, n_classes=len(classes))
    return {
        "dice": float(np.nanmean(d)),
        "ece": float(metrics.expected_calibration_error(proba, y, n_bins=15)),
        "nll": float(metrics.negative_log_likelihood(proba, y)),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[48, 48])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80, help="gradient steps per data set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--small-subjects", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "training_multitask.json"))
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["single", "joint", "finetune"],
        choices=["single", "joint", "finetune", "single_long"],
        help="single_long: one network per data set with the joint network's step count",
    )
    ap.add_argument("--doc-section", default="multitask", help="marker name of the docs table")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs table from --out")
    ap.add_argument("--no-doc", action="store_true", help="leave the docs table alone")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine per-seed result files of one configuration into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return finish(merge(args.merge), args)
    if args.render_only:
        result = json.loads(Path(args.out).read_text())
        write_doc_section(args.doc_section, render(result))
        return result
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    size = tuple(args.size)
    data = {
        name: {s: load(name, s, size, args.small_subjects) for s in ("train", "val", "test")}
        for name in TASKS
    }
    names = list(TASKS)
    sizes = [len(data[n]["train"][0]) for n in names]
    kw = {"batch_size": args.batch_size, "eval_every": args.eval_every}

    def new_net(seed: int) -> UNet:
        torch.manual_seed(seed)
        return UNet(1, N_GLOBAL, width=args.width, depth=args.depth)

    def evaluate(net) -> dict:
        return {
            n: task_scores(
                softmax(predict_logits(net, data[n]["test"][0], 32, "cpu")),
                data[n]["test"][1],
                TASKS[n]["classes"],
            )
            for n in names
        }

    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    # validation curves (mean foreground Dice every eval_every steps) and the step kept:
    # whether a network's validation Dice had plateaued
    curves: dict[str, list[dict]] = {arm: [] for arm in args.arms}

    def fit(arm, run_seed, task, net, *a, **k):
        h = fit_multitask(net, *a, **k)
        curves[arm].append({"seed": run_seed, "task": task, "best_step": h["best_step"],
                            "val_dice": [round(float(v), 4) for v in h["val_dice"]]})
        return h

    draws, onnx_check = None, {}
    for seed in args.seeds:
        if "single_long" in runs:  # one network per data set with the joint network's steps
            row = {}
            for n in names:
                net = new_net(seed)
                fit(
                    "single_long", seed, n, net,
                    [data[n]["train"]],
                    [data[n]["val"]],
                    steps=len(names) * args.steps,
                    lr=args.lr,
                    seed=seed,
                    **kw,
                )
                row[n] = evaluate(net)[n]
            runs["single_long"].append({"seed": seed, **row})
        single = {}
        for n in names if {"single", "finetune"} & set(runs) else []:
            net = new_net(seed)
            fit(
                "single", seed, n, net,
                [data[n]["train"]],
                [data[n]["val"]],
                steps=args.steps,
                lr=args.lr,
                seed=seed,
                **kw,
            )
            single[n] = net
        if "single" in runs:
            runs["single"].append({"seed": seed, **{n: evaluate(single[n])[n] for n in names}})
        joint = new_net(seed) if "joint" in runs else None
        h = joint and fit(
            "joint", seed, "all", joint,
            [data[n]["train"] for n in names],
            [data[n]["val"] for n in names],
            steps=len(names) * args.steps,
            lr=args.lr,
            seed=seed,
            **kw,
        )
        if joint is not None:
            draws = h["draws"]
            runs["joint"].append({"seed": seed, **evaluate(joint)})
        ft_row = {}
        for n in names[1:] if "finetune" in runs else []:
            net = copy.deepcopy(single[names[0]])
            fit(
                "finetune", seed, n, net,
                [data[n]["train"]],
                [data[n]["val"]],
                steps=args.steps,
                lr=args.lr / 3,
                seed=seed,
                **kw,
            )
            ft_row[n] = evaluate(net)[n]
        if "finetune" in runs:
            runs["finetune"].append({"seed": seed, **ft_row})
        for arm in runs:
            r = runs[arm][-1]
            print(
                f"seed {seed} {arm}: "
                + "  ".join(
                    f"{n} dice {r[n]['dice']:.3f} ece {r[n]['ece']:.3f}" for n in names if n in r
                ),
                flush=True,
            )
        if seed == args.seeds[0] and joint is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "joint.onnx"
                rep = export_onnx(
                    joint,
                    path,
                    data[names[0]]["test"][0][:2],
                    feature_layers=["decoder_last", "bottleneck"],
                    info={"arm": "joint", "tasks": TASKS, "seed": seed},
                )
                seg = OnnxSegmenter(str(path), backend="onnxruntime", device="cpu").fit()
                onnx_check = {"export_max_abs_diff": rep["max_abs_diff"]}
                for n in names:
                    Xt, yt = data[n]["test"]
                    p = seg.predict_proba(Xt)
                    ref = softmax(predict_logits(joint, Xt, 32, "cpu"))
                    onnx_check[n] = {
                        "proba_max_abs_diff_vs_torch": float(np.abs(p - ref).max()),
                        **task_scores(p, yt, TASKS[n]["classes"]),
                    }
    result = {
        "benchmark": "training_multitask",
        "config": vars(args)
        | {"tasks": TASKS, "train_sizes": dict(zip(names, sizes, strict=True))},
        "dataset_probabilities": dict(
            zip(names, dataset_probabilities(sizes).tolist(), strict=True)
        ),
        "joint_draws_last_seed": None if draws is None else dict(zip(names, draws, strict=True)),
        "runs": runs,
        "validation_curves": curves,
        "summary_mean_std": summarise(runs, names),
        "onnx_seed0_joint": onnx_check,
        "seconds": time.perf_counter() - t0,
    }
    return finish(result, args)


def summarise(runs: dict, names: list[str]) -> dict:
    """Mean and standard deviation over seeds per arm, data set and score."""
    summary: dict = {}
    for arm, rows in runs.items():
        summary[arm] = {}
        for n in names:
            if n not in rows[0]:
                continue
            summary[arm][n] = {}
            for k in ("dice", "ece", "nll"):
                v = np.array([r[n][k] for r in rows])
                summary[arm][n][k] = [float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0)]
    return summary


def merge(paths: list[str]) -> dict:
    """One result from runs of the same configuration on different seeds (one process per
    seed spreads a run over cores); the ONNX check is the first file's."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    keep = ("seeds", "out", "merge", "threads", "no_doc")
    for p in parts[1:]:
        a = {k: v for k, v in first["config"].items() if k not in keep}
        b = {k: v for k, v in p["config"].items() if k not in keep}
        if a != b:
            raise SystemExit(f"cannot merge runs of different configurations: {a} vs {b}")
    runs = {arm: [r for p in parts for r in p["runs"][arm]] for arm in first["runs"]}
    curves = {arm: [c for p in parts for c in p.get("validation_curves", {}).get(arm, [])]
              for arm in first["runs"]}
    seeds = [r["seed"] for r in next(iter(runs.values()))]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the runs repeat a seed: {seeds}")
    names = list(TASKS)
    return first | {"config": first["config"] | {"seeds": seeds}, "runs": runs,
                    "validation_curves": curves,
                    "summary_mean_std": summarise(runs, names),
                    "seconds_per_process": [p["seconds"] for p in parts],
                    "seconds": max(p["seconds"] for p in parts)}


def finish(result: dict, args) -> dict:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not args.no_doc:
        write_doc_section(args.doc_section, render(result))
    for arm, s in result["summary_mean_std"].items():
        for n, v in s.items():
            print(
                f"{arm:9s} {n:22s} "
                + "  ".join(f"{k} {m:.4f}±{sd:.4f}" for k, (m, sd) in v.items())
            )
    return result


if __name__ == "__main__":
    main()
