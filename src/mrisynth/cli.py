"""The ``mrisynth`` command: argument parsing only; the work is done by the Python API.

Heavy modules (torch, the model code) are imported inside the command functions so that
``mrisynth --help`` answers at once. A :class:`MrisynthError` becomes one line on stderr and its
exit code (1 bad data, 2 bad usage); argparse itself exits 2 on a malformed command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import MrisynthError


def cmd_cases(args: argparse.Namespace) -> int:
    from .cases import discover_cases, format_table

    cases = discover_cases(args.root)
    if args.json:
        print(json.dumps([c.to_json() for c in cases], indent=2))
    elif not cases:
        print(f"no BraTS cases found under {args.root}")
    else:
        print(format_table(cases))
    return 0


def add_cases(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cases", help="list the BraTS cases under a folder and what is wrong with them")
    p.add_argument("root", type=Path, help="a case folder or any folder above case folders")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_cases)


COMMANDS = [add_cases]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrisynth",
        description="Synthesize a missing brain MRI sequence (T1, T1CE, T2 or FLAIR) from the other three.",
    )
    parser.add_argument("--version", action="version", version=f"mrisynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MrisynthError as exc:
        print(f"mrisynth {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mrisynth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
