"""Multi-task training across segmentation data sets (Karimi & Gholipour, arXiv 2004.06569).

One network is trained jointly on K data sets. As in the authors' code (``train_model.py``,
``sampling_mode='root-proportional'``), every training *sample* of data set k is drawn with
probability proportional to ``1 / (K sqrt(n_k))``; a data set is therefore drawn with
probability proportional to ``sqrt(n_k)`` — small data sets are seen more often than their
share of the samples, large ones less.

Labels of all data sets live in one global label space (the caller maps them, e.g. tissue
classes 1, 2 and a brain-mask class 3); :func:`restrict_to_task` turns the network's
probabilities into one task's classes for evaluation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .loop import foreground_dice, predict_logits
from .losses import make_loss
from .vls import _flip_aug


def sample_probabilities(sizes: Sequence[int]) -> np.ndarray:
    """Per-sample draw probabilities of the concatenated data sets.

    Sample ``i`` of data set ``k`` gets ``1 / (K sqrt(n_k))``, normalised to sum to 1.

    Examples
    --------
    >>> sample_probabilities([4, 1]).round(3)
    array([0.167, 0.167, 0.167, 0.167, 0.333])
    """
    sizes = [int(n) for n in sizes]
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive data set sizes, got {sizes}")
    k = len(sizes)
    w = np.concatenate([np.full(n, 1.0 / (k * np.sqrt(n))) for n in sizes])
    return w / w.sum()


def dataset_probabilities(sizes: Sequence[int]) -> np.ndarray:
    """Probability that a draw comes from data set k: ``sqrt(n_k) / sum_j sqrt(n_j)``."""
    p = sample_probabilities(sizes)
    bounds = np.cumsum([0, *sizes])
    return np.array([p[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def restrict_to_task(proba: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Probabilities over one task's classes ``(N, len(classes), *sp)``.

    ``classes[0]`` is the task's background; the mass of every class outside ``classes``
    (another task's foreground) is added to it: for this task it means "not my structure".
    """
    classes = list(classes)
    out = proba[:, classes].copy()
    others = [c for c in range(proba.shape[1]) if c not in classes]
    if others:
        out[:, 0] += proba[:, others].sum(1)
    return out


def fit_multitask(
    model: nn.Module,
    datasets: Sequence[tuple],
    val: Sequence[tuple] | None = None,
    *,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    loss: str | nn.Module = "dice_ce",
    augment: bool = True,
    seed: int = 0,
    eval_every: int = 50,
    probabilities: np.ndarray | None = None,
) -> dict:
    """Train one network jointly on several data sets (CPU), sampling ``1/(K sqrt(n_k))``.

    Parameters
    ----------
    model : torch.nn.Module
        ``model(x) -> logits (N, K, *spatial)`` over the global label space.
    datasets : sequence of ``(X, y)``
        Training sets with equal image shape; labels in the global label space. One data
        set gives ordinary single-task training (and fine-tuning, from a trained model).
    val : sequence of ``(X, y)``, optional
        Validation sets; every ``eval_every`` steps the mean over data sets of the mean
        foreground Dice is computed and the best weights are kept.
    steps : int
        Gradient steps (the budget: compare arms at equal ``steps * batch_size``).
    batch_size, lr, weight_decay, loss, augment, seed :
        Batch size, AdamW settings (cosine-annealed over ``steps``), loss name or module
        (see :func:`uqseg.training.losses.make_loss`), flips + intensity augmentation, seed.
    probabilities : array, optional
        Per-sample probabilities over the concatenated data sets; default
        :func:`sample_probabilities`.

    Returns
    -------
    dict
        ``loss`` (mean per ``eval_every`` steps), ``val_dice``, ``best_step``,
        ``best_val_dice``, ``draws`` (samples drawn per data set), ``seconds``.
    """
    if not datasets:
        raise ValueError("datasets must hold at least one (X, y) pair")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    Xs = [np.asarray(X, dtype=np.float32) for X, _ in datasets]
    ys = [np.asarray(y) for _, y in datasets]
    if len({X.shape[1:] for X in Xs}) != 1:
        raise ValueError(f"all data sets need the same image shape, got {[X.shape for X in Xs]}")
    sizes = [len(X) for X in Xs]
    Xt = torch.from_numpy(np.concatenate(Xs))
    yt = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    p = sample_probabilities(sizes) if probabilities is None else np.asarray(probabilities)
    if p.shape != (len(Xt),) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"probabilities must be {len(Xt)} values summing to 1")
    criterion = make_loss(loss)
    dims = Xt.dim() - 2
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n_classes = int(getattr(model, "n_classes", 0)) or int(yt.max()) + 1
    hist: dict = {"loss": [], "val_dice": [], "best_step": None, "best_val_dice": None}
    draws = np.zeros(len(sizes), dtype=int)
    best, best_state, running = -np.inf, None, []
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = rng.choice(len(Xt), size=batch_size, p=p)
        draws += np.bincount(owner[idx], minlength=len(sizes))
        xb, yb = Xt[idx], yt[idx]
        if augment:
            xb, yb = _flip_aug([xb, yb], gen, dims, True)
        opt.zero_grad(set_to_none=True)
        value = criterion(model(xb), yb)
        value.backward()
        opt.step()
        sched.step()
        running.append(float(value.detach()))
        if step % eval_every == 0 or step == steps:
            hist["loss"].append(float(np.mean(running)))
            running = []
            if val:
                scores = [
                    foreground_dice(
                        predict_logits(model, Xv, 32, "cpu").argmax(1), np.asarray(yv), n_classes
                    ).mean()
                    for Xv, yv in val
                ]
                score = float(np.mean(scores))
                hist["val_dice"].append(score)
                if score > best:
                    best, best_state = score, copy.deepcopy(model.state_dict())
                    hist["best_step"], hist["best_val_dice"] = step, score
            model.train()
    if best_state is not None:
        model.load_state_dict(best_state)
    hist["draws"] = draws.tolist()
    hist["seconds"] = time.perf_counter() - start
    return hist


__all__ = ["fit_multitask", "sample_probabilities", "dataset_probabilities", "restrict_to_task"]
