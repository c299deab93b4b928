"""The runner interface every backend implements (Polygraphy-style)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class Runner:
    """Runs one ONNX network. Backends fill in ``_run_impl``; this class owns the checks.

    Attributes
    ----------
    input_names, output_names : list of str
    input_shapes : dict name -> tuple (None for dynamic axes)
    input_dtypes : dict name -> numpy dtype
    backend, device : str
    """

    backend = "base"

    def __init__(self) -> None:
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_shapes: dict[str, tuple[int | None, ...]] = {}
        self.input_dtypes: dict[str, np.dtype] = {}
        self.device = "cpu"
        self.providers: list[str] = []

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the network on named inputs; return the named outputs as host arrays."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing input(s) {missing}; the model takes {self.input_names}")
        extra = [n for n in feeds if n not in self.input_names]
        if extra:
            raise ValueError(f"unknown input(s) {extra}; the model takes {self.input_names}")
        outputs = list(outputs) if outputs is not None else list(self.output_names)
        unknown = [n for n in outputs if n not in self.output_names]
        if unknown:
            raise ValueError(f"unknown output(s) {unknown}; the runner has {self.output_names}")
        prepared = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            want = self.input_dtypes.get(name)
            if want is not None and arr.dtype != want:
                arr = arr.astype(want)
            prepared[name] = np.ascontiguousarray(arr)
        return self._run_impl(prepared, outputs)

    def _run_impl(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release engine resources; the runner cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, device={self.device!r}, "
                f"inputs={self.input_names}, outputs={self.output_names})")
