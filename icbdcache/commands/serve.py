"""The ``icbd-cache`` command line: ``serve`` and ``demo`` (more subcommands arrive with the
store, PXE and replication)."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
import textwrap
import tomllib
from collections.abc import Sequence
from typing import Any

from icbdcache import __version__
from icbdcache import log as logsetup
from icbdcache.commands import pxe as pxecli
from icbdcache.commands import store as storecli
from icbdcache.commands.store import parse_bytes, size_arg
from icbdcache.exports import ExportSpec
from icbdcache.server import DEFAULT_PORT, ServeConfig, parse_listen
from icbdcache.store import StoreError

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
        description=textwrap.fill(
            "Serve raw disk images (iMIs) to NBD clients: the kernel's nbd-client, qemu, "
            "libnbd. Read-only by default; ',cow' gives each client its own copy-on-write "
            "overlay. See docs/serve.md.", 78),
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the same settings: keys are the long options with _ "
                        "(hot_size = \"64M\"); options given on the command line win, and "
                        "--export/--listen replace the file's lists (docs/serve.md)")
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
    g.add_argument("--store-cow", action="store_true", default=None,
                   help="make the store's versions writable through a per-client "
                        "copy-on-write overlay (workstations that mount their root rw)")
    g.add_argument("--store-size", type=size_arg, metavar="BYTES", default=None,
                   help="bound of the store's chunks (e.g. 50G); cold unpinned chunks are evicted")
    g.add_argument("--hot-size", type=size_arg, metavar="BYTES", default=None, dest="hot_bytes",
                   help="chunks kept in process memory (default 1G)")
    g.add_argument("--fault-timeout", type=float, metavar="SECONDS", default=None,
                   help="a read waiting on a missing chunk fails with EIO after this (default 10)")
    g.add_argument("--source-timeout", type=float, metavar="SECONDS", default=None,
                   help="per request to a source (default 5)")
    g.add_argument("--readahead", type=int, metavar="CHUNKS", default=None,
                   help="chunks faulted ahead of a sequential miss (a first boot has no boot "
                        "profile yet; default 8, 0 turns it off; docs/store.md)")
    pxecli.add_serve_args(p)
    from icbdcache.commands import replica as replicacli

    replicacli.add_transfer_args(p, required=False)
    _verbosity(p)


def _verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


#: Keys of a ``serve --config`` file: the long options with ``_`` -> (ServeConfig field, kind).
#: ``exports`` (the field's name) and ``hot_bytes`` (the old spelling) are accepted too.
FILE_SETTINGS: dict[str, tuple[str, str]] = {
    "listen": ("listen", "list"),
    "unix": ("unix", "str"),
    "export": ("exports", "list"),
    "exports": ("exports", "list"),
    "default_export": ("default_export", "str"),
    "tls_cert": ("tls_cert", "str"),
    "tls_key": ("tls_key", "str"),
    "tls_required": ("tls_required", "bool"),
    "max_connections": ("max_connections", "int"),
    "handshake_timeout": ("handshake_timeout", "float"),
    "grace": ("grace", "float"),
    "cow_dir": ("cow_dir", "str"),
    "cow_linger": ("cow_linger", "float"),
    "workers": ("workers", "int"),
    "debug_requests": ("debug_requests", "bool"),
    "trace": ("trace", "str"),
    "store": ("store", "str"),
    "store_size": ("store_size", "size"),
    "hot_size": ("hot_bytes", "size"),
    "hot_bytes": ("hot_bytes", "size"),
    "fault_timeout": ("fault_timeout", "float"),
    "source_timeout": ("source_timeout", "float"),
    "readahead": ("readahead", "int"),
}
_KINDS = {
    "str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
    "size": 'a size (bytes as an integer, or a string like "64M" or "50G")',
    "list": "a list of strings",
}
#: ServeConfig field -> the attribute of the parsed command line that sets it.
_FLAG_OF = {"exports": "export"}


def _file_value(path: str, key: str, kind: str, value: Any) -> Any:
    """``value`` of setting ``key`` checked against ``kind`` and converted. Raises
    ValueError naming the file and the setting."""
    ok = True
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "size":
        if isinstance(value, str):
            try:
                value = parse_bytes(value)
            except ValueError:
                ok = False
        ok = ok and isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind == "list":
        if isinstance(value, str):
            value = [value]  # a single string is a one-element list
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    if not ok:
        raise ValueError(f"{path}: setting {key!r} must be {_KINDS[kind]}, got {value!r}")
    return value


def load_config(path: str) -> dict[str, Any]:
    """The settings of a ``serve --config`` TOML file by ServeConfig field, checked.
    Raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid TOML file: {e}") from e
    cli_only = sorted(set(raw) & {"v", "q", "verbose", "quiet"})
    if cli_only:
        raise ValueError(f"{path}: {', '.join(cli_only)}: -v/-q are command-line options only")
    unknown = sorted(set(raw) - set(FILE_SETTINGS))
    if unknown:
        known = [k for k in FILE_SETTINGS if k not in ("exports", "hot_bytes")]
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in raw.items():
        fld, kind = FILE_SETTINGS[key]
        if fld in given:
            raise ValueError(f"{path}: {given[fld]!r} and {key!r} are the same setting; give one")
        given[fld] = key
        out[fld] = _file_value(path, key, kind, value)
    return out


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Merge the TOML file (if any) with the flags given. Raises ValueError for the user."""
    file = load_config(args.config) if args.config else {}

    def pick(key: str) -> Any:
        value = getattr(args, _FLAG_OF.get(key, key), None)
        return value if value is not None else file.get(key)

    def parsed(key: str, parse: Any) -> list[Any]:
        # the command line's list replaces the file's, it does not extend it
        flags = getattr(args, _FLAG_OF.get(key, key), None)
        where = "" if flags is not None else f"{args.config}: "
        try:
            return [parse(x) for x in (flags if flags is not None else file.get(key, []))]
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e

    exports = parsed("exports", ExportSpec.parse)
    listen = parsed("listen", parse_listen)
    unix = pick("unix")
    if not listen and not unix:
        listen = [parse_listen(f"0.0.0.0:{DEFAULT_PORT}")]
    cfg = ServeConfig(exports=exports, listen=listen, unix=unix)
    for key in ("default_export", "tls_cert", "tls_key", "tls_required", "max_connections",
                "handshake_timeout", "grace", "cow_dir", "cow_linger", "workers",
                "debug_requests", "trace", "store", "store_cow", "store_size", "hot_bytes",
                "fault_timeout", "source_timeout", "readahead"):
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


def check_cow_dir(path: str) -> None:
    """Refuse a ``--cow-dir`` where overlay files cannot be made. Raises ValueError."""
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ValueError(f"--cow-dir {path}: {what}")
    try:
        fd, name = tempfile.mkstemp(prefix="icbd-cow-check-", dir=path)
    except OSError as e:
        raise ValueError(f"--cow-dir {path}: cannot create overlay files there "
                         f"({e.strerror or e})") from e
    os.close(fd)
    os.unlink(name)


def check_tls(cert: str, key: str) -> None:
    """Load ``--tls-cert``/``--tls-key`` once, so that a bad pair is refused at startup with
    the files named. Raises ValueError."""
    from icbdcache.server import tls_context

    texts = {}
    for opt, path, marker, what in (
            ("--tls-cert", cert, b"-----BEGIN CERTIFICATE-----", "a PEM certificate"),
            ("--tls-key", key, b" PRIVATE KEY-----", "a PEM private key")):
        try:
            with open(path, "rb") as f:
                texts[opt] = f.read(1 << 20)
        except OSError as e:
            raise ValueError(f"{opt} {path}: {e.strerror or e}") from e
        if marker not in texts[opt]:
            raise ValueError(f"{opt} {path}: not {what} (no '{marker.decode().strip()}' line)")
    if any(m in texts["--tls-key"] for m in (b"ENCRYPTED PRIVATE KEY-----",
                                              b"Proc-Type: 4,ENCRYPTED")):
        raise ValueError(f"--tls-key {key}: the key is encrypted and the server cannot ask for "
                         "its passphrase (decrypt it: openssl pkey -in KEY -out PLAIN)")
    try:
        tls_context(cert, key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"--tls-key {key} does not match the certificate in --tls-cert "
                             f"{cert}") from e
        raise ValueError(f"cannot use --tls-cert {cert} with --tls-key {key}: {e}") from e
    except OSError as e:
        raise ValueError(f"cannot use --tls-cert {cert} with --tls-key {key}: "
                         f"{e.strerror or e}") from e


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache.server import run

    try:
        cfg = serve_config(args)
        cfg.pxe = pxecli.serve_pxe_config(args, cfg)
        from icbdcache.server import build_catalog

        if cfg.cow_dir:
            check_cow_dir(cfg.cow_dir)
        if cfg.tls_cert and cfg.tls_key:
            check_tls(cfg.tls_cert, cfg.tls_key)
        build_catalog(cfg).close()  # fail early, with the export named, before forking
        if cfg.store:
            from icbdcache.store import Store

            Store(cfg.store, size_limit=cfg.store_size).close()
        from icbdcache.commands import replica as replicacli

        if args.master:
            from icbdcache import node

            node.DEFAULT_SERVICES.append(replicacli.serve_service(
                args, cfg.listen, workers=cfg.workers, store=cfg.store))
        elif replicacli.has_transfer_args(args):
            raise ValueError("--site, --subscribe and the other replication options need "
                             "--master URL")
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
        description=textwrap.fill(
            "Builds a small ext4 disk image (once, kept in ~/.cache/icbd-cache), serves it "
            "with 'icbd-cache serve' on 127.0.0.1, reads it back with real NBD clients "
            "(nbdinfo, then several nbdcopy at once) and checks each copy's sha256. Needs "
            "mkfs.ext4, nbdinfo and nbdcopy (scripts/setup installs them).", 78),
        epilog="examples:\n  icbd-cache demo\n  icbd-cache demo --size 256M --clients 8\n"
               "  icbd-cache demo --image /srv/imi/lab-7.img",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="128M", metavar="SIZE",
                   help="image size: bytes, or a number with K, M or G (default 128M)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="serve this raw image instead of building one")
    p.add_argument("--clients", type=int, default=4, metavar="N",
                   help="parallel nbdcopy readers (default 4)")
    p.add_argument("--boot", action="store_true",
                   help="instead, boot a real workstation: build the Debian test iMI "
                        "(scripts/build-test-imi: root, debootstrap), import it into a "
                        "temporary store, serve it with 'serve --store --pxe' and boot a QEMU "
                        "guest from it over iPXE and NBD (2 to 4 minutes the first time)")
    _verbosity(p)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.boot:
        from icbdcache.commands.bootdemo import run_boot_demo

        return run_boot_demo()
    from icbdcache.commands.demo import run_demo

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
    from icbdcache.commands import master as mastercli

    master_handlers = mastercli.add_parsers(sub, _verbosity)
    from icbdcache.commands import replica as replicacli

    master_handlers.update(replicacli.add_parsers(sub, _verbosity))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logsetup.setup(-1 if args.quiet else args.verbose)
    handlers = {"serve": cmd_serve, "demo": cmd_demo, **store_handlers, **pxe_handlers}
    handlers.update(master_handlers)
    return int(handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
