"""Write the ``uqseg.preprocessing`` metadata into the shipped zoo members (weights untouched).

The description is ``uqseg.datasets._zoo.ZOO_PREPROCESSING`` (what the training slices had);
``benchmarks/train_zoo.py`` writes it at export, this script adds it to members exported
before it existed. It checks that every initializer and the graph are byte-identical
afterwards. Run from a source checkout::

    python scripts/zoo_preprocessing.py          # --check: only report which members lack it
"""

from __future__ import annotations

import argparse
import sys

import onnx

from uqseg.datasets import reference_models
from uqseg.datasets._zoo import ZOO_PREPROCESSING
from uqseg.preprocessing import Preprocessing, read_preprocessing, set_preprocessing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report only; exit 1 if any differs")
    args = ap.parse_args(argv)
    want = Preprocessing.from_dict(ZOO_PREPROCESSING)
    stale = []
    for path in reference_models():
        if read_preprocessing(path) != want:
            stale.append(path)
        if args.check or path not in stale:
            continue
        before = onnx.load(path)
        set_preprocessing(path, want)
        after = onnx.load(path)
        if after.graph.SerializeToString() != before.graph.SerializeToString():
            raise RuntimeError(f"{path}: the graph changed while setting metadata")
        print(f"{path}: set uqseg.preprocessing")
    if args.check:
        for p in stale:
            print(f"{p}: preprocessing missing or different")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
