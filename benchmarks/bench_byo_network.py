"""Spectral OOD detection on foreign networks: layers found by structure vs one layer.

Trains tiny MONAI ``UNet`` and ``BasicUNet`` for a few epochs on the embedded brain data
(train split, cross-entropy), exports them with plain ``torch.onnx.export`` (no uqseg
metadata), and fits ``SpectralOODDetector`` on the train split with

- ``structural``: the library default (``decoder_1/4``, ``decoder_1/2``, ``bottleneck`` found
  from the graph, and the ``stem`` where the network normalises per image; layout part on
  ``decoder_1/2``, on ``decoder_last`` where there is a stem),
- ``single:<role>``: one structural layer (``bottleneck`` or ``decoder_last``), the layout part
  on the same layer (what a one-layer fallback would give),

- other structural choices (``--more``): decoder tensors with the last one instead of or
  besides the bottleneck, the layout part on ``decoder_last``, and for ``BasicUNet`` the
  concatenations of upsampled and skip tensors inside its ``upcat`` blocks, and on
  instance-normalised networks the default with the layout on ``decoder_1/2``, without the
  stem, or with the stem as a descriptor of its own (its own spectrum, and layout),

scored with the test split as in-distribution against every ``datasets.OOD_KINDS``. The zoo's
first member is measured the same way (its structural layers are its named ones). Test Dice
says how trained each network is; the zoo was trained for 100 epochs, these for ``--epochs``.

Writes ``benchmarks/results/byo_network.json``.

Usage::

    python benchmarks/bench_byo_network.py          # about 15 min on 2 busy CPU cores
    python benchmarks/bench_byo_network.py --quick  # one epoch, about 7 min
    python benchmarks/bench_byo_network.py --more --cache /tmp/byo   # + the other choices
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from uqseg import OnnxSegmenter, SpectralOODDetector, datasets, metrics
from uqseg.ood import Layout, Spectrum

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ("bottleneck", "decoder_last")
# --more: {name: (roles of the spectral part or None = default, layout role or None = default)}
MORE = {"1/4+1/2+last": (("decoder_1/4", "decoder_1/2", "decoder_last"), None),
        "1/2+last": (("decoder_1/2", "decoder_last"), None),
        "1/4+1/2+bottleneck+last": (("decoder_1/4", "decoder_1/2", "bottleneck",
                                     "decoder_last"), None),
        "default, layout on last": (None, "decoder_last")}
# tensors inside MONAI BasicUNet's upcat blocks: cat([skip, upsampled])
UPCAT = ["/upcat_3/Concat_1_output_0", "/upcat_2/Concat_1_output_0"]


def _nets():
    from monai.networks.nets import BasicUNet, SegResNet, UNet

    return {
        "monai_unet": lambda: UNet(spatial_dims=2, in_channels=1, out_channels=3,
                                   channels=(8, 16, 32, 64), strides=(2, 2, 2),
                                   num_res_units=1),
        "monai_basicunet": lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=3,
                                             features=(8, 8, 16, 16, 32, 8)),
        # the two guesses for BasicUNet's gap (--nets): batch instead of instance norm, wider
        "monai_basicunet_batchnorm": lambda: BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=3, features=(8, 8, 16, 16, 32, 8),
            norm=("batch", {"affine": True})),
        # GroupNorm (exported as reshaped instance normalisation), residual blocks
        "monai_segresnet": lambda: SegResNet(spatial_dims=2, in_channels=1, out_channels=3,
                                             init_filters=8),
        "monai_basicunet_wide": lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=3,
                                                  features=(16, 16, 32, 32, 64, 16)),
    }


DEFAULT_NETS = ("monai_unet", "monai_basicunet")
ALL_NETS = (*DEFAULT_NETS, "monai_basicunet_batchnorm", "monai_basicunet_wide",
            "monai_segresnet")


def train(build, X, y, epochs: int, seed: int = 0, loss: str = "ce"):
    """Adam, batches of 16; ``loss`` "ce" (cross-entropy) or "dicece" (MONAI's ``DiceCELoss``
    on the softmax, MONAI's usual segmentation recipe)."""
    import torch

    if loss == "dicece":
        from monai.losses import DiceCELoss

        crit = DiceCELoss(to_onehot_y=True, softmax=True)

        def objective(out, target):
            return crit(out, target[:, None])
    elif loss == "ce":
        objective = torch.nn.functional.cross_entropy
    else:
        raise ValueError(f"loss must be 'ce' or 'dicece', got {loss!r}")
    torch.manual_seed(seed)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(X)), max(1, len(X) // 16)):
            opt.zero_grad()
            objective(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def export(net, path):
    import torch

    axes = {"image": {0: "N", 2: "H", 3: "W"}, "out": {0: "N", 2: "H", 3: "W"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 128, 128),), str(path), input_names=["image"],
                          output_names=["out"], dynamic_axes=axes, dynamo=False)
    return str(path)


def evaluate(path, X_tr, X_te, y_te, more=False) -> dict:
    seg = OnnxSegmenter(path).fit()
    dice = metrics.dice_score(seg.predict(X_te), y_te, n_classes=3).mean(axis=0)
    ood = {k: datasets.load_ood(k) for k in datasets.OOD_KINDS}
    settings = {"structural": {}}
    for role in SINGLE:
        settings[f"single:{role}"] = {"layer": role, "descriptors": [Spectrum(),
                                                                     Layout(layer=role)]}

    def kw(roles, layout=None):
        return {**({"layer": list(roles)} if roles else {}),
                **({"descriptors": [Spectrum(), Layout(layer=layout)]} if layout else {})}

    if more:
        for name, (roles, layout) in MORE.items():
            settings[name] = kw(roles, layout)
        stem = seg.layer_roles_.get("stem")
        if stem is not None:  # instance-normalised: the stem with or without its own parts
            r = seg.layer_roles_
            three = [r[k] for k in ("decoder_1/4", "decoder_1/2", "bottleneck") if k in r]
            half = r["decoder_1/2"]
            settings["default, layout on 1/2"] = kw(None, half)
            settings["1/4, 1/2, bottleneck without the stem (1/2)"] = kw(three, half)
            settings["stem as its own spectrum (1/2)"] = {"descriptors": [
                Spectrum(layer=three), Spectrum(layer=stem), Layout(layer=half)]}
            settings["stem as its own spectrum and layout (1/2)"] = {"descriptors": [
                Spectrum(layer=three), Spectrum(layer=stem), Layout(layer=half),
                Layout(layer=stem)]}
        if all(t in seg.feature_layers_ for t in UPCAT):
            b = seg.layer_roles_["bottleneck"]
            settings["upcat concat 1/4+1/2+bottleneck"] = kw([*UPCAT, b])
            settings["upcat concat 1/4+1/2+bottleneck, layout on concat 1/2"] = kw(
                [*UPCAT, b], UPCAT[1])
            settings["upcat concat 1/4+1/2, layout on concat 1/2"] = kw(UPCAT, UPCAT[1])
    out = {"dice": [float(d) for d in dice], "roles": seg.layer_roles_,
           "spatial_divisor": seg.spatial_divisor_, "settings": {}}
    for name, kw in settings.items():
        det = SpectralOODDetector(seg, **kw).fit(X_tr)
        s_in = det.score_samples(X_te)
        au = {k: float(metrics.ood_auroc(s_in, det.score_samples(v))) for k, v in ood.items()}
        out["settings"][name] = {"layers": det.layers_,
                                 "descriptor_layers": [d.layers_ for d in det.descriptors_],
                                 "layout_layer": next(d for d in det.descriptors_
                                                     if isinstance(d, Layout)).layers_[0],
                                 "auroc": au, "mean_auroc": float(np.mean(list(au.values())))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="one epoch (smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/byo_network.json")
    ap.add_argument("--more", action="store_true", help="also the other structural choices")
    ap.add_argument("--nets", nargs="+", default=list(DEFAULT_NETS), choices=ALL_NETS,
                    help="networks to train (default: %(default)s)")
    ap.add_argument("--cache", type=Path, help="keep/reuse the trained ONNX files here "
                    "(<network>_e<epochs>.onnx)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = 1
    try:
        import monai  # noqa: F401
        import torch
    except ImportError as exc:  # the core install: nothing to train
        print(f"skipped: {exc} (pip install 'uqseg[train,dev]')")
        return

    torch.set_num_threads(2)
    X_tr, y_tr = datasets.load_brain_tissue("train")
    X_te, y_te = datasets.load_brain_tissue("test")
    res = {"epochs": args.epochs, "python": platform.python_version(),
           "torch": torch.__version__, "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.cache or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.nets:
            build = _nets()[name]
            t0 = time.perf_counter()
            path = folder / f"{name}_e{args.epochs}.onnx"
            if not path.exists():
                export(train(build, X_tr, y_tr, args.epochs), path)
            train_s = time.perf_counter() - t0
            res["networks"][name] = evaluate(str(path), X_tr, X_te, y_te, args.more)
            res["networks"][name]["train_s"] = round(train_s, 1)
            print(name, json.dumps({k: v["mean_auroc"] for k, v in
                                    res["networks"][name]["settings"].items()}), flush=True)
    res["networks"]["zoo_member_00"] = evaluate(datasets.reference_models()[0], X_tr, X_te, y_te,
                                                args.more)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    names = list(dict.fromkeys(k for r in res["networks"].values() for k in r["settings"]))
    print("| setting | " + " | ".join(res["networks"]) + " |")
    print("|---" * (len(res["networks"]) + 1) + "|")
    print("| test Dice (GM, WM) | " + " | ".join(
        f"{r['dice'][0]:.3f}, {r['dice'][1]:.3f}" for r in res["networks"].values()) + " |")
    for k in names:
        print(f"| {k} | " + " | ".join(
            f"{r['settings'][k]['mean_auroc']:.3f} (noise {r['settings'][k]['auroc']['noise']:.2f})"
            if k in r["settings"] else "" for r in res["networks"].values()) + " |")


if __name__ == "__main__":
    main()
