"""The ``icbd-cache`` entry point."""

from __future__ import annotations

import sys

from icbdcache.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
