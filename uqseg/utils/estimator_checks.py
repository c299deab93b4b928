"""scikit-learn's estimator contract, checked on image data.

:func:`sklearn.utils.estimator_checks.check_estimator` feeds tabular ``(n_samples,
n_features)`` arrays, which an image estimator rightly refuses. These checks run the same
contract on the images ``X`` (and labels ``y``) the estimator is meant for:

=================================  ===========================================================
check                              what must hold
=================================  ===========================================================
``check_clone``                    ``clone`` gives an unfitted estimator with the same params
``check_get_set_params``           ``get_params`` names the ``__init__`` arguments and
                                   ``set_params(**get_params())`` round-trips
``check_no_attributes_in_init``    ``__init__`` only stores its arguments
``check_not_fitted``               every public method raises ``NotFittedError`` before ``fit``
``check_fit_returns_self``         ``fit`` returns the estimator itself
``check_params_unchanged_by_fit``  ``fit`` changes no parameter (nor a nested estimator)
``check_idempotent_refit``         fitting twice on the same data gives the same outputs
``check_refit_forgets``            a fit after a fit on other data equals a fresh fit
``check_pickle``                   a pickled fitted estimator gives the same outputs
``check_save_load``                ``uqseg.save`` / ``uqseg.load`` gives the same outputs
``check_readonly_memmap``          read-only memory-mapped ``X`` / ``y`` work, same outputs
``check_dtype_float16``            float16 ``X`` behaves as the same values in float32
``check_dtype_float64``            float64 ``X`` behaves as float32 ``X``
``check_dtype_int``                integer ``X`` (``rint(X)``) behaves as the same values in
                                   float32
``check_list_input``               lists of per-image arrays give the array outputs
=================================  ===========================================================

"Outputs" are the results of the public methods (``predict``, ``predict_proba``,
``transform``, ``score_samples``, ... whichever the estimator has) on ``X``. A failing check
raises ``AssertionError`` whose message starts with the check's name.

Examples
--------
>>> import numpy as np
>>> from uqseg import TemperatureCalibrator
>>> from uqseg.utils.estimator_checks import check_image_estimator
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)      # logits of 4 images
>>> y = rng.integers(0, 3, size=(4, 8, 8))
>>> results = check_image_estimator(
...     TemperatureCalibrator(), z, y,
...     expected_failed_checks={"check_dtype_int": "integer logits are refused on purpose"})
>>> results["check_dtype_int"], results["check_pickle"]
('xfail: integer logits are refused on purpose', 'passed')
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

__all__ = ["check_image_estimator", "image_estimator_checks", "CHECKS", "DEFAULT_METHODS"]

#: Public methods whose outputs the checks compare, in this order, when the estimator has them.
DEFAULT_METHODS = ("predict", "predict_proba", "predict_log_proba", "transform",
                   "decision_function", "score_samples", "predict_set", "predict_members",
                   "predict_with_uncertainty", "uncertainty", "segment_uncertainty", "run",
                   "features", "signature", "flag", "score")

CHECKS = ("check_clone", "check_get_set_params", "check_no_attributes_in_init",
          "check_not_fitted", "check_fit_returns_self", "check_params_unchanged_by_fit",
          "check_idempotent_refit", "check_refit_forgets", "check_pickle", "check_save_load",
          "check_readonly_memmap", "check_dtype_float16", "check_dtype_float64",
          "check_dtype_int", "check_list_input")


class _Data:
    """The images and labels the checks run on, and the methods whose outputs count."""

    def __init__(self, X, y, methods, rtol, atol):
        self.X, self.y, self.methods = X, y, tuple(methods)
        self.rtol, self.atol = rtol, atol


def _fail(check: str, msg: str):
    raise AssertionError(f"{check}: {msg}")


def _fit(est, X, y):
    return est.fit(X) if y is None else est.fit(X, y)


def _call(est, method: str, X, y):
    fn = getattr(est, method)
    return fn(X, y) if method == "score" else fn(X)


def _methods(est, methods, y) -> tuple[str, ...]:
    names = DEFAULT_METHODS if methods is None else tuple(methods)
    found = tuple(m for m in names if callable(getattr(est, m, None))
                  and (m != "score" or y is not None))
    missing = [m for m in (methods or ()) if m not in found]
    if missing:
        raise ValueError(f"methods {missing} are not callable on {type(est).__name__}"
                         + (" ('score' needs y)" if "score" in missing else ""))
    return found


def _outputs(est, data: _Data, X=None, y=None) -> dict:
    X = data.X if X is None else X
    y = data.y if y is None else y
    return {m: _call(est, m, X, y) for m in data.methods}


def _close(a, b, where: str, check: str, rtol: float, atol: float) -> None:
    """``a`` equals ``b`` (nested dicts/tuples/lists of arrays; floats within tolerance)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or sorted(a) != sorted(b):
            _fail(check, f"{where}: keys differ: {_keys(a)} vs {_keys(b)}")
        for k in a:
            _close(a[k], b[k], f"{where}[{k!r}]", check, rtol, atol)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            _fail(check, f"{where}: lengths differ: {len(a)} vs {len(b)}")
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{where}[{i}]", check, rtol, atol)
        return
    if isinstance(a, (list, tuple)) != isinstance(b, (list, tuple)):
        # a list of per-image outputs against the stacked array
        seq, arr = (a, b) if isinstance(a, (list, tuple)) else (b, a)
        arr = np.asarray(arr)
        if len(seq) != arr.shape[0]:
            _fail(check, f"{where}: {len(seq)} per-image outputs vs {arr.shape[0]} rows")
        for i, u in enumerate(seq):
            _close(u, arr[i], f"{where}[{i}]", check, rtol, atol)
        return
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        _fail(check, f"{where}: shapes differ: {a.shape} vs {b.shape}")
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            err = np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))
            _fail(check, f"{where}: values differ (max abs difference {err:.3g}, "
                         f"rtol={rtol}, atol={atol})")
    elif not np.array_equal(a, b):
        _fail(check, f"{where}: values differ ({int((a != b).sum())} of {a.size} entries)")


def _keys(d):
    return sorted(d) if isinstance(d, dict) else type(d).__name__


def _same(a: dict, b: dict, check: str, data: _Data, what: str) -> None:
    for m in data.methods:
        _close(a[m], b[m], f"{what}: {m}()", check, data.rtol, data.atol)


# ---------------------------------------------------------------------- the checks
def check_clone(estimator, data: _Data) -> None:
    c = clone(estimator)
    if c is estimator:
        _fail("check_clone", "clone returned the estimator itself")
    p, q = estimator.get_params(deep=False), c.get_params(deep=False)
    if sorted(p) != sorted(q):
        _fail("check_clone", f"the clone's parameters {sorted(q)} differ from {sorted(p)}")
    fitted = [k for k in vars(c) if k.endswith("_") and not k.startswith("_")]
    if fitted:
        _fail("check_clone", f"the clone of an unfitted estimator has fitted attributes {fitted}")


def check_get_set_params(estimator, data: _Data) -> None:
    name = "check_get_set_params"
    init = inspect.signature(type(estimator).__init__).parameters
    expected = sorted(k for k, p in init.items()
                      if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    params = estimator.get_params(deep=False)
    if sorted(params) != expected:
        _fail(name, f"get_params() keys {sorted(params)} differ from the __init__ arguments "
                    f"{expected}")
    for k in params:
        if params[k] is not getattr(estimator, k):
            _fail(name, f"get_params()[{k!r}] is not the attribute {k!r} itself")
    c = clone(estimator)
    if c.set_params(**params) is not c:
        _fail(name, "set_params did not return the estimator")
    back = c.get_params(deep=False)
    for k in params:
        if back[k] is not params[k]:
            _fail(name, f"set_params(**get_params()) changed {k!r}: {back[k]!r} vs {params[k]!r}")
    deep = estimator.get_params(deep=True)
    if clone(estimator).set_params(**deep).get_params(deep=True).keys() != deep.keys():
        _fail(name, "set_params(**get_params(deep=True)) changed the parameter names")


def check_no_attributes_in_init(estimator, data: _Data) -> None:
    c = type(estimator)(**estimator.get_params(deep=False))
    extra = sorted(set(vars(c)) - set(c.get_params(deep=False)))
    if extra:
        _fail("check_no_attributes_in_init", f"__init__ sets attributes that are not parameters:"
                                            f" {extra}")


def check_not_fitted(estimator, data: _Data) -> None:
    c = clone(estimator)
    for m in data.methods:
        try:
            _call(c, m, data.X, data.y)
        except NotFittedError:
            continue
        except Exception as exc:  # noqa: BLE001 - the wrong error is the finding
            _fail("check_not_fitted", f"{m}() before fit raised {type(exc).__name__} "
                                      f"({exc}) instead of NotFittedError")
        _fail("check_not_fitted", f"{m}() before fit did not raise NotFittedError")


def check_fit_returns_self(estimator, data: _Data) -> None:
    c = clone(estimator)
    out = _fit(c, data.X, data.y)
    if out is not c:
        _fail("check_fit_returns_self", f"fit returned {type(out).__name__} {out!r:.80}, "
                                        "not the estimator")


def check_params_unchanged_by_fit(estimator, data: _Data) -> None:
    import joblib

    c = clone(estimator)
    before = {k: joblib.hash(v) for k, v in c.get_params(deep=False).items()}
    objects = dict(c.get_params(deep=False))
    _fit(c, data.X, data.y)
    after = c.get_params(deep=False)
    changed = sorted(k for k, v in after.items()
                     if joblib.hash(v) != before[k] or v is not objects[k])
    if changed:
        _fail("check_params_unchanged_by_fit", f"fit changed the parameters {changed} (fit "
                                               "must leave them, and nested estimators, as given)")


def check_idempotent_refit(estimator, data: _Data) -> None:
    c = _fit(clone(estimator), data.X, data.y)
    first = _outputs(c, data)
    _fit(c, data.X, data.y)
    _same(first, _outputs(c, data), "check_idempotent_refit", data, "second fit")


def check_refit_forgets(estimator, data: _Data) -> None:
    ref = _outputs(_fit(clone(estimator), data.X, data.y), data)
    c = _fit(clone(estimator), data.X[1:], None if data.y is None else data.y[1:])
    _fit(c, data.X, data.y)
    _same(ref, _outputs(c, data), "check_refit_forgets", data,
          "fit on X[1:] then on X vs a fresh fit on X")


def check_pickle(estimator, data: _Data) -> None:
    c = _fit(clone(estimator), data.X, data.y)
    ref = _outputs(c, data)
    back = pickle.loads(pickle.dumps(c))
    if type(back) is not type(c):
        _fail("check_pickle", f"unpickled a {type(back).__name__}, not a {type(c).__name__}")
    _same(ref, _outputs(back, data), "check_pickle", data, "after pickle")


def check_save_load(estimator, data: _Data) -> None:
    import uqseg

    c = _fit(clone(estimator), data.X, data.y)
    ref = _outputs(c, data)
    with tempfile.TemporaryDirectory() as tmp:
        uqseg.save(c, Path(tmp) / "saved")
        back = uqseg.load(Path(tmp) / "saved")
        if type(back) is not type(c):
            _fail("check_save_load", f"loaded a {type(back).__name__}, not a {type(c).__name__}")
        if sorted(back.get_params(deep=False)) != sorted(c.get_params(deep=False)):
            _fail("check_save_load", "the loaded estimator's parameter names differ")
        _same(ref, _outputs(back, data), "check_save_load", data, "after uqseg.load")


def check_readonly_memmap(estimator, data: _Data) -> None:
    ref = _outputs(_fit(clone(estimator), data.X, data.y), data)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "X.npy", np.asarray(data.X))
        X = np.load(Path(tmp) / "X.npy", mmap_mode="r")
        y = None
        if data.y is not None:
            np.save(Path(tmp) / "y.npy", np.asarray(data.y))
            y = np.load(Path(tmp) / "y.npy", mmap_mode="r")
        try:
            c = _fit(clone(estimator), X, y)
            out = _outputs(c, data, X, y)
        except Exception as exc:  # noqa: BLE001
            _fail("check_readonly_memmap", f"read-only memmapped input raised "
                                           f"{type(exc).__name__}: {exc}")
        _same(ref, out, "check_readonly_memmap", data, "memmapped input")
        del X, y, c, out  # release the maps before the folder goes


def _equivalent(estimator, data: _Data, check: str, X_new, X_ref) -> None:
    """Fitting and predicting on ``X_new`` behaves as on ``X_ref`` (same outputs or the same
    kind of error)."""
    def run(X):
        try:
            return _outputs(_fit(clone(estimator), X, data.y), data, X), None
        except Exception as exc:  # noqa: BLE001
            return None, exc

    out, err = run(X_new)
    ref, ref_err = run(X_ref)
    if err is not None or ref_err is not None:
        if err is None or ref_err is None or type(err) is not type(ref_err):
            what = f"{X_new.dtype} input raised {type(err).__name__}: {err}" if err is not None \
                else f"{X_new.dtype} input worked"
            how = f"raised {type(ref_err).__name__}: {ref_err}" if ref_err is not None \
                else "worked"
            _fail(check, f"{what}, while the same values in {X_ref.dtype} {how}")
        return
    _same(ref, out, check, data, f"{X_new.dtype} input vs {X_ref.dtype}")


def check_dtype_float16(estimator, data: _Data) -> None:
    X16 = np.asarray(data.X).astype(np.float16)
    _equivalent(estimator, data, "check_dtype_float16", X16, X16.astype(np.float32))


def check_dtype_float64(estimator, data: _Data) -> None:
    X = np.asarray(data.X, dtype=np.float32)
    _equivalent(estimator, data, "check_dtype_float64", X.astype(np.float64), X)


def check_dtype_int(estimator, data: _Data) -> None:
    Xi = np.rint(np.asarray(data.X, dtype=np.float64)).astype(np.int64)
    _equivalent(estimator, data, "check_dtype_int", Xi, Xi.astype(np.float32))


def check_list_input(estimator, data: _Data) -> None:
    X = list(np.asarray(data.X))
    y = None if data.y is None else list(np.asarray(data.y))
    ref = _outputs(_fit(clone(estimator), data.X, data.y), data)
    try:
        c = _fit(clone(estimator), X, y)
        out = _outputs(c, data, X, y)
    except Exception as exc:  # noqa: BLE001
        _fail("check_list_input", f"lists of images raised {type(exc).__name__}: {exc}")
    _same(ref, out, "check_list_input", data, "list input")


_FUNCS: dict[str, Callable] = {name: globals()[name] for name in CHECKS}


def _run(name: str, estimator, data: _Data) -> None:
    try:
        _FUNCS[name](estimator, data)
    except AssertionError:
        raise
    except Exception as exc:  # an error inside a check is its failure, named as such
        raise AssertionError(f"{name}: raised {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------- entry points
def image_estimator_checks(estimator, X, y=None, *, methods=None, rtol=1e-5,
                           atol=1e-6) -> Iterator[tuple[str, Callable[[], None]]]:
    """Yield ``(name, check)`` pairs; ``check()`` runs one check of the contract.

    For test parametrisation (one test per check), as scikit-learn's
    ``estimator_checks_generator``.

    Parameters
    ----------
    estimator : estimator
        An unfitted estimator (it is cloned; the object itself is never fitted).
    X : ndarray of shape (N, C, *spatial)
        Images (or scores, for an estimator that reads them) to fit and predict on; a few
        small ones keep the checks fast.
    y : ndarray or None, default=None
        Labels for ``fit(X, y)``; ``None`` fits with ``fit(X)``.
    methods : sequence of str or None, default=None
        Public methods whose outputs are compared; ``None``: those of :data:`DEFAULT_METHODS`
        the estimator has (``score`` only with ``y``).
    rtol, atol : float
        Tolerance of float outputs.

    Yields
    ------
    name : str
        One of :data:`CHECKS`.
    check : callable
        Takes no argument; raises ``AssertionError`` (message starting with ``name``) on a
        failure, also when the estimator raised some other error inside the check.
    """
    X = np.asarray(X)
    if X.ndim < 3:
        raise ValueError(f"X must be images (N, C, *spatial), got shape {X.shape}")
    if y is not None and len(y) != len(X):
        raise ValueError(f"X has {len(X)} images but y has {len(y)} entries")
    data = _Data(X, None if y is None else np.asarray(y), _methods(estimator, methods, y),
                 rtol, atol)
    if not data.methods:
        raise ValueError(f"{type(estimator).__name__} has none of the methods {DEFAULT_METHODS}")
    for name in CHECKS:
        yield name, partial(_run, name, estimator, data)


def check_image_estimator(estimator, X, y=None, *, methods=None, expected_failed_checks=None,
                          rtol=1e-5, atol=1e-6) -> dict[str, str]:
    """Run every check of :func:`image_estimator_checks`; raise on the first unexpected failure.

    Parameters
    ----------
    estimator, X, y, methods, rtol, atol
        As in :func:`image_estimator_checks`.
    expected_failed_checks : dict of {str: str} or None, default=None
        ``{check name: reason}`` of checks known to fail. They still run; their failure is
        recorded, not raised.

    Returns
    -------
    dict of {str: str}
        Each check's outcome: ``"passed"``, ``"xfail: <reason>"`` (failed as expected) or
        ``"xpass: <reason>"`` (listed as expected to fail, yet passed).

    Raises
    ------
    AssertionError
        The first failing check that is not in ``expected_failed_checks``; the message starts
        with the check's name.
    """
    expected = dict(expected_failed_checks or {})
    unknown = sorted(set(expected) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks in expected_failed_checks: {unknown}; the checks are "
                         f"{list(CHECKS)}")
    results = {}
    for name, check in image_estimator_checks(estimator, X, y, methods=methods, rtol=rtol,
                                              atol=atol):
        try:
            check()
        except AssertionError:
            if name not in expected:
                raise
            results[name] = f"xfail: {expected[name]}"
            continue
        results[name] = f"xpass: {expected[name]}" if name in expected else "passed"
    return results
