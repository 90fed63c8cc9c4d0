"""``icbd-bench``: a thin dispatcher over the benchmark subcommands.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser
(with an example in the epilog) and sets ``func``: a callable taking the parsed namespace and
returning the exit status. To add one, import its module and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bench import adversary, bootstorm, chunksize, replication, serve

#: The modules that register a subcommand, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (serve.register, chunksize.register,
                                                   bootstorm.register, replication.register,
                                                   adversary.register)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="icbd-bench", description="Benchmarks for icbd-cache.",
        epilog="example:\n  icbd-bench serve --quick --servers nbdkit,qemu-nbd\n\n"
               "Run 'icbd-bench COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
