"""``icbd-cache serve``: its option table, the settings it is run with (ServeConfig) and the
checks made before anything is served (docs/serve.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import ssl
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from functools import partial
from typing import Any

from icbdcache.access import parse_cidr
from icbdcache.commands import pxe, replica
from icbdcache.commands.options import Command, Option, reresolve
from icbdcache.commands.store import store_option, store_size_option
from icbdcache.exports import ExportSpec
from icbdcache.log import kv
from icbdcache.node import NodeService
from icbdcache.server import DEFAULT_PORT, ServeConfig, parse_listen
from icbdcache.store import StoreError

serve_log = logging.getLogger("icbdcache.serve")

SERVE_EXAMPLES = """\
examples:
  # one read-only iMI on the default port, for every address of the host
  icbd-cache serve --export lab=/srv/imi/lab-7.img

  # two exports on loopback, the second writable through per-client copy-on-write
  icbd-cache serve --listen 127.0.0.1:10809 --export lab=/srv/lab.img \\
      --export scratch=/srv/base.img,cow --default-export lab

  # planned restart (an upgrade) without a dropped client: run the new version with the
  # same arguments, or send SIGUSR2 to the running server; the old one hands over and exits
  icbd-cache serve --store /var/lib/icbd-cache/store --handover /run/icbd-cache/handover

  # TLS required (STARTTLS), settings from a file, flags override it
  icbd-cache serve --config /etc/icbd-cache/serve.toml --tls-cert srv.pem \\
      --tls-key srv.key --tls-required

clients:
  nbdinfo nbd://HOST/lab          qemu-img info nbd://HOST:10809/lab
  nbd-client HOST 10809 /dev/nbd0 -N lab
"""


CACHE_GROUP = "cache (see docs/store.md)"
LIMITS_GROUP = "limits (see docs/serve.md, LIMITS AND SHUTDOWN)"

#: ``--workers auto``.
AUTO = 0


def parse_workers(text: str) -> int:
    """``--workers``: a number of at least 1, or ``auto`` (:data:`AUTO`). Raises ValueError."""
    if text.strip().lower() == "auto":
        return AUTO
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--workers {text!r}: a number or auto") from None
    if n < 1:
        raise ValueError("--workers must be at least 1 (or auto)")
    return n


SERVE = Command(
    "serve", "serve iMI images over NBD",
    textwrap.fill(
        "Serve raw disk images (iMIs) to NBD clients: the kernel's nbd-client, qemu, libnbd. "
        "Read-only by default; ',cow' gives each client its own copy-on-write overlay. See "
        "docs/serve.md.", 78),
    SERVE_EXAMPLES,
    (Option("listen", "list", metavar="HOST:PORT", parse=parse_listen,
            help=f"TCP address to listen on, repeatable (default 0.0.0.0:{DEFAULT_PORT} "
                 "unless --unix is given)"),
     Option("unix", metavar="PATH", help="also listen on a Unix socket"),
     Option("export", "list", metavar="NAME=PATH[,cow][,allow=CIDR]", dest="exports",
            aliases=("exports",), parse=ExportSpec.parse,
            help="an export: a raw image file; ',cow' = writable per client, the file itself "
                 "is never written; ',allow=CIDR' (repeatable) = only clients of these "
                 "networks see it (repeatable)"),
     Option("allow", "list", metavar="CIDR", parse=parse_cidr,
            help="accept NBD clients from this network only, e.g. 10.1.0.0/16 (repeatable; "
                 "default: any); others are closed at once and logged; SIGHUP re-reads it"),
     Option("metrics-listen", metavar="HOST:PORT", parse=parse_listen,
            help="serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md)"),
     Option("default-export", metavar="NAME",
            help="export for clients that ask for the empty name: an --export, or with "
                 "--store a version IMI@VERSION or an iMI (its latest) (default: the first "
                 "--export)"),
     Option("tls-cert", metavar="FILE", help="PEM certificate (chain)"),
     Option("tls-key", metavar="FILE", help="PEM private key"),
     Option("tls-required", "bool",
            help="refuse every option but STARTTLS/ABORT until TLS is up"),
     Option("tls-ca", metavar="FILE",
            help="PEM bundle of the CAs client certificates must chain to (only these, not "
                 "the system's); a client that presents another certificate, or an expired "
                 "one, fails the TLS handshake"),
     Option("tls-verify-peer", "bool",
            help="every client must present a certificate that chains to --tls-ca (implies "
                 "--tls-required)"),
     Option("tls-identity", default="address", choices=("address", "subject"),
            metavar="address|subject",
            help="whose copy-on-write overlay a client gets: its address (default), or the "
                 "subject of its verified client certificate (docs/serve.md, Client "
                 "identity)"),
     Option("max-connections", "int", metavar="N", group=LIMITS_GROUP,
            help="connections beyond this are closed at once (default 512)"),
     Option("address-connections", "int", metavar="N", group=LIMITS_GROUP,
            help="connections from one client address (default 64)"),
     Option("address-handshakes", "int", metavar="N", group=LIMITS_GROUP,
            help="connections from one client address still in the handshake (default 16)"),
     Option("reserved-connections", "int", metavar="N", group=LIMITS_GROUP,
            help="the last N of --max-connections (at most half) go only to addresses "
                 "holding fewer than 4 (default 64)"),
     Option("handshake-timeout", "float", metavar="SECONDS", group=LIMITS_GROUP,
            help="time a client may take to send its next option in the handshake "
                 "(default 10)"),
     Option("handshake-total", "float", metavar="SECONDS", group=LIMITS_GROUP,
            help="time a client has to reach transmission, however busy (default 300)"),
     Option("idle-timeout", "float", metavar="SECONDS", group=LIMITS_GROUP,
            help="close a connection with no request for this long (not one with a "
                 "copy-on-write overlay); only for clients that reconnect by themselves "
                 "(icbd-nbd-client; not nbd-client -persist, not qemu without "
                 "reconnect-delay); default 0: never"),
     Option("send-timeout", "float", metavar="SECONDS", group=LIMITS_GROUP,
            help="close a connection whose client has read none of its replies for this "
                 "long (default 60, 0: never)"),
     Option("reply-budget", "size", metavar="BYTES", group=LIMITS_GROUP,
            help="replies in flight in the whole server (each of N workers: 1/N of it); "
                 "more requests wait (default 512M)"),
     Option("connection-reply-budget", "size", metavar="BYTES", group=LIMITS_GROUP,
            help="replies in flight on one connection; more requests wait, unread "
                 "(default 64M)"),
     Option("address-reply-budget", "size", metavar="BYTES", group=LIMITS_GROUP,
            help="replies in flight on the connections of one client address (default "
                 "128M)"),
     Option("grace", "float", metavar="SECONDS",
            help="on SIGTERM/SIGINT, time to finish in-flight replies (default 10)"),
     Option("cow-dir", metavar="DIR",
            help="where the clients' copy-on-write overlays are kept, across restarts and "
                 "crashes (default: $TMPDIR/icbd-cow-UID-HASH, named after the listen "
                 "addresses)"),
     Option("cow-linger", "float", metavar="SECONDS",
            help="a client's overlay outlives its last connection this long; a client that "
                 "comes back later boots anew (default 120)"),
     Option("cow-max", "size", metavar="BYTES",
            help="the most one client's overlay may hold; writes past it fail with ENOSPC "
                 "(default: a quarter of the file system of --cow-dir; 0: no bound)"),
     Option("handover", metavar="PATH",
            help="a Unix socket for planned restarts: a server started with the same "
                 "--handover takes the listening sockets and live connections of the one "
                 "running (which exits), so clients see no drop; SIGUSR2 makes the running "
                 "server start its successor itself (docs/serve.md)"),
     Option("workers", metavar="N|auto", parse=parse_workers,
            help="server processes sharing the port (SO_REUSEPORT) and the store (each "
                 "chunk faulted once across them); with copy-on-write exports each client "
                 "address is steered to one worker; auto (the default): one per core this "
                 "process may run on, or 1 where a setting needs one process (docs/serve.md)"),
     Option("debug-requests", "bool", help="log every request (debug level)"),
     Option("trace", metavar="FILE",
            help="write every request as t_ms,conn,op,offset,count,lat_us (a boot trace for "
                 "icbd-bench bootstorm)"),
     store_option(default=None, group=CACHE_GROUP,
                  help="serve every version in this store as IMI@VERSION and IMI (latest); "
                       "--export NAME=nbd://HOST:PORT/EXPORT then faults NAME from an "
                       "upstream"),
     Option("create-store", "bool", group=CACHE_GROUP,
            help="make an empty store at --store DIR if there is none (without it a missing "
                 "store is refused: a mistyped path must not serve nothing)"),
     Option("store-cow", "bool", group=CACHE_GROUP,
            help="make the store's versions writable through a per-client copy-on-write "
                 "overlay (workstations that mount their root rw)"),
     store_size_option("bound of the store's chunks (e.g. 50G); cold unpinned chunks are "
                       "evicted", group=CACHE_GROUP),
     Option("hot-size", "size", metavar="BYTES", dest="hot_bytes", aliases=("hot_bytes",),
            group=CACHE_GROUP, help="chunks kept in memory (default 1G; each of N workers: "
            "1/N of it); each worker's store writer queues as much again at most, and at least "
            "64M (store.md)"),
     Option("fault-timeout", "float", metavar="SECONDS", group=CACHE_GROUP,
            help="a read waiting on a missing chunk fails with EIO after this (default 10)"),
     Option("source-timeout", "float", metavar="SECONDS", group=CACHE_GROUP,
            help="per request to a source (default 5)"),
     Option("readahead", "int", metavar="CHUNKS", group=CACHE_GROUP,
            help="chunks faulted ahead of a sequential miss (a first boot has no boot profile "
                 "yet; default 8, 0 turns it off; docs/store.md)"),
     Option("busy-poll", "int", metavar="MICROSECONDS", dest="busy_poll_us",
            help="after a client's request, keep polling the sockets this long instead of "
                 "sleeping: the next request of a client at iodepth 1 is read without a "
                 "wake-up (costs CPU only while clients send requests; default 50, 0 turns "
                 "it off; docs/serve.md, Busy polling)"),
     *pxe.serve_options(),
     *replica.transfer_options(in_serve=True)),
    doc="serve.md", config_file=True)

#: serve's table.
COMMANDS = (SERVE,)

#: The options that are ServeConfig fields; a value not given keeps the field's default.
#: (``pxe``, the flag, becomes a PXE service of the node: :func:`pxe.serve_pxe_config`.)
_CONFIG_FIELDS = (frozenset(f.name for f in dataclasses.fields(ServeConfig))
                  & frozenset(o.dest for o in SERVE.options)) - {"pxe"}


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of the resolved options (:meth:`Command.resolve`). Raises ValueError
    for the user."""
    values = {d: getattr(args, d) for d in _CONFIG_FIELDS}
    values["allow"] = values.get("allow") or []
    listen = values.pop("listen") or []
    if not listen and not values["unix"]:
        listen = [parse_listen(f"0.0.0.0:{DEFAULT_PORT}")]
    auto = values.get("workers") in (AUTO, None)
    if auto:
        values["workers"] = 1
    cfg = ServeConfig(exports=values.pop("exports") or [], listen=listen,
                      **{k: v for k, v in values.items() if v is not None})
    if auto:
        cfg.workers, cfg.workers_why = default_workers(cfg)
    if not 0 <= cfg.busy_poll_us <= 1_000_000:
        raise ValueError("--busy-poll takes 0 (off) to 1000000 microseconds")
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
    if cfg.workers > 1 and cfg.unix and (cfg.store_cow or any(e.cow for e in cfg.exports)):
        raise ValueError("copy-on-write exports (,cow and --store-cow) with --workers > 1 "
                         "need TCP --listen addresses only, not --unix (a client's overlay "
                         "lives in one worker, and a client is steered there by address)")
    if cfg.tls_ca and not cfg.tls_cert:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key")
    if cfg.tls_verify_peer and not cfg.tls_ca:
        raise ValueError("--tls-verify-peer needs --tls-ca FILE (the CAs client certificates "
                         "must chain to)")
    if cfg.tls_verify_peer:
        cfg.tls_required = True  # a client without a certificate gets no export at all
    if cfg.tls_identity == "subject" and not cfg.tls_ca:
        raise ValueError("--tls-identity subject needs --tls-ca FILE (subjects of verified "
                         "certificates only)")
    if any(e.tls_names for e in cfg.exports) and not cfg.tls_ca:
        raise ValueError("an export with tls-name= needs --tls-ca FILE (names of verified "
                         "certificates only)")
    if (cfg.workers > 1 and cfg.tls_identity == "subject"
            and (cfg.store_cow or any(e.cow for e in cfg.exports))):
        raise ValueError("--tls-identity subject with copy-on-write exports needs --workers 1 "
                         "(workers are chosen by the client's address, an overlay by its "
                         "certificate)")
    if cfg.workers > 1 and cfg.trace:
        raise ValueError("--trace needs --workers 1 (one file, one writer)")
    if cfg.workers > 1 and cfg.handover and (cfg.store_cow or any(e.cow for e in cfg.exports)):
        raise ValueError("--handover with copy-on-write exports needs --workers 1 (the "
                         "sockets that steer each client to its worker cannot cross)")
    if cfg.max_connections < 1 or cfg.workers < 1:
        raise ValueError("--max-connections and --workers must be at least 1")
    if cfg.address_connections < 1 or cfg.address_handshakes < 1:
        raise ValueError("--address-connections and --address-handshakes must be at least 1")
    if cfg.reserved_connections < 0:
        raise ValueError("--reserved-connections must be 0 or more")
    if cfg.handshake_timeout <= 0 or cfg.handshake_total <= 0:
        raise ValueError("--handshake-timeout and --handshake-total must be positive")
    if cfg.idle_timeout < 0 or cfg.send_timeout < 0:
        raise ValueError("--idle-timeout and --send-timeout must be 0 (never) or positive")
    if min(cfg.reply_budget, cfg.connection_reply_budget, cfg.address_reply_budget) < 1:
        raise ValueError("--reply-budget, --connection-reply-budget and "
                         "--address-reply-budget must be at least 1 byte")
    return cfg


def default_workers(cfg: ServeConfig, environ: Mapping[str, str] | None = None,
                    cores: int | None = None) -> tuple[int, str]:
    """The number of workers of ``--workers auto``, and why: one per core this
    process may run on (``cores``: that number, default :func:`os.sched_getaffinity`), or 1
    where a setting needs a single process (``--trace``; copy-on-write exports with
    ``--unix``, sockets passed by systemd (``environ``'s ``LISTEN_FDS``), ``--handover`` or
    ``--tls-identity subject``)."""
    from icbdcache.layers.cowdir import kept_by
    from icbdcache.server import cow_dir_of

    env = os.environ if environ is None else environ
    n = cores if cores is not None else len(os.sched_getaffinity(0))
    if cfg.trace:
        return 1, "--trace writes one file from one process"
    if cfg.store_cow or any(e.cow for e in cfg.exports):
        # a client's overlay lives in one worker, reached through steered TCP sockets
        for given_, what in ((cfg.unix, "--unix"), (env.get("LISTEN_FDS"), "sockets "
                             "passed by systemd"), (cfg.handover, "--handover"),
                             (cfg.tls_identity == "subject", "--tls-identity subject")):
            if given_:
                return 1, f"copy-on-write exports with {what}"
        cow_dir = cow_dir_of(cfg)
        kept = kept_by(cow_dir) if cow_dir is not None else None
        if kept:  # its clients must find their overlays where they were kept
            return kept, f"the overlays in --cow-dir were kept by {kept} worker(s)"
    return max(1, n), "one per core" if n > 1 else "one core"


def check_default_export(cfg: ServeConfig) -> None:
    """Refuse a ``--default-export`` that names neither an ``--export`` nor a version the
    store resolves (``IMI@VERSION``, or ``IMI`` with a latest version). The store must exist;
    it is opened read-only. Raises ValueError naming what was looked for, or StoreError."""
    name = cfg.default_export
    if name is None or name in {e.name for e in cfg.exports}:
        return
    if cfg.store:
        from icbdcache.store import Store

        store = Store(cfg.store, readonly=True)
        try:
            if store.version(name) is not None:
                return
        finally:
            store.close()
        where = (f"not an --export name, and the store {cfg.store} has no version {name!r} "
                 "(IMI@VERSION, or IMI with a latest version; see icbd-cache ls)")
    else:
        where = "not an --export name (a store version needs --store DIR)"
    raise ValueError(f"--default-export {name!r} is not an export: {where}")


def check_cow_dir(path: str, *, make: bool = False, held_ok: bool = False) -> None:
    """Refuse a ``--cow-dir`` where overlay files cannot be made, or that another running
    server holds (unless ``held_ok``: a successor taking over with ``--handover``); ``make``:
    the server will make it (the default directory), so a missing one only needs a writable
    parent. Raises ValueError."""
    from icbdcache.layers.cowdir import CowDir

    if make and not os.path.exists(path):
        parent = os.path.dirname(path) or "."
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot make the overlay directory {path} (no write access to "
                             f"{parent}); give --cow-dir DIR")
        return
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ValueError(f"--cow-dir {path}: {what}")
    try:
        if not held_ok:
            CowDir.check_free(path)
    except OSError as e:
        raise ValueError(str(e)) from e
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


def check_tls_ca(ca: str) -> None:
    """Load ``--tls-ca`` once, so that a missing file or one without a PEM certificate is
    refused at startup. Raises ValueError naming the file."""
    try:
        with open(ca, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--tls-ca {ca}: {e.strerror or e}") from e
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"--tls-ca {ca}: not a PEM certificate bundle")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise ValueError(f"--tls-ca {ca}: {e}") from e


def check_startup(cfg: ServeConfig) -> None:
    """Everything checked before serving, each refusal naming the option or file: the
    ``--cow-dir``, the TLS files, that every file export opens, the store (a missing one is
    refused unless ``--create-store``), the default export. Raises ValueError, OSError or
    StoreError."""
    from icbdcache.server import build_catalog, cow_dir_of

    cow_dir = cow_dir_of(cfg)
    if cow_dir is not None:
        check_cow_dir(cow_dir, make=not cfg.cow_dir, held_ok=bool(cfg.handover))
        from icbdcache.layers.cowdir import check_layout

        check_layout(cow_dir, cfg.workers)
    elif cfg.cow_dir:
        check_cow_dir(cfg.cow_dir)
    if cfg.tls_cert and cfg.tls_key:
        check_tls(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        check_tls_ca(cfg.tls_ca)
    # every file export opens, with the export named, before forking (the default export
    # may be a store version, checked below against the store)
    build_catalog(dataclasses.replace(cfg, default_export=None), recover=False).close()
    from icbdcache.store.index import sector_note

    for spec in cfg.exports:
        note = None if spec.is_upstream else sector_note(os.path.getsize(spec.path))
        if note is not None:
            serve_log.warning(kv(event="image_size", export=spec.name, path=spec.path,
                                 warning=note))
    if cfg.store:
        from icbdcache.store import Store

        if not os.path.exists(os.path.join(cfg.store, "data.mdb")) and not cfg.create_store:
            raise ValueError(f"--store {cfg.store}: no store there (a mistyped path? "
                             "--create-store makes an empty one)")
        Store(cfg.store, size_limit=cfg.store_size).close()
    check_default_export(cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache import server

    try:
        cfg = serve_config(args)
        pxe_config = pxe.serve_pxe_config(args, cfg)
        services: list[NodeService] = list(replica.serve_services(
            args, cfg.listen, workers=cfg.workers, store=cfg.store))
        check_startup(cfg)
        if pxe_config is not None:
            from pxe.service import PxeNodeService

            services.append(PxeNodeService(pxe_config))
    except (ValueError, OSError, StoreError) as e:
        print(f"icbd-cache serve: {e}", file=sys.stderr)
        return 2
    from icbdcache.handover import HandoverError

    try:
        return server.run(cfg, services=services, reload=partial(reload_serve, args, cfg))
    except (OSError, StoreError, HandoverError, ValueError) as e:
        print(f"icbd-cache serve: {e}", file=sys.stderr)
        return 1


#: Settings SIGHUP applies; a change of any other is logged as needing a restart.
RELOADABLE = frozenset({"allow", "log_format", "verbose", "quiet"})


def _setting_name(field: str) -> str:
    """The name a user knows a ServeConfig field by: its option's (``busy-poll`` for
    ``busy_poll_us``, ``hot-size`` for ``hot_bytes``), else the field's own."""
    try:
        return SERVE.option(field).name
    except KeyError:
        return field


def reload_serve(args: argparse.Namespace, running: ServeConfig, srv: Any) -> None:
    """SIGHUP: read the command line and ``--config`` file again and apply what can change
    while serving: ``--allow``, the PXE boot settings (pins, menus, templates) and the log
    format; name the settings that differ and need a restart. Raises ValueError (the new
    settings are refused, nothing changed) or OSError (the pins file)."""
    from icbdcache import log as logsetup

    fresh = reresolve(SERVE, args)
    cfg = serve_config(fresh)
    pxe_config = pxe.serve_pxe_config(fresh, cfg)
    services = srv.node.services if srv.node is not None else []
    pxe_services = [s for s in services if hasattr(s, "reload")]
    if pxe_config is not None:
        for svc in pxe_services:
            svc.reload(pxe_config.settings, pxe_config.allow)
    srv.set_allow(cfg.allow)
    logsetup.setup(-1 if fresh.quiet else fresh.verbose, fresh.log_format)
    differ = sorted(_setting_name(f.name) for f in dataclasses.fields(ServeConfig)
                    if f.name not in RELOADABLE
                    and getattr(cfg, f.name) != getattr(running, f.name))
    # the replica's settings (--master, --trust-key, --revoked-key, ...) are not ServeConfig
    # fields: compared as given, resolved then and now
    differ += sorted(o.name for o in replica.transfer_options(in_serve=True)
                     if getattr(fresh, o.dest, None) != getattr(args, o.dest, None))
    serve_log.info(kv(event="reload", allow=",".join(cfg.allow) or "any",
                      pins=len(pxe_config.settings.pins) if pxe_config else "-",
                      restart_needed=",".join(differ) or "-"))


def register(sub: Any) -> None:
    """Add ``serve`` to ``sub`` (argparse subparsers)."""
    SERVE.add_parser(sub, cmd_serve)


__all__ = ["COMMANDS", "SERVE", "check_default_export", "check_startup", "register",
           "serve_config"]
