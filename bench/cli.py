"""``icbd-bench``: a thin dispatcher over the benchmark subcommands.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser
(with an example in the epilog) and sets ``func``: a callable taking the parsed namespace and
returning the exit status. To add one, import its module and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from bench import adversary, bootstorm, chunksize, digests, replication, serve

#: The Python packages of the ``bench`` extra each benchmark needs (a runtime-only install,
#: ``pip install icbd-cache``, has none of them): matplotlib draws the plots, pyroute2 builds
#: the shaped links in network namespaces, trustme makes the TLS rows' certificates.
NEEDS: dict[str, tuple[str, ...]] = {
    "serve": ("matplotlib",),
    "chunksize": (),
    "bootstorm": ("matplotlib", "pyroute2"),
    "replication": ("matplotlib", "pyroute2", "trustme"),
}

EXTRA_HINT = "pip install 'icbd-cache[bench]' (scripts/setup installs it)"


def missing_packages(command: str) -> list[str]:
    """The packages benchmark ``command`` needs that are not installed."""
    return [m for m in NEEDS.get(command, ()) if importlib.util.find_spec(m) is None]

#: The modules that register a subcommand, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (serve.register, chunksize.register,
                                                   bootstorm.register, replication.register,
                                                   digests.register, adversary.register)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="icbd-bench", description="Benchmarks for icbd-cache.",
        epilog="example:\n  icbd-bench serve --quick --servers nbdkit,qemu-nbd\n\n"
               "Run 'icbd-bench COMMAND --help' for a command's options.\n\n"
               "Python packages beyond the runtime (the 'bench' extra, "
               f"{EXTRA_HINT}):\n"
               + "".join(f"  {c:12} {', '.join(m) or 'none'}\n" for c, m in NEEDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    missing = missing_packages(args.command)
    if missing:
        print(f"icbd-bench {args.command}: needs {', '.join(missing)}, not installed: "
              f"{EXTRA_HINT}", file=sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
