"""Training loop for segmentation networks: seeded, early-stopped on validation Dice."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn

from .losses import make_loss


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values go to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_images(X, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    if t.dim() not in (4, 5):
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) with 2 or 3 spatial axes, "
            f"got {tuple(t.shape)}"
        )
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return t.float()


def _as_labels(y, X: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {t.dtype}")
    expected = (X.shape[0], *X.shape[2:])
    if tuple(t.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} to match the images, got {tuple(t.shape)}"
        )
    return t.long()


def _augment(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator, flip_axes: list[int]):
    """Random per-sample flips of ``flip_axes`` and small intensity scale/shift."""
    n, dims = xb.shape[0], xb.dim() - 2
    xb, yb = xb.clone(), yb.clone()
    flips = torch.rand(n, dims, generator=gen) < 0.5
    for i in range(n):
        axes = [a for a in flip_axes if flips[i, a]]
        if axes:
            xb[i] = torch.flip(xb[i], [a + 1 for a in axes])
            yb[i] = torch.flip(yb[i], axes)
    scale = 1.0 + 0.1 * (2 * torch.rand(n, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(n, generator=gen) - 1)
    std = xb.flatten(1).std(dim=1).clamp_min(1e-6)
    view = (n,) + (1,) * (xb.dim() - 1)
    return xb * scale.view(view) + (shift * std).view(view), yb


def foreground_dice(
    pred: np.ndarray, y: np.ndarray, n_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """Hard Dice ``(N, K-1)`` per image and foreground class (1 when both are empty)."""
    n = pred.shape[0]
    pred = pred.reshape(n, -1)
    y = y.reshape(n, -1)
    valid = np.ones_like(y, dtype=bool) if ignore_index is None else y != ignore_index
    out = np.empty((n, n_classes - 1))
    for k in range(1, n_classes):
        p, t = (pred == k) & valid, (y == k) & valid
        inter = (p & t).sum(1)
        denom = p.sum(1) + t.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k - 1] = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    return out


def predict_logits(
    model: nn.Module, X, batch_size: int = 16, device: str = "auto", mc_mask=None
) -> np.ndarray:
    """Logits ``(N, K, *spatial)`` float32 of ``model`` in eval mode, batch by batch.

    Parameters
    ----------
    model : torch.nn.Module
    X : array or tensor ``(N, C, *spatial)``
    batch_size : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    mc_mask : array ``(N, D)``, optional
        Dropout multipliers passed to ``model(x, mc_mask)``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    Xt = _as_images(X, "X")
    dev = resolve_device(device)
    was_training = model.training
    param = next(model.parameters(), None)
    old_dev = param.device if param is not None else dev
    model.to(dev).eval()
    outs = []
    try:
        with torch.no_grad():
            for s in range(0, Xt.shape[0], batch_size):
                xb = Xt[s : s + batch_size].to(dev)
                if mc_mask is None:
                    outs.append(model(xb).float().cpu().numpy())
                else:
                    mb = torch.as_tensor(
                        np.asarray(mc_mask[s : s + batch_size]), dtype=torch.float32, device=dev
                    )
                    outs.append(model(xb, mb).float().cpu().numpy())
    finally:
        model.to(old_dev).train(was_training)
    return np.concatenate(outs).astype(np.float32, copy=False)


def fit_segmenter(
    model: nn.Module,
    X,
    y,
    X_val=None,
    y_val=None,
    *,
    loss: str | nn.Module = "dice_ce",
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
    device: str = "auto",
    patience: int | None = 10,
    progress: bool = True,
    max_minutes: float | None = None,
    ignore_index: int | None = None,
    cosine: bool = True,
    flip_axes: tuple[int, ...] | None = None,
) -> dict:
    """Train a segmentation network with AdamW; early stopping on validation Dice.

    Parameters
    ----------
    model : torch.nn.Module
        ``model(x) -> logits (N, K, *spatial)``; trained in place (on ``device``, moved
        back to its original device at the end).
    X, y : arrays ``(N, C, *spatial)`` float and ``(N, *spatial)`` int
        Training images and labels.
    X_val, y_val : arrays, optional
        Validation set. When given, the weights of the epoch with the best mean foreground
        Dice are restored at the end and ``patience`` applies.
    loss : {"dice", "ce", "dice_ce"} or torch.nn.Module
        Soft Dice, cross-entropy, their sum, or any ``loss(logits, target)`` module.
    epochs, batch_size, lr, weight_decay : training schedule (cosine-annealed ``lr``).
    augment : bool
        Random flips (see ``flip_axes``) and +-10 % intensity scale/shift per sample.
    seed : int
        Seeds shuffling, augmentation and dropout: a run is reproducible given the seed
        and the model's initial weights (create the model under ``torch.manual_seed``).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    patience : int or None
        Stop after this many epochs without validation improvement (None: never).
    progress : bool
        Show a tqdm progress bar over epochs.
    max_minutes : float, optional
        Wall-clock budget; training stops after the epoch that exceeds it.
    ignore_index : int, optional
        Label value left out of the loss and of the validation Dice.
    cosine : bool
        Cosine-anneal the learning rate over ``epochs``.
    flip_axes : tuple of int, optional
        Spatial axes (0-based, negative allowed) that augmentation may mirror; default all.
        E.g. ``(-1,)`` for left-right only.

    Returns
    -------
    dict
        ``loss`` (mean training loss per epoch), ``val_dice`` (mean foreground Dice per
        epoch), ``val_dice_per_class`` (per epoch), ``best_epoch`` (0-based; None without
        validation), ``best_val_dice``, ``epochs_run``, ``seconds``, ``stopped``
        (``"epochs"``, ``"patience"`` or ``"time"``), ``device``.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    if (X_val is None) != (y_val is None):
        raise ValueError("X_val and y_val must be given together")
    Xt = _as_images(X, "X")
    yt = _as_labels(y, Xt, "y")
    has_val = X_val is not None
    if has_val:
        Xv = _as_images(X_val, "X_val")
        yv = _as_labels(y_val, Xv, "y_val")
    divisor = int(getattr(model, "spatial_divisor", 1))
    if any(s % divisor for s in Xt.shape[2:]):
        raise ValueError(
            f"spatial shape {tuple(Xt.shape[2:])} must be a multiple of the "
            f"model's spatial_divisor={divisor}"
        )
    dims = Xt.dim() - 2
    try:
        flips = sorted({range(dims)[a] for a in (range(dims) if flip_axes is None else flip_axes)})
    except (IndexError, TypeError):
        raise ValueError(
            f"flip_axes must hold spatial axes in [-{dims}, {dims}), got {flip_axes!r}"
        ) from None
    criterion = make_loss(loss, ignore_index)
    dev = resolve_device(device)
    param = next(model.parameters())
    old_dev = param.device

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(dev)
    criterion.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if cosine else None
    n = Xt.shape[0]
    n_batches = math.ceil(n / batch_size)
    hist: dict = {
        "loss": [],
        "val_dice": [],
        "val_dice_per_class": [],
        "best_epoch": None,
        "best_val_dice": None,
        "epochs_run": 0,
        "seconds": 0.0,
        "stopped": "epochs",
        "device": str(dev),
    }
    best_state, best, since_best = None, -np.inf, 0
    start = time.perf_counter()
    bar = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="fit", unit="epoch")
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for b in range(n_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                xb, yb = Xt[idx], yt[idx]
                if augment:
                    xb, yb = _augment(xb, yb, gen, flips)
                xb, yb = xb.to(dev), yb.to(dev)
                opt.zero_grad(set_to_none=True)
                value = criterion(model(xb), yb)
                value.backward()
                opt.step()
                total += float(value.detach()) * len(idx)
            if sched is not None:
                sched.step()
            hist["loss"].append(total / n)
            hist["epochs_run"] = epoch + 1
            postfix = {"loss": f"{total / n:.4f}"}
            if has_val:
                pred = predict_logits(model, Xv, batch_size, str(dev)).argmax(1)
                k = int(getattr(model, "n_classes", 0)) or int(yv.max()) + 1
                per = foreground_dice(pred, yv.numpy(), k, ignore_index).mean(0)
                score = float(per.mean())
                hist["val_dice"].append(score)
                hist["val_dice_per_class"].append(per.tolist())
                postfix["val_dice"] = f"{score:.4f}"
                if score > best:
                    best, since_best = score, 0
                    best_state = copy.deepcopy(model.state_dict())
                    hist["best_epoch"], hist["best_val_dice"] = epoch, score
                else:
                    since_best += 1
            if progress:
                bar.set_postfix(postfix)
            if has_val and patience is not None and since_best >= patience:
                hist["stopped"] = "patience"
                break
            if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
                hist["stopped"] = "time"
                break
    finally:
        if progress:
            bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        model.to(old_dev)
    hist["seconds"] = time.perf_counter() - start
    return hist


__all__ = ["fit_segmenter", "predict_logits", "foreground_dice", "resolve_device"]
