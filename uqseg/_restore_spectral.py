"""Load-time checks of :class:`uqseg.ood.SpectralOODDetector` and its descriptors (part of
:mod:`uqseg._restore`), and the migration of folders written before descriptor objects.

Format 1 (uqseg before descriptor objects) stored the detector's keywords (``grid``,
``layout_grid``, ``descriptor`` ...) and one training matrix ``descriptors_`` with
``n_spectral_`` spectral columns; :func:`migrate` turns those parameters into descriptor nodes
before anything is decoded, and :func:`spectral_fitted` splits the matrix into the fitted
descriptors, then checks the result as a folder of today.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from uqseg._checks import (
    SEGMENTER_CLASSES,
    _short,
    check_array,
    check_choice,
    check_instance,
    check_int,
    check_keys,
    check_real,
    check_str,
    check_str_list,
    close,
    fitted_state,
    run_own,
    same,
)

DESCRIPTOR_CLASSES = ("uqseg.ood.Spectrum", "uqseg.ood.Layout")
_LAYOUT_STATS = ("mean_", "scale_", "components_")
_DERIVED = ("dist_stats_", "train_scores_", "offset_", "threshold_", "n_train_")


def _is_layout(est: Any) -> bool:
    return type(est).__name__ == "Layout"


# ---------------------------------------------------------------------------- descriptors
def descriptor_params(est: Any, w: str) -> None:
    from sklearn.neighbors import VALID_METRICS

    from uqseg._restore import _layer

    run_own(est._check_params, w)
    if _is_layout(est):
        check_str(est.layer, f"{w}.layer")
    else:
        if est.layer is not None:
            _layer(est.layer, f"{w}.layer")
        check_choice(est.metric, f"{w}.metric", VALID_METRICS["brute"])


def descriptor_fitted(est: Any, s: dict, w: str, *, required: bool = False) -> None:
    """Types and shapes of a fitted descriptor (its statistics are recomputed by the
    detector's check, which knows the network)."""
    if not s and not required:
        return
    layout = _is_layout(est)
    check_keys(s, w, ("layers_", "features_", *(_LAYOUT_STATS if layout else ())))
    layers = check_str_list(s["layers_"], f"{w}.layers_")
    if layout and len(layers) != 1:
        raise ValueError(f"{w}.layers_: a Layout reads one layer, got {_short(layers)}")
    F = check_array(s["features_"], f"{w}.features_", ndim=2)
    if F.shape[0] < 1 or F.shape[1] < 1:
        raise ValueError(f"{w}.features_: expected at least one training image, got {F.shape}")
    if layout:
        p = F.shape[1]
        check_array(s["mean_"], f"{w}.mean_", shape=(p,))
        scale = check_array(s["scale_"], f"{w}.scale_", shape=(p,))
        if (scale <= 0).any():
            raise ValueError(f"{w}.scale_: must be positive")
        comp = check_array(s["components_"], f"{w}.components_", shape=(None, p))
        if comp.shape[0] < 1:
            raise ValueError(f"{w}.components_: expected at least one axis")


# ---------------------------------------------------------------------------- detector
def spectral_params(est: Any, w: str) -> None:
    from uqseg._restore import _estimator_param, _layer

    descs = est.descriptors
    if descs is not None:
        if not isinstance(descs, (list, tuple)):
            raise TypeError(f"{w}.descriptors: expected None or a list of descriptors, got "
                            f"{_short(descs)}")
        for i, d in enumerate(descs):
            check_instance(d, f"{w}.descriptors[{i}]", DESCRIPTOR_CLASSES)
    run_own(est._check_params, w)
    _estimator_param(est.estimator, f"{w}.estimator")
    _layer(est.layer, f"{w}.layer")


def _width(d: Any, ch: dict, spatial_dims: int) -> int | None:
    """Columns of a descriptor's rows from the layers' channels (None: a channel count is
    unknown)."""
    if not all(ch.get(n) for n in d.layers_):
        return None
    c = sum(ch[n] for n in d.layers_)
    if not _is_layout(d):
        return c  # one singular value per channel, whatever the grid
    g = d.grid
    return c * int(np.prod(g) if isinstance(g, (list, tuple)) else g ** spatial_dims)


def spectral_fitted(est: Any, s: dict, w: str) -> None:
    """The fitted descriptors must be copies of ``descriptors`` with the layers that the
    network gives and rows of the widths its channels give; every statistic is recomputed from
    the saved training rows and must match."""
    from uqseg._restore import _layer_channels

    if not s:
        return
    if "n_spectral_" in s or isinstance(s.get("descriptors_"), np.ndarray):
        s = _from_format1(est, s, w)
    check_keys(s, w, ("estimator_", "layers_", "descriptors_", *_DERIVED))
    check_instance(s["estimator_"], f"{w}.estimator_", SEGMENTER_CLASSES, fitted=True)
    descs, want = s["descriptors_"], est._descriptor_list()
    if not isinstance(descs, list) or len(descs) != len(want):
        raise ValueError(f"{w}.descriptors_: expected a list of {len(want)} fitted descriptors "
                         f"(one per entry of descriptors), got {_short(descs)}")
    probe = object.__new__(type(est))  # _setup resolves the layers without touching est
    probe.__dict__.update(est.__dict__)
    run_own(probe._setup, w)
    seg = getattr(s["estimator_"], "feature_network_", s["estimator_"])
    if not same(s["layers_"], probe.layers_):
        raise ValueError(f"{w}.layers_: restored {_short(s['layers_'])}, the parameters and "
                         f"network give {_short(probe.layers_)}")
    ch = _layer_channels(seg)
    n = None
    for i, (d, p) in enumerate(zip(descs, probe.descriptors_, strict=True)):
        wi = f"{w}.descriptors_[{i}]"
        check_instance(d, wi, DESCRIPTOR_CLASSES)
        if any(d is q for q in want):
            raise ValueError(f"{wi}: is the object of descriptors[{i}] itself, not a fitted copy")
        if type(d) is not type(p) or not same(d.get_params(), p.get_params()):
            raise ValueError(f"{wi}: {_short(d)} is not a fitted copy of descriptors[{i}] "
                             f"({_short(p)})")
        descriptor_fitted(d, fitted_state(d), wi, required=True)
        if not same(d.layers_, p.layers_):
            raise ValueError(f"{wi}.layers_: restored {_short(d.layers_)}, the parameters and "
                             f"network give {_short(p.layers_)}")
        rows, cols = d.features_.shape
        if n is not None and rows != n:
            raise ValueError(f"{wi}.features_: {rows} images, descriptors_[0] holds {n}")
        n = rows
        width = _width(d, ch, seg.spatial_dims_)
        if width is not None and cols != width:
            raise ValueError(f"{wi}.features_: width {cols} does not match the network's "
                             f"feature layers ({width})")
    saved = {k: s[k] for k in _DERIVED}
    if check_int(saved["n_train_"], f"{w}.n_train_", 1) != n:
        raise ValueError(f"{w}.n_train_: {saved['n_train_']} but the descriptors hold {n} images")
    for k in ("offset_", "threshold_"):
        check_real(saved[k], f"{w}.{k}")
    check_array(saved["dist_stats_"], f"{w}.dist_stats_", shape=(len(descs), 2))
    check_array(saved["train_scores_"], f"{w}.train_scores_", shape=(n,))
    stats = [{k: getattr(d, k) for k in _LAYOUT_STATS} if _is_layout(d) else {} for d in descs]
    try:  # the statistics again, from the training rows
        est._refit()
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{w}.descriptors_: the saved training data do not fit: {exc}") from exc
    except Exception as exc:  # numerical failures (e.g. singular matrices) on hostile data
        raise ValueError(f"{w}.descriptors_: the saved training data do not fit: "
                         f"{type(exc).__name__}: {exc}") from exc
    checks = [(f"{w}.{k}", v, getattr(est, k), False) for k, v in saved.items()]
    checks += [(f"{w}.descriptors_[{i}].{k}", v, getattr(d, k), k == "components_")
               for i, (d, st) in enumerate(zip(descs, stats, strict=True)) for k, v in st.items()]
    for where, got, new, signs in checks:
        if not close(got, new, signs=signs):
            raise ValueError(f"{where}: does not match the statistics of the saved training data")
    est.__dict__.update(saved)  # keep the saved values bit for bit
    for d, st in zip(descs, stats, strict=True):
        d.__dict__.update(st)
    est._cache = {}


# ---------------------------------------------------------------------------- format 1
def migrate(raw: dict, w: str) -> dict:
    """Format-1 parameters (no ``descriptors``; ``grid=``, ``layout_grid=``, ``descriptor=``
    ...) -> the ``descriptors`` list they meant, as manifest nodes (decoded and checked as any
    other)."""
    from uqseg.ood._spectral import DESCRIPTORS, OLD_KEYWORDS, OLD_LAYOUT, OLD_SPECTRUM
    from uqseg.persistence import _TAG

    if "descriptors" in raw:  # today's format (the old keywords are deprecated parameters)
        return raw
    old = {k: raw[k] for k in OLD_KEYWORDS if k in raw}
    kind = old.get("descriptor", "spectrum+layout")
    check_choice(kind, f"{w}.descriptor", DESCRIPTORS)

    def node(i: int, cls: str, names: dict) -> dict:
        # ids below zero: never used by uqseg.save, so no clash with the folder's own
        return {_TAG: "estimator", "id": -1 - i, "class": f"uqseg.ood.{cls}", "fitted": {},
                "params": {names[k]: v for k, v in old.items() if k in names}}

    out = {k: v for k, v in raw.items() if k not in old}
    out["descriptors"] = [node(0, "Spectrum", OLD_SPECTRUM)] + (
        [node(1, "Layout", OLD_LAYOUT)] if kind == "spectrum+layout" else [])
    return out


def _from_format1(est: Any, s: dict, w: str) -> dict:
    """Format-1 fitted state (one training matrix) -> fitted descriptors; ``est`` updated."""
    from sklearn.base import clone

    want = est._descriptor_list()
    layout = len(want) == 2
    check_keys(s, w, ("estimator_", "descriptors_", "layers_", "layout_layer_", "n_spectral_",
                      *_DERIVED, *(("layout_mean_", "layout_scale_", "layout_components_")
                                   if layout else ())))
    D = check_array(s["descriptors_"], f"{w}.descriptors_", ndim=2)
    nsp = check_int(s["n_spectral_"], f"{w}.n_spectral_", 1, D.shape[1])
    if layout == (nsp == D.shape[1]):
        raise ValueError(f"{w}.n_spectral_: {nsp} does not fit descriptors_ of width "
                         f"{D.shape[1]}")
    descs = [clone(d) for d in want]
    descs[0].layers_ = check_str_list(s["layers_"], f"{w}.layers_")
    descs[0].features_ = np.ascontiguousarray(D[:, :nsp])
    if layout:
        descs[1].layers_ = [check_str(s["layout_layer_"], f"{w}.layout_layer_")]
        descs[1].features_ = np.ascontiguousarray(D[:, nsp:])
        for k in _LAYOUT_STATS:
            setattr(descs[1], k, s[f"layout_{k}"])
    elif s["layout_layer_"] is not None:
        raise ValueError(f"{w}.layout_layer_: expected None without the layout part")
    for k in s:
        est.__dict__.pop(k, None)
    new = {k: s[k] for k in ("estimator_", "layers_", *_DERIVED)}
    new["descriptors_"] = descs
    est.__dict__.update(new)
    return new
