"""Segmentation losses: soft Dice, cross-entropy and their sum.

All losses take logits ``(N, K, *spatial)`` and integer labels ``(N, *spatial)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() < 3:
        raise ValueError(f"logits must have shape (N, K, *spatial), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must have shape (N, *spatial) = {tuple(logits.shape[:1] + logits.shape[2:])}"
            f", got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point:
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Voxel-wise cross-entropy (``torch.nn.CrossEntropyLoss`` that checks shapes).

    Parameters
    ----------
    weight : tensor ``(K,)``, optional
        Class weights.
    ignore_index : int
        Label value that contributes nothing (default -100, as in torch).
    label_smoothing : float
        Uniform label smoothing in [0, 1).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(logits, target)
        return super().forward(logits, target.long())


class DiceLoss(nn.Module):
    """Multi-class soft Dice loss over softmax probabilities.

    For each class k, over all voxels of the batch (ignored voxels excluded):
    ``dice_k = (2 sum(p_k y_k) + smooth) / (sum(p_k) + sum(y_k) + smooth)``;
    the loss is ``1 - mean_k dice_k`` over the foreground classes (all classes when
    ``include_background``). A class absent from both prediction and target scores 1.

    Parameters
    ----------
    smooth : float
        Additive smoothing of numerator and denominator.
    include_background : bool
        Include class 0 in the mean.
    ignore_index : int, optional
        Label value whose voxels are left out.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([[[0, 1], [1, 1]]])
    >>> logits = 20.0 * torch.nn.functional.one_hot(y, 2).permute(0, 3, 1, 2).float()
    >>> round(float(DiceLoss()(logits, y)), 4)
    0.0
    """

    def __init__(
        self,
        smooth: float = 1e-5,
        include_background: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if not smooth >= 0:
            raise ValueError(f"smooth must be >= 0, got {smooth!r}")
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.ignore_index = ignore_index

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice of every class ``(K,)``."""
        _check_pair(logits, target)
        k = logits.shape[1]
        target = target.long()
        valid = torch.ones_like(target, dtype=logits.dtype)
        if self.ignore_index is not None:
            valid = (target != self.ignore_index).to(logits.dtype)
            target = torch.where(target == self.ignore_index, torch.zeros_like(target), target)
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"target labels must be in [0, {k}) (or ignore_index)")
        proba = F.softmax(logits, dim=1) * valid.unsqueeze(1)
        onehot = F.one_hot(target, k).movedim(-1, 1).to(logits.dtype) * valid.unsqueeze(1)
        axes = [0, *range(2, logits.dim())]
        inter = (proba * onehot).sum(axes)
        denom = proba.sum(axes) + onehot.sum(axes)
        return (2 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = self.per_class(logits, target)
        if not self.include_background:
            dice = dice[1:]
        return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight * DiceLoss + ce_weight * CrossEntropyLoss``.

    Parameters
    ----------
    dice_weight, ce_weight : float
        Weights of the two terms.
    smooth, include_background : see :class:`DiceLoss`.
    ignore_index : int, optional
        Label value left out of both terms.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        include_background: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(
                f"dice_weight and ce_weight must be >= 0, got {dice_weight!r}, {ce_weight!r}"
            )
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.dice = DiceLoss(smooth, include_background, ignore_index)
        self.ce = CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(
            logits, target
        )


def make_loss(loss: str | nn.Module, ignore_index: int | None = None) -> nn.Module:
    """Loss module from a name (``"dice"``, ``"ce"``, ``"dice_ce"``) or a module."""
    if isinstance(loss, nn.Module):
        return loss
    if loss == "dice":
        return DiceLoss(ignore_index=ignore_index)
    if loss == "ce":
        return CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)
    if loss == "dice_ce":
        return DiceCELoss(ignore_index=ignore_index)
    raise ValueError(f"loss must be 'dice', 'ce', 'dice_ce' or an nn.Module, got {loss!r}")


__all__ = ["CrossEntropyLoss", "DiceLoss", "DiceCELoss", "make_loss"]
