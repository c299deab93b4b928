"""U-Net segmentation networks (2-D and 3-D) with export-friendly MC dropout.

Dropout is channel-wise (spatial dropout) and driven by an explicit multiplier mask, so the
same stochastic network can be exported to ONNX with the mask as an input (``mc_mask``).
"""

from __future__ import annotations

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_IN = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _norm(kind: str | None, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return _BN[dims](channels)
    if kind == "instance":
        return _IN[dims](channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two ``conv 3 - norm - ReLU`` layers."""

    def __init__(self, c_in: int, c_out: int, dims: int, norm: str | None) -> None:
        conv = _CONV[dims]
        bias = norm is None  # a norm layer's shift makes the conv bias redundant
        super().__init__(
            conv(c_in, c_out, 3, padding=1, bias=bias),
            _norm(norm, dims, c_out),
            nn.ReLU(inplace=True),
            conv(c_out, c_out, 3, padding=1, bias=bias),
            _norm(norm, dims, c_out),
            nn.ReLU(inplace=True),
        )


def check_unet_args(dims, in_channels, n_classes, width, depth, norm) -> None:
    """Argument checks shared by the U-Net family."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    for name, value, low in (
        ("in_channels", in_channels, 1),
        ("n_classes", n_classes, 2),
        ("width", width, 1),
        ("depth", depth, 2),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if norm not in ("batch", "instance", None):
        raise ValueError(f"norm must be 'batch', 'instance' or None, got {norm!r}")


class UNet(nn.Module):
    """U-Net for 2-D or 3-D segmentation with mask-driven channel dropout.

    Parameters
    ----------
    in_channels : int
        Number of image channels ``C_in``.
    n_classes : int
        Number of output classes ``K`` (background included).
    dims : {2, 3}
        Spatial dimensionality.
    width : int
        Channels of the first level; level ``i`` has ``width * 2**i`` channels.
    depth : int
        Number of resolution levels (``depth - 1`` poolings). The deepest level is the
        bottleneck.
    dropout : float
        Channel-dropout probability ``p`` at the bottleneck and after every decoder block.
        ``0`` disables dropout (then :attr:`mc_size` is 0).
    norm : {"batch", "instance", None}
        Normalisation layer of the conv blocks.
    up : {"transpose", "upsample"}
        Transposed convolution (kernel 2, stride 2) or nearest upsampling + 1x1 conv.

    Notes
    -----
    Dropout sites, in the order their channels appear in ``mc_mask`` (shape ``(N, D)``):
    the bottleneck (``width * 2**(depth-1)`` channels), then the decoder blocks from the
    deepest to the shallowest (``width * 2**(depth-2)``, ..., ``width`` channels).
    ``D = mc_size``. Mask values are 0 or ``1 / (1 - p)``; a mask of ones equals eval mode.

    When ``mc_mask`` is None, masks are sampled in training mode or when
    ``model.mc_dropout`` is True; otherwise dropout is the identity.

    Named features (see :meth:`forward_features`): ``enc1`` ... ``enc{depth-1}`` (encoder
    blocks, finest first), ``bottleneck``, ``dec1`` ... ``dec{depth-2}`` (decoder blocks,
    deepest first) and ``decoder_last`` (the last decoder block, before the output conv).
    Features are taken after dropout, i.e. the tensors that flow on through the network.

    Examples
    --------
    >>> import torch
    >>> net = UNet(1, 3, dims=2, width=4, depth=3, dropout=0.2).eval()
    >>> net(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 3, 16, 16])
    >>> net.mc_size
    28
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        dims: int = 2,
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
        norm: str | None = "batch",
        up: str = "transpose",
    ) -> None:
        super().__init__()
        check_unet_args(dims, in_channels, n_classes, width, depth, norm)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if up not in ("transpose", "upsample"):
            raise ValueError(f"up must be 'transpose' or 'upsample', got {up!r}")
        self.in_channels, self.n_classes, self.dims = in_channels, n_classes, dims
        self.width, self.depth, self.dropout, self.norm, self.up_mode = (
            width,
            depth,
            float(dropout),
            norm,
            up,
        )
        self.mc_dropout = False
        chans = [width * 2**i for i in range(depth)]
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for c in chans:
            self.encoders.append(ConvBlock(c_prev, c, dims, norm))
            c_prev = c
        self.pool = _POOL[dims](2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c in reversed(chans[:-1]):
            if up == "transpose":
                self.ups.append(_CONVT[dims](2 * c, c, 2, stride=2))
            else:
                self.ups.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), _CONV[dims](2 * c, c, 1)
                    )
                )
            self.decoders.append(ConvBlock(2 * c, c, dims, norm))
        self.head = _CONV[dims](chans[0], n_classes, 1)
        # channels of each dropout site, in mask order
        self._site_channels = [chans[-1], *reversed(chans[:-1])] if self.dropout > 0 else []

    @property
    def spatial_divisor(self) -> int:
        """Spatial sizes must be multiples of this (``2**(depth-1)``)."""
        return 2 ** (self.depth - 1)

    @property
    def mc_size(self) -> int:
        """Length ``D`` of one ``mc_mask`` row (0 without dropout)."""
        return int(sum(self._site_channels))

    @property
    def feature_names(self) -> list[str]:
        """Names of the features returned by :meth:`forward_features`, in network order."""
        enc = [f"enc{i + 1}" for i in range(self.depth - 1)]
        dec = [f"dec{i + 1}" for i in range(self.depth - 2)]
        return [*enc, "bottleneck", *dec, "decoder_last"]

    def sample_mc_mask(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Draw a dropout multiplier mask ``(n, mc_size)`` with values 0 or ``1/(1-p)``."""
        keep = 1.0 - self.dropout
        u = torch.rand(n, self.mc_size, generator=generator, device=device)
        return (u < keep).float() / keep

    def _check_mask(self, x: torch.Tensor, mc_mask: torch.Tensor) -> None:
        if self.mc_size == 0:
            raise ValueError("mc_mask was given but the network has no dropout (dropout=0)")
        if mc_mask.dim() != 2 or mc_mask.shape[1] != self.mc_size:
            raise ValueError(
                f"mc_mask must have shape (N, {self.mc_size}), got {tuple(mc_mask.shape)}"
            )

    def forward_features(
        self, x: torch.Tensor, mc_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``(N, K, *spatial)`` and the named intermediate features."""
        if mc_mask is None and self.mc_size and (self.training or self.mc_dropout):
            mc_mask = self.sample_mc_mask(x.shape[0], device=x.device)
        if mc_mask is not None:
            self._check_mask(x, mc_mask)
            mc_mask = mc_mask.to(x.dtype)
        bshape = (1,) * self.dims
        offsets = [0]
        for c in self._site_channels:
            offsets.append(offsets[-1] + c)

        def drop(h: torch.Tensor, site: int) -> torch.Tensor:
            if mc_mask is None:
                return h
            m = mc_mask[:, offsets[site] : offsets[site + 1]]
            return h * m.reshape(m.shape[0], m.shape[1], *bshape)

        feats: dict[str, torch.Tensor] = {}
        skips = []
        h = x
        for i, enc in enumerate(self.encoders[:-1]):
            h = enc(h)
            feats[f"enc{i + 1}"] = h
            skips.append(h)
            h = self.pool(h)
        h = drop(self.encoders[-1](h), 0)
        feats["bottleneck"] = h
        n_dec = len(self.decoders)
        for j, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            h = up(h)
            h = dec(torch.cat([skips[-1 - j], h], dim=1))
            h = drop(h, j + 1)
            feats["decoder_last" if j == n_dec - 1 else f"dec{j + 1}"] = h
        return self.head(h), feats

    def forward(self, x: torch.Tensor, mc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, K, *spatial)``; see the class notes for ``mc_mask``."""
        return self.forward_features(x, mc_mask)[0]

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, width={self.width}, depth={self.depth}, "
            f"dropout={self.dropout}, norm={self.norm!r}, up={self.up_mode!r}"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["UNet", "ConvBlock", "count_parameters"]
