"""A SIGHUP that reaches ``icbd-cache serve`` or ``master`` before they handle signals.

Imported by :mod:`icbdcache.cli` before the commands (whose imports take a fraction of a
second): for the services that reload on SIGHUP (``serve``: its settings; ``master``: its
token files) it notes a SIGHUP instead of letting its default action end the process, and the
service applies it (a reload) once it runs (docs/serve.md, "SIGHUP: reload"). Other commands
keep SIGHUP's default (a closed terminal ends them).
"""

from __future__ import annotations

import signal
import sys

_seen = [False]


def _note(_sig: int, _frame: object) -> None:
    _seen[0] = True


def seen() -> bool:
    """Whether a SIGHUP came before the server's own handler replaced this one. Read it after
    installing that handler: one that comes in between is not lost."""
    return _seen[0]


#: The commands whose SIGHUP is a reload.
RELOADING = ("serve", "master")

if sys.argv[1:2] and sys.argv[1] in RELOADING:
    signal.signal(signal.SIGHUP, _note)
