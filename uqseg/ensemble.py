"""EnsembleSegmenter: deep ensembles, MC dropout and test-time flips as one segmenter.

Every *sample* is one softmax map of one member: deep-ensemble members, MC-dropout passes of a
member that takes an ``mc_mask`` and test-time flips all add samples. The estimator validates,
caches and presents results; :mod:`uqseg._ensemble_engine` executes (streaming the samples
chunk by chunk into float32 running sums, so memory does not grow with their number; only
:meth:`EnsembleSegmenter.predict_members` stacks them).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from uqseg._ensemble_checks import (
    check_agree,
    check_kinds,
    check_layers,
    check_params,
    check_weights,
    fit_members,
    flip_list,
    member_passes,
)
from uqseg._ensemble_engine import (
    FEATURE,
    MAX_SPATIAL_DIVISOR,
    EnsembleEngine,
    fuse_problem,
)
from uqseg._inference import check_maps
from uqseg._numeric import TINY
from uqseg._validation import check_images
from uqseg.metrics.uncertainty import segment_uncertainty as _segment_uncertainty
from uqseg.segmenter import OnnxSegmenter
from uqseg.uncertainty import KINDS

__all__ = ["EnsembleSegmenter"]

# computed on every inference: they cost one multiply-add per sample and make the common
# "predict_proba, then uncertainty" sequence a cache hit
_DEFAULT = frozenset({"entropy", "expected_entropy", "mutual_information"})


class EnsembleSegmenter(TransformerMixin, BaseEstimator):
    """An ensemble of segmentation networks with voxel-wise uncertainty.

    Samples are deep-ensemble members, MC-dropout passes and test-time flips, in any mix; the
    prediction is their weighted mean softmax. One inference serves the probabilities and every
    uncertainty map; results of the last ``cache_size`` inputs are kept, keyed on a hash of the
    input, so ``predict_proba(X)`` followed by ``uncertainty(X, ...)`` does not run again.

    Parameters
    ----------
    members : list of path or OnnxSegmenter
        The networks. Paths become ``OnnxSegmenter(path, backend, device, batch_size=...)``;
        given segmenters are cloned in ``fit`` (your objects stay untouched).
    tta : None, "flips" or list of tuples of spatial axes, default=None
        Test-time flips; each flip of each pass is one sample. ``"flips"`` is every combination
        of flipped spatial axes (4 in 2-D, 8 in 3-D); a list such as ``[(0,), (1,)]`` adds those
        flips to the unflipped pass.
    mc_samples : int, default=0
        MC-dropout passes per member that takes an ``mc_mask`` input (masks drawn from ``seed``).
        Members without one contribute one deterministic pass. An error when no member takes a
        mask.
    weights : array-like of shape (n_members,), optional
        Member weights (normalised to sum 1); a member's samples share its weight equally.
    seed : int or None, default=0
        Seed of the MC-dropout masks; ``None`` draws fresh masks (and disables the cache).
    fuse : {"auto", True, False}, default="auto"
        Run all members as one fused ONNX graph (:func:`uqseg.backends.fuse.fuse_members`).
        Valid without MC dropout, when the members have dynamic spatial axes, no TTA of their
        own and one backend/device/precision. ``"auto"`` fuses whenever valid (measured faster
        on the CPU too, see docs/ensemble.md) except for chunks whose members' logits would
        together exceed 256 MiB (large 3-D chunks), which run member by member so that memory
        stays that of one member; ``True`` always fuses when valid and raises when not.
    backend, device : str, default="auto"
        Used for members given as paths and for the fused graph.
    precision : {"fp32", "fp16", "int8"}, default="fp32"
        For members given as paths (see :class:`uqseg.OnnxSegmenter`). ``"int8"`` quantises
        each member on the images given to :meth:`fit` (required then) and runs the members
        separately (quantised graphs are not fused).
    batch_size : int or "auto", default="auto"
        Images per chunk: memory is bounded by one chunk's maps, whatever the size of ``X``.
        ``"auto"``: as :class:`uqseg.OnnxSegmenter` (on a CPU, chunks of at most 2**17 input
        voxels: 8 images of 128 x 128; 16 on a GPU).
    cache_size : int, default=2
        Inputs whose results are kept (each entry holds the probabilities and maps of one
        ``X``); 0 disables the cache.
    output : str, optional
        Graph output used as the segmentation by members given as paths (see
        :class:`uqseg.OnnxSegmenter`); given segmenters keep their own.
    fused_stats : {"auto", "graph", "numpy"}, default="auto"
        Where the fused graph's statistics (mean probability, entropies) are computed:
        ``"graph"`` inside the ONNX graph (fewer copies off a GPU), ``"numpy"`` from the
        members' logits it outputs (faster on the CPU: ``benchmarks/bench_ensemble.py``);
        ``"auto"`` picks by device. Results agree to float32 rounding.
    feature_member : int, default=0
        The member whose feature maps :meth:`run` gives (and so the feature-based OOD
        detectors and the quality regressor's typicality read): its deterministic, unflipped
        pass, from the fused graph when it runs.
    activation : {"auto", "softmax", "sigmoid", "none"}, default="auto"
        Passed to the members given as paths (``OnnxSegmenter(activation=...)``); members
        given as segmenters keep their own. Every member must resolve to the same one.

    Attributes
    ----------
    members_ : list of OnnxSegmenter
        Fitted copies of the members.
    n_members_ : int
    weights_ : ndarray of shape (n_members_,)
        Normalised member weights.
    member_samples_ : list of int
        Samples each member contributes per image.
    n_samples_ : int
        Samples per image (members x MC passes x flips).
    sample_weights_ : ndarray of shape (n_samples_,)
        Weight of each sample, ordered member, MC pass, flip.
    n_classes_, n_input_channels_, spatial_dims_ : int
    input_shape_ : tuple
        ``(C, *spatial)`` with ``None`` for dynamic spatial axes.
    spatial_divisor_ : int
        Least common multiple of the members'.
    fused_ : bool
        Whether inference runs the fused graph.
    feature_layers_, layer_roles_
        Those of the feature member (``members_[feature_member]``).

    Examples
    --------
    >>> from uqseg import EnsembleSegmenter, datasets
    >>> X, y = datasets.load_brain_tissue("test")
    >>> ens = EnsembleSegmenter(datasets.reference_models()).fit()
    >>> proba, maps = ens.predict_with_uncertainty(X[:4])
    >>> maps["mutual_information"].shape
    (4, 128, 128)
    >>> bool((maps["mutual_information"] <= maps["entropy"] + 1e-6).all())
    True
    """

    def __init__(
        self,
        members,
        tta=None,
        mc_samples=0,
        weights=None,
        seed=0,
        fuse="auto",
        backend="auto",
        device="auto",
        batch_size="auto",
        cache_size=2,
        precision="fp32",
        output=None,
        feature_member=0,
        fused_stats="auto",
        activation="auto",
    ):
        self.members = members
        self.tta = tta
        self.mc_samples = mc_samples
        self.weights = weights
        self.seed = seed
        self.fuse = fuse
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.precision = precision
        self.output = output
        self.feature_member = feature_member
        self.fused_stats = fused_stats
        self.activation = activation

    # ------------------------------------------------------------------ fitting
    def _check_params(self):
        check_params(self)

    @property
    def _feature_member(self):
        return getattr(self, "feature_member", 0)  # ensembles saved before the parameter

    def _flip_list(self, dims: int) -> list[tuple[int, ...]]:
        return flip_list(self.tta, dims)

    def fit(self, X=None, y=None):
        """Fit copies of the members and check that they agree.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays, optional
            Checked against the members' input when given; nothing is learned from it.
        y : ignored

        Returns
        -------
        self
        """
        self._check_params()
        members = fit_members(self, X)
        check_agree(members)
        first = members[0]
        self.members_ = members
        self.n_members_ = len(members)
        self.weights_ = check_weights(self.weights, len(members))
        self.n_classes_ = int(first.n_classes_)
        self.activation_ = first.activation_
        feat = members[int(self._feature_member)]
        self.feature_layers_ = list(feat.feature_layers_)
        self.layer_roles_ = dict(feat.layer_roles_)
        self.n_input_channels_ = int(first.n_input_channels_)
        self.spatial_dims_ = int(first.spatial_dims_)
        self.input_shape_ = tuple(first.input_shape_)
        self.spatial_divisor_ = int(math.lcm(*(int(s.spatial_divisor_) for s in members)))
        if self.spatial_divisor_ > MAX_SPATIAL_DIVISOR:  # e.g. two large coprime divisors
            raise ValueError(
                f"the members' spatial divisors {[s.spatial_divisor_ for s in members]} have a "
                f"least common multiple of {self.spatial_divisor_}, above "
                f"{MAX_SPATIAL_DIVISOR}: every image would be padded to a multiple of it")
        flips = self._flip_list(self.spatial_dims_)
        passes = member_passes(self.mc_samples, members)
        self.member_samples_ = [int(t * len(flips)) for t in passes]
        self.n_samples_ = int(sum(self.member_samples_))
        self.sample_weights_ = np.concatenate(
            [np.full(s, w / s) for s, w in zip(self.member_samples_, self.weights_, strict=True)]
        )
        problem = fuse_problem(self)
        if self.fuse is True and problem is not None:
            raise ValueError(f"fuse=True but the members cannot be fused: {problem}")
        # measured (benchmarks/bench_ensemble.py): one fused session beats separate ones on
        # ONNX Runtime's CPU provider too (-14% vs +8..12% over the members' plain inference)
        self.fused_ = problem is None and self.fuse in (True, "auto")
        self._reset()
        if X is not None:
            self._check_X(X)
        return self

    @property
    def preprocessing_(self):
        """The members' common preprocessing description (None when none carries one).

        Raises ValueError when members carry different descriptions (or only some do).
        """
        check_is_fitted(self, "members_")
        found = [m.preprocessing_ for m in self.members_]
        if any(f != found[0] for f in found[1:]):
            which = ", ".join(f"{m.model}: {'none' if f is None else f.to_json()}"
                              for m, f in zip(self.members_, found, strict=True))
            raise ValueError(f"the ensemble's members carry different preprocessing ({which}); "
                             "their inputs would differ")
        return found[0]

    # ------------------------------------------------------------------ runtime state
    def _reset(self):
        self._runtime = None
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def _engine(self) -> EnsembleEngine:
        """The inference engine (built on first use, not pickled)."""
        if getattr(self, "_runtime", None) is None:
            self._runtime = EnsembleEngine(self)
        return self._runtime

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_runtime", "_cache", "_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def clear_cache(self) -> None:
        """Forget cached results (e.g. to free their memory)."""
        if hasattr(self, "_lock"):
            with self._lock:
                self._cache.clear()

    def _check_X(self, X):
        return check_images(X, spatial_dims=self.spatial_dims_, n_channels=self.n_input_channels_)

    @staticmethod
    def _key(X) -> str:
        h = hashlib.blake2b(digest_size=16)
        for a in X if isinstance(X, list) else [X]:
            h.update(repr(a.shape).encode())
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()

    def _results(self, X, kinds, layers=()) -> dict:
        """Probabilities and maps for ``X``, from the cache when the same input came before."""
        check_is_fitted(self)
        kinds = self._check_kinds(kinds)
        X = self._check_X(X)
        want = frozenset(kinds) | _DEFAULT | {FEATURE + ly for ly in self._check_layers(layers)}
        use_cache = self._caching()
        if not hasattr(self, "_lock"):
            self._reset()
        key = self._key(X) if use_cache else None
        if use_cache:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None and want <= hit.keys():
                    self._cache.move_to_end(key)
                    return hit
        res = self._engine().compute(X, want)
        if use_cache:
            with self._lock:
                self._cache[key] = res
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return res

    @staticmethod
    def _check_kinds(kinds) -> tuple[str, ...]:
        return check_kinds(kinds)

    def _check_layers(self, layers) -> tuple[str, ...]:
        return check_layers(layers, self.feature_layers_, int(self._feature_member))

    def _caching(self) -> bool:
        return self.cache_size > 0 and not (self.seed is None and self.mc_samples > 0)

    def _copy(self, val):
        """What a caller may modify: a copy of a cached result, else the result itself."""
        if not self._caching():
            return val
        return [v.copy() for v in val] if isinstance(val, list) else val.copy()

    # ------------------------------------------------------------------ public inference
    def predict_with_uncertainty(self, X, kinds=("entropy", "mutual_information")):
        """Mean probability and uncertainty maps from one inference pass.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays
        kinds : str or sequence of str, default=("entropy", "mutual_information")
            From ``"entropy"`` (total), ``"expected_entropy"`` (aleatoric),
            ``"mutual_information"`` (epistemic), ``"variance"`` (of the probabilities over
            samples, averaged over classes).

        Returns
        -------
        proba : ndarray ``(N, K, *spatial)`` float32 (list for list input)
        maps : dict kind -> ndarray ``(N, *spatial)`` float32 (lists for list input)

        Examples
        --------
        >>> from uqseg import EnsembleSegmenter, datasets
        >>> X, _ = datasets.load_brain_tissue("test")
        >>> ens = EnsembleSegmenter(datasets.reference_models()[:2]).fit()
        >>> proba, maps = ens.predict_with_uncertainty(X[:2], kinds=("entropy",))
        >>> proba.shape, sorted(maps)
        ((2, 3, 128, 128), ['entropy'])
        """
        kinds = self._check_kinds(kinds)
        res = self._results(X, kinds)
        return self._copy(res["proba"]), {k: self._copy(res[k]) for k in kinds}

    #: uncertainty maps ``run`` gives
    MAPS = KINDS

    def run(self, X, layers=(), maps=(), *, proba=True):
        """The segmenter protocol (as :meth:`uqseg.OnnxSegmenter.run`): probabilities,
        uncertainty maps and the feature member's feature maps, from one pass.

        With the fused graph (``fused_``) the feature maps come out of the same inference
        call as the probabilities (the tensors are exposed in the fused graph); else the
        feature member runs once more for them. Either way they equal
        ``members_[feature_member].run(X, layers)`` (deterministic, unflipped pass). With
        ``proba=False`` and no maps only the feature member runs.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays
        layers : str or sequence of str, default=()
            Feature layers of the feature member (``feature_layers_``; ``"auto"`` is the
            preferred one).
        maps : str or sequence of str, default=()
            Uncertainty maps, as in :meth:`predict_with_uncertainty` (``MAPS``).
        proba : bool, default=True
            Whether to return the mean probabilities (``"proba"``).

        Returns
        -------
        dict
            ``"proba"`` ``(N, K, *spatial)``, one ``(N, *spatial)`` map per kind and one
            ``(N, C_l, *spatial_l)`` array per layer (lists for list input).

        Examples
        --------
        >>> from uqseg import EnsembleSegmenter, datasets
        >>> X, _ = datasets.load_brain_tissue("test")
        >>> ens = EnsembleSegmenter(datasets.reference_models()[:2]).fit()
        >>> out = ens.run(X[:2], layers=["bottleneck"], maps=["mutual_information"])
        >>> sorted(out)
        ['bottleneck', 'mutual_information', 'proba']
        """
        check_is_fitted(self)
        maps = check_maps(maps, self.MAPS, "the ensemble")
        layers = self._check_layers(layers)
        if not proba and not maps:
            out = self.feature_network_.run(X, layers=layers, proba=False)
            out.pop("logits")
            return out
        res = self._results(X, maps, layers)
        out = {"proba": self._copy(res["proba"])} if proba else {}
        out.update({k: self._copy(res[k]) for k in maps})
        out.update({ly: self._copy(res[FEATURE + ly]) for ly in layers})
        return out

    @property
    def feature_network_(self) -> OnnxSegmenter:
        """The member whose feature maps :meth:`run` gives (``members_[feature_member]``)."""
        check_is_fitted(self, "members_")
        return self.members_[int(self._feature_member)]

    def layer_help(self) -> str:
        """As :meth:`uqseg.OnnxSegmenter.layer_help`, for the feature member."""
        return self.feature_network_.layer_help()

    @property
    def _binary(self) -> bool:
        """Channels are independent binary probabilities (sigmoid, or one probability)."""
        return self.activation_ == "sigmoid" or (self.activation_ == "none"
                                                 and self.n_classes_ == 1)

    def predict_proba(self, X):
        """Weighted mean of the samples' probabilities ``(N, K, *spatial)`` float32 (softmax,
        or per-channel sigmoid for sigmoid members)."""
        return self._copy(self._results(X, ())["proba"])

    def predict(self, X):
        """Labels ``(N, *spatial)``: argmax of :meth:`predict_proba`; for sigmoid (binary)
        outputs boolean masks ``(N, C, *spatial)``, mean probability >= 0.5."""
        proba = self._results(X, ())["proba"]
        if self._binary:
            return [p >= 0.5 for p in proba] if isinstance(proba, list) else proba >= 0.5
        if isinstance(proba, list):
            return [p.argmax(axis=0) for p in proba]
        return proba.argmax(axis=1)

    def transform(self, X):
        """Log of the mean probability ``(N, K, *spatial)`` float32 (for binary outputs its
        logit ``log p - log(1 - p)``), clipped at the smallest normal float32 so it stays
        finite; chains into a temperature calibrator as logits."""
        proba = self._results(X, ())["proba"]
        binary = self._binary

        def log(p):
            out = np.maximum(p, TINY)
            np.log(out, out=out)
            if binary:
                out -= np.log(np.maximum(1 - p, TINY))
            return out

        return [log(p) for p in proba] if isinstance(proba, list) else log(proba)

    def uncertainty(self, X, kind: str = "entropy"):
        """One voxel-wise uncertainty map ``(N, *spatial)`` float32.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays
        kind : {"entropy", "expected_entropy", "mutual_information", "variance"}
            ``entropy`` of the mean probability (total) = ``expected_entropy`` (mean entropy of
            the samples, aleatoric) + ``mutual_information`` (epistemic); ``variance`` of the
            probabilities over samples, averaged over classes.

        Returns
        -------
        ndarray ``(N, *spatial)`` (list for list input)
        """
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a string, got {type(kind).__name__}")
        return self._copy(self._results(X, (kind,))[kind])

    def segment_uncertainty(self, X, region: str = "segment") -> np.ndarray:
        """Segment-level uncertainty (Mehrtash et al.): per image and foreground class, the mean
        binary entropy of ``p_k`` over the predicted segment (NaN where it is empty).

        Returns
        -------
        ndarray ``(N, K - 1)``
        """
        proba = self._results(X, ())["proba"]
        if isinstance(proba, list):
            return np.concatenate([_segment_uncertainty(p[None], region=region) for p in proba])
        return _segment_uncertainty(proba, region=region)

    def predict_members(self, X, per_sample: bool = False):
        """Every member's probabilities, stacked: ``(M, N, K, *spatial)`` float32.

        Memory-heavy (``M`` full copies); the other methods stream instead.

        Parameters
        ----------
        X : array ``(N, C, *spatial)``
            Lists of differently sized images are not supported here.
        per_sample : bool, default=False
            False averages each member's MC passes and flips; True returns every sample
            ``(n_samples_, N, K, *spatial)``, weighted by ``sample_weights_``.

        Returns
        -------
        ndarray
        """
        check_is_fitted(self)
        X = self._check_X(X)
        if isinstance(X, list):
            if len({x.shape for x in X}) > 1:
                raise ValueError(
                    "predict_members needs images of one size (an array "
                    "(N, C, *spatial)); got a list of differently sized images"
                )
            X = np.stack(X)
        return self._engine().member_probabilities(X, per_sample)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags
