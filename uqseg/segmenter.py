"""OnnxSegmenter: one exported segmentation network as a scikit-learn transformer."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from itertools import product

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from uqseg import backends
from uqseg._inference import by_shape, check_batch_size, check_maps, resolve_batch_size
from uqseg._numeric import (
    categorical_entropy,
    sigmoid,
    sigmoid_entropy,
    softmax,
    softmax_entropy,
)
from uqseg._validation import ImageBatch, check_images, n_images
from uqseg.backends import graph
from uqseg.backends._checks import (
    ACTIVATIONS,
    DIVISOR_KEY,
    ModelOutputError,
    check_logits,
    check_metadata,
    check_output_type,
)
from uqseg.backends._model import image_input_names, read_model
from uqseg.metrics.uncertainty import binary_entropy

MC_MASK = "mc_mask"
PRECISIONS = (*backends.PRECISIONS, "int8")
# a quantised member is refused when it changes more labels or probabilities than this on
# the fit images (measured on a zoo member: 99.8% agreement, mean |dp| 0.0013)
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_MEAN_DIFF = 0.01
INT8_MIN_SPEEDUP = 0.95  # below this, fit warns that int8 does not pay
def _gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights, highest at the window centre (patch borders are least reliable)."""
    grids = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2
        sigma = max(w * sigma_scale, 1e-3)
        grids.append(np.exp(-0.5 * (x / sigma) ** 2))
    imp = grids[0]
    for g in grids[1:]:
        imp = np.multiply.outer(imp, g)
    imp = imp / imp.max()
    return np.maximum(imp, 1e-3).astype(np.float32)  # never zero: every voxel gets a weight


def _window_starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    n = int(np.ceil((size - window) / step)) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


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
        upsampling) and ``"decoder_last"`` (the last full-resolution decoder tensor); a role the
        network does not have is absent. The feature-based detectors use them by default when
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
        if self.activation not in ("auto", *ACTIVATIONS):
            raise ValueError(f"activation must be one of {('auto', *ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if not 0 <= float(self.overlap) < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}")
        # unknown names fail here, before any work
        self.device_ = backends.resolve(self.backend, self.device)[1]
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
        proto, _ = read_model(self.model)
        where = self._where()
        meta = check_metadata(proto, where)
        inputs = image_input_names(proto)
        image_inputs = [n for n in inputs if n != MC_MASK]
        if len(image_inputs) != 1:
            raise ValueError(f"{where}: the model must take exactly one image input (plus an "
                             f"optional {MC_MASK!r}); it takes {inputs}")
        self.input_name_ = image_inputs[0]
        in_vi = next(i for i in proto.graph.input if i.name == self.input_name_)
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in in_vi.type.tensor_type.shape.dim]
        if len(dims) not in (4, 5):
            raise ValueError(f"the model input {self.input_name_!r} has rank {len(dims)}; expected "
                             "(N, C, H, W) or (N, C, D, H, W)")
        if dims[1] is None:
            raise ValueError(f"the model input {self.input_name_!r} has no fixed channel count")
        self.input_shape_ = tuple(dims[1:])
        self.n_input_channels_ = int(dims[1])
        self.spatial_dims_ = len(dims) - 2
        out_names = [o.name for o in proto.graph.output]
        if self.output is not None and (not isinstance(self.output, str)
                                        or self.output not in out_names):
            raise ValueError(f"{where}: output={self.output!r} is not an output of the model; "
                             f"its outputs are {out_names}")
        struct = graph.structure(proto, output=self.output if self.output is not None
                                 else "logits" if "logits" in out_names else None)
        if self.output is not None:
            self.output_name_ = self.output
        elif "logits" in out_names:
            self.output_name_ = "logits"
        else:  # deep supervision: the full-resolution head is the segmentation
            self.output_name_ = (struct.output if struct is not None and struct.output
                                 else out_names[0])
        out_vi = next(o for o in proto.graph.output if o.name == self.output_name_)
        check_output_type(out_vi, where)
        out_dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in out_vi.type.tensor_type.shape.dim]
        if out_vi.type.tensor_type.HasField("shape") and len(out_dims) != len(dims):
            raise ValueError(
                f"{where}: the model output {self.output_name_!r} has rank {len(out_dims)} but "
                f"a segmentation network must output (N, K, *spatial) of rank {len(dims)}"
            )
        if len(out_dims) == len(dims) and any(
                a is not None and b is not None and a != b
                for a, b in zip(out_dims[2:], dims[2:], strict=True)):
            raise ValueError(f"{where}: the model output {self.output_name_!r} has spatial shape "
                             f"{out_dims[2:]} but its input has {dims[2:]}; segmentation logits "
                             "must have the input's spatial size")
        self.activation_, pre = _resolve_activation(proto, self.output_name_, self.activation,
                                                    meta["activation"], out_dims)
        if pre is not None:  # the logits before the graph's own Softmax/Sigmoid
            self.output_name_ = pre
        self._hidden_output = pre is not None
        self.mc_dropout_ = self._mc_spec(proto, meta["mc_dropout"], inputs, where)
        named_divisor = any(p.key == DIVISOR_KEY for p in proto.metadata_props)
        self.spatial_divisor_ = meta["spatial_divisor"] if named_divisor or struct is None \
            or struct.divisor is None else struct.divisor
        self._preprocessing = meta["preprocessing"]
        self.layer_roles_ = dict(struct.roles) if struct is not None else {}
        cands = [info.name for info in graph.candidate_layers(proto)]
        named = graph.preferred_layers(proto)
        first = named + [n for n in self.layer_roles_.values() if n not in named]
        self.feature_layers_ = first + [n for n in cands if n not in first]
        self._reset()
        n_classes = meta["n_classes"]
        if n_classes is None and out_dims and out_dims[1]:
            n_classes = out_dims[1]
        if n_classes is None:  # symbolic class axis: one probe run tells
            probe = np.zeros((1, *self._probe_shape()), dtype=np.float32)
            n_classes = self._raw_run(probe, [self.output_name_])[self.output_name_].shape[1]
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
            self._quantize(proto, X)
        return self

    def _quantize(self, proto, X) -> None:
        """``quantized_model_`` from calibration images ``X``; refuse a drifting model."""
        from uqseg.backends._model import with_external_data
        from uqseg.backends.quantize import quantize_int8

        if isinstance(X, list):  # images of the first size calibrate
            X = np.stack([x for x in X if x.shape == X[0].shape])
        X = self._to_input_size(X)
        _, folder = read_model(self.model)
        full = with_external_data(proto, folder, self._where())
        extra = ({self.mc_dropout_["input"]: np.ones(self.mc_dropout_["size"], np.float32)}
                 if self.mc_dropout_ is not None else None)
        path, _ = quantize_int8(full, X, self.input_name_, extra_inputs=extra)
        self.quantized_model_ = str(path)
        n = min(len(X), 16)
        calib = X[np.linspace(0, len(X) - 1, n).round().astype(int)]
        ref = clone(self).set_params(precision="fp32").fit()  # every other setting as ours
        self._reset()
        z32, z8 = ref.transform(calib), self.transform(calib)
        agree = float(np.mean(ref._labels(z32) == self._labels(z8)))
        p32, p8 = ref._proba(z32), self._proba(z8)  # labels first: _proba works in place
        diff = np.abs(p32.astype(np.float64) - p8)
        self.int8_drift_ = {"images": int(n), "label_agreement": agree,
                            "mean_abs_proba_diff": float(diff.mean()),
                            "max_abs_proba_diff": float(diff.max())}
        if agree < INT8_MIN_AGREEMENT or diff.mean() > INT8_MAX_MEAN_DIFF:
            self._refuse_int8(n)
        # whether it pays: small networks spend their time outside the convolutions
        t32, t8 = [], []
        for _ in range(3):
            for fn, ts in ((ref.predict_proba, t32), (self.predict_proba, t8)):
                t0 = time.perf_counter()
                fn(calib)
                ts.append(time.perf_counter() - t0)
        speedup = float(np.median(t32) / max(np.median(t8), 1e-12))
        self.int8_drift_["speedup_on_fit_images"] = speedup
        if speedup < INT8_MIN_SPEEDUP:
            warnings.warn(
                f"{self._where()}: int8 ran {speedup:.2f}x as fast as float32 on the fit images "
                "(measured at fit): it does not pay for this network; keep precision='fp32'",
                UserWarning, stacklevel=3)

    def _refuse_int8(self, n) -> None:
        d = self.int8_drift_
        raise ValueError(
            f"{self._where()}: the int8 model drifts from float32 on {n} of the fit images "
            f"(labels agree on {d['label_agreement']:.2%} of voxels, need "
            f"{INT8_MIN_AGREEMENT:.0%}; mean |p32 - p8| {d['mean_abs_proba_diff']:.4f}, "
            f"allowed {INT8_MAX_MEAN_DIFF}; max {d['max_abs_proba_diff']:.3f}): keep "
            "precision='fp32' for this network")

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

    @staticmethod
    def _mc_spec(proto, spec, inputs, where):
        """``mc_dropout_``: the validated metadata, or the width of an ``mc_mask`` input."""
        if spec is None and MC_MASK not in inputs:
            return None
        spec = dict(spec) if spec is not None else {"input": MC_MASK, "p": None, "size": None}
        if spec["size"] is None:
            mask_vi = next(i for i in proto.graph.input if i.name == spec["input"])
            dims = mask_vi.type.tensor_type.shape.dim
            spec["size"] = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value else None
        if spec["size"] is None:
            raise ValueError(f"{where}: the MC-dropout mask input {spec['input']!r} has no fixed "
                             "width (N, D) and the metadata 'uqseg.mc_dropout' gives no size")
        return spec

    def _where(self) -> str:
        return f"model {str(self.model)!r}"

    def _probe_shape(self):
        d = max(self.spatial_divisor_, 8)
        return (self.n_input_channels_, *[s or d for s in self.input_shape_[1:]])

    # ------------------------------------------------------------------ runtime state
    def _reset(self):
        self._runners = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_runners", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _runner(self, layers: tuple[str, ...] = ()):
        if not hasattr(self, "_runners"):
            self._reset()
        int8 = getattr(self, "quantized_model_", None)
        return backends.cached_runner(self._runners, layers, self._lock, lambda: backends.load(
            int8 or self.model, self.backend, self.device,
            "fp32" if self.precision == "int8" else self.precision,
            outputs=list(layers) or None, threads=self.threads,
            max_batch=resolve_batch_size(self.batch_size, (), "gpu")))

    def _device(self) -> str:
        """``device_``; resolved again for segmenters fitted before it was recorded."""
        device = getattr(self, "device_", None)
        return device if device is not None else backends.resolve(self.backend, self.device)[1]

    def _raw_run(self, batch: np.ndarray, outputs: list[str], mask: np.ndarray | None = None):
        hidden = getattr(self, "_hidden_output", False)  # an inner tensor: exposed like a layer
        layers = tuple(o for o in outputs if hidden or o != self.output_name_)
        runner = self._runner(layers)
        feeds = {self.input_name_: batch}
        if self.mc_dropout_ is not None:
            if mask is None:
                mask = np.ones((batch.shape[0], self.mc_dropout_["size"]), dtype=np.float32)
            feeds[self.mc_dropout_["input"]] = mask
        try:
            out = runner.run(feeds, outputs)
        except ValueError:
            raise
        except Exception as exc:  # engine errors on sizes the network cannot take
            raise ValueError(
                f"{self._where()} failed on an input of shape {batch.shape}: {exc}. Check that the "
                "spatial size is one the network accepts"
            ) from exc
        check_logits(out[self.output_name_], n=batch.shape[0],
                     n_classes=getattr(self, "n_classes_", None), spatial=batch.shape[2:],
                     where=self._where(), name=self.output_name_)
        return {k: (v if v.dtype == np.float32 else v.astype(np.float32)) for k, v in out.items()}

    # ------------------------------------------------------------------ checks
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
        if act == "softmax":
            p, h = softmax_entropy(logits.copy(), "entropy" in maps)
        elif act == "sigmoid":
            p, h = sigmoid_entropy(logits.copy(), "entropy" in maps)
        else:
            p = self._proba(logits.copy())
            h = (binary_entropy(p) if p.shape[1] == 1 else categorical_entropy(p)) \
                if "entropy" in maps else None
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
            return by_shape(X, lambda sub, idx: self._run_array(
                sub, names, None if mc_mask is None else mc_mask[idx]))
        return self._run_array(X, names, mc_mask)

    def _run_array(self, X: np.ndarray, layers: list[str], mask) -> dict:
        spatial = X.shape[2:]
        fixed = self.input_shape_[1:]
        if any(f is not None and s > f for s, f in zip(spatial, fixed, strict=True)):
            if layers:
                raise ValueError(
                    f"feature maps need the whole image in one pass, but the image {spatial} is "
                    f"larger than the model input {fixed} (sliding window); crop or resize first"
                )
            return {"logits": self._sliding_window(X, mask)}
        padded = self._to_input_size(X)
        target = padded.shape[2:]
        outputs = [self.output_name_, *layers]
        result = self._batched(padded, outputs, mask)
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
        out = {"logits": result[self.output_name_][crop] if target != spatial
               else result[self.output_name_]}
        for name in layers:
            out[name] = result[name]
        return out

    def _to_input_size(self, X: np.ndarray) -> np.ndarray:
        """``X`` reflect-padded to what the model takes: fixed axes their size (larger
        images cut to it), dynamic ones the next multiple of ``spatial_divisor_``."""
        spatial = X.shape[2:]
        target = tuple(
            f if f is not None else int(np.ceil(s / self.spatial_divisor_) * self.spatial_divisor_)
            for s, f in zip(spatial, self.input_shape_[1:], strict=True))
        if target == spatial:
            return X
        pad = [(0, 0), (0, 0)] + [(0, max(0, t - s)) for s, t in zip(spatial, target, strict=True)]
        X = np.pad(X, pad, mode="reflect" if min(spatial) > 1 else "edge")
        return X[(slice(None), slice(None), *(slice(0, t) for t in target))]

    def _batched(self, X: np.ndarray, outputs: list[str], mask) -> dict:
        """Run in batches (and over flips), filling preallocated outputs without concatenation."""
        flips = self._flips()
        n = X.shape[0]
        bs = resolve_batch_size(self.batch_size, X.shape[2:], self._device())
        result: dict[str, np.ndarray] = {}
        for start in range(0, n, bs):
            batch = X[start:start + bs]
            bmask = None if mask is None else mask[start:start + bs]
            acc: dict[str, np.ndarray] = {}
            for flip in flips:
                inp = np.flip(batch, axis=flip) if flip else batch
                res = self._raw_run(np.ascontiguousarray(inp), outputs, bmask)
                for name, val in res.items():
                    if flip and name == self.output_name_:
                        val = np.flip(val, axis=flip)
                    elif flip:
                        continue  # features of flipped passes do not align voxel-wise
                    if name in acc:
                        acc[name] += val
                    else:
                        acc[name] = val.copy() if flip or len(flips) > 1 else val
            if len(flips) > 1:
                acc[self.output_name_] /= len(flips)
            for name, val in acc.items():
                if n <= bs:  # one batch: the engine's fresh output array is the result
                    result[name] = val
                    continue
                if name not in result:
                    result[name] = np.empty((n, *val.shape[1:]), dtype=np.float32)
                result[name][start:start + bs] = val
        return result

    def _sliding_window(self, X: np.ndarray, mask) -> np.ndarray:
        window = tuple(f if f is not None else s for s, f in zip(
            X.shape[2:], self.input_shape_[1:], strict=True))
        pad = [(0, 0), (0, 0)] + [(0, max(0, w - s)) for s, w in zip(X.shape[2:], window,
                                                                     strict=True)]
        Xp = np.pad(X, pad, mode="constant") if any(p[1] for p in pad) else X
        spatial = Xp.shape[2:]
        steps = [max(1, int(round(w * (1 - float(self.overlap))))) for w in window]
        starts = list(product(*[_window_starts(s, w, st)
                                for s, w, st in zip(spatial, window, steps, strict=True)]))
        imp = _gaussian_importance(window)
        out = np.zeros((X.shape[0], self.n_classes_, *spatial), dtype=np.float32)
        norm = np.zeros(spatial, dtype=np.float32)
        for st in starts:
            norm[tuple(slice(a, a + w) for a, w in zip(st, window, strict=True))] += imp
        bs = resolve_batch_size(self.batch_size, window, self._device())
        for i in range(X.shape[0]):
            # windows are cut, run and accumulated batch_size at a time: memory stays at one
            # output volume plus one batch of patches, whatever the number of windows
            for first in range(0, len(starts), bs):
                chunk = starts[first:first + bs]
                patches = np.stack([Xp[i][(slice(None),) + tuple(
                    slice(a, a + w) for a, w in zip(st, window, strict=True))] for st in chunk])
                imask = None if mask is None else np.repeat(mask[i:i + 1], len(chunk), axis=0)
                logits = self._batched(patches, [self.output_name_], imask)[self.output_name_]
                for st, lg in zip(chunk, logits, strict=True):
                    region = (slice(None),) + tuple(slice(a, a + w)
                                                    for a, w in zip(st, window, strict=True))
                    lg *= imp
                    out[i][region] += lg
        out /= norm
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in X.shape[2:])
        return out[crop]

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
        try:
            return graph.layer_help(read_model(self.model)[0])
        except Exception:  # no readable file behind the segmenter: the names alone
            return f"Choose from {list(self.feature_layers_)[:12]}"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags


def _resolve_activation(proto, output: str, asked: str, meta: str | None, out_dims):
    """``(activation, pre-activation tensor or None)`` for the model output ``output``."""
    node = next((n for n in proto.graph.node if output in n.output), None)
    op = None
    if node is not None and node.op_type == "Sigmoid":
        op = "sigmoid"
    elif node is not None and node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        if axis is None:
            axis = -1 if opset >= 13 else 1
        rank = len(out_dims) if out_dims else None
        if axis == 1 or (rank is not None and axis == 1 - rank):
            op = "softmax"
    pre = node.input[0] if op is not None and node.input and node.input[0] else None
    if asked == "none" or (asked == "auto" and meta == "none"):  # said to be probabilities
        return "none", None
    if asked in ("softmax", "sigmoid"):
        return asked, pre if op == asked else None
    if op is not None:
        return op, pre
    if meta is not None:
        return meta, None
    if out_dims and len(out_dims) > 1 and out_dims[1] == 1:
        return "sigmoid", None
    return "softmax", None


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
