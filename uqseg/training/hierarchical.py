"""Hierarchical uncertainty U-Net (Bai & Bai, arXiv 2308.08465).

Every skip connection carries a distribution instead of a point value: from the encoder
features of level ``l`` a 1x1 convolution predicts a mean and a log-variance per channel and
voxel, and the decoder receives ``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``. The
training loss adds ``kl_weight * KL(N(mu, sigma^2) || N(0, I))`` (mean over elements, summed
over levels), our reading of the paper's variational term: without it the predicted variances
collapse to zero and the samples stop differing. At test time T noise draws give T
predictions; their mean is the segmentation and their spread (entropy, mutual information)
the uncertainty map.

The noise is an explicit input (``noise_1`` ... ``noise_L``, finest level first) so sampling
survives ONNX export, is seeded, gives the same result on every backend, and T samples fold
into the batch axis. :func:`export_hierarchical_onnx` writes that sampling model;
:func:`sample_onnx` runs T samples through any uqseg backend. The deterministic mean model
(zero noise) exports with :func:`uqseg.training.export_onnx` and runs in
:class:`uqseg.OnnxSegmenter`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .losses import make_loss
from .networks import _CONV, _CONVT, _POOL, ConvBlock, check_unet_args

NOISE_META = "uqseg.hierarchical"


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(mu, exp(logvar)) || N(0, 1))`` in closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class HierarchicalUNet(nn.Module):
    """U-Net whose skip connections are sampled from predicted Gaussians.

    Parameters
    ----------
    in_channels : int
        Image channels ``C_in``.
    n_classes : int
        Output classes ``K`` (background included).
    dims : {2, 3}
        Spatial dimensionality.
    width : int
        Channels of the first level; level ``i`` has ``width * 2**i``.
    depth : int
        Resolution levels; ``depth - 1`` skip connections carry distributions.
    norm : {"batch", "instance", None}
        Normalisation of the conv blocks.
    min_logvar, max_logvar : float
        Clamp of the predicted log-variances (keeps ``exp`` finite early in training).

    Notes
    -----
    ``forward(x, noise)`` takes ``noise`` as a list of ``depth - 1`` tensors, level ``l``
    (0-based, finest first) of shape ``(N, width * 2**l, *spatial / 2**l)``
    (:meth:`noise_shapes`). ``noise=None`` samples in training mode (or when
    :attr:`sampling` is True) and uses zeros (the mean skip features) otherwise. After each
    forward pass :attr:`kl` holds the mean KL to ``N(0, I)`` summed over levels.

    Examples
    --------
    >>> import torch
    >>> net = HierarchicalUNet(1, 3, width=4, depth=3).eval()
    >>> x = torch.zeros(2, 1, 16, 16)
    >>> [tuple(s) for s in net.noise_shapes(x.shape[2:])]
    [(4, 16, 16), (8, 8, 8)]
    >>> noise = net.sample_noise(2, x.shape[2:], generator=torch.Generator().manual_seed(0))
    >>> net(x, noise).shape
    torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        dims: int = 2,
        width: int = 16,
        depth: int = 4,
        norm: str | None = "batch",
        min_logvar: float = -10.0,
        max_logvar: float = 4.0,
    ) -> None:
        super().__init__()
        check_unet_args(dims, in_channels, n_classes, width, depth, norm)
        if not min_logvar < max_logvar:
            raise ValueError(f"min_logvar must be < max_logvar, got {min_logvar}, {max_logvar}")
        self.in_channels, self.n_classes, self.dims = in_channels, n_classes, dims
        self.width, self.depth, self.norm = width, depth, norm
        self.min_logvar, self.max_logvar = float(min_logvar), float(max_logvar)
        self.sampling = False
        self.kl = torch.zeros(())
        chans = [width * 2**i for i in range(depth)]
        self.skip_channels = chans[:-1]
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for c in chans:
            self.encoders.append(ConvBlock(c_prev, c, dims, norm))
            c_prev = c
        self.pool = _POOL[dims](2)
        # one (mu, logvar) head per skip level
        self.skip_heads = nn.ModuleList(_CONV[dims](c, 2 * c, 1) for c in self.skip_channels)
        for head in self.skip_heads:
            # start near the identity map with small variance so early training is U-Net-like
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            with torch.no_grad():
                c = head.out_channels // 2
                eye = torch.eye(c).reshape(c, c, *([1] * dims))
                head.weight[:c].copy_(eye)
                head.bias[c:].fill_(-6.0)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.ups.append(_CONVT[dims](2 * c, c, 2, stride=2))
            self.decoders.append(ConvBlock(2 * c, c, dims, norm))
        self.head = _CONV[dims](chans[0], n_classes, 1)

    @property
    def spatial_divisor(self) -> int:
        """Spatial sizes must be multiples of this (``2**(depth-1)``)."""
        return 2 ** (self.depth - 1)

    @property
    def feature_names(self) -> list[str]:
        """Names returned by :meth:`forward_features`."""
        return ["bottleneck", "decoder_last"]

    def noise_shapes(self, spatial) -> list[tuple[int, ...]]:
        """Shape of one image's noise ``(C_l, *spatial / 2**l)`` for every skip level."""
        spatial = [int(s) for s in spatial]
        if len(spatial) != self.dims or any(s % self.spatial_divisor for s in spatial):
            raise ValueError(
                f"spatial must be {self.dims} sizes that are multiples of "
                f"{self.spatial_divisor}, got {tuple(spatial)}"
            )
        return [(c, *[s // 2**lvl for s in spatial]) for lvl, c in enumerate(self.skip_channels)]

    def sample_noise(
        self,
        n: int,
        spatial,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> list[torch.Tensor]:
        """Standard-normal noise for ``n`` images, one tensor per level."""
        return [
            torch.randn(n, *shape, generator=generator, device=device)
            for shape in self.noise_shapes(spatial)
        ]

    def _skip(self, h: torch.Tensor, level: int, eps: torch.Tensor | None):
        mu, logvar = self.skip_heads[level](h).chunk(2, dim=1)
        logvar = logvar.clamp(self.min_logvar, self.max_logvar)
        kl = kl_standard_normal(mu, logvar).mean()
        if eps is None:
            return mu, kl
        return mu + torch.exp(0.5 * logvar) * eps, kl

    def forward_features(self, x: torch.Tensor, noise=None, mc_mask=None):
        """Logits and the named features ``bottleneck`` and ``decoder_last``.

        ``mc_mask`` is accepted (and must be None) so :func:`export_onnx` can call this.
        """
        if mc_mask is not None:
            raise ValueError("HierarchicalUNet has no dropout mask; pass noise instead")
        logits, feats, kl = self._run(x, noise)
        if not torch.compiler.is_compiling():  # attribute writes are not allowed while exporting
            self.kl = kl
        return logits, feats

    def _run(self, x: torch.Tensor, noise):
        n_lev = len(self.skip_channels)
        if noise is None and (self.training or self.sampling):
            noise = self.sample_noise(x.shape[0], x.shape[2:], device=x.device)
        if noise is not None and len(noise) != n_lev:
            raise ValueError(f"noise must hold {n_lev} tensors (one per level), got {len(noise)}")
        skips, kl = [], x.new_zeros(())
        h = x
        for lvl, enc in enumerate(self.encoders[:-1]):
            h = enc(h)
            s, k = self._skip(h, lvl, None if noise is None else noise[lvl].to(h.dtype))
            skips.append(s)
            kl = kl + k
            h = self.pool(h)
        h = self.encoders[-1](h)
        feats = {"bottleneck": h}
        for j, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            h = dec(torch.cat([skips[-1 - j], up(h)], dim=1))
        feats["decoder_last"] = h
        return self.head(h), feats, kl

    def forward(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """Logits ``(N, K, *spatial)``; see the class notes for ``noise``."""
        return self.forward_features(x, noise)[0]

    def extra_repr(self) -> str:
        return f"dims={self.dims}, width={self.width}, depth={self.depth}, norm={self.norm!r}"


class HierarchicalLoss(nn.Module):
    """Segmentation loss plus ``kl_weight`` times the model's last KL term.

    Works with :func:`uqseg.training.fit_segmenter`, which calls ``loss(model(x), y)``:
    the KL of that forward pass is read from ``model.kl``.

    Parameters
    ----------
    model : HierarchicalUNet
    loss : str or torch.nn.Module
        Segmentation loss (see :func:`uqseg.training.losses.make_loss`).
    kl_weight : float
        Weight of the KL term.
    """

    def __init__(self, model: HierarchicalUNet, loss="dice_ce", kl_weight: float = 1e-3) -> None:
        super().__init__()
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        self._model = [model]  # a list: not registered as a submodule (no double parameters)
        self.seg = make_loss(loss)
        self.kl_weight = float(kl_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.seg(logits, target) + self.kl_weight * self._model[0].kl


def sample_torch(model: HierarchicalUNet, X, n_samples: int = 8, seed: int = 0, batch_size=8):
    """Softmax probabilities of ``n_samples`` noise draws ``(T, N, K, *spatial)`` (torch).

    Uses the same noise as :func:`sample_onnx` with the same ``seed``.
    """
    X = np.asarray(X, dtype=np.float32)
    was = model.training
    model.eval()
    out = None
    try:
        with torch.no_grad():
            for s in range(0, X.shape[0], batch_size):
                xb = X[s : s + batch_size]
                noise = _noise_batch(model.noise_shapes(xb.shape[2:]), s, len(xb), n_samples, seed)
                xt = torch.from_numpy(np.repeat(xb[None], n_samples, 0).reshape(-1, *xb.shape[1:]))
                logits = model(xt, [torch.from_numpy(e) for e in noise])
                p = torch.softmax(logits, 1).numpy().reshape(n_samples, len(xb), *logits.shape[1:])
                if out is None:
                    out = np.empty((n_samples, X.shape[0], *p.shape[2:]), np.float32)
                out[:, s : s + len(xb)] = p
    finally:
        model.train(was)
    return out


def _noise_batch(shapes, start: int, n: int, n_samples: int, seed: int) -> list[np.ndarray]:
    """Noise of images ``start .. start+n``, sample-major ``(T * n, *shape)`` per level.

    Image ``i`` always gets the draws of ``default_rng([seed, i])``: results do not depend
    on the batch size.
    """
    per_level: list[list[np.ndarray]] = [[] for _ in shapes]
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        for lvl, shape in enumerate(shapes):
            per_level[lvl].append(rng.standard_normal((n_samples, *shape), dtype=np.float32))
    # (n, T, ...) -> (T, n, ...) -> (T * n, ...): sample axis folded into the batch axis
    return [np.stack(a, 1).reshape(n_samples * n, *a[0].shape[1:]) for a in per_level]


class _SamplingWrapper(nn.Module):
    def __init__(self, model: HierarchicalUNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, *noise):
        return self.model._run(image, list(noise))[0]


def export_hierarchical_onnx(
    model: HierarchicalUNet,
    path: str | os.PathLike,
    example,
    opset: int = 18,
    info: dict | None = None,
) -> dict:
    """Export the sampling network: ``(image, noise_1, ..., noise_L) -> logits``.

    Batch and spatial axes are dynamic (spatial sizes multiples of ``spatial_divisor``; the
    noise of level ``l`` has ``1 / 2**l`` of the image size). Metadata: the usual
    ``uqseg.n_classes`` / ``uqseg.spatial_divisor`` / ``uqseg.info`` plus
    ``uqseg.hierarchical`` = JSON ``{"inputs": [...], "channels": [...], "strides": [...]}``.
    Checked against torch on the example with random noise (max abs diff returned).

    Returns
    -------
    dict
        ``path``, ``max_abs_diff``, ``inputs``, ``size_bytes``.
    """
    from torch.export import Dim

    x = torch.as_tensor(np.asarray(example, dtype=np.float32))
    if x.dim() != model.dims + 2:
        raise ValueError(f"example must have shape (N, C, *spatial), got {tuple(x.shape)}")
    was, device = model.training, next(model.parameters()).device
    model.cpu().eval()
    names = [f"noise_{i + 1}" for i in range(len(model.skip_channels))]
    try:
        noise = model.sample_noise(x.shape[0], x.shape[2:], torch.Generator().manual_seed(0))
        batch = Dim("batch", min=1, max=4096)
        div = model.spatial_divisor
        axes = ("depth", "height", "width")[3 - model.dims :]
        base = [Dim(f"{a}_blocks", min=1, max=4096) for a in axes]
        image_spec = {0: batch, **{i + 2: b * div for i, b in enumerate(base)}}
        noise_specs = [
            {0: batch, **{i + 2: b * (div // 2**lvl) for i, b in enumerate(base)}}
            for lvl in range(len(names))
        ]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            program = torch.onnx.export(
                _SamplingWrapper(model).eval(),
                (x, *noise),
                dynamo=True,
                input_names=["image", *names],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes=(image_spec, tuple(noise_specs)),
                external_data=False,
                verbose=False,
            )
            proto = program.model_proto
            ref = model(x, noise).numpy()
        meta = {
            "uqseg.n_classes": str(model.n_classes),
            "uqseg.spatial_divisor": str(div),
            "uqseg.feature_layers": "[]",
            "uqseg.info": json.dumps(info or {}),
            NOISE_META: json.dumps(
                {
                    "inputs": names,
                    "channels": list(model.skip_channels),
                    "strides": [2**lvl for lvl in range(len(names))],
                }
            ),
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto, full_check=True)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        feeds = {"image": x.numpy(), **{n: e.numpy() for n, e in zip(names, noise, strict=True)}}
        diff = float(np.max(np.abs(sess.run(["logits"], feeds)[0] - ref)))
        if not diff <= 1e-3:
            raise ValueError(f"exported model disagrees with torch: max abs diff {diff:.3g}")
    finally:
        model.to(device).train(was)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, os.fspath(path), save_as_external_data=False)
    return {
        "path": os.fspath(path),
        "max_abs_diff": diff,
        "inputs": ["image", *names],
        "size_bytes": path.stat().st_size,
    }


def sample_onnx(
    model,
    X,
    n_samples: int = 8,
    seed: int = 0,
    batch_size: int = 4,
    backend: str = "auto",
    device: str = "auto",
    return_samples: bool = False,
) -> dict:
    """Run ``n_samples`` noise draws of an exported hierarchical network; aggregate them.

    Parameters
    ----------
    model : str or path-like
        File written by :func:`export_hierarchical_onnx`.
    X : array ``(N, C, *spatial)``
        Images; spatial sizes must be multiples of the model's ``uqseg.spatial_divisor``.
    n_samples : int
        Noise draws T; they run as one batch of ``T * batch_size`` images.
    seed : int
        Image ``i`` gets the noise of ``numpy.random.default_rng([seed, i])``, independent of
        ``batch_size`` and backend.
    batch_size : int
        Images per inference call.
    backend, device : str
        Passed to :func:`uqseg.backends.load`.
    return_samples : bool
        Also return the per-sample probabilities ``(T, N, K, *spatial)``.

    Returns
    -------
    dict
        ``proba`` (mean probability ``(N, K, *spatial)``), ``entropy`` (predictive entropy),
        ``mutual_information`` and ``variance`` (mean over classes of the sample variance),
        each ``(N, *spatial)``; ``samples`` when asked.
    """
    from uqseg import backends
    from uqseg.backends._model import metadata, read_model
    from uqseg.uncertainty import softmax

    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    proto, _ = read_model(model)
    meta = metadata(proto)
    if NOISE_META not in meta:
        raise ValueError(f"model has no {NOISE_META!r} metadata: not a hierarchical export")
    spec = json.loads(meta[NOISE_META])
    X = np.asarray(X, dtype=np.float32)
    spatial = X.shape[2:]
    div = int(meta.get("uqseg.spatial_divisor", 1))
    if any(s % div for s in spatial):
        raise ValueError(f"spatial sizes {spatial} must be multiples of {div}")
    shapes = [
        (c, *[s // st for s in spatial])
        for c, st in zip(spec["channels"], spec["strides"], strict=True)
    ]
    runner = backends.load(model, backend, device, max_batch=n_samples * batch_size)
    n = X.shape[0]
    samples = None
    for s in range(0, n, batch_size):
        xb = X[s : s + batch_size]
        noise = _noise_batch(shapes, s, len(xb), n_samples, seed)
        feeds = {"image": np.repeat(xb[None], n_samples, 0).reshape(-1, *xb.shape[1:])}
        feeds.update(zip(spec["inputs"], noise, strict=True))
        logits = runner.run(feeds, ["logits"])["logits"]
        p = softmax(logits.reshape(n_samples, len(xb), *logits.shape[1:]), axis=2)
        if samples is None:
            samples = np.empty((n_samples, n, *p.shape[2:]), np.float32)
        samples[:, s : s + len(xb)] = p
    return aggregate_samples(samples, return_samples)


def aggregate_samples(samples: np.ndarray, return_samples: bool = False) -> dict:
    """Mean probability and uncertainty maps from sample probabilities ``(T, N, K, *sp)``."""
    from uqseg.uncertainty import entropy, mutual_information

    proba = samples.mean(0)
    out = {
        "proba": proba,
        "entropy": entropy(proba),
        "mutual_information": mutual_information(samples),
        "variance": samples.var(0).mean(1),
    }
    if return_samples:
        out["samples"] = samples
    return out


__all__ = [
    "HierarchicalUNet",
    "HierarchicalLoss",
    "kl_standard_normal",
    "export_hierarchical_onnx",
    "sample_onnx",
    "sample_torch",
    "aggregate_samples",
]
