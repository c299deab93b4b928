"""The inference layer for a plain ONNX network: one array in, its first output back.

Networks that are not segmenters (the DeVries & Taylor quality CNN that
``QualityRegressor(regressor=<path>)`` runs) go through this object, so that estimators never
import :mod:`uqseg.backends`.
"""

from __future__ import annotations

import os

import numpy as np


class OnnxNetwork:
    """A one-input ONNX network, loaded on first use (the engine session is not pickled).

    Parameters
    ----------
    path : str or path-like
    who : str
        How error messages name the network.
    what : str
        How error messages name its input.
    """

    def __init__(self, path, who: str = "the ONNX network", what: str = "input"):
        self.path = os.fspath(path)
        self.who, self.what = who, what
        self._runner = None

    def _load(self):
        if self._runner is None:
            from uqseg import backends

            self._runner = backends.load(self.path)
        return self._runner

    @property
    def input_names(self) -> list[str]:
        return list(self._load().input_names)

    def input_shape(self) -> tuple | None:
        """Declared shape of the only input (``None`` entries: dynamic axes), if declared."""
        runner = self._load()
        return runner.input_shapes.get(runner.input_names[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output for input ``x``, as float64; engine errors become ``ValueError``."""
        runner = self._load()
        try:
            out = runner.run({runner.input_names[0]: x})
        except ValueError:
            raise
        except Exception as exc:  # engine errors on inputs the network cannot take
            raise ValueError(f"{self.who} failed on {self.what} of shape {x.shape}: {exc}") from exc
        return np.asarray(out[runner.output_names[0]], dtype=np.float64)

    def __getstate__(self):
        return {**self.__dict__, "_runner": None}
