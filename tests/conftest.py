"""Shared fixtures: tiny ONNX networks written to a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from onnx_models import make_unet_like  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _save(model_dir: Path, name: str, model: onnx.ModelProto) -> str:
    path = model_dir / f"{name}.onnx"
    if not path.exists():
        onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_2d(model_dir) -> str:
    """Dynamic-size 2-D network, 1 input channel, 3 classes."""
    return _save(model_dir, "tiny_2d", make_unet_like(dims=2))


@pytest.fixture(scope="session")
def tiny_3d(model_dir) -> str:
    return _save(model_dir, "tiny_3d", make_unet_like(dims=3))


@pytest.fixture(scope="session")
def tiny_fixed(model_dir) -> str:
    """Fixed 16x16 input: larger images need a sliding window."""
    return _save(model_dir, "tiny_fixed", make_unet_like(dims=2, spatial=(16, 16)))


@pytest.fixture(scope="session")
def tiny_mc(model_dir) -> str:
    return _save(model_dir, "tiny_mc", make_unet_like(dims=2, mc_mask=True))


@pytest.fixture(scope="session")
def tiny_fp16(model_dir) -> str:
    return _save(model_dir, "tiny_fp16", make_unet_like(dims=2, fp16=True))


@pytest.fixture(scope="session")
def tiny_members(model_dir) -> list[str]:
    """Three dynamic-size 2-D networks with different weights (an ensemble)."""
    return [_save(model_dir, f"member_{i}", make_unet_like(dims=2, seed=10 + i)) for i in range(3)]


@pytest.fixture(scope="session")
def make_model(model_dir):
    """Factory: ``make_model(name, **make_unet_like_kwargs) -> path``."""
    def factory(name: str, **kwargs) -> str:
        return _save(model_dir, name, make_unet_like(**kwargs))
    return factory
