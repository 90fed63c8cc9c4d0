"""``icbd-cache``: a thin dispatcher over the commands of :mod:`icbdcache.commands`.

Each command family lives in its own module with an option table per command
(:mod:`icbdcache.commands.options`) and ``register(subparsers)``, which adds its parsers (each
with an example in its epilog) and sets ``func``: a callable taking the parsed namespace and
returning the exit status. To add a family, import its module and list it in ``FAMILIES``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from icbdcache import __version__, earlyhup  # noqa: F401  (before the commands)
from icbdcache import log as logsetup
from icbdcache.commands import demo, master, pxe, replica, serve, store, trust
from icbdcache.commands.options import Command

#: The command modules, in the order ``--help`` lists their commands.
FAMILIES = (serve, demo, store, pxe, master, replica, trust)

#: Every command's option table (the docs check reads them).
COMMANDS: tuple[Command, ...] = tuple(c for m in FAMILIES for c in m.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="icbd-cache",
        description="Boot-path caching NBD server for iCBD diskless workstations.",
        epilog="example:\n  icbd-cache serve --export lab=/srv/imi/lab.img\n"
               "  icbd-cache serve --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"icbd-cache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icbd-cache``: parse ``argv`` (default ``sys.argv[1:]``), run the
    command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logsetup.setup(-1 if args.quiet else args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
