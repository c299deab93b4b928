"""Variational label smoothing (VLS) of CALSeg (Guo et al., ICASSP 2024).

Stage 1: :class:`VariationalLabelSmoothing` — a U-Net on the image gives features; a
posterior encoder on (image, one-hot label) gives ``mu`` and ``logvar`` of a small latent
``z``; ``z`` is sampled, broadcast over the image and concatenated with the features; one
head predicts the segmentation (cross-entropy to the label), another reconstructs the image
(MSE). Loss = CE + MSE + KL(q(z|x, y) || N(0, I)).

Soft labels (:meth:`VariationalLabelSmoothing.soft_labels`): ``z`` drawn ``m`` times from
``q(z|x, y)``, tempered softmax ``softmax(logits / tau)`` averaged over the draws
(``y_s``), mixed with the hard label: ``Y_s = (1 - alpha) onehot(y) + alpha y_s``.

Stage 2: the deployed segmenter (a plain :class:`UNet`) is trained on the image with
:func:`fit_soft_targets`, a soft-target cross-entropy (the KL to ``Y_s`` up to a constant).
The same loop trains the baselines: one-hot targets (hard-label CE) and uniform label
smoothing (:func:`smooth_labels`).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .loop import foreground_dice, predict_logits, resolve_device
from .networks import _CONV, UNet


def kl_divergence_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per row: sum over the last axis."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def one_hot(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels ``(N, *spatial)`` -> float one-hot ``(N, K, *spatial)``."""
    return F.one_hot(y.long(), n_classes).movedim(-1, 1).float()


def mix_soft_labels(y: torch.Tensor, y_soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * onehot(y) + alpha * y_soft`` (``y_soft`` of shape ``(N, K, *sp)``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return (1.0 - alpha) * one_hot(y, y_soft.shape[1]).to(y_soft) + alpha * y_soft


def smooth_labels(y, n_classes: int, epsilon: float = 0.1) -> np.ndarray:
    """Uniform label smoothing ``(1 - eps) onehot(y) + eps / K`` as float32 ``(N, K, *sp)``."""
    t = one_hot(torch.as_tensor(np.asarray(y)), n_classes)
    return ((1.0 - epsilon) * t + epsilon / n_classes).numpy()


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``-sum_k target_k log softmax(logits)_k``.

    Equals ``KL(target || softmax(logits))`` plus the target's entropy, a constant: the
    stage-2 loss of CALSeg.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class _Head(nn.Sequential):
    def __init__(self, c_in: int, c_mid: int, c_out: int, dims: int) -> None:
        conv = _CONV[dims]
        super().__init__(
            conv(c_in, c_mid, 3, padding=1), nn.ReLU(inplace=True), conv(c_mid, c_out, 1)
        )


class VariationalLabelSmoothing(nn.Module):
    """Stage-1 network of CALSeg: segmentation + reconstruction conditioned on a latent ``z``.

    Parameters
    ----------
    in_channels : int
        Image channels ``C_in``.
    n_classes : int
        Classes ``K``.
    dims : {2, 3}
        Spatial dimensionality.
    width, depth, norm :
        Of the feature U-Net (see :class:`UNet`); its ``decoder_last`` features are used.
    latent_dim : int
        Size of ``z`` (3 in the CALSeg code).
    recon_weight, kl_weight : float
        Weights of the MSE and KL terms (1 and 1 in the paper's loss).

    Examples
    --------
    >>> import torch
    >>> vls = VariationalLabelSmoothing(1, 3, width=4, depth=3)
    >>> x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    >>> sorted(vls.loss(x, y))
    ['ce', 'kl', 'mse', 'total']
    >>> vls.soft_labels(x, y, m=4, tau=2.0, alpha=0.3).shape
    torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        dims: int = 2,
        width: int = 16,
        depth: int = 4,
        latent_dim: int = 3,
        norm: str | None = "batch",
        recon_weight: float = 1.0,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.unet = UNet(in_channels, n_classes, dims, width, depth, norm=norm)
        self.in_channels, self.n_classes, self.dims = in_channels, n_classes, dims
        self.latent_dim = latent_dim
        self.recon_weight, self.kl_weight = float(recon_weight), float(kl_weight)
        conv = _CONV[dims]
        self.posterior = nn.Sequential(
            conv(in_channels + n_classes, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            conv(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            conv(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.to_latent = nn.Linear(2 * width, 2 * latent_dim)
        self.seg_head = _Head(width + latent_dim, width, n_classes, dims)
        self.recon_head = _Head(width + latent_dim, width, in_channels, dims)

    @property
    def spatial_divisor(self) -> int:
        return self.unet.spatial_divisor

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, logvar`` of ``q(z | x, y)``, each ``(N, latent_dim)``."""
        h = self.posterior(torch.cat([x, one_hot(y, self.n_classes).to(x)], 1))
        mu, logvar = self.to_latent(h.flatten(2).mean(-1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, feats: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and image reconstruction from features and ``z``."""
        zmap = z.reshape(*z.shape, *([1] * self.dims)).expand(-1, -1, *feats.shape[2:])
        h = torch.cat([feats, zmap], 1)
        return self.seg_head(h), self.recon_head(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_features(x)[1]["decoder_last"]

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator=None) -> dict:
        """One posterior sample: ``logits``, ``recon``, ``mu``, ``logvar``, ``z``."""
        mu, logvar = self.encode(x, y)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits, recon = self.decode(self.features(x), z)
        return {"logits": logits, "recon": recon, "mu": mu, "logvar": logvar, "z": z}

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator=None) -> dict:
        """``total = ce + recon_weight * mse + kl_weight * kl`` and its parts.

        KL is summed over the latent dimensions and averaged over the batch.
        """
        out = self(x, y, generator)
        ce = F.cross_entropy(out["logits"], y.long())
        mse = F.mse_loss(out["recon"], x)
        kl = kl_divergence_standard_normal(out["mu"], out["logvar"]).mean()
        total = ce + self.recon_weight * mse + self.kl_weight * kl
        return {"total": total, "ce": ce, "mse": mse, "kl": kl}

    @torch.no_grad()
    def soft_labels(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        m: int = 8,
        tau: float = 1.0,
        alpha: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``Y_s = (1 - alpha) onehot(y) + alpha mean_m softmax(logits(z_m) / tau)``.

        ``z_m ~ q(z | x, y)``; the network runs in eval mode. Rows sum to 1.
        """
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive integer, got {m!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        was = self.training
        self.eval()
        try:
            feats = self.features(x)
            mu, logvar = self.encode(x, y)
            acc = torch.zeros(x.shape[0], self.n_classes, *x.shape[2:], device=x.device)
            for _ in range(m):
                eps = torch.randn(mu.shape, generator=generator, device=mu.device)
                logits, _ = self.decode(feats, mu + torch.exp(0.5 * logvar) * eps)
                acc += torch.softmax(logits / tau, 1)
        finally:
            self.train(was)
        return mix_soft_labels(y, acc / m, alpha)


def _flip_aug(tensors: list[torch.Tensor], gen: torch.Generator, dims: int, intensity: bool):
    """Same random flips for every tensor (channel axis 1 for images/targets, none for labels).

    ``tensors[0]`` is the image batch; it alone gets the +-10 % intensity scale/shift.
    """
    x = tensors[0]
    n = x.shape[0]
    flips = torch.rand(n, dims, generator=gen) < 0.5
    out = [t.clone() for t in tensors]
    for i in range(n):
        axes = [a for a in range(dims) if flips[i, a]]
        if axes:
            for t in out:
                off = t.dim() - dims - 1  # 1 for (N, C, *sp), 0 for (N, *sp)
                t[i] = torch.flip(t[i], [a + off for a in axes])
    if intensity:
        scale = 1.0 + 0.1 * (2 * torch.rand(n, generator=gen) - 1)
        shift = 0.1 * (2 * torch.rand(n, generator=gen) - 1)
        std = out[0].flatten(1).std(dim=1).clamp_min(1e-6)
        view = (n,) + (1,) * (out[0].dim() - 1)
        out[0] = out[0] * scale.view(view) + (shift * std).view(view)
    return out


def _train(model, n, step, *, epochs, batch_size, lr, weight_decay, seed, val, patience, budget):
    """Shared AdamW + cosine loop; keeps the weights of the best ``val()`` score."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    hist = {"loss": [], "val_dice": [], "best_epoch": None, "best_val_dice": None}
    best, best_state, since = -np.inf, None, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for b in range(math.ceil(n / batch_size)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            value = step(idx, gen)
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
        sched.step()
        hist["loss"].append(total / n)
        if val is not None:
            score = val()
            hist["val_dice"].append(score)
            if score > best:
                best, since = score, 0
                best_state = copy.deepcopy(model.state_dict())
                hist["best_epoch"], hist["best_val_dice"] = epoch, score
            else:
                since += 1
            if patience is not None and since >= patience:
                break
        if budget is not None and time.perf_counter() - start > 60 * budget:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    hist["epochs_run"] = len(hist["loss"])
    hist["seconds"] = time.perf_counter() - start
    return hist


def fit_vls(
    model: VariationalLabelSmoothing,
    X,
    y,
    *,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
    max_minutes: float | None = None,
) -> dict:
    """Train the stage-1 VLS network on ``(X, y)`` (CPU). Returns the loss history.

    The history holds ``loss`` (mean total loss per epoch) and the last epoch's parts
    ``ce``, ``mse``, ``kl``.
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y)).long()
    parts: dict = {}

    def step(idx, gen):
        xb, yb = Xt[idx], yt[idx]
        if augment:
            xb, yb = _flip_aug([xb, yb], gen, model.dims, True)
        out = model.loss(xb, yb, gen)
        for k in ("ce", "mse", "kl"):
            parts[k] = float(out[k].detach())
        return out["total"]

    hist = _train(
        model, len(Xt), step, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed, val=None, patience=None, budget=max_minutes,
    )  # fmt: skip
    hist.update(parts)
    return hist


def vls_soft_labels(
    model: VariationalLabelSmoothing,
    X,
    y,
    m: int = 8,
    tau: float = 1.0,
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """Soft labels ``Y_s`` float32 ``(N, K, *spatial)`` for a whole data set, seeded."""
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y)).long()
    out = [
        model.soft_labels(Xt[s : s + batch_size], yt[s : s + batch_size], m, tau, alpha, gen)
        for s in range(0, len(Xt), batch_size)
    ]
    return torch.cat(out).numpy()


def fit_soft_targets(
    model: nn.Module,
    X,
    targets,
    X_val=None,
    y_val=None,
    *,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
    patience: int | None = None,
    max_minutes: float | None = None,
) -> dict:
    """Train a segmenter with soft-target cross-entropy (CALSeg stage 2, or its baselines).

    Parameters
    ----------
    model : torch.nn.Module
        ``model(x) -> logits (N, K, *spatial)``, trained in place on the CPU.
    X : array ``(N, C, *spatial)``
    targets : array ``(N, K, *spatial)``
        Per-voxel target distributions: VLS soft labels, one-hot labels (hard CE), or
        uniformly smoothed labels (:func:`smooth_labels`).
    X_val, y_val : arrays, optional
        Validation images and integer labels: the epoch with the best mean foreground Dice
        is kept (as :func:`uqseg.training.fit_segmenter` does).
    epochs, batch_size, lr, weight_decay, augment, seed, patience, max_minutes :
        As in :func:`uqseg.training.fit_segmenter` (augmentation: flips of every spatial
        axis and +-10 % intensity scale/shift).

    Returns
    -------
    dict
        ``loss``, ``val_dice`` (per epoch), ``best_epoch``, ``best_val_dice``,
        ``epochs_run``, ``seconds``.
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    Tt = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if Tt.dim() != Xt.dim() or Tt.shape[0] != Xt.shape[0] or Tt.shape[2:] != Xt.shape[2:]:
        raise ValueError(
            f"targets must have shape (N, K, *spatial) matching X {tuple(Xt.shape)}, "
            f"got {tuple(Tt.shape)}"
        )
    dims = Xt.dim() - 2
    val = None
    if X_val is not None:
        yv = np.asarray(y_val)

        def val():
            pred = predict_logits(model, X_val, 32, "cpu").argmax(1)
            return float(foreground_dice(pred, yv, Tt.shape[1]).mean())

    def step(idx, gen):
        xb, tb = Xt[idx], Tt[idx]
        if augment:
            xb, tb = _flip_aug([xb, tb], gen, dims, True)
        return soft_target_cross_entropy(model(xb), tb)

    model.to(resolve_device("cpu"))
    return _train(
        model, len(Xt), step, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed, val=val, patience=patience, budget=max_minutes,
    )  # fmt: skip


__all__ = [
    "VariationalLabelSmoothing",
    "fit_vls",
    "vls_soft_labels",
    "fit_soft_targets",
    "soft_target_cross_entropy",
    "smooth_labels",
    "mix_soft_labels",
    "kl_divergence_standard_normal",
]
