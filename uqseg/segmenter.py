"""OnnxSegmenter: one exported segmentation network as a scikit-learn transformer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import product

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import by_shape, check_batch_size, check_maps
from uqseg._model_interface import (
    MC_MASK,
    PRECISIONS,
    ModelOutputError,
    check_activation,
    layer_help,
    read_interface,
    resolve_device,
)
from uqseg._numeric import probabilities, sigmoid, softmax
from uqseg._segmenter_engine import NetworkEngine
from uqseg._validation import ImageBatch, check_images, n_images

__all__ = ["MC_MASK", "PRECISIONS", "OnnxSegmenter", "is_fitted", "resolve_segmenter", "sigmoid",
           "softmax"]


class OnnxSegmenter(TransformerMixin, BaseEstimator):
    """One exported segmentation network, run through an inference backend.

    Parameters
    ----------
    model : str or path-like
        ONNX file of a network mapping images ``(N, C, *spatial)`` to logits ``(N, K, *spatial)``.
    backend : {"auto", "onnxruntime", "tensorrt"}, default="auto"
    device : {"auto", "cpu", "cuda", "cuda:N", "tensorrt"}, default="auto"
    precision : {"fp32", "fp16", "int8"}, default="fp32"
        ``"fp16"``: half precision on GPU backends. ``"int8"``: static QDQ quantisation for
        ONNX Runtime on the CPU (per-channel int8 weights, activations calibrated on the
        images given to :meth:`fit`, convolutions only), cached under
        ``$UQSEG_CACHE_DIR/int8``; refused when it drifts from float32 on those images
        (``int8_drift_``).
    batch_size : int or "auto", default="auto"
        Images (or sliding-window patches) per inference call. ``"auto"``: on a CPU as many as
        keep one call within 2**17 input voxels (8 images of 128 x 128, 2 of 256 x 256, 1
        volume of 96**3; at most 16), on a GPU 16 (see :func:`resolve_batch_size`).
    tta : None, "flips" or list of tuples of spatial axes, default=None
        Test-time flips; logits are averaged over the flipped passes.
    overlap : float in [0, 1), default=0.5
        Overlap of sliding windows, used when images are larger than a fixed-size model input.
    threads : int, optional
        CPU threads of the backend (default: all cores this process may use).
    activation : {"auto", "softmax", "sigmoid", "none"}, default="auto"
        What turns the network's output into probabilities. ``"softmax"``: classes are
        exclusive (labels ``(N, *spatial)``). ``"sigmoid"``: each channel is an independent
        binary probability (multi-label; boolean masks ``(N, C, *spatial)``). ``"none"``: the
        network already outputs probabilities (labels by argmax, or ``p >= 0.5`` for one
        channel). ``"auto"``: a graph ending in a ``Softmax`` over the channel axis or a
        ``Sigmoid`` node says which (and the tensor before it is used as the logits), else
        the ``uqseg.activation`` metadata, else one output channel means sigmoid and several
        mean softmax.
    output : str, optional
        The graph output that is the segmentation. Default: ``"logits"`` when the graph has
        one, else the first output at the input's full resolution (networks with deep
        supervision heads at lower resolutions), else the first output.

    Attributes
    ----------
    activation_ : {"softmax", "sigmoid", "none"}
        The resolved activation.
    n_classes_ : int
        Output channels (classes for softmax, labels for sigmoid).
    input_shape_ : tuple
        ``(C, *spatial)`` the model takes; ``None`` for dynamic spatial axes.
    n_input_channels_ : int
    spatial_dims_ : int
    feature_layers_ : list of str
        Candidate feature tensors: the exporter's (``uqseg.feature_layers`` metadata) first,
        then those of ``layer_roles_``, then the rest, deepest first.
    layer_roles_ : dict
        Tensors found by the graph's structure (shapes probed at a fixed input size):
        ``"bottleneck"`` (lowest resolution, the deepest encoder output), ``"decoder_1/4"`` and
        ``"decoder_1/2"`` (decoder blocks at 1/4 and 1/2 of the input resolution, after
        upsampling), ``"decoder_last"`` (the last full-resolution decoder tensor) and, in a
        network that normalises each image's maps (instance or group norm), ``"stem"`` (the
        first convolution's output, before any normalisation); a role the network does not
        have is absent. The feature-based detectors use them by default when
        the model names no layer.
    spatial_divisor_ : int
        Dynamic-size inputs are padded to a multiple of this (then cropped back): the
        ``uqseg.spatial_divisor`` metadata, else the product of the strides and pooling on the
        path to the bottleneck found in the graph, else 1.
    output_name_ : str
        The tensor used as logits (the pre-activation tensor when the graph ends in a
        ``Softmax``/``Sigmoid``).
    device_ : str
        The device ``device`` resolved to (``"cpu"``, ``"cuda"`` or ``"tensorrt"``).
    mc_dropout_ : dict or None
        ``{"input", "p", "size"}`` when the model takes an MC-dropout mask.
    preprocessing_ : uqseg.preprocessing.Preprocessing or None
        The model's ``uqseg.preprocessing`` metadata (read from the file, not saved state).

    Examples
    --------
    >>> from uqseg import OnnxSegmenter, datasets
    >>> seg = OnnxSegmenter(datasets.reference_models()[0]).fit()
    >>> seg.predict(datasets.load_brain_tissue("test")[0][:2]).shape
    (2, 128, 128)
    """

    def __init__(self, model, backend="auto", device="auto", precision="fp32", batch_size="auto",
                 tta=None, overlap=0.5, threads=None, activation="auto", output=None):
        self.model = model
        self.backend = backend
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.tta = tta
        self.overlap = overlap
        self.threads = threads
        self.activation = activation
        self.output = output

    # ------------------------------------------------------------------ fitting
    def fit(self, X=None, y=None):
        """Validate the model and record its interface; ``X`` (optional) is checked against it."""
        if isinstance(self.model, (bytes, bytearray)):
            raise TypeError("model must be a path to an ONNX file (bytes cannot be cloned safely)")
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(
                f"model must be a path to an ONNX file, got {type(self.model).__name__}")
        check_batch_size(self.batch_size)
        check_activation(self.activation)
        if not 0 <= float(self.overlap) < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}")
        # unknown names fail here, before any work
        self.device_ = resolve_device(self.backend, self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of "
                             f"{PRECISIONS}")
        if self.precision == "int8":
            if self.device_ != "cpu":
                raise ValueError("precision='int8' is ONNX Runtime's CPU quantisation; on a GPU "
                                 "use precision='fp16'")
            if X is None:
                raise ValueError("precision='int8' calibrates the activation ranges on images: "
                                 "call fit(X) with images like those the network will see")
        for attr in ("quantized_model_", "int8_drift_"):
            self.__dict__.pop(attr, None)
        attrs, proto, meta, out_dims = read_interface(self.model, self.output, self.activation)
        self.__dict__.update(attrs)
        where = self._where()
        pre = self.output_name_ if self._hidden_output else None
        self._reset()
        n_classes = meta["n_classes"]
        if n_classes is None and out_dims and out_dims[1]:
            n_classes = out_dims[1]
        if n_classes is None:  # symbolic class axis: one probe run tells
            probe = np.zeros((1, *self._probe_shape()), dtype=np.float32)
            n_classes = self._engine()._raw_run(probe, [self.output_name_])[
                self.output_name_].shape[1]
        self.n_classes_ = int(n_classes)
        if self.activation == "auto" and self.activation_ == "softmax" and pre is None \
                and meta["activation"] is None and self.n_classes_ == 1:
            self.activation_ = "sigmoid"  # one channel, known only after the probe run
        if self.n_classes_ < 2 and self.activation_ == "softmax":
            raise ValueError(f"{where}: the model outputs {self.n_classes_} channel(s); a "
                             "softmax needs at least 2 classes (one channel is a binary "
                             "sigmoid output: activation='sigmoid')")
        if X is not None:
            X = self._check_X(X)
        if self.precision == "int8":
            self._engine()._quantize(proto, X)
        return self

    @property
    def preprocessing_(self):
        """The model's preprocessing description (metadata ``uqseg.preprocessing``) or None."""
        if not hasattr(self, "n_classes_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this OnnxSegmenter is not fitted yet: call fit() first")
        if not hasattr(self, "_preprocessing"):  # restored by uqseg.load: read the file once
            from uqseg.preprocessing import read_preprocessing

            self._preprocessing = read_preprocessing(self.model)
        return self._preprocessing

    def _where(self) -> str:
        return f"model {str(self.model)!r}"

    def _probe_shape(self):
        d = max(self.spatial_divisor_, 8)
        return (self.n_input_channels_, *[s or d for s in self.input_shape_[1:]])

    # ------------------------------------------------------------------ runtime state
    def _reset(self):
        self._runtime = None

    def _engine(self) -> NetworkEngine:
        """The inference engine (built on first use, not pickled)."""
        if getattr(self, "_runtime", None) is None:
            self._runtime = NetworkEngine(self)
        return self._runtime

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_runtime", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _device(self) -> str:
        """``device_``; resolved again for segmenters fitted before it was recorded."""
        device = getattr(self, "device_", None)
        return device if device is not None else resolve_device(self.backend, self.device)

    def _check_X(self, X) -> ImageBatch:
        return check_images(X, spatial_dims=self.spatial_dims_, n_channels=self.n_input_channels_)

    def _resolve_layers(self, layers) -> list[str]:
        if isinstance(layers, str):
            layers = [layers]
        out = []
        for name in layers:
            if name == "auto":
                if not self.feature_layers_:
                    raise ValueError("the model has no candidate feature layer for layers='auto'")
                name = self.feature_layers_[0]
            if name not in out:
                out.append(name)
        return out

    def _flips(self) -> list[tuple[int, ...]]:
        if self.tta is None:
            return [()]
        axes = range(2, 2 + self.spatial_dims_)
        if self.tta == "flips":
            combos = [tuple(a for a, on in zip(axes, bits, strict=True) if on)
                      for bits in product([0, 1], repeat=self.spatial_dims_)]
            return combos
        if isinstance(self.tta, (list, tuple)):
            flips = [()]
            for item in self.tta:
                t = tuple(item) if isinstance(item, (list, tuple)) else (item,)
                if any(not isinstance(a, (int, np.integer)) or not 0 <= a < self.spatial_dims_
                       for a in t):
                    raise ValueError(f"tta flips name spatial axes 0..{self.spatial_dims_ - 1}; "
                                     f"got {item!r}")
                flips.append(tuple(a + 2 for a in t))
            return flips
        raise ValueError(
            f"tta must be None, 'flips' or a list of spatial-axis tuples; got {self.tta!r}")

    # ------------------------------------------------------------------ inference
    #: uncertainty maps ``run`` gives for one network
    MAPS = ("entropy",)

    def run(self, X, layers=(), maps=(), *, proba=True, mc_mask=None) -> dict:
        """The segmenter protocol: logits, probabilities, uncertainty maps and feature maps
        from one inference pass.

        :class:`uqseg.EnsembleSegmenter` has the same method; the estimators built on a
        segmenter (OOD detectors, quality regressor, :func:`uqseg.assess`) make this one call.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays
        layers : str or sequence of str, default=()
            Feature tensor names (see ``feature_layers_``); ``"auto"`` is the preferred one.
        maps : str or sequence of str, default=()
            Uncertainty maps; one network gives ``"entropy"`` (``MAPS``): categorical
            ``(N, *spatial)``, or per channel ``(N, C, *spatial)`` for sigmoid outputs.
        proba : bool, default=True
            Whether to return the probabilities (``"proba"``).
        mc_mask : array ``(N, D)``, optional
            MC-dropout multipliers for models exported with a dropout mask.

        Returns
        -------
        dict
            ``"logits"`` ``(N, K, *spatial)``, ``"proba"`` (when asked), one entry per map and
            one per layer (lists for list input).

        Examples
        --------
        >>> from uqseg import OnnxSegmenter, datasets
        >>> seg = OnnxSegmenter(datasets.reference_models()[0]).fit()
        >>> out = seg.run(datasets.load_brain_tissue("test")[0][:2], layers=["bottleneck"],
        ...               maps=["entropy"])
        >>> sorted(out), out["entropy"].shape
        (['bottleneck', 'entropy', 'logits', 'proba'], (2, 128, 128))
        """
        check_is_fitted(self)
        maps = check_maps(maps, self.MAPS, "one network")
        out = self._forward(X, layers, mc_mask)
        if proba or maps:
            logits = out["logits"]
            if isinstance(logits, list):
                derived = [self._derived(lg[None], maps) for lg in logits]
                for key in derived[0] if derived else ():
                    out[key] = [d[key][0] for d in derived]
            else:
                out.update(self._derived(logits, maps))
            if not proba:
                out.pop("proba")
        return out

    def _derived(self, logits: np.ndarray, maps) -> dict:
        """Probabilities (and entropy) of a batch of logits, which stay untouched."""
        act = getattr(self, "activation_", "softmax")
        if act == "none":
            self._proba(logits)  # the range check: given probabilities pass through unchanged
        p, h = probabilities(logits.copy(), act, "entropy" in maps)
        return {"proba": p, **({"entropy": h} if h is not None else {})}

    def _forward(self, X, layers=(), mc_mask=None) -> dict:
        """Logits and feature maps of one pass (lists for list input)."""
        check_is_fitted(self)
        X = self._check_X(X)
        names = self._resolve_layers(layers)
        if mc_mask is not None:
            if self.mc_dropout_ is None:
                raise ValueError("mc_mask given but the model takes no MC-dropout mask input")
            mc_mask = np.asarray(mc_mask, dtype=np.float32)
            want = (n_images(X), self.mc_dropout_["size"])
            if mc_mask.shape != want:
                raise ValueError(f"mc_mask must have shape {want}, got {mc_mask.shape}")
        if isinstance(X, list):
            return by_shape(X, lambda sub, idx: self._engine()._run_array(
                sub, names, None if mc_mask is None else mc_mask[idx]))
        return self._engine()._run_array(X, names, mc_mask)

    def transform(self, X) -> np.ndarray | list[np.ndarray]:
        """Logits ``(N, K, *spatial)`` float32 (a list for a list of differently sized images)."""
        return self._forward(X)["logits"]

    def predict_proba(self, X):
        """Probabilities ``(N, K, *spatial)``: softmax over classes, or independent sigmoid
        probabilities per channel (``activation_``)."""
        logits = self.transform(X)
        if isinstance(logits, list):
            return [self._proba(lg[None])[0] for lg in logits]
        # transform's result is ours alone (the engine's fresh output or our buffer)
        return self._proba(logits)

    def _proba(self, z: np.ndarray) -> np.ndarray:
        act = getattr(self, "activation_", "softmax")
        if act == "softmax":
            return softmax(z, copy=False)
        if act == "sigmoid":
            return sigmoid(z)
        if np.any(z < 0) or np.any(z > 1):
            raise ModelOutputError(
                f"{self._where()}: activation='none' but the network output has values in "
                f"[{float(z.min()):.3g}, {float(z.max()):.3g}], outside [0, 1]: it outputs "
                "logits, not probabilities (use activation='softmax' or 'sigmoid')")
        return z

    def predict(self, X):
        """Labels ``(N, *spatial)`` (argmax over classes), or for sigmoid outputs boolean
        masks ``(N, C, *spatial)`` (probability >= 0.5)."""
        logits = self.transform(X)
        if isinstance(logits, list):
            return [self._labels(lg[None])[0] for lg in logits]
        return self._labels(logits)

    def _labels(self, z: np.ndarray) -> np.ndarray:
        act = getattr(self, "activation_", "softmax")
        if act == "sigmoid":
            return z >= 0  # sigmoid(z) >= 0.5
        if act == "none":
            p = self._proba(z)
            return p >= 0.5 if p.shape[1] == 1 else p.argmax(axis=1)
        return z.argmax(axis=1)

    def features(self, X, layers: Sequence[str] = ("auto",)) -> dict:
        """Feature maps only (``run`` without the logits)."""
        out = self._forward(X, layers)
        out.pop("logits")
        return out

    def layer_help(self) -> str:
        """How to choose or name a feature layer of this network: its structural candidates
        with their resolutions, and how to name layers (metadata, ``Identity`` nodes)."""
        check_is_fitted(self)
        return layer_help(self.model, self.feature_layers_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags


def is_fitted(est) -> bool:
    """sklearn's fitted check, duck-typed for segmenters without sklearn's machinery."""
    try:
        check_is_fitted(est)
    except NotFittedError:
        return False
    except (TypeError, AttributeError):
        return any(v.endswith("_") and not v.startswith("__") for v in vars(est))
    return True


def resolve_segmenter(estimator, X=None, *, requires=("predict_proba",)):
    """The fitted segmenter a meta-estimator works with.

    A path becomes a fitted :class:`OnnxSegmenter`; a fitted segmenter is used as is; an
    unfitted one is cloned (the caller's object stays untouched) and fitted on ``X``.
    ``requires`` names the methods the caller needs; a missing one is a ``TypeError``.
    """
    if isinstance(estimator, (str, os.PathLike)):
        return OnnxSegmenter(estimator).fit()
    missing = [m for m in requires if not callable(getattr(estimator, m, None))]
    if missing:
        raise TypeError(
            f"estimator must be a path to an ONNX file or a segmenter with {', '.join(requires)}"
            f" (an OnnxSegmenter or EnsembleSegmenter); got {type(estimator).__name__} "
            f"without {', '.join(missing)}")
    if is_fitted(estimator):
        return estimator
    est = clone(estimator) if hasattr(estimator, "get_params") else estimator
    try:
        return est.fit(X)
    except TypeError:  # segmenters whose fit takes no images
        return est.fit()
