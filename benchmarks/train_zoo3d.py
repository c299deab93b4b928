"""Train the 3-D reference member shipped in ``uqseg/datasets/models/3d``.

A small 3-D U-Net (width 6, depth 4) trained on ``load_brain_tissue(split, dims=3)`` (one
64^3 whole-brain volume per subject: 12 train, 5 val, 5 test) on the CPU with one thread:
random 48^3 crops (4 per volume and epoch, left-right flips, +-10 % intensity), soft Dice +
cross-entropy, AdamW with a cosine schedule; the epoch with the best validation mean Dice
(whole 64^3 volumes) is kept. It is exported with a fixed 64^3 input (the size its
preprocessing produces; larger inputs go through OnnxSegmenter's sliding window), named
feature layers and the ``uqseg.preprocessing`` description of its training volumes
(``uqseg.datasets._zoo.ZOO3D_PREPROCESSING``), and recorded under ``"member_3d"`` in
``zoo.json``.

Usage::

    python benchmarks/train_zoo3d.py             # shipped member: about 15 min, 1 thread
    python benchmarks/train_zoo3d.py --quick     # smoke run into a temporary folder

Deterministic given the seed, the thread count and the torch version.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from uqseg.datasets._zoo import ZOO3D_FILE, ZOO3D_PREPROCESSING
from uqseg.training import DiceCELoss, UNet, export_onnx, predict_logits
from uqseg.training.loop import _augment, foreground_dice

MODELS = Path(__file__).resolve().parents[1] / "uqseg" / "datasets" / "models"
CLASSES = ["grey_matter", "white_matter"]
PREFERRED_LAYERS = ["decoder_last", "bottleneck"]
MAX_BYTES = 1_500_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=25, help="epochs (default 25)")
    p.add_argument("--crops", type=int, default=4, help="random crops per volume and epoch")
    p.add_argument("--patch", type=int, default=48, help="training crop edge (default 48)")
    p.add_argument("--width", type=int, default=6)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help=f"models folder (default {MODELS})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch, width 2, depth 3, temporary folder")
    return p.parse_args(argv)


def dice(model, X, y) -> dict:
    pred = predict_logits(model, X, batch_size=1, device="cpu").argmax(1)
    per = foreground_dice(pred, y, 3).mean(0)
    return {"per_class": dict(zip(CLASSES, map(float, per), strict=True)),
            "mean": float(per.mean())}


def crops(X, y, n_per, patch, gen):
    """``n_per`` random ``patch``^3 crops of every volume, shuffled."""
    Xs, ys = [], []
    size = X.shape[2:]
    for i in range(len(X)):
        for _ in range(n_per):
            o = [int(torch.randint(0, s - patch + 1, (1,), generator=gen)) for s in size]
            sl = tuple(slice(a, a + patch) for a in o)
            Xs.append(X[i][(slice(None), *sl)])
            ys.append(y[i][sl])
    order = torch.randperm(len(Xs), generator=gen)
    return torch.stack([Xs[j] for j in order]), torch.stack([ys[j] for j in order])


def train(args, X, y, X_val, y_val):
    torch.manual_seed(args.seed)
    model = UNet(1, 3, dims=3, width=args.width, depth=args.depth)
    gen = torch.Generator().manual_seed(args.seed)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y).long()
    steps = args.epochs * -(-len(X) * args.crops // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    crit = DiceCELoss()
    hist = {"loss": [], "val_dice": [], "best_epoch": None, "best_val_dice": -1.0}
    best_state, start = None, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        xe, ye = crops(Xt, yt, args.crops, args.patch, gen)
        total = 0.0
        for s in range(0, len(xe), args.batch_size):
            # left-right only (axis 2 runs R): the volumes keep superior up, anterior first
            xb, yb = _augment(xe[s:s + args.batch_size], ye[s:s + args.batch_size], gen, [2])
            opt.zero_grad(set_to_none=True)
            loss = crit(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
        hist["loss"].append(round(total / len(xe), 5))
        val = dice(model, X_val, y_val)["mean"]
        hist["val_dice"].append(round(val, 5))
        if val > hist["best_val_dice"]:
            hist["best_epoch"], hist["best_val_dice"] = epoch, val
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(xe):.4f}, val Dice "
              f"{val:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.load_state_dict(best_state)
    hist["seconds"] = round(time.perf_counter() - start, 1)
    return model.eval(), hist


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.width, args.depth, args.crops = 1, 2, 3, 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="uqseg_zoo3d_quick_"))
    out = Path(args.out or MODELS)
    torch.set_num_threads(args.threads)
    from uqseg.datasets import load_brain_tissue

    data = {s: load_brain_tissue(s, dims=3) for s in ("train", "val", "test")}
    (X, y), (X_val, y_val), (X_te, y_te) = data["train"], data["val"], data["test"]
    print(f"data: train {X.shape}, val {X_val.shape}, test {X_te.shape}; out {out}", flush=True)
    model, hist = train(args, X, y, X_val, y_val)
    val, test = dice(model, X_val, y_val), dice(model, X_te, y_te)
    layers = PREFERRED_LAYERS + [n for n in model.feature_names if n not in PREFERRED_LAYERS]
    info = {"width": args.width, "depth": args.depth, "loss": "dice_ce", "seed": args.seed,
            "epochs": args.epochs, "patch": args.patch, "val_dice": val["per_class"],
            "test_dice": test["per_class"], "data": "uqseg.datasets.load_brain_tissue(dims=3)"}
    path = out / ZOO3D_FILE
    report = export_onnx(model, path, X_val[:1], feature_layers=layers, info=info,
                         dynamic_spatial=False, preprocessing=ZOO3D_PREPROCESSING)
    rec = {
        "file": ZOO3D_FILE,
        "description": "3-D U-Net for brain tissue (0 background, 1 grey matter, 2 white "
                       "matter) on whole-brain volumes resampled to 64^3",
        "command": " ".join(["python", "benchmarks/train_zoo3d.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
        "threads": args.threads,
        "data": {"train": list(X.shape), "val": list(X_val.shape), "test": list(X_te.shape)},
        "width": args.width, "depth": args.depth, "loss": "dice_ce", "seed": args.seed,
        "settings": {"epochs": args.epochs, "crops_per_volume": args.crops,
                     "patch": args.patch, "batch_size": args.batch_size, "lr": args.lr,
                     "weight_decay": 1e-4, "optimizer": "AdamW, cosine schedule per step",
                     "augment": "random crops, left-right flip, +-10% intensity scale/shift",
                     "selection": "best val mean Dice epoch (whole volumes)"},
        "input_shape": [1, 64, 64, 64], "feature_layers": layers,
        "best_epoch": hist["best_epoch"], "train_seconds": hist["seconds"],
        "train_loss": hist["loss"], "val_mean_dice_per_epoch": hist["val_dice"],
        "val_dice": val["per_class"], "val_mean_dice": val["mean"],
        "test_dice": test["per_class"], "test_mean_dice": test["mean"],
        "size_bytes": report["size_bytes"], "export_max_abs_diff": report["max_abs_diff"],
        "dynamic_spatial": report["dynamic_spatial"],
    }
    zoo_path = out / "zoo.json"  # the 2-D zoo's file: only the "member_3d" entry changes
    zoo = json.loads(zoo_path.read_text(encoding="utf-8")) if zoo_path.exists() else {}
    zoo["member_3d"] = rec
    zoo_path.write_text(json.dumps(zoo, indent=2) + "\n", encoding="utf-8")
    print(f"{path}: {hist['seconds']:.0f} s, best epoch {hist['best_epoch'] + 1}, val "
          f"{val['mean']:.4f}, test {test['mean']:.4f} {test['per_class']}, "
          f"{report['size_bytes'] / 1024:.0f} KiB, diff {report['max_abs_diff']:.1e}")
    if report["size_bytes"] > MAX_BYTES:
        print(f"WARNING: {path} is {report['size_bytes']} bytes > {MAX_BYTES}", file=sys.stderr)
    return rec


if __name__ == "__main__":
    main()
