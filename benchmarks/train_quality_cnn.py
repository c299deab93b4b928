"""DeVries & Taylor's quality CNN against the feature regressor, 3 seeds, at two schedules.

Issue 23's check of the claim "a learned second stage predicts segmentation quality" at the
zoo's scale: the same fit and test sets as ``bench_quality.py`` (val / test slices at 128²
widened with corrupted copies; five corruption kinds fitted, three held out), the zoo
ensemble's pass cached as there. Arms, each with seeds 0, 1, 2:

- ``features``: ``QualityRegressor``'s default (features + typicality + atlas agreement;
  extra trees seeded ``random_state=seed``, and the ridge);
- ``cnn_e{E}``: ``QualityNetRegressor`` (the shipped CNN's size: width 16, depth 4,
  downsample 2) on the maps input, trained ``E`` epochs (12 as the shipped one, and 4x that to
  see whether longer training changes the verdict).

Reports MAE and Pearson r between predicted and true Dice on the clean + fitted kinds and on the
held-out kinds, mean ± std over seeds; writes ``benchmarks/results/quality_cnn_seeds.json``
and the ``quality_cnn_seeds`` section of ``docs/quality.md``. Never touches the shipped model.

    python benchmarks/train_quality_cnn.py      # ~4 min ensemble pass (cached), ~6 min training
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_quality import (
    FIT_KINDS,
    HELD_OUT_KINDS,
    SEVERITIES,
    CachedEnsemble,
    cached_pass,
    collect,
    true_quality,
)
from common import RESULTS, ROOT, machine_record, pm, write_doc_section, write_json

from uqseg import EnsembleSegmenter, QualityRegressor, datasets
from uqseg.datasets import make_quality_set
from uqseg.metrics import quality_report
from uqseg.quality import default_regressor


def _report(pred, true, held):
    return {"fitted": quality_report(pred[~held], true[~held]),
            "held_out": quality_report(pred[held], true[held])}


def _summary(runs):
    out = {}
    for arm, rows in runs.items():
        out[arm] = {}
        for part in ("fitted", "held_out"):
            for m in ("mae", "pearson_r"):
                v = [r[part][m] for r in rows]
                out[arm][f"{part}_{m}"] = [float(np.mean(v)), float(np.std(v))]
    return out


def render(res) -> str:
    s = res["summary"]
    lines = [f"Zoo ensemble, {res['n_fit']} fitting images, {res['n_test']} test images "
             f"({', '.join(HELD_OUT_KINDS)} held out), seeds {res['seeds']}; mean ± std over "
             "seeds.", "",
             "| arm | MAE fitted | r fitted | MAE held out | r held out | train s (seed 0) |",
             "|---|---|---|---|---|---|"]
    for arm, r in s.items():
        lines.append(f"| {arm} | {pm(r['fitted_mae'])} | {pm(r['fitted_pearson_r'])} | "
                     f"{pm(r['held_out_mae'])} | {pm(r['held_out_pearson_r'])} | "
                     f"{res['train_seconds'][arm]:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[12, 48])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) /
                    "uqseg_quality_cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_cnn_seeds.json")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    doc = ROOT / "docs" / "quality.md"
    if args.render_only:
        res = json.loads(args.out.read_text())
        write_doc_section(doc, "quality_cnn_seeds", render(res))
        return res
    import torch

    from uqseg.training.quality_net import QualityNetRegressor

    torch.set_num_threads(1)
    seg = EnsembleSegmenter(datasets.reference_models()).fit()
    Xv, yv = datasets.load_brain_tissue("val")
    Xt, yt = datasets.load_brain_tissue("test")
    Xvw, yvw, info_v = make_quality_set(Xv, yv, corruptions=FIT_KINDS, severities=SEVERITIES,
                                        seed=0)
    Xtw, ytw, info_t = make_quality_set(Xt, yt, corruptions=FIT_KINDS + HELD_OUT_KINDS,
                                        severities=SEVERITIES, seed=1)
    cseg = CachedEnsemble(seg, [(Xvw, cached_pass(seg, Xvw, "fit", args.cache)),
                                (Xtw, cached_pass(seg, Xtw, "test", args.cache))])
    held = np.isin(info_t["corruption"], HELD_OUT_KINDS)
    runs, seconds = {}, {}
    maps_v = maps_t = T_v = T_te = None
    for seed in args.seeds:
        t0 = time.perf_counter()
        reg = default_regressor().set_params(trees__random_state=seed)
        qr = QualityRegressor(cseg, regressor=reg).fit(Xvw, yvw, groups=info_v["source"])
        pred = qr.predict(Xtw)
        seconds.setdefault("features", time.perf_counter() - t0)
        if maps_v is None:  # the CNN's inputs and the true Dice, once
            _, _, maps_t, pred_t = collect(qr, cseg, Xtw)
            _, _, maps_v, pred_v = collect(qr, cseg, Xvw)
            T_te = true_quality(pred_t, ytw, qr.n_classes_)
            T_v = true_quality(pred_v, yvw, qr.n_classes_)
        runs.setdefault("features", []).append({"seed": seed, **_report(pred, T_te, held)})
        print(f"seed {seed} features: {runs['features'][-1]}", flush=True)
        for epochs in args.epochs:
            arm = f"cnn_e{epochs}"
            t0 = time.perf_counter()
            net = QualityNetRegressor(width=16, depth=4, downsample=2, epochs=epochs,
                                      batch_size=32, lr=3e-3, seed=seed)
            net.fit(maps_v.astype(np.float32), T_v)
            seconds.setdefault(arm, time.perf_counter() - t0)
            p = np.concatenate([net.predict(maps_t[i:i + 256].astype(np.float32))
                                for i in range(0, len(maps_t), 256)])
            runs.setdefault(arm, []).append({"seed": seed, **_report(p, T_te, held),
                                             "final_train_loss": float(
                                                 net.history_["loss"][-1])
                                             if "loss" in net.history_ else None})
            print(f"seed {seed} {arm}: {runs[arm][-1]}", flush=True)
    res = {"seeds": args.seeds, "epochs": args.epochs, "n_fit": int(len(Xvw)),
           "n_test": int(len(Xtw)), "runs": runs, "summary": _summary(runs),
           "train_seconds": seconds,
           "machine": machine_record(["numpy", "onnxruntime", "scikit-learn", "torch"])}
    write_json(args.out, res)
    write_doc_section(doc, "quality_cnn_seeds", render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
