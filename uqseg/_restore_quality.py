"""What ``uqseg.load`` checks on the quality estimators (``QualityRegressor``,
``QualityFeatures``, ``QualityCNN``): learned state with a declared type, shape and range per
attribute, feature names that follow from the parameters, the segmenter they were fitted
around (see :mod:`uqseg._restore`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from uqseg._checks import (
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
    run_own,
    same,
)


def qr_params(est: Any, w: str) -> None:
    run_own(est._check_params, w)
    _estimator_param(est.estimator, f"{w}.estimator")
    reg = est.regressor
    if reg is not None and not isinstance(reg, (str, os.PathLike)) and not callable(
            getattr(reg, "predict", None)):
        raise TypeError(f"{w}.regressor: expected None, a model or a regressor, got {_short(reg)}")
    ref = est.reference
    for i, r in enumerate(ref if isinstance(ref, list) else [] if ref is None else [ref]):
        check_array(r, f"{w}.reference" + (f"[{i}]" if isinstance(ref, list) else ""),
                    kinds="fiu")


def qr_fitted(est: Any, s: dict, w: str) -> None:
    from uqseg import quality as q
    from uqseg.uncertainty import KINDS

    if not s:
        return
    typ, atl = s.get("typicality_"), s.get("atlas_")
    for key, v in (("typicality_", typ), ("atlas_", atl)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{w}.{key}: expected True or False, got {_short(v)}")
    opt = (["typicality_layer_", "reference_signatures_"] if typ else []) + \
        (["atlas_maps_", "atlas_blocks_"] if atl else [])
    check_keys(s, w, ("estimator_", "uncertainty_kind_", "typicality_", "atlas_", "n_classes_",
                      "input_kind_", "regressor_", "feature_names_", "fit_report_", *opt))
    seg = s["estimator_"]
    check_instance(seg, f"{w}.estimator_", SEGMENTER_CLASSES, fitted=True)
    sig = q.is_sigmoid(seg)
    k = check_int(s["n_classes_"], f"{w}.n_classes_", 1 if sig else 2)
    if k != seg.n_classes_:
        raise ValueError(f"{w}.n_classes_: {k} but estimator_ gives {seg.n_classes_} classes")
    kind = s["uncertainty_kind_"]
    ens = q._is_ensemble(seg)
    want = ("mutual_information" if ens else "entropy") if est.uncertainty == "auto" \
        else est.uncertainty
    check_choice(kind, f"{w}.uncertainty_kind_", (want,) if want in KINDS else KINDS)
    check_choice(s["input_kind_"], f"{w}.input_kind_", ("features", "maps"))
    names = q.feature_names(k, kind, int(est.n_bins), sig) + \
        (list(q.TYPICALITY_NAMES) if typ else []) + (q.atlas_names(k) if atl else [])
    if not same(s["feature_names_"], names):
        raise ValueError(f"{w}.feature_names_: do not match the parameters and n_classes_")
    reg = s["regressor_"]
    if isinstance(reg, (str, os.PathLike)):
        if s["input_kind_"] != "maps":
            raise ValueError(f"{w}.regressor_: an ONNX regressor reads maps, input_kind_ is "
                             f"{s['input_kind_']!r}")
    elif not callable(getattr(reg, "predict", None)):
        raise TypeError(f"{w}.regressor_: expected a fitted regressor, got {_short(reg)}")
    elif s["input_kind_"] == "features" and getattr(reg, "n_features_in_", len(names)) \
            != len(names):
        raise ValueError(f"{w}.regressor_: takes {reg.n_features_in_} features, "
                         f"feature_names_ has {len(names)}")
    if typ:
        member = getattr(q._feature_member(seg), "feature_network_", seg)
        if s["typicality_layer_"] != q._typicality_layer(member):
            raise ValueError(f"{w}.typicality_layer_: restored "
                             f"{_short(s['typicality_layer_'])}, the network gives "
                             f"{q._typicality_layer(member)!r}")
        c = _layer_channels(member).get(s["typicality_layer_"])
        check_array(s["reference_signatures_"], f"{w}.reference_signatures_", ndim=2,
                    shape=(None, c))
    if atl:
        if seg.spatial_dims_ != 2:
            raise ValueError(f"{w}.atlas_: atlas features need 2-D images")
        maps = check_array(s["atlas_maps_"], f"{w}.atlas_maps_",
                           shape=(None, k - 1, q.ATLAS_GRID, q.ATLAS_GRID), lo=0, hi=1)
        check_array(s["atlas_blocks_"], f"{w}.atlas_blocks_", kinds="i",
                    shape=(maps.shape[0],), lo=0, hi=q.ATLAS_FOLDS - 1)
    fit_report(s["fit_report_"], w)


def fit_report(rep: Any, w: str) -> None:
    if not isinstance(rep, dict) or set(rep) != {"mae", "pearson_r", "spearman_rho", "n"}:
        raise ValueError(f"{w}.fit_report_: expected a dict of mae, pearson_r, spearman_rho, n")
    for key in ("mae", "pearson_r", "spearman_rho"):
        check_real(rep[key], f"{w}.fit_report_[{key!r}]", nan=True)
    check_int(rep["n"], f"{w}.fit_report_['n']", 0)


def segmenter_and_kind(est: Any, s: dict, w: str) -> int:
    """Checks ``estimator_``, ``n_classes_`` and ``uncertainty_kind_``; returns the class count."""
    from uqseg.quality_features import is_ensemble, is_sigmoid
    from uqseg.uncertainty import KINDS

    seg = s["estimator_"]
    check_instance(seg, f"{w}.estimator_", SEGMENTER_CLASSES, fitted=True)
    k = check_int(s["n_classes_"], f"{w}.n_classes_", 1 if is_sigmoid(seg) else 2)
    if k != seg.n_classes_:
        raise ValueError(f"{w}.n_classes_: {k} but estimator_ gives {seg.n_classes_} classes")
    want = ("mutual_information" if is_ensemble(seg) else "entropy") \
        if est.uncertainty == "auto" else est.uncertainty
    check_choice(s["uncertainty_kind_"], f"{w}.uncertainty_kind_",
                 (want,) if want in KINDS else KINDS)
    return k


def qf_fitted(est: Any, s: dict, w: str) -> None:
    from uqseg.quality_features import feature_names, is_sigmoid

    if not s:
        return
    check_keys(s, w, ("estimator_", "uncertainty_kind_", "n_classes_", "feature_names_"))
    k = segmenter_and_kind(est, s, w)
    if not same(s["feature_names_"], feature_names(k, s["uncertainty_kind_"], int(est.n_bins),
                                                   is_sigmoid(s["estimator_"]))):
        raise ValueError(f"{w}.feature_names_: do not match the parameters and n_classes_")


def qcnn_params(est: Any, w: str) -> None:
    run_own(est._check_params, w)
    _estimator_param(est.estimator, f"{w}.estimator")


def qcnn_fitted(est: Any, s: dict, w: str) -> None:
    if not s:
        return
    check_keys(s, w, ("estimator_", "uncertainty_kind_", "n_classes_", "fit_report_"))
    segmenter_and_kind(est, s, w)
    fit_report(s["fit_report_"], w)
