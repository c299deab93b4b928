"""What ``uqseg.load`` checks on every estimator it rebuilds from an untrusted folder.

One entry of :data:`CHECKS` per class that may be stored field by field (the exact class
allowlist of :mod:`uqseg.persistence`): which parameters must be model references or
estimators in the manifest (so that no plain string is ever used as a file path), a check of
the parameters and a check of the restored fitted state. Fitted state is checked in one of
three ways, the strongest that applies:

- derived from the model files alone (``OnnxSegmenter``, ``EnsembleSegmenter``): ``fit`` is run
  again on a clone and every restored attribute must equal what it gives;
- derived from saved training data (the OOD detectors; the spectral detector and its
  descriptors in :mod:`uqseg._restore_spectral`, which also migrates folders of the earlier
  format): the data are checked (shape, dtype, finite, consistent with the network's layers),
  the statistics are recomputed from them and every restored one must match;
- learned (``TemperatureCalibrator``, ``QualityRegressor``): a declared type, shape, dtype
  and range per attribute, plus the relations between attributes.

Every failure is a ValueError or TypeError whose message starts with the key path in the
manifest (``estimator.steps[1][1].temperature_``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uqseg import _restore_quality as _rq
from uqseg import _restore_spectral as _rs
from uqseg._checks import (
    _SCORERS,
    SEGMENTER_CLASSES,
    _estimator_param,
    _layer_channels,
    _short,
    check_array,
    check_choice,
    check_instance,
    check_int,
    check_keys,
    check_real,
    check_side_effects,
    check_str,
    check_str_list,
    close,
    fitted_state,
    refit_compare,
    run_own,
    same,
)

__all__ = ["CHECKS", "Spec", "check_side_effects", "fitted_state", "same"]

# node kinds a parameter may hold in the manifest ("model": a model node, "estimator": an
# estimator, ref or skops node, "none": null)
MODEL, ESTIMATOR, NONE = "model", "estimator", "none"


@dataclass(frozen=True)
class Spec:
    params: Callable[[Any, str], None]
    fitted: Callable[[Any, dict, str], None]
    # parameter -> node kinds allowed in the manifest; "members" style lists use ("list", kinds)
    node_kinds: dict[str, tuple] = field(default_factory=dict)
    fitted_node_kinds: dict[str, tuple] = field(default_factory=dict)
    # raw manifest parameters of an older format -> today's (before any is decoded)
    migrate: Callable[[dict, str], dict] | None = None


# ---------------------------------------------------------------------------- parameters
def _device(v: Any, where: str) -> None:
    from uqseg import backends

    check_str(v, where)
    dev = v.split(":", 1)[0] if v.startswith("cuda:") and v[5:].isdigit() else v
    check_choice(dev, where, backends.DEVICES)


def _batch_size(v: Any, where: str) -> None:
    if not (isinstance(v, str) and v == "auto"):
        check_int(v, where, 1)


def _tta(v: Any, where: str) -> None:
    if v is None or (isinstance(v, str) and v == "flips"):
        return
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{where}: expected None, 'flips' or a list of axis tuples, got "
                        f"{_short(v)}")
    for i, item in enumerate(v):
        for a in item if isinstance(item, (list, tuple)) else (item,):
            check_int(a, f"{where}[{i}]", 0, 2)


def _engine(est: Any, where: str) -> None:
    from uqseg import backends

    check_choice(est.backend, f"{where}.backend", backends.BACKENDS)
    _device(est.device, f"{where}.device")
    _batch_size(est.batch_size, f"{where}.batch_size")
    _tta(est.tta, f"{where}.tta")


def _model_path(v: Any, where: str) -> None:
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{where}: expected a model stored in the folder, got {_short(v)}")


def _seg_params(est: Any, w: str) -> None:
    from uqseg import backends
    from uqseg.backends._checks import ACTIVATIONS

    _model_path(est.model, f"{w}.model")
    _engine(est, w)
    check_choice(est.precision, f"{w}.precision", backends.PRECISIONS)
    check_choice(est.activation, f"{w}.activation", ("auto", *ACTIVATIONS))
    if est.output is not None and not (isinstance(est.output, str) and 0 < len(est.output) < 4096):
        raise TypeError(f"{w}.output: expected None or the name of a model output, got "
                        f"{_short(est.output)}")
    if check_real(est.overlap, f"{w}.overlap", 0, 1) >= 1:
        raise ValueError(f"{w}.overlap: expected a number in [0, 1), got {est.overlap!r}")


def _ens_params(est: Any, w: str) -> None:
    from uqseg import backends

    run_own(est._check_params, w)
    _engine(est, w)
    check_choice(getattr(est, "precision", "fp32"), f"{w}.precision", backends.PRECISIONS)
    if not isinstance(est.members, (list, tuple)) or not est.members:
        raise TypeError(f"{w}.members: expected a non-empty list, got {_short(est.members)}")
    for i, m in enumerate(est.members):
        if not isinstance(m, (str, os.PathLike)):
            check_instance(m, f"{w}.members[{i}]", SEGMENTER_CLASSES[:1])
    if est.weights is not None:
        wt = np.asarray(est.weights) if isinstance(est.weights, (list, tuple)) else est.weights
        check_array(wt, f"{w}.weights", ndim=1, kinds="fiu", shape=(len(est.members),))
        if (wt <= 0).any():
            raise ValueError(f"{w}.weights: must be positive, got {_short(est.weights)}")


def _cal_params(est: Any, w: str) -> None:
    run_own(est._check_params, w)
    _estimator_param(est.estimator, f"{w}.estimator", none=True)


def _layer(v: Any, where: str) -> None:
    if not isinstance(v, str):
        check_str_list(v, where)


def _ood_params(est: Any, w: str) -> None:
    run_own(est._check_common, w)
    _estimator_param(est.estimator, f"{w}.estimator")
    if hasattr(est, "_setup_params"):
        run_own(est._setup_params, w)
        _layer(est.layer, f"{w}.layer")
    if hasattr(est, "SCORES"):
        check_choice(est.score, f"{w}.score", est.SCORES)
        check_choice(est.region, f"{w}.region", est.REGIONS)


def _pipe_params(est: Any, w: str) -> None:
    steps = est.steps
    if not isinstance(steps, list) or not steps:
        raise TypeError(f"{w}.steps: expected a non-empty list of (name, estimator) tuples")
    names = set()
    for i, step in enumerate(steps):
        if not (isinstance(step, tuple) and len(step) == 2 and isinstance(step[0], str)):
            raise TypeError(f"{w}.steps[{i}]: expected a (name, estimator) tuple, got "
                            f"{_short(step)}")
        if step[0] in names or "__" in step[0]:
            raise ValueError(f"{w}.steps[{i}][0]: step names must be unique and free of '__', "
                             f"got {step[0]!r}")
        names.add(step[0])
        if not (step[1] is None or step[1] == "passthrough" or hasattr(step[1], "get_params")):
            raise TypeError(f"{w}.steps[{i}][1]: expected an estimator, got {_short(step[1])}")
    if not isinstance(est.verbose, bool):
        raise TypeError(f"{w}.verbose: expected True or False, got {_short(est.verbose)}")
    if getattr(est, "transform_input", None) is not None:
        raise ValueError(f"{w}.transform_input: must be None in a loaded folder")


# ---------------------------------------------------------------------------- fitted state
def _cal_fitted(est: Any, s: dict, w: str) -> None:
    from uqseg.calibration import CONFIDENCE_EDGES, LOG_T_BOUNDS

    if not s:
        return
    local = est.mode == "local"
    check_keys(s, w, ("temperature_", "n_classes_", "n_voxels_fit_", "n_voxels_sampled_",
                      "nll_before_", "nll_after_", "ece_before_", "ece_after_", "n_iter_",
                      "estimator_", "sample_",
                      *(("coef_", "intercept_", "feature_names_") if local else ())),
               ("activation_",))
    check_choice(s.get("activation_", "softmax"), f"{w}.activation_", ("softmax", "sigmoid"))
    sig = s.get("activation_") == "sigmoid"
    k = check_int(s["n_classes_"], f"{w}.n_classes_", 1 if sig else 2, 1 << 16)
    rows, kt = (1, 2 * k) if sig else (k, k)  # sigmoid: one logit per entry, target 2 c + y
    lo, hi = (math.exp(b) for b in LOG_T_BOUNDS)
    lo, hi = lo * (1 - 1e-9), hi * (1 + 1e-9)
    if est.mode == "classwise":
        check_array(s["temperature_"], f"{w}.temperature_", shape=(k,), lo=lo, hi=hi)
    else:
        check_real(s["temperature_"], f"{w}.temperature_", lo, hi)
    for key in ("nll_before_", "nll_after_"):
        check_real(s[key], f"{w}.{key}", 0)
    for key in ("ece_before_", "ece_after_"):
        check_real(s[key], f"{w}.{key}", 0, 1, nan=est.mode == "classwise")
    check_int(s["n_iter_"], f"{w}.n_iter_", 0)
    sub = s["estimator_"]
    if sub is not None:
        check_instance(sub, f"{w}.estimator_", _SCORERS)
        if sub is est or getattr(sub, "n_classes_", k) != k:
            raise ValueError(f"{w}.estimator_: gives {getattr(sub, 'n_classes_', '?')} classes, "
                             f"n_classes_ is {k}")
        if getattr(sub, "activation_", "softmax") != s.get("activation_", "softmax"):
            raise ValueError(f"{w}.activation_: does not match the estimator_'s outputs")
    smp = s["sample_"]
    want = {"scores", "labels", "strata", "keys", "counts"} | ({"features"} if local else set())
    if not isinstance(smp, dict) or set(smp) != want:
        raise ValueError(f"{w}.sample_: expected a dict of {', '.join(sorted(want))}")
    nb = len(CONFIDENCE_EDGES) + 1
    scores = check_array(smp["scores"], f"{w}.sample_['scores']", ndim=2)
    if scores.shape[0] != rows:
        raise ValueError(f"{w}.n_classes_: {k} but sample_['scores'] holds {scores.shape[0]} "
                         "classes")
    n = scores.shape[1]
    labels = check_array(smp["labels"], f"{w}.sample_['labels']", kinds="i", shape=(n,),
                         lo=0, hi=kt - 1)
    strata = check_array(smp["strata"], f"{w}.sample_['strata']", kinds="i", shape=(n,),
                         lo=0, hi=kt * nb - 1)
    check_array(smp["keys"], f"{w}.sample_['keys']", shape=(n,), lo=0, hi=1)
    counts = check_array(smp["counts"], f"{w}.sample_['counts']", kinds="i", shape=(kt * nb,),
                         lo=0)
    if (strata // nb != labels).any():
        raise ValueError(f"{w}.sample_['strata']: does not match sample_['labels']")
    if (np.bincount(strata, minlength=kt * nb) > counts).any():
        raise ValueError(f"{w}.sample_['counts']: fewer voxels than the sample holds")
    if check_int(s["n_voxels_sampled_"], f"{w}.n_voxels_sampled_", 0) != n:
        raise ValueError(f"{w}.n_voxels_sampled_: {s['n_voxels_sampled_']} but the sample "
                         f"holds {n}")
    if check_int(s["n_voxels_fit_"], f"{w}.n_voxels_fit_", 0) != int(counts.sum()):
        raise ValueError(f"{w}.n_voxels_fit_: does not match sample_['counts']")
    if local:
        _local_fitted(est, s, k, n, w, sig)


def _local_fitted(est: Any, s: dict, k: int, n: int, w: str, sig: bool = False) -> None:
    """The local map: feature names that the parameters give, one finite coefficient per
    feature, and a feature row per sampled voxel."""
    from uqseg._local import feature_names, sigmoid_feature_names

    names = s["feature_names_"]
    check_str_list(names, f"{w}.feature_names_")
    c = sum(str(v).startswith("intensity[") for v in names)
    if c and (est.estimator is None or not est.use_image):
        raise ValueError(f"{w}.feature_names_: intensity features need an estimator and "
                         "use_image=True")
    names_of = sigmoid_feature_names if sig else feature_names
    if not same(list(names), names_of(k, tuple(float(v) for v in est.scales), c)):
        raise ValueError(f"{w}.feature_names_: do not match the parameters (scales) and "
                         "n_classes_")
    f = len(names)
    check_array(s["coef_"], f"{w}.coef_", shape=(f,))
    check_real(s["intercept_"], f"{w}.intercept_")
    check_array(s["sample_"]["features"], f"{w}.sample_['features']", shape=(f, n))


_DERIVED = {"MahalanobisOODDetector": ("pca_mean_", "components_", "mean_", "precision_")}


def _ood_fitted(est: Any, s: dict, w: str) -> None:
    if not s:
        return
    name, train = type(est).__name__, est._train_attr
    derived = [*_DERIVED.get(name, ()), "train_scores_", "offset_", "threshold_", "n_train_"]
    extra = ["layers_"] if hasattr(est, "_setup_params") else []
    check_keys(s, w, ("estimator_", train, *extra, *derived))
    check_instance(s["estimator_"], f"{w}.estimator_", SEGMENTER_CLASSES, fitted=True)
    D = check_array(s[train], f"{w}.{train}", ndim=2)
    if D.shape[0] < 1 or D.shape[1] < 1:
        raise ValueError(f"{w}.{train}: expected at least one training image, got {D.shape}")
    width = None
    if extra:
        probe = object.__new__(type(est))  # _setup resolves the layers without touching est
        probe.__dict__.update(est.__dict__)
        run_own(probe._setup, w)
        for key in extra:
            if key in s and not same(s[key], getattr(probe, key)):
                raise ValueError(f"{w}.{key}: restored {_short(s[key])}, the parameters and "
                                 f"network give {_short(getattr(probe, key))}")
        seg = getattr(s["estimator_"], "feature_network_", s["estimator_"])
        ch = _layer_channels(seg)
        width = sum(ch.get(n) or 0 for n in s["layers_"]) \
            if all(ch.get(n) for n in s["layers_"]) else None
    elif D.shape[1] != 1:
        raise ValueError(f"{w}.{train}: expected one column, got shape {D.shape}")
    if width is not None and D.shape[1] != width:
        raise ValueError(f"{w}.{train}: width {D.shape[1]} does not match the network's feature "
                         f"layers ({width})")
    saved = {k: s[k] for k in derived}
    for k in derived:
        v = saved[k]
        if k == "n_train_":
            if check_int(v, f"{w}.{k}", 1) != D.shape[0]:
                raise ValueError(f"{w}.{k}: {v} but {train} holds {D.shape[0]} images")
        elif k in ("offset_", "threshold_"):
            check_real(v, f"{w}.{k}")
        elif not (v is None and k in ("pca_mean_", "components_")):
            check_array(v, f"{w}.{k}")
    try:  # the statistics again, from the training descriptors
        est._refit()
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{w}.{train}: the saved training data do not fit: {exc}") from exc
    except Exception as exc:  # numerical failures (e.g. singular matrices) on hostile data
        raise ValueError(f"{w}.{train}: the saved training data do not fit: "
                         f"{type(exc).__name__}: {exc}") from exc
    for k in derived:
        got, want = saved[k], getattr(est, k)
        ok = (got is None and want is None) if got is None or want is None else close(
            got, want, signs=k in ("layout_components_", "components_"))
        if not ok:
            raise ValueError(f"{w}.{k}: does not match the statistics of the saved training data")
    est.__dict__.update(saved)  # keep the saved values bit for bit
    est._cache = {}


def _pipe_fitted(est: Any, s: dict, w: str) -> None:
    check_keys(s, w, ())
    for i, (_, step) in enumerate(est.steps[1:], start=1):
        # a fitted step that reads scores (estimator=None) needs a step before it giving them,
        # with its number of classes
        k = getattr(step, "n_classes_", None)
        if k is None or getattr(step, "estimator", 0) is not None:
            continue
        prev = est.steps[i - 1][1]
        if getattr(prev, "n_classes_", None) != k:
            raise ValueError(f"{w}.steps[{i}][1].n_classes_: {k}, the step before gives "
                             f"{getattr(prev, 'n_classes_', 'no scores')}")


def _crc_params(est: Any, w: str) -> None:
    run_own(est._check_params, w)
    _estimator_param(est.estimator, f"{w}.estimator", none=True)
    if est.classes is not None:
        check_array(np.asarray(est.classes), f"{w}.classes", ndim=1, kinds="iu", lo=0)


def _crc_fitted(est: Any, s: dict, w: str) -> None:
    """Checked statistics; every learned attribute recomputed from them must match."""
    from sklearn.base import clone

    if not s:
        return
    derived = ("classes_", "threshold_index_", "lambda_", "empirical_risk_", "n_calibration_",
               "n_images_", "method_", "set_error_")
    sets = ("set_threshold_index_", "set_quantile_", "mean_set_size_")
    check_keys(s, w, ("stats_", "n_classes_", "target_kind_", "estimator_", *derived), sets)
    k = check_int(s["n_classes_"], f"{w}.n_classes_", 1, 1 << 16)
    check_choice(s["target_kind_"], f"{w}.target_kind_", ("labels", "indicator"))
    stats, nb = s["stats_"], int(est.n_bins)
    hist = ("true", "all", "set_true", "set_all") if s["target_kind_"] == "labels" else (
        "true", "all")
    if not isinstance(stats, dict) or not {"true", "all", "n_voxels"} <= set(stats):
        raise ValueError(f"{w}.stats_: expected a dict of {', '.join(hist)}, n_voxels")
    if set(stats) != {*hist, "n_voxels"}:
        raise ValueError(f"{w}.target_kind_: {s['target_kind_']!r} does not match the saved "
                         f"statistics ({', '.join(sorted(stats))})")
    width = getattr(stats["true"], "shape", (0, 0))[1:2]
    if width != (k,):
        raise ValueError(f"{w}.n_classes_: {k} but stats_ holds {width} classes")
    nvox = check_array(stats["n_voxels"], f"{w}.stats_['n_voxels']", ndim=1, kinds="iu", lo=0)
    n = nvox.shape[0]
    if n < 1:
        raise ValueError(f"{w}.stats_['n_voxels']: no calibration image")
    for key in hist:
        h = check_array(stats[key], f"{w}.stats_[{key!r}]", kinds="iu", lo=0,
                        shape=(n, k, nb + 1))
        if (h.sum(axis=2) > nvox[:, None]).any():
            raise ValueError(f"{w}.stats_[{key!r}]: more voxels than n_voxels")
    if (stats["true"] > stats["all"]).any():
        raise ValueError(f"{w}.stats_['true']: more truth voxels than voxels in a bin")
    sub = s["estimator_"]
    if (sub is None) != (est.estimator is None):
        raise ValueError(f"{w}.estimator_: must be None exactly when estimator is None")
    if sub is not None:
        check_instance(sub, f"{w}.estimator_", _SCORERS)
        if getattr(sub, "n_classes_", k) != k:
            raise ValueError(f"{w}.estimator_: gives {getattr(sub, 'n_classes_', '?')} classes, "
                             f"n_classes_ is {k}")
    fresh = clone(est)
    fresh.stats_, fresh.n_classes_, fresh.target_kind_ = stats, k, s["target_kind_"]
    try:
        fresh._solve_all()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{w}.stats_: the saved statistics do not calibrate: {exc}") from exc
    want = {key: getattr(fresh, key) for key in (*derived, *sets) if hasattr(fresh, key)}
    check_keys(s, w, ("stats_", "n_classes_", "target_kind_", "estimator_", *want))
    for key, value in want.items():
        if not same(s[key], value):
            raise ValueError(f"{w}.{key}: restored {_short(s[key])} but the saved statistics "
                             f"give {_short(value)}")

_SEG_NODE = (MODEL, ESTIMATOR)
CHECKS: dict[str, Spec] = {
    "uqseg.segmenter.OnnxSegmenter": Spec(_seg_params, refit_compare, {"model": (MODEL,)}),
    "uqseg.ensemble.EnsembleSegmenter": Spec(_ens_params, refit_compare,
                                             {"members": ("list", _SEG_NODE)},
                                             {"members_": ("list", (ESTIMATOR,))}),
    "uqseg.calibration.TemperatureCalibrator": Spec(_cal_params, _cal_fitted,
                                                    {"estimator": (NONE, *_SEG_NODE)},
                                                    {"estimator_": (NONE, ESTIMATOR)}),
    **{f"uqseg.ood.{n}": Spec(_ood_params, _ood_fitted, {"estimator": _SEG_NODE},
                              {"estimator_": (ESTIMATOR,)})
       for n in ("UncertaintyOODDetector", "MahalanobisOODDetector", "KNNOODDetector")},
    "uqseg.ood.SpectralOODDetector": Spec(_rs.spectral_params, _rs.spectral_fitted,
                                          {"estimator": _SEG_NODE}, {"estimator_": (ESTIMATOR,)},
                                          migrate=_rs.migrate),
    **{name: Spec(_rs.descriptor_params, _rs.descriptor_fitted)
       for name in _rs.DESCRIPTOR_CLASSES},
    "uqseg.quality.QualityRegressor": Spec(_rq.qr_params, _rq.qr_fitted,
                                           {"estimator": _SEG_NODE,
                                            "regressor": (NONE, *_SEG_NODE)},
                                           {"estimator_": (ESTIMATOR,),
                                            "regressor_": _SEG_NODE}),
    "uqseg.quality_features.QualityFeatures": Spec(_rq.qcnn_params, _rq.qf_fitted,
                                                   {"estimator": _SEG_NODE},
                                                   {"estimator_": (ESTIMATOR,)}),
    "uqseg.quality_cnn.QualityCNN": Spec(_rq.qcnn_params, _rq.qcnn_fitted,
                                         {"estimator": _SEG_NODE, "model": (MODEL,)},
                                         {"estimator_": (ESTIMATOR,)}),
    "uqseg.conformal.ConformalRiskController": Spec(_crc_params, _crc_fitted,
                                                    {"estimator": (NONE, *_SEG_NODE)},
                                                    {"estimator_": (NONE, ESTIMATOR)}),
    "sklearn.pipeline.Pipeline": Spec(_pipe_params, _pipe_fitted),
}
