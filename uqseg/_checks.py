"""Value checks for :mod:`uqseg._restore`: types, ranges, arrays, side effects, comparison.

Every failure is a ValueError or TypeError whose message starts with the key path.
"""


from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import numpy as np

SEGMENTER_CLASSES = ("uqseg.segmenter.OnnxSegmenter", "uqseg.ensemble.EnsembleSegmenter")
DEVICES_RESOLVED = ("cpu", "cuda", "tensorrt")


# ---------------------------------------------------------------------------- primitives
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_int(v):
        raise TypeError(f"{where}: expected an integer, got {_short(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{where}: expected an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def check_real(v: Any, where: str, lo: float | None = None, hi: float | None = None, *,
               open_lo: bool = False, nan: bool = False) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating)):
        raise TypeError(f"{where}: expected a number, got {_short(v)}")
    v = float(v)
    if math.isnan(v) and nan:
        return v
    if not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        raise ValueError(f"{where}: expected a number in {'(' if open_lo else '['}{lo}, {hi}], "
                         f"got {v!r}")
    return v


def check_choice(v: Any, where: str, choices) -> None:
    if not any(v is c or (type(v) is type(c) and v == c) for c in choices):
        raise ValueError(f"{where}: expected one of {tuple(choices)}, got {_short(v)}")


def check_str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{where}: expected a string, got {_short(v)}")
    return v


def check_str_list(v: Any, where: str, *, allowed=None, nonempty: bool = True) -> list[str]:
    if not isinstance(v, list) or (nonempty and not v):
        raise TypeError(f"{where}: expected a {'non-empty ' if nonempty else ''}list of "
                        f"strings, got {_short(v)}")
    for i, s in enumerate(v):
        check_str(s, f"{where}[{i}]")
        if allowed is not None and s not in allowed:
            raise ValueError(f"{where}[{i}]: {s!r} is not one of {list(allowed)}")
    return v


def check_array(v: Any, where: str, *, ndim: int | None = None, kinds: str = "f",
                finite: bool = True, lo: float | None = None, hi: float | None = None,
                shape: tuple | None = None) -> np.ndarray:
    """A numpy array of the given rank, dtype kind ("f" float, "i" signed, "u" unsigned),
    shape (None entries are free), all values finite and in [lo, hi]."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array, got {_short(v)}")
    if v.dtype.kind not in kinds:
        raise TypeError(f"{where}: expected dtype kind {kinds!r}, got {v.dtype}")
    if ndim is not None and v.ndim != ndim:
        raise ValueError(f"{where}: expected {ndim} dimensions, got shape {v.shape}")
    if shape is not None and (len(shape) != v.ndim or any(
            s is not None and s != t for s, t in zip(shape, v.shape, strict=True))):
        raise ValueError(f"{where}: expected shape {shape} (None: any), got {v.shape}")
    if v.size and v.dtype.kind == "f" and finite and not np.isfinite(v).all():
        raise ValueError(f"{where}: holds non-finite values")
    if v.size and ((lo is not None and v.min() < lo) or (hi is not None and v.max() > hi)):
        raise ValueError(f"{where}: values must lie in [{lo}, {hi}], got "
                         f"[{v.min()!r}, {v.max()!r}]")
    return v


def check_keys(state: dict, where: str, required, optional=()) -> None:
    """Fitted state is all or nothing: exactly the required keys (plus optional ones)."""
    missing = [k for k in required if k not in state]
    extra = [k for k in state if k not in required and k not in optional]
    if extra:
        raise ValueError(f"{where}.{extra[0]}: not a fitted attribute of this estimator")
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing from the fitted state")


def run_own(check: Callable[[], Any], where: str) -> Any:
    """An estimator's own validation; its message gains the key path."""
    try:
        return check()
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def cls_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_instance(v: Any, where: str, names, *, fitted: bool = False) -> None:
    if cls_name(v) not in names:
        raise TypeError(f"{where}: expected one of {list(names)}, got {cls_name(v)}")
    if fitted and not hasattr(v, "n_classes_"):
        raise ValueError(f"{where}: the estimator is not fitted")


def fitted_state(est: Any) -> dict:
    params = est.get_params(deep=False)
    return {k: v for k, v in vars(est).items()
            if k.endswith("_") and not k.startswith("_") and k not in params}


# ---------------------------------------------------------------------------- side effects
def _max_jobs() -> int:
    return max(os.cpu_count() or 1, 1)


def check_side_effects(params: dict, where: str) -> None:
    """Parameters that write files, unpickle or start processes/threads (any estimator)."""
    for name, value in params.items():
        key = f"{where}.{name.replace('__', '.')}"
        leaf = name.rsplit("__", 1)[-1]
        if leaf == "memory" and value is not None:
            raise ValueError(f"{key}: must be None in a loaded folder (a joblib cache writes "
                             "and unpickles files); set it after loading if you need one")
        if leaf in ("n_jobs", "threads") and value is not None and not (
                is_int(value) and (value == -1 or 1 <= value <= _max_jobs())):
            raise ValueError(f"{key}: expected None, -1 or an integer in [1, {_max_jobs()}] "
                             f"(the CPUs here), got {_short(value)}")


# ---------------------------------------------------------------------------- comparison
def same(a: Any, b: Any, seen: set | None = None) -> bool:
    """Equal values of the same types (arrays: dtype, shape, values with NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, seen) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], seen) for k in a)
    if hasattr(a, "get_params"):
        seen = set() if seen is None else seen
        if (id(a), id(b)) in seen:
            return True
        seen.add((id(a), id(b)))
        fa, fb = fitted_state(a), fitted_state(b)
        fa.pop("device_", None)  # resolved per machine
        fb.pop("device_", None)
        return same(a.get_params(deep=False), b.get_params(deep=False), seen) and same(fa, fb, seen)
    return bool(a == b)


def close(a: Any, b: Any, *, signs: bool = False) -> bool:
    """Numerically equal up to float noise (``signs``: rows may differ in sign, as SVD axes)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    tol = dict(rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(b).max(initial=0.0))),
               equal_nan=True)
    if signs and a.ndim == 2:
        return all(np.allclose(x, y, **tol) or np.allclose(x, -y, **tol)
                   for x, y in zip(a, b, strict=True))
    return bool(np.allclose(a, b, **tol))


def refit_compare(est: Any, state: dict, where: str) -> None:
    """Fitted state that the model files alone determine: fit a clone, compare everything."""
    from sklearn.base import clone

    if not state:
        return
    fresh = clone(est)
    try:
        fresh.fit()
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: the saved parameters do not fit: {exc}") from exc
    except Exception as exc:  # engine or device errors on this machine
        raise ValueError(f"{where}: cannot refit the saved parameters to check the restored "
                         f"state: {type(exc).__name__}: {exc}") from exc
    want = fitted_state(fresh)
    check_keys(state, where, list(want))
    for key, value in want.items():
        if key == "device_":
            check_choice(state[key], f"{where}.{key}", DEVICES_RESOLVED)
        elif not same(state[key], value):
            raise ValueError(f"{where}.{key}: restored {_short(state[key])} but the model "
                             f"files give {_short(value)}")


# what a restored estimator's ``estimator`` parameter may be (besides a model path)
_SCORERS = SEGMENTER_CLASSES + ("uqseg.calibration.TemperatureCalibrator",
                                "sklearn.pipeline.Pipeline")


def _estimator_param(v: Any, where: str, *, none: bool = False) -> None:
    if v is None and none:
        return
    if not isinstance(v, (str, os.PathLike)):
        check_instance(v, where, _SCORERS)


def _layer_channels(seg: Any) -> dict:
    from uqseg.backends import graph
    from uqseg.backends._model import read_model

    proto, _ = read_model(seg.model)
    return {info.name: info.channels for info in graph.candidate_layers(proto)}
