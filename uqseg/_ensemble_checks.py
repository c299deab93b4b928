"""Checks of an :class:`uqseg.EnsembleSegmenter`: its parameters, its members (fitted copies
that must agree), weights, test-time flips and MC passes at ``fit``; the maps and layers asked
of it at call time. Pure validation: nothing here runs a network but the members' own ``fit``.
"""

from __future__ import annotations

import os
from itertools import product

import numpy as np
from sklearn.base import clone

from uqseg._inference import check_batch_size
from uqseg._model_interface import check_activation
from uqseg.segmenter import PRECISIONS, OnnxSegmenter
from uqseg.uncertainty import KINDS


def check_params(ens) -> None:
    """The ensemble's parameters (everything that needs no fitted member)."""
    check_batch_size(ens.batch_size)
    if ens.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {ens.precision!r}; choose one of {PRECISIONS}")
    check_activation(getattr(ens, "activation", "auto"))  # saved before the parameter: auto
    for name in ("mc_samples", "cache_size"):
        v = getattr(ens, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if ens.seed is not None and (
        isinstance(ens.seed, bool)
        or not isinstance(ens.seed, (int, np.integer))
        or ens.seed < 0
    ):
        raise ValueError(f"seed must be a non-negative integer or None, got {ens.seed!r}")
    if not (ens.fuse == "auto" or ens.fuse is True or ens.fuse is False):
        raise ValueError(f"fuse must be 'auto', True or False, got {ens.fuse!r}")
    output = getattr(ens, "output", None)  # ensembles saved before the parameter
    if output is not None and not (isinstance(output, str) and 0 < len(output) < 4096):
        raise TypeError(f"output must be None or the name of a model output, got "
                        f"{output!r}")
    if getattr(ens, "fused_stats", "auto") not in ("auto", "graph", "numpy"):
        raise ValueError(f"fused_stats must be 'auto', 'graph' or 'numpy', got "
                         f"{ens.fused_stats!r}")
    fm = ens._feature_member
    n = len(ens.members) if isinstance(ens.members, (list, tuple)) else 0
    if isinstance(fm, bool) or not isinstance(fm, (int, np.integer)) or fm < 0 or (
            n and fm >= n):
        raise ValueError(f"feature_member must be the index of a member (0..{n - 1}), "
                         f"got {fm!r}")


def fit_members(ens, X=None) -> list[OnnxSegmenter]:
    """Fitted copies of ``ens.members`` (paths become segmenters with the ensemble's options)."""
    members = ens.members
    if isinstance(members, (str, os.PathLike, OnnxSegmenter)) or not isinstance(
        members, (list, tuple)
    ):
        raise TypeError(
            "members must be a list of ONNX paths or OnnxSegmenter objects, got "
            f"{type(members).__name__}"
        )
    if len(members) == 0:
        raise ValueError("members is empty: an ensemble needs at least one member")
    fitted = []
    for i, m in enumerate(members):
        if isinstance(m, (str, os.PathLike)):
            seg = OnnxSegmenter(
                m, backend=ens.backend, device=ens.device, batch_size=ens.batch_size,
                precision=ens.precision, output=getattr(ens, "output", None),
                activation=getattr(ens, "activation", "auto"))  # saved before the parameter
        elif isinstance(m, OnnxSegmenter):
            seg = clone(m)
        else:
            raise TypeError(
                f"members[{i}] must be a path to an ONNX file or an "
                f"OnnxSegmenter, got {type(m).__name__}"
            )
        try:
            seg.fit(X if seg.precision == "int8" else None)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise type(exc)(f"member {i} ({seg.model}): {exc}") from exc
        fitted.append(seg)
    return fitted


def check_agree(members: list[OnnxSegmenter]) -> None:
    """Members must share channels, classes, spatial axes, input size and activation."""
    first = members[0]

    def fixed(seg):
        return tuple(seg.input_shape_[1:])

    checks = [
        ("n_input_channels_", lambda s: s.n_input_channels_, "{} input channels"),
        ("n_classes_", lambda s: s.n_classes_, "{} classes"),
        ("spatial_dims_", lambda s: s.spatial_dims_, "{} spatial axes"),
        ("input_shape_", fixed, "spatial input size {} (None = dynamic)"),
        ("activation_", lambda s: s.activation_, "activation {!r}"),
    ]
    for i, seg in enumerate(members[1:], start=1):
        for _, get, text in checks:
            if get(seg) != get(first):
                raise ValueError(
                    f"member {i} ({seg.model}) has {text.format(get(seg))}, member 0 "
                    f"({first.model}) has {text.format(get(first))}; ensemble members "
                    "must agree"
                )


def check_weights(weights, m: int) -> np.ndarray:
    """Normalised member weights (uniform for None)."""
    if weights is None:
        return np.full(m, 1.0 / m)
    w = np.asarray(weights)
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise TypeError(f"weights must be numbers, got dtype {w.dtype}")
    w = w.astype(np.float64).ravel()
    if w.shape != (m,):
        raise ValueError(f"weights must have one entry per member ({m}), got {w.size}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive finite numbers, got {weights!r}")
    return w / w.sum()


def flip_list(tta, dims: int) -> list[tuple[int, ...]]:
    """The flips of ``tta`` as tuples of array axes (``()`` is the unflipped pass, first)."""
    if tta is None:
        return [()]
    if isinstance(tta, str):
        if tta != "flips":
            raise ValueError(
                f"tta must be None, 'flips' or a list of spatial-axis tuples; got {tta!r}"
            )
        return [
            tuple(a + 2 for a, on in zip(range(dims), bits, strict=True) if on)
            for bits in product([0, 1], repeat=dims)
        ]
    if isinstance(tta, (list, tuple)):
        flips = [()]
        for item in tta:
            t = tuple(item) if isinstance(item, (list, tuple)) else (item,)
            if not t or any(
                isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 0 <= a < dims
                for a in t
            ):
                raise ValueError(f"tta flips name spatial axes 0..{dims - 1}; got {item!r}")
            flip = tuple(sorted({int(a) + 2 for a in t}))
            if flip not in flips:
                flips.append(flip)
        return flips
    raise ValueError(
        f"tta must be None, 'flips' or a list of spatial-axis tuples; got {tta!r}"
    )


def member_passes(mc_samples: int, members: list[OnnxSegmenter]) -> list[int]:
    """Passes per member: ``mc_samples`` for members with an ``mc_mask``, else one."""
    mc = [s.mc_dropout_ is not None for s in members]
    if mc_samples > 0:
        if not any(mc):
            raise ValueError(
                f"mc_samples={mc_samples} needs members that take an "
                f"mc_mask input; none of the {len(members)} members does"
            )
        for i, s in enumerate(members):
            p = s.mc_dropout_.get("p") if s.mc_dropout_ else 0.0
            if p is None or not 0 <= float(p) < 1:
                raise ValueError(
                    f"member {i} ({s.model}) takes an mc_mask but its metadata "
                    f"gives no valid dropout rate p (got {p!r})"
                )
    return [mc_samples if (mc_samples > 0 and has) else 1 for has in mc]


def check_kinds(kinds) -> tuple[str, ...]:
    """Uncertainty kinds asked of the ensemble (a string or a sequence, from ``KINDS``)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kind must be one of {KINDS}, got {bad[0]!r}")
    return kinds


def check_layers(layers, known: list[str], member: int) -> tuple[str, ...]:
    """Feature layers asked of the feature member ``member`` (``"auto"``: its preferred one)."""
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if "auto" in layers:
        if not known:
            raise ValueError("the feature member has no candidate feature layer for "
                             "layers='auto'")
        layers = tuple(dict.fromkeys(known[0] if ly == "auto" else ly for ly in layers))
    bad = [ly for ly in layers if not isinstance(ly, str) or ly not in known]
    if bad:
        raise ValueError(f"layer {bad[0]!r} is not a feature layer of the feature member "
                         f"(member {member}); choose from {known[:12]}")
    return layers
