"""Command-line entry point: ``uqseg demo | predict | bench | train | export``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uqseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "predict", "bench", "train", "export"):
        sub.add_parser(name, help=f"{name} (not yet available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"uqseg {args.command}: not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
