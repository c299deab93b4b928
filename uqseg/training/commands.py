"""What ``uqseg train`` and ``uqseg export`` run: the torch side of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .export import export_onnx
from .loop import fit_segmenter
from .networks import UNet

CONFIG_KEYS = ("in_channels", "n_classes", "dims", "width", "depth", "dropout", "example_shape")


def build_unet(config: dict) -> UNet:
    """The U-Net a ``uqseg train`` config describes."""
    return UNet(config["in_channels"], config["n_classes"], dims=config["dims"],
                width=config["width"], depth=config["depth"], dropout=config["dropout"])


def train_unet(config: dict, X, y, X_val, y_val, *, loss, epochs, batch_size, lr, seed, device,
               progress, checkpoint: Path | None = None):
    """Train the config's U-Net (seeded); save its state (and config) to ``checkpoint``.

    Returns ``(model, history)``; a ``ValueError`` when the image sizes do not divide by the
    network's spatial divisor.
    """
    torch.manual_seed(seed)
    model = build_unet(config)
    div = model.spatial_divisor
    if any(s % div for s in X.shape[2:]):
        raise ValueError(f"image sizes {X.shape[2:]} must be multiples of {div} for depth "
                         f"{config['depth']}")
    hist = fit_segmenter(model, X, y, X_val, y_val, loss=loss, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, device=device,
                         progress=progress)
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), checkpoint)
        checkpoint.with_suffix(".json").write_text(json.dumps(config, indent=2))
    return model, hist


def load_unet(checkpoint: Path, config: dict) -> UNet:
    """The U-Net of ``config`` with the weights saved in ``checkpoint`` (tensors only)."""
    model = build_unet(config)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model


def export_unet(model, config: dict, out, *, opset: int, dynamic: bool, info: dict) -> dict:
    """Export to ONNX with the feature layers and MC-dropout input uqseg reads."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = np.random.default_rng(0).random(config["example_shape"], dtype=np.float32)
    return export_onnx(model, out, example, feature_layers=["decoder_last", "bottleneck"],
                       mc_dropout=config["dropout"] > 0, opset=opset, dynamic_spatial=dynamic,
                       info=info)
