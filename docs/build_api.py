"""Generate ``docs/api.md`` from the numpydoc docstrings of uqseg's public API.

Usage::

    python docs/build_api.py            # rewrites docs/api.md
    python docs/build_api.py --check    # exit 1 when docs/api.md is out of date

Only :mod:`inspect` is used (no sphinx). Each public class gets its signature, its docstring
(numpydoc sections become bold headings, their bodies stay verbatim in text blocks) and a
summary line for each public method; each function gets its signature and docstring.
``uqseg.training`` is documented when torch is installed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"

# (module, names or None for the module's __all__, heading)
SECTIONS = [
    ("uqseg", ["OnnxSegmenter", "EnsembleSegmenter", "TemperatureCalibrator",
               "SpectralOODDetector", "UncertaintyOODDetector", "MahalanobisOODDetector",
               "KNNOODDetector", "QualityRegressor", "ConformalRiskController", "assess",
               "save", "load"], "Estimators and persistence"),
    ("uqseg.quality", ["make_quality_set"], "Quality data"),
    ("uqseg.datasets", None, "Data sets and reference models (uqseg.datasets)"),
    ("uqseg.metrics", None, "Metrics (uqseg.metrics)"),
    ("uqseg.uncertainty", None, "Uncertainty maps (uqseg.uncertainty)"),
    ("uqseg.backends", ["load"], "Backends (uqseg.backends)"),
    ("uqseg.io", None, "Image input/output (uqseg.io)"),
    ("uqseg.preprocessing", None, "Preprocessing that travels with a model (uqseg.preprocessing)"),
    ("uqseg.report", None, "Report (uqseg.report, extra `plot`)"),
    ("uqseg.demo", ["run_demo", "DemoConfig"], "Demo (uqseg.demo)"),
    ("uqseg.distributed", None, "Distributed scoring (uqseg.distributed, extra `ray`)"),
    ("uqseg.training", None, "Training (uqseg.training, extra `train`)"),
]

_SECTION_RE = re.compile(r"^(\w[\w ]*)\n-{3,}\n", re.M)


def _docstring(obj) -> str:
    doc = inspect.getdoc(obj) or "(no docstring)"
    parts = _SECTION_RE.split(doc)
    out = [parts[0].strip()]
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip("\n")
        out.append(f"**{title}**\n\n```text\n{body}\n```" if body else f"**{title}**")
    return "\n\n".join(out)


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    return f"```python\n{name}{sig}\n```"


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", text.lower()).replace(" ", "-")


def _methods(cls) -> list[str]:
    lines = []
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or not callable(member):
            continue
        if name in {"get_params", "set_params", "get_metadata_routing", "fit_transform",
                    "set_output", "fit_predict", "set_fit_request", "set_score_request",
                    "set_partial_fit_request", "set_transform_request", "set_predict_request"}:
            continue
        if getattr(member, "__module__", "").split(".")[0] != "uqseg" and not any(
                name in vars(k) for k in cls.__mro__ if k.__module__.startswith("uqseg")):
            continue
        doc = (inspect.getdoc(member) or "").split("\n\n")[0].replace("\n", " ")
        try:
            sig = str(inspect.signature(member))
        except (TypeError, ValueError):
            sig = "(...)"
        lines.append(f"- `{name}{sig}`: {doc}")
    return lines


def _entry(module: str, name: str, obj) -> str:
    qual = f"{module}.{name}"
    parts = [f"### `{qual}`", _signature(qual, obj), _docstring(obj)]
    if inspect.isclass(obj):
        methods = _methods(obj)
        if methods:
            parts.append("**Methods**\n\n" + "\n".join(methods))
    return "\n\n".join(parts)


def build() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    toc, body = [], []
    for module, names, heading in SECTIONS:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            body.append(f"## {heading}\n\nNot documented here: {exc}")
            continue
        names = names if names is not None else list(getattr(mod, "__all__", []))
        entries = []
        for n in names:
            obj = getattr(mod, n)
            if inspect.isclass(obj) or inspect.isfunction(obj) or callable(obj):
                entries.append(_entry(module, n, obj))
            else:
                entries.append(f"### `{module}.{n}`\n\n```python\n{n} = {obj!r}\n```")
        toc.append(f"- [{heading}](#{_anchor(heading)}): "
                   + ", ".join(f"`{n}`" for n in names))
        body.append(f"## {heading}\n\n" + (inspect.getdoc(mod) or "").split("\n\n")[0]
                    + "\n\n" + "\n\n".join(entries))
    header = ("# uqseg API reference\n\n"
              "Generated from the docstrings by `python docs/build_api.py`; do not edit by "
              "hand. The binding contract is the public API in the design document; see "
              "also [the user guide](user_guide.md) and [the CLI](cli.md).\n\n")
    return header + "\n".join(toc) + "\n\n" + "\n\n".join(body) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = p.parse_args(argv)
    text = build()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python docs/build_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
