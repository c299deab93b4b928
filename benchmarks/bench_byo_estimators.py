"""The four estimators with default settings on foreign networks, next to the zoo's member.

Trains small networks uqseg did not write for a few epochs on the embedded brain data (train
split, 128 x 128), exports each the way its own library's users do (plain
``torch.onnx.export``, no uqseg metadata) and measures, with every estimator at its default
settings:

- test Dice (softmax: grey and white matter; sigmoid: mean over channels, masks ``p >= 0.5``),
- ECE (15 bins, all voxels of the test split) before and after ``TemperatureCalibrator``
  fitted on the validation split,
- mean OOD AUROC of ``SpectralOODDetector`` fitted on the train split, test split as
  in-distribution against every ``datasets.OOD_KINDS``,
- ``QualityRegressor`` fitted on the validation split: Pearson r and mean absolute error of
  its predicted per-image, per-class Dice against the true Dice on the test split.

Networks: MONAI ``UNet``, ``BasicUNet`` and ``SegResNet``, an nnU-Net-style ``PlainConvUNet`` layout
(trained with deep supervision, exported with its heads), the layout of
``segmentation_models_pytorch.Unet`` with a ResNet-18 encoder (smp itself is used when it
imports), a binary sigmoid MONAI ``UNet`` (white matter) and a three-channel multi-label one
(tissue = GM or WM, GM, WM; overlapping) ending in ``Sigmoid``. The network classes are
those of ``tests/test_byo_network.py``. An estimator that refuses an output kind at this
commit is reported as "n/a (not supported at this commit)" with its message in the JSON;
any other error stops the run.

Writes ``benchmarks/results/byo_estimators.json`` and prints the markdown table that
``docs/byo_network.md`` holds between its ``byo-estimators`` markers.

Usage::

    python benchmarks/bench_byo_estimators.py --write-doc      # 8 epochs, about 75 min
                                                               # on 2 busy CPU cores
    python benchmarks/bench_byo_estimators.py --epochs 1 --only monai_unet   # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from uqseg import (
    OnnxSegmenter,
    QualityRegressor,
    SpectralOODDetector,
    TemperatureCalibrator,
    datasets,
    metrics,
)

ROOT = Path(__file__).resolve().parents[1]
NA = "n/a (not supported at this commit)"
BEGIN, END = "<!-- byo-estimators:begin -->", "<!-- byo-estimators:end -->"


def _test_networks():
    """The network classes of ``tests/test_byo_network.py`` (one definition of each)."""
    spec = importlib.util.spec_from_file_location("_byo_nets", ROOT / "tests/test_byo_network.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- networks
def networks() -> dict:
    """name -> (builder, target kind, output names, description)."""
    import torch
    from monai.networks.nets import BasicUNet, UNet

    t = _test_networks()
    unet = dict(spatial_dims=2, in_channels=1, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                num_res_units=1)
    nets = {
        "monai_unet": (lambda: UNet(out_channels=3, **unet), "classes", ["out"],
                       "MONAI UNet"),
        "monai_basicunet": (lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=3,
                                              features=(8, 8, 16, 16, 32, 8)),
                            "classes", ["out"], "MONAI BasicUNet"),
        "nnunet_style": (lambda: t.PlainConvUNetLike(3), "classes",
                         ["seg", "seg_1_2", "seg_1_4"], "nnU-Net-style PlainConvUNet, deep "
                         "supervision"),
        "monai_segresnet": (t._monai_segresnet, "classes", ["out"],
                            "MONAI SegResNet (GroupNorm)"),
    }
    if importlib.util.find_spec("segmentation_models_pytorch") is not None:
        nets["smp_unet"] = (t._smp_unet, "classes", ["mask"], "smp Unet (resnet18)")
    else:
        # a quarter of smp's widths: at an eighth (2 channels at full resolution) the
        # white matter class was not learned in 8 epochs (Dice 0.001)
        nets["smp_layout"] = (lambda: t.SmpLayoutUnet(widths=(16, 16, 32, 64, 128),
                                                      decoder=(64, 32, 16, 8, 4)),
                              "classes", ["mask"], "smp Unet layout (ResNet-18, 1/4 width)")
    nets["sigmoid_binary"] = (lambda: UNet(out_channels=1, **unet), "binary", ["out"],
                              "MONAI UNet, 1 sigmoid channel (WM)")
    nets["sigmoid_multilabel"] = (
        lambda: torch.nn.Sequential(UNet(out_channels=3, **unet), torch.nn.Sigmoid()),
        "multilabel", ["prob"], "MONAI UNet + Sigmoid, 3 overlapping channels")
    return nets


def targets(y: np.ndarray, kind: str) -> np.ndarray:
    """Labels (0 background, 1 GM, 2 WM) as the network's targets."""
    if kind == "classes":
        return y
    if kind == "binary":
        return y == 2
    return np.stack([y > 0, y == 1, y == 2], axis=1)  # tissue, GM, WM: tissue overlaps both


def train(build, X, y, kind: str, epochs: int, seed: int = 0):
    """Adam, batches of 16; cross-entropy (deep supervision: on every head, nnU-Net's halving
    weights) or binary cross-entropy (sigmoid kinds)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    Xt = torch.from_numpy(X)
    T = torch.from_numpy(targets(y, kind).astype(np.int64 if kind == "classes" else np.float32))
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(X)), max(1, len(X) // 16)):
            opt.zero_grad()
            out, tb = net(Xt[idx]), T[idx]
            if kind == "classes":
                heads = out if isinstance(out, tuple) else (out,)
                w = np.array([0.5 ** i for i in range(len(heads))])
                w = w / w.sum()
                loss = sum(float(wi) * F.cross_entropy(h, tb[:, ::2 ** i, ::2 ** i])
                           for i, (wi, h) in enumerate(zip(w, heads, strict=True)))
            else:
                tb = tb[:, None] if kind == "binary" else tb
                loss = (F.binary_cross_entropy(out, tb) if kind == "multilabel"
                        else F.binary_cross_entropy_with_logits(out, tb))
            loss.backward()
            opt.step()
    return net.eval()


def export(net, path, outputs):
    import torch

    axes = {n: {0: "N", 2: "H", 3: "W"} for n in ["image", *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 128, 128),), str(path), input_names=["image"],
                          output_names=outputs, dynamic_axes=axes, dynamo=False)
    return str(path)


# ---------------------------------------------------------------------- measures
def _unsupported(exc: ValueError) -> bool:
    """The estimator's refusal of the output kind (sigmoid / probabilities), nothing else."""
    return "activation_" in str(exc)


def dice_per_image(seg, X, T, kind) -> np.ndarray:
    """(N, K) Dice of the segmenter's masks: foreground classes (softmax) or channels."""
    if kind == "classes":
        return metrics.dice_score(seg.predict(X), T, n_classes=3)
    pred = seg.predict(X).astype(bool)
    T = T[:, None] if T.ndim == pred.ndim - 1 else T
    ax = tuple(range(2, pred.ndim))
    inter, tot = (pred & T).sum(ax), pred.sum(ax) + T.sum(ax)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, 2 * inter / np.maximum(tot, 1), np.nan)


def ece(proba, T, kind) -> float:
    if kind == "classes":
        return float(metrics.expected_calibration_error(proba, T, n_bins=15))
    return float(metrics.multilabel_report(proba, T, n_bins=15)["pooled"]["ece"])


def evaluate(path, kind, data) -> dict:
    (X_tr, _), (X_va, T_va), (X_te, T_te) = data
    seg = OnnxSegmenter(path).fit()
    out = {"activation": seg.activation_, "output": seg.output_name_,
           "spatial_divisor": seg.spatial_divisor_, "roles": seg.layer_roles_}
    d = dice_per_image(seg, X_te, T_te, kind)
    out["dice"] = [float(v) for v in np.nanmean(d, axis=0)]
    out["ece_before"] = ece(seg.predict_proba(X_te), T_te, kind)
    try:
        cal = TemperatureCalibrator(seg).fit(X_va, T_va)
        out["ece_after"] = ece(cal.predict_proba(X_te), T_te, kind)
        out["temperature"] = np.asarray(cal.temperature_).ravel().tolist()
    except ValueError as exc:
        if not _unsupported(exc):
            raise
        out["ece_after"], out["ece_after_error"] = NA, str(exc)
    ood = SpectralOODDetector(seg).fit(X_tr)
    s_in = ood.score_samples(X_te)
    au = {k: float(metrics.ood_auroc(s_in, ood.score_samples(datasets.load_ood(k))))
          for k in datasets.OOD_KINDS}
    out["ood"] = {"layers": ood.layers_, "layout_layer": ood.descriptors_[1].layers_[0],
                  "auroc": au, "mean_auroc": float(np.mean(list(au.values())))}
    try:
        q = QualityRegressor(seg).fit(X_va, T_va).predict(X_te)
        ok = np.isfinite(d) & np.isfinite(q)
        out["quality"] = {"r": float(np.corrcoef(q[ok], d[ok])[0, 1]),
                          "mae": float(np.abs(q[ok] - d[ok]).mean()), "n": int(ok.sum())}
    except ValueError as exc:
        if not _unsupported(exc):
            raise
        out["quality"], out["quality_error"] = NA, str(exc)
    return out


def _f(v, fmt="{:.3f}"):
    return v if isinstance(v, str) else fmt.format(v)


def table(res: dict) -> str:
    rows = ["| network | training | activation | test Dice | ECE before | ECE after TS "
            "| OOD AUROC (mean of 9) | quality r | quality MAE |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["networks"].values():
        q = r["quality"]
        rows.append(
            f"| {r['description']} | {r['training']} | {r['activation']} | "
            + ", ".join(f"{v:.3f}" for v in r["dice"])
            + f" | {_f(r['ece_before'], '{:.4f}')} | {_f(r['ece_after'], '{:.4f}')} | "
            f"{r['ood']['mean_auroc']:.3f} | {_f(q if isinstance(q, str) else q['r'])} | "
            f"{_f(q if isinstance(q, str) else q['mae'])} |")
    return "\n".join(rows)


def write_doc_table(text: str, doc: Path) -> bool:
    src = doc.read_text()
    if BEGIN not in src or END not in src:
        return False
    head, rest = src.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="network names (default: all)")
    ap.add_argument("--cache", type=Path, help="keep/reuse trained ONNX files in this folder "
                    "(files named <network>_e<epochs>.onnx)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/byo_estimators.json")
    ap.add_argument("--write-doc", action="store_true",
                    help="replace the table between the markers of docs/byo_network.md")
    args = ap.parse_args(argv)
    try:
        import monai  # noqa: F401
        import torch
    except ImportError as exc:  # the core install: nothing to train
        print(f"skipped: {exc} (pip install 'uqseg[train,dev]')")
        return
    torch.set_num_threads(2)
    raw = {s: datasets.load_brain_tissue(s) for s in ("train", "val", "test")}
    res = {"epochs": args.epochs, "resolution": [128, 128], "python": platform.python_version(),
           "torch": torch.__version__, "networks": {}}
    if args.only and args.out.exists():  # a partial run updates the rows it measures
        res["networks"] = json.loads(args.out.read_text())["networks"]
    nets = networks()
    order = [*nets, "zoo_member_00"]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every network: an interrupted run keeps what it measured
        res["networks"] = {k: res["networks"][k] for k in order if k in res["networks"]}
        args.out.write_text(json.dumps(res, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.cache or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, (build, kind, outputs, desc) in nets.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            path = folder / f"{name}_e{args.epochs}.onnx"
            if not path.exists():
                X, y = raw["train"]
                export(train(build, X, y, kind, args.epochs), path, outputs)
            train_s = time.perf_counter() - t0
            data = [(raw[s][0], targets(raw[s][1], kind)) for s in ("train", "val", "test")]
            r = evaluate(str(path), kind, data)
            r.update(description=desc, kind=kind, training=f"{args.epochs} epochs, 128 x 128",
                     train_s=round(train_s, 1), eval_s=round(time.perf_counter() - t0 - train_s, 1))
            res["networks"][name] = r
            save()
            print(name, json.dumps({k: r[k] for k in ("dice", "ece_before", "ece_after")}),
                  r["ood"]["mean_auroc"], r["quality"], flush=True)
    if not args.only or "zoo_member_00" in args.only:
        data = [raw[s] for s in ("train", "val", "test")]
        r = evaluate(datasets.reference_models()[0], "classes", data)
        r.update(description="zoo member 0 (uqseg's exporter, named layers)", kind="classes",
                 training="100 epochs, 128 x 128")
        res["networks"]["zoo_member_00"] = r
        save()
    text = table(res)
    print(text)
    if args.write_doc and not write_doc_table(text, ROOT / "docs/byo_network.md"):
        print(f"docs/byo_network.md has no {BEGIN} ... {END} markers", file=sys.stderr)


if __name__ == "__main__":
    main()
