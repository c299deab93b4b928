"""Mutation testing of the numeric modules with mutmut (not part of CI; ~40 min on 2 cores).

    python scripts/mutation.py            # run mutmut over scripts/mutation_scope.txt, report
    python scripts/mutation.py --report   # only rewrite the report from mutants/ results

The scope lists the numeric functions as fnmatch patterns over mutmut's mutant names; each
mutant runs only the tests (pyproject [tool.mutmut]) that reach its function. Mutants listed
in scripts/mutation_equivalent.txt with a reason count as equivalent, not as survivors. The
per-module table goes to docs/testing.md between the MUTATION markers.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPE = ROOT / "scripts" / "mutation_scope.txt"
EQUIV = ROOT / "scripts" / "mutation_equivalent.txt"
DOC = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- MUTATION:BEGIN -->", "<!-- MUTATION:END -->"


def _lines(path):
    return [ln.strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def results() -> dict[str, str]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        if ": " in line:
            name, status = line.strip().rsplit(": ", 1)
            res[name] = status
    return res


def report() -> str:
    scope = _lines(SCOPE)
    equiv = dict(ln.split(None, 1) for ln in _lines(EQUIV)) if EQUIV.exists() else {}
    res = {n: s for n, s in results().items() if any(fnmatch.fnmatchcase(n, p) for p in scope)}
    per = {}
    for name, status in res.items():
        mod = name.split(".x")[0]
        if status == "survived" and name in equiv:
            status = "equivalent"
        per.setdefault(mod, Counter())[status] += 1
    rows = ["| module | mutants | killed | equivalent | survived | other | killed % |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    tot = Counter()
    for mod in sorted(per):
        c = per[mod]
        tot.update(c)
        rows.append(_row(mod, c))
    rows.append(_row("**all**", tot))
    surv = sorted(n for n, s in res.items() if s == "survived" and n not in equiv)
    text = "\n".join(rows) + "\n\n"
    text += ("killed % = killed / (mutants - equivalent); other = timeout, no tests or not "
             "checked.\n\n")
    text += f"Survivors not yet killed ({len(surv)}):\n\n"
    text += "\n".join(f"- `{n}`" for n in surv) + "\n"
    return text


def _row(mod, c):
    n = sum(c.values())
    other = n - c["killed"] - c["equivalent"] - c["survived"]
    denom = max(n - c["equivalent"], 1)
    return (f"| {mod} | {n} | {c['killed']} | {c['equivalent']} | {c['survived']} | {other} | "
            f"{100 * c['killed'] / denom:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true", help="only rewrite the report")
    args = p.parse_args(argv)
    if not args.report:
        subprocess.run(["mutmut", "run", *_lines(SCOPE)], cwd=ROOT, check=False)
    text = report()
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + BEGIN + "\n" + text + END + tail)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
