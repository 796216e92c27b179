"""Command line: `baracuda-kernels demo` (also `python -m baracuda_kernels demo`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baracuda-kernels",
                                     description="Fast block-sparse attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    try:
        from .bench import cli as bench_cli
    except ImportError:  # the bench harness is optional at import time
        bench_cli = None
    if bench_cli is not None:
        bench_cli.add_arguments(sub.add_parser("bench", help="benchmark against same-run baselines"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
