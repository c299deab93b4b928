"""Mark survivors that are equivalent by construction (run after a mutation run).

    for n in SURVIVORS; do echo "@@ $n"; mutmut show $n | grep '^[-+][^-+]'; done > diffs.txt
    python scripts/mutation_classify.py diffs.txt >> scripts/mutation_equivalent.txt

Only mechanical classes whose equivalence holds for every input are recognised; everything
else stays a survivor to be killed or argued by hand.
"""

from __future__ import annotations

import re
import sys

RULES = [
    # zip(..., strict=True) -> strict=None / strict=False / no flag: the zipped sequences are
    # built from the same tuples and always have equal lengths, so the flag never fires
    (lambda a, b: re.sub(r",?\s*strict=True", "", a) ==
     re.sub(r",?\s*strict=(None|False)", "", b).replace(", )", ")").replace(",)", ")"),
     "zip strict flag on sequences of equal length"),
    # slice(0, s) -> slice(None, s) / slice(s): the same slice
    (lambda a, b: a.replace("slice(0, s)", "slice(s)") == b.replace("slice(None, s)", "slice(s)"),
     "slice(0, s) is slice(None, s) is slice(s)"),
    # np.pad(..., mode="constant") -> np.pad(...): constant is numpy's default mode
    (lambda a, b: a.replace(', mode="constant"', "").replace(" ", "") == b.replace(" ", ""),
     "np.pad mode='constant' is the default"),
]


def main(path):
    blocks = open(path).read().split("@@ ")[1:]
    for block in blocks:
        lines = block.strip().splitlines()
        name, body = lines[0].strip(), lines[1:]
        minus = [ln[1:] for ln in body if ln.startswith("-")]
        plus = [ln[1:] for ln in body if ln.startswith("+")]
        if len(minus) != 1 or len(plus) != 1:
            continue
        a, b = minus[0].strip(), plus[0].strip()
        for rule, reason in RULES:
            if a != b and rule(a, b):
                print(f"{name} {reason}")
                break


if __name__ == "__main__":
    main(sys.argv[1])
