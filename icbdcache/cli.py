"""The ``icbd-cache`` command line: ``serve`` and ``demo`` (more subcommands arrive with the
store, PXE and replication)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from icbdcache import __version__, pxecli, storecli
from icbdcache import log as logsetup
from icbdcache.exports import ExportSpec
from icbdcache.server import DEFAULT_PORT, ServeConfig, parse_listen
from icbdcache.store import StoreError
from icbdcache.storecli import parse_bytes

SERVE_EXAMPLES = """\
examples:
  # one read-only iMI on the default port, for every address of the host
  icbd-cache serve --export lab=/srv/imi/lab-7.img

  # two exports on loopback, the second writable through per-client copy-on-write
  icbd-cache serve --listen 127.0.0.1:10809 --export lab=/srv/lab.img \\
      --export scratch=/srv/base.img,cow --default-export lab

  # TLS required (STARTTLS), settings from a file, flags override it
  icbd-cache serve --config /etc/icbd-cache/serve.toml --tls-cert srv.pem \\
      --tls-key srv.key --tls-required

clients:
  nbdinfo nbd://HOST/lab          qemu-img info nbd://HOST:10809/lab
  nbd-client HOST 10809 /dev/nbd0 -N lab
"""


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve iMI images over NBD",
        description="Serve raw disk images (iMIs) to NBD clients: the kernel's nbd-client, "
                    "qemu, libnbd. Read-only by default; ',cow' gives each client its own "
                    "copy-on-write overlay. See docs/serve.md.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the same settings (keys as the long options, with _); "
                        "options given on the command line win")
    p.add_argument("--listen", action="append", metavar="HOST:PORT", default=None,
                   help=f"TCP address to listen on, repeatable (default 0.0.0.0:{DEFAULT_PORT} "
                        "unless --unix is given)")
    p.add_argument("--unix", metavar="PATH", default=None, help="also listen on a Unix socket")
    p.add_argument("--export", action="append", metavar="NAME=PATH[,cow]", default=None,
                   help="an export: a raw image file; ',cow' = writable per client, the file "
                        "itself is never written (repeatable)")
    p.add_argument("--default-export", metavar="NAME", default=None,
                   help="export for clients that ask for the empty name (default: the first)")
    p.add_argument("--tls-cert", metavar="FILE", default=None, help="PEM certificate (chain)")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="PEM private key")
    p.add_argument("--tls-required", action="store_true", default=None,
                   help="refuse every option but STARTTLS/ABORT until TLS is up")
    p.add_argument("--max-connections", type=int, metavar="N", default=None,
                   help="connections beyond this are closed at once (default 512)")
    p.add_argument("--handshake-timeout", type=float, metavar="SECONDS", default=None,
                   help="time a client has to reach transmission (default 10)")
    p.add_argument("--grace", type=float, metavar="SECONDS", default=None,
                   help="on SIGTERM/SIGINT, time to finish in-flight replies (default 10)")
    p.add_argument("--cow-dir", metavar="DIR", default=None,
                   help="where copy-on-write overlay files live (default: $TMPDIR)")
    p.add_argument("--cow-linger", type=float, metavar="SECONDS", default=None,
                   help="a client's overlay outlives its last connection this long; a client "
                        "that comes back later boots anew (default 120)")
    p.add_argument("--workers", type=int, metavar="N", default=None,
                   help="server processes sharing the port with SO_REUSEPORT (default 1; "
                        "read-only exports only)")
    p.add_argument("--debug-requests", action="store_true", default=None,
                   help="log every request (debug level)")
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="write every request as t_ms,conn,op,offset,count,lat_us (a boot trace "
                        "for icbd-bench bootstorm)")
    g = p.add_argument_group("cache (see docs/store.md)")
    g.add_argument("--store", metavar="DIR", default=None,
                   help="serve every version in this store as IMI@VERSION and IMI (latest); "
                        "--export NAME=nbd://HOST:PORT/EXPORT then faults NAME from an upstream")
    g.add_argument("--store-size", type=parse_bytes, metavar="BYTES", default=None,
                   help="bound of the store's chunks (e.g. 50G); cold unpinned chunks are evicted")
    g.add_argument("--hot-size", type=parse_bytes, metavar="BYTES", default=None, dest="hot_bytes",
                   help="chunks kept in process memory (default 256M)")
    g.add_argument("--fault-timeout", type=float, metavar="SECONDS", default=None,
                   help="a read waiting on a missing chunk fails with EIO after this (default 10)")
    g.add_argument("--source-timeout", type=float, metavar="SECONDS", default=None,
                   help="per request to a source (default 5)")
    _verbosity(p)


def _verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Merge the TOML file (if any) with the flags given. Raises ValueError for the user."""
    file: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as f:
            file = tomllib.load(f)
    known = set(ServeConfig.__dataclass_fields__)
    unknown = set(file) - known
    if unknown:
        raise ValueError(f"{args.config}: unknown settings {', '.join(sorted(unknown))}")

    def pick(key: str) -> Any:
        value = getattr(args, key, None)
        return value if value is not None else file.get(key)

    exports = pick("export") or file.get("exports") or []
    listen = pick("listen") or []
    unix = pick("unix")
    if not listen and not unix:
        listen = [f"0.0.0.0:{DEFAULT_PORT}"]
    cfg = ServeConfig(
        exports=[ExportSpec.parse(e) for e in exports],
        listen=[parse_listen(x) for x in listen],
        unix=unix,
    )
    for key in ("default_export", "tls_cert", "tls_key", "tls_required", "max_connections",
                "handshake_timeout", "grace", "cow_dir", "cow_linger", "workers",
                "debug_requests", "trace", "store", "store_size", "hot_bytes", "fault_timeout",
                "source_timeout"):
        value = pick(key)
        if value is not None:
            setattr(cfg, key, value)
    if not cfg.exports and not cfg.store:
        raise ValueError("nothing to serve: give --export NAME=PATH or --store DIR")
    if any(e.is_upstream for e in cfg.exports) and not cfg.store:
        raise ValueError("--export NAME=nbd://... needs --store DIR (the cache it fills)")
    if any(e.is_upstream and e.cow for e in cfg.exports):
        raise ValueError("upstream exports are read-only")
    names = [e.name for e in cfg.exports]
    if len(set(names)) != len(names):
        raise ValueError("export names must be unique")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if cfg.tls_required and not cfg.tls_cert:
        raise ValueError("--tls-required needs --tls-cert and --tls-key")
    if cfg.workers > 1 and any(e.cow for e in cfg.exports):
        raise ValueError("copy-on-write exports need --workers 1 (overlays live in one process)")
    if cfg.workers > 1 and cfg.trace:
        raise ValueError("--trace needs --workers 1 (one file, one writer)")
    if cfg.max_connections < 1 or cfg.workers < 1:
        raise ValueError("--max-connections and --workers must be at least 1")
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache.server import run

    try:
        cfg = serve_config(args)
        from icbdcache.server import build_catalog, tls_context

        build_catalog(cfg).close()  # fail early, with the export named, before forking
        if cfg.store:
            from icbdcache.store import Store

            Store(cfg.store, size_limit=cfg.store_size).close()
        if cfg.tls_cert and cfg.tls_key:
            tls_context(cfg.tls_cert, cfg.tls_key)
    except (ValueError, OSError, StoreError) as e:
        print(f"icbd-cache serve: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except (OSError, StoreError) as e:
        print(f"icbd-cache serve: {e}", file=sys.stderr)
        return 1


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="make a small real disk image, serve it, read it back with nbdcopy",
        description="The main job on an embedded default: builds a small ext4 disk image "
                    "(cached), serves it with 'icbd-cache serve' on 127.0.0.1, and reads it "
                    "back with real NBD clients (nbdinfo, nbdcopy), comparing checksums.",
        epilog="example:\n  icbd-cache demo\n  icbd-cache demo --size 256M --keep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="128M", help="image size (default 128M)")
    p.add_argument("--image", default=None, help="serve this raw image instead")
    p.add_argument("--clients", type=int, default=4, help="parallel nbdcopy readers (default 4)")
    _verbosity(p)


def cmd_demo(args: argparse.Namespace) -> int:
    from icbdcache.demo import run_demo

    return run_demo(args.size, args.image, args.clients)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icbd-cache``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="icbd-cache",
        description="Boot-path caching NBD server for iCBD diskless workstations.",
        epilog="example:\n  icbd-cache serve --export lab=/srv/imi/lab.img\n"
               "  icbd-cache serve --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"icbd-cache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _demo_parser(sub)
    store_handlers = storecli.add_parsers(sub, _verbosity)
    pxe_handlers = pxecli.add_parsers(sub, _verbosity)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logsetup.setup(-1 if args.quiet else args.verbose)
    handlers = {"serve": cmd_serve, "demo": cmd_demo, **store_handlers, **pxe_handlers}
    return int(handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
