"""Doctests of the package (``testpaths`` holds ``uqseg``, ``addopts`` ``--doctest-modules``).

Modules and examples whose optional extra is not installed are left out, so that the core
install (``tox -e core``) runs the rest.
"""

from __future__ import annotations

import importlib.util

import pytest


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return True


collect_ignore_glob = ["docs/*", "benchmarks/*", "scripts/*"]
if _missing("torch"):
    collect_ignore_glob.append("uqseg/training/*")

# examples (doctest names) that need an extra beyond the core install
_NEEDS = {"matplotlib": ("uqseg.plotting.plot_reliability_diagram",)}


def pytest_collection_modifyitems(config, items):
    for module, names in _NEEDS.items():
        if not _missing(module):
            continue
        for item in items:
            if isinstance(item, pytest.DoctestItem) and item.name in names:
                item.add_marker(pytest.mark.skip(reason=f"needs {module}"))
