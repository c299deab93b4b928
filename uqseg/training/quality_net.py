"""The second-stage quality network of DeVries & Taylor (2018), trained with torch.

A small CNN reads the stacked ``(image, class probabilities, uncertainty map)`` of a
segmentation (:func:`uqseg.quality.maps_input`) and regresses its per-class quality (Dice or
IoU) through a sigmoid. :class:`QualityNetRegressor` wraps training in ``fit``/``predict`` so
that :class:`uqseg.QualityRegressor` can train it (``regressor_input="maps"``), and
:func:`export_quality_net` writes the ONNX file that ``QualityRegressor(regressor=path)`` runs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.base import BaseEstimator
from torch import nn

__all__ = ["QualityNet", "QualityNetRegressor", "export_quality_net", "train_quality_net"]


class QualityNet(nn.Module):
    """Strided conv blocks -> global average pool -> linear -> sigmoid.

    Parameters
    ----------
    in_channels : int
        Image channels + K probability channels + 1 uncertainty channel.
    n_outputs : int
        Foreground classes (K - 1).
    width : int, default=16
        Channels of the first block (doubled per block).
    depth : int, default=4
        Conv blocks; each halves the spatial size.
    dims : {2, 3}, default=2
    downsample : int, default=1
        Average-pool the input by this factor first (cheap on large images; quality is an
        image-level property).

    Examples
    --------
    >>> net = QualityNet(5, 2)
    >>> net(torch.zeros(3, 5, 32, 32)).shape
    torch.Size([3, 2])
    """

    def __init__(self, in_channels: int, n_outputs: int, width: int = 16, depth: int = 4,
                 dims: int = 2, downsample: int = 1):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("n_outputs", n_outputs),
                        ("width", width), ("depth", depth), ("downsample", downsample)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims!r}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
        layers, c_in = ([pool(downsample)] if downsample > 1 else []), in_channels
        for i in range(depth):
            c_out = width * 2 ** min(i, 3)
            layers += [conv(c_in, c_out, 3, stride=2, padding=1), norm(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_outputs)
        self.in_channels, self.n_outputs, self.dims = in_channels, n_outputs, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.mean(dim=tuple(range(2, h.dim())))
        return torch.sigmoid(self.head(h))


def _as_tensor(a, name: str, ndim: tuple[int, ...]) -> torch.Tensor:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dims, got shape "
                         f"{arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr))


def train_quality_net(model: QualityNet, maps, targets, *, epochs: int = 30,
                      batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4,
                      seed: int = 0, flip: bool = True, device: str = "cpu") -> dict:
    """Train a :class:`QualityNet` with an L1 loss on the quality (AdamW, cosine schedule).

    Parameters
    ----------
    model : QualityNet
    maps : array of shape (N, C + K + 1, *spatial)
        :func:`uqseg.quality.maps_input` of the training images.
    targets : array of shape (N, K - 1)
        True quality in ``[0, 1]``.
    epochs, batch_size, lr, weight_decay : training schedule.
    seed : int
        Seeds shuffling, flips and the weights' updates.
    flip : bool
        Random flips of the spatial axes (quality does not change under a mirror).
    device : str

    Returns
    -------
    dict
        ``loss`` (mean L1 per epoch), ``seconds``.
    """
    import time

    Xt = _as_tensor(maps, "maps", (4, 5))
    Yt = _as_tensor(targets, "targets", (2,))
    if Xt.shape[0] != Yt.shape[0]:
        raise ValueError(f"maps has {Xt.shape[0]} samples but targets has {Yt.shape[0]}")
    if Xt.shape[1] != model.in_channels or Yt.shape[1] != model.n_outputs:
        raise ValueError(f"model takes {model.in_channels} channels -> {model.n_outputs} "
                         f"outputs; got maps {tuple(Xt.shape)} and targets {tuple(Yt.shape)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n, hist, start = Xt.shape[0], {"loss": []}, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            xb, yb = Xt[idx], Yt[idx]
            if flip:
                for ax in range(2, xb.dim()):
                    if torch.rand(1, generator=gen).item() < 0.5:
                        xb = xb.flip(ax)
            xb, yb = xb.to(dev), yb.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = (model(xb) - yb).abs().mean()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        hist["loss"].append(total / n)
    model.cpu().eval()
    hist["seconds"] = time.perf_counter() - start
    return hist


def _predict(model: QualityNet, maps, batch_size: int = 64) -> np.ndarray:
    Xt = _as_tensor(maps, "maps", (4, 5))
    model.eval()
    with torch.no_grad():
        return torch.cat([model(Xt[b:b + batch_size]) for b in range(0, len(Xt), batch_size)]
                         ).numpy()


def export_quality_net(model: QualityNet, path, example, *, info: dict | None = None,
                       opset: int = 18) -> dict:
    """Export to one ONNX file: input ``maps`` (dynamic batch and spatial axes) -> ``quality``.

    Parameters
    ----------
    model : QualityNet
    path : str or path-like
    example : array of shape (N, C + K + 1, *spatial)
        Traces the export and checks onnxruntime against torch (max abs diff <= 1e-4).
    info : dict, optional
        Stored as JSON in the ``uqseg.quality`` metadata entry.
    opset : int, default=18

    Returns
    -------
    dict
        ``path``, ``max_abs_diff``, ``size_bytes``.
    """
    import json

    import onnxruntime as ort
    from torch.export import Dim

    x = _as_tensor(example, "example", (4, 5))
    model = model.cpu().eval()
    shapes = {"x": {0: Dim("batch", min=1, max=4096),
                    **{ax: Dim(f"s{ax}", min=16, max=4096) for ax in range(2, x.dim())}}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter-internal deprecation chatter
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["maps"],
                                    output_names=["quality"], opset_version=opset,
                                    dynamic_shapes=shapes, external_data=False, verbose=False)
        ref = model(x).numpy()
    proto = program.model_proto
    proto.metadata_props.add(key="uqseg.quality", value=json.dumps(info or {}))
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    if diff > 1e-4:
        raise ValueError(f"exported quality net disagrees with torch: max abs diff {diff:.3g}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, os.fspath(path), save_as_external_data=False)
    return {"path": os.fspath(path), "max_abs_diff": diff, "size_bytes": path.stat().st_size}


class QualityNetRegressor(BaseEstimator):
    """:class:`QualityNet` with scikit-learn's fit/predict, for ``QualityRegressor(...,
    regressor_input="maps")``.

    Parameters
    ----------
    width, depth, downsample : int
        Network size (see :class:`QualityNet`).
    epochs, batch_size, lr : training schedule (see :func:`train_quality_net`).
    seed : int

    Attributes
    ----------
    model_ : QualityNet
    history_ : dict

    Examples
    --------
    >>> import numpy as np
    >>> maps = np.random.default_rng(0).random((8, 5, 16, 16)).astype(np.float32)
    >>> reg = QualityNetRegressor(width=4, depth=2, epochs=1).fit(maps, np.full((8, 2), 0.5))
    >>> reg.predict(maps).shape
    (8, 2)
    """

    def __init__(self, width=16, depth=4, downsample=1, epochs=30, batch_size=32, lr=2e-3,
                 seed=0):
        self.width = width
        self.depth = depth
        self.downsample = downsample
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def fit(self, X, y):
        """Train on maps ``(N, C, *spatial)`` and qualities ``(N, n_outputs)``."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        if y.ndim == 1:
            y = y[:, None]
        if X.ndim not in (4, 5):
            raise ValueError(f"X must be maps of shape (N, C, *spatial), got shape {X.shape}")
        torch.manual_seed(self.seed)
        self.model_ = QualityNet(X.shape[1], y.shape[1], self.width, self.depth, X.ndim - 2,
                                 self.downsample)
        self.history_ = train_quality_net(self.model_, X, y, epochs=self.epochs,
                                          batch_size=self.batch_size, lr=self.lr, seed=self.seed)
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted quality ``(N, n_outputs)`` in ``[0, 1]``."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        return _predict(self.model_, X)

    def export_onnx(self, path, example, info: dict | None = None) -> dict:
        """Write the trained network with :func:`export_quality_net`."""
        return export_quality_net(self.model_, path, example, info=info)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.two_d_array = False
        return tags
