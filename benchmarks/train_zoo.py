"""Train the reference ONNX model zoo shipped in ``uqseg/datasets/models``.

Members are small 2-D U-Nets trained on ``uqseg.datasets.load_brain_tissue`` (background /
grey matter / white matter), each from its own random initialisation, with soft-Dice loss
(over-confident, Mehrtash et al. 2020), cross-entropy, or both; one member carries MC dropout
exported as an ``mc_mask`` input. Every member is written as ``member_XX_<loss>.onnx`` with
uqseg's metadata, and ``zoo.json`` records how each was made and how well it does.

Usage::

    python benchmarks/train_zoo.py --device cuda   # shipped zoo: 4 min on an H100
    python benchmarks/train_zoo.py --quick         # tiny smoke run into a temporary folder
    python benchmarks/train_zoo.py --members 3 --epochs 4 --out /tmp/zoo --device cuda

Training on a GPU machine that lacks the data dependencies or the ONNX exporter, in three steps::

    python benchmarks/train_zoo.py --dump-data build/zoo_data.npz          # here
    python benchmarks/train_zoo.py --data build/zoo_data.npz --device cuda \
        --states-only --out build/zoo_states                                 # on the GPU
    python benchmarks/train_zoo.py --from-states build/zoo_states            # here: export

Deterministic given the seeds on one device and torch version (on CUDA up to cuDNN's
non-deterministic kernels).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from uqseg.datasets._zoo import ZOO_PREPROCESSING
from uqseg.training import DiceLoss, UNet, export_onnx, fit_segmenter, predict_logits
from uqseg.training.loop import foreground_dice

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "uqseg" / "datasets" / "models"
# named first in the metadata: the layers the estimators prefer; then every other block
# (the spectral OOD detector measures best with all of them, docs/ood.md)
PREFERRED_LAYERS = ["decoder_last", "bottleneck"]
CLASSES = ["grey_matter", "white_matter"]
# member recipes, cycled when more members are asked for: (loss, dropout, mc_dropout export)
RECIPES = [
    ("dice", 0.0, False),  # soft Dice over the foreground classes (nnU-Net style)
    ("ce", 0.0, False),
    ("dice_bg", 0.0, False),  # soft Dice over all classes, background included
    ("ce", 0.0, False),
    ("dice_ce", 0.2, True),
]
MAX_TOTAL_BYTES = 20 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=5, help="number of members (default 5)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per member (100, as shipped)")
    p.add_argument("--width", type=int, default=8, help="U-Net width (default 8)")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of member 0; member i uses seed+i")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="per-member time budget (breaks determinism when it triggers)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 members, 1 epoch, width 4, small data, temporary folder",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--dump-data",
        type=Path,
        default=None,
        help="write the train/val/test arrays to this .npz and exit",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="read the arrays from a --dump-data file instead of uqseg.datasets",
    )
    p.add_argument(
        "--states-only",
        action="store_true",
        help="train and save state dicts + histories to OUT, no ONNX export",
    )
    p.add_argument(
        "--from-states",
        type=Path,
        default=None,
        help="skip training: load the members saved by --states-only from this folder",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep members already recorded in OUT/zoo.json whose file exists",
    )
    return p.parse_args(argv)


def feature_layers(model) -> list[str]:
    """The model's named blocks, ``PREFERRED_LAYERS`` first (any depth)."""
    return PREFERRED_LAYERS + [n for n in model.feature_names if n not in PREFERRED_LAYERS]


def load_splits(path=None) -> dict:
    """``X_<split>``, ``y_<split>`` of train/val/test: from a ``--dump-data`` file, else built."""
    if path is not None:
        with np.load(path) as d:
            return dict(d)
    from uqseg.datasets import load_brain_tissue

    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"X_{split}"], arrays[f"y_{split}"] = load_brain_tissue(split)
    return arrays


def member_dice(model, X, y, device):
    pred = predict_logits(model, X, batch_size=16, device=device).argmax(1)
    per_class = foreground_dice(pred, y, 3).mean(0)
    return {
        "per_class": dict(zip(CLASSES, map(float, per_class), strict=True)),
        "mean": float(per_class.mean()),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.members, args.epochs, args.width = min(args.members, 2), 1, 4
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="uqseg_zoo_quick_"))
    if args.dump_data is not None:
        args.dump_data.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.dump_data, **load_splits())
        print(f"wrote {args.dump_data}")
        return {}
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    d = load_splits(args.data)
    X, y, X_val, y_val, X_te, y_te = (
        d[f"{a}_{s}"] for s in ("train", "val", "test") for a in ("X", "y")
    )
    if args.quick:
        X, y, X_val, y_val = X[::8], y[::8], X_val[::8], y_val[::8]
        X_te, y_te = X_te[::8], y_te[::8]
    print(f"data: train {X.shape}, val {X_val.shape}, test {X_te.shape}; out {out}", flush=True)

    members, written = [], []
    done = {}
    if args.resume and (out / "zoo.json").exists():
        old = json.loads((out / "zoo.json").read_text(encoding="utf-8"))
        done = {m["file"]: m for m in old.get("members", []) if (out / m["file"]).exists()}
    for i in range(args.members):
        loss, dropout, mc = RECIPES[i % len(RECIPES)]
        seed = args.seed + i
        name = f"member_{i:02d}_{loss}.onnx"
        if name in done:
            members.append(done[name])
            written.append(out / name)
            print(f"{name}: kept from an earlier run", flush=True)
            continue
        torch.manual_seed(seed)  # the initial weights differ per member
        model = UNet(1, 3, dims=2, width=args.width, depth=args.depth, dropout=dropout)
        stem = name.removesuffix(".onnx")
        if args.from_states is not None:
            state = torch.load(args.from_states / f"{stem}.pt", weights_only=True)
            model.load_state_dict(state)
            saved = json.loads((args.from_states / f"{stem}.json").read_text(encoding="utf-8"))
            hist, trained = saved["history"], saved["trained"]
        else:
            hist = fit_segmenter(
                model,
                X,
                y,
                X_val,
                y_val,
                loss=DiceLoss(include_background=True) if loss == "dice_bg" else loss,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=1e-4,
                augment=True,
                flip_axes=(-1,),  # left-right mirror only: axial slices keep anterior up
                seed=seed,
                device=args.device,
                patience=None,
                progress=not args.no_progress,
                max_minutes=args.max_minutes,
            )
            cuda = str(hist["device"]).startswith("cuda")
            trained = {
                "device": hist["device"],
                "gpu": torch.cuda.get_device_name() if cuda else None,
                "torch": torch.__version__,
                "epochs": args.epochs,
            }
        model.cpu()
        if args.states_only:
            torch.save(model.state_dict(), out / f"{stem}.pt")
            (out / f"{stem}.json").write_text(
                json.dumps({"history": hist, "trained": trained}), encoding="utf-8"
            )
            print(
                f"{stem}: {hist['seconds']:.1f}s on {hist['device']}, best epoch "
                f"{hist['best_epoch']}, val Dice {hist['best_val_dice']:.4f}",
                flush=True,
            )
            continue
        val = member_dice(model, X_val, y_val, "cpu")
        test = member_dice(model, X_te, y_te, "cpu")
        info = {
            "loss": loss,
            "seed": seed,
            "width": args.width,
            "depth": args.depth,
            "dropout": dropout,
            "epochs": trained.get("epochs", args.epochs),
            "val_dice": val["per_class"],
            "test_dice": test["per_class"],
            "data": "uqseg.datasets.load_brain_tissue",
        }
        report = export_onnx(
            model,
            out / name,
            X_val[:2],
            feature_layers=feature_layers(model),
            mc_dropout=mc,
            info=info,
            preprocessing=ZOO_PREPROCESSING,
        )
        written.append(out / name)
        rec = {
            "file": name,
            "seed": seed,
            "loss": loss,
            "width": args.width,
            "depth": args.depth,
            "dropout": dropout,
            "mc_dropout": mc,
            "mc_size": report["mc_size"],
            "epochs": trained.get("epochs", args.epochs),
            "epochs_run": hist["epochs_run"],
            "best_epoch": hist["best_epoch"],
            "train_seconds": round(hist["seconds"], 1),
            "trained_on": trained,
            "train_loss": [round(v, 5) for v in hist["loss"]],
            "val_dice": val["per_class"],
            "val_mean_dice": val["mean"],
            "test_dice": test["per_class"],
            "test_mean_dice": test["mean"],
            "size_bytes": report["size_bytes"],
            "export_max_abs_diff": report["max_abs_diff"],
            "dynamic_spatial": report["dynamic_spatial"],
            "exporter": report["exporter"],
        }
        members.append(rec)
        print(
            f"{name}: {hist['seconds']:.0f}s, val {val['mean']:.4f}, test {test['mean']:.4f} "
            f"{test['per_class']}, {report['size_bytes'] / 1024:.0f} KiB, "
            f"diff {report['max_abs_diff']:.1e}",
            flush=True,
        )
        # record after every member, so an interrupted run can --resume
        write_zoo(out, args, argv, (X, X_val, X_te), members)

    if args.states_only:
        print(f"saved {args.members} member states to {out}")
        return {}
    # drop members of an earlier, larger zoo so the folder holds exactly this run
    for stale in out.glob("member_*.onnx"):
        if stale not in written:
            stale.unlink()
    zoo = write_zoo(out, args, argv, (X, X_val, X_te), members)
    total = zoo["total_size_bytes"]
    print(f"wrote {len(members)} members ({total / 2**20:.2f} MiB) and zoo.json to {out}")
    if total > MAX_TOTAL_BYTES:
        print(f"WARNING: zoo is {total / 2**20:.1f} MiB > 20 MiB", file=sys.stderr)
    worst = min(m["test_mean_dice"] for m in members)
    if not args.quick and worst < 0.85:
        print(f"WARNING: a member's test mean Dice is {worst:.3f} < 0.85", file=sys.stderr)
    return zoo


def _reproduce(args) -> list[str]:
    """The commands that rebuild this zoo, including the GPU step of a --from-states run."""
    if args.from_states is None:
        return []
    trained = f"--epochs {args.epochs} --width {args.width} --depth {args.depth}"
    return [
        "python benchmarks/train_zoo.py --dump-data build/zoo_data.npz",
        f"python benchmarks/train_zoo.py --data build/zoo_data.npz --device cuda --states-only "
        f"{trained} --out {args.from_states}  # on the GPU machine",
        f"python benchmarks/train_zoo.py --from-states {args.from_states} {trained}",
    ]


def write_zoo(out, args, argv, shapes, members) -> dict:
    """Write ``zoo.json`` describing ``members`` and return it."""
    X, X_val, X_te = shapes
    total = sum(m["size_bytes"] for m in members)
    zoo = {
        "description": "Reference 2-D U-Net ensemble for brain tissue segmentation "
        "(0 background, 1 grey matter, 2 white matter)",
        "command": " ".join(["python", *sys.argv])
        if argv is None
        else " ".join(["python", "benchmarks/train_zoo.py", *argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": members[0].get("trained_on", {}).get("device", args.device)
        if members
        else args.device,
        "gpu": members[0].get("trained_on", {}).get("gpu") if members else None,
        "threads": args.threads,
        "data": {"train": list(X.shape), "val": list(X_val.shape), "test": list(X_te.shape)},
        "classes": ["background", *CLASSES],
        "feature_layers": feature_layers(UNet(1, 3, width=args.width, depth=args.depth)),
        "settings": {
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": 1e-4,
            "optimizer": "AdamW, cosine schedule",
            "augment": "left-right flip, +-10% intensity scale/shift",
            "selection": "best val mean Dice epoch",
        },
        "members": members,
        "total_size_bytes": total,
        "reproduce": _reproduce(args),
    }
    old = out / "zoo.json"
    if old.exists():  # the 3-D member's entry (benchmarks/train_zoo3d.py) stays
        kept = json.loads(old.read_text(encoding="utf-8")).get("member_3d")
        if kept is not None:
            zoo["member_3d"] = kept
    with open(out / "zoo.json", "w", encoding="utf-8") as fh:
        json.dump(zoo, fh, indent=2)
        fh.write("\n")
    return zoo


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
