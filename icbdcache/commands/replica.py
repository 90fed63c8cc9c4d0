"""``icbd-cache replica`` (a site's replica alone), and the replica options of ``icbd-cache serve
--master`` (one process serving NBD and replicating). See docs/replica.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import textwrap
from typing import TYPE_CHECKING, Any

from icbdcache.commands.options import Command, Option, given
from icbdcache.commands.store import check_name, store_option, store_size_option
from icbdcache.log import kv

log = logging.getLogger("icbdcache.replica")

if TYPE_CHECKING:  # imported when used: aiohttp stays out of every other command's start
    from icbdcache.replication.client import MasterClient
    from icbdcache.replication.replica import ReplicaConfig, ReplicaService
    from icbdcache.replication.signing import Trust

REPLICA_EXAMPLES = """\
examples:
  # pull what site-a is subscribed to (and lab), keep pulling new versions
  icbd-cache replica --store /var/lib/icbd-cache/store --master http://master:10810 \\
      --site site-a --subscribe lab --trust-key /etc/icbd-cache/master.key.pub

  # once, over TLS with zstd and a token, for a script (exit 0 when complete)
  icbd-cache replica --store DIR --master https://master:10810 --master-ca ca.pem \\
      --master-token-file site-a.token --compress zstd:3 --site site-a --once \\
      --trust-key master.key.pub

  # serve NBD and replicate in one process
  icbd-cache serve --store DIR --listen 10.0.0.5:10809 --master http://master:10810 \\
      --site site-a --subscribe lab --trust-key master.key.pub

  # the settings in a file (keys: the long options with _)
  icbd-cache replica --config /etc/icbd-cache/replica.toml
"""


def parse_master_url_text(text: str) -> str:
    """``--master URL`` checked (:func:`icbdcache.commands.master.parse_master_url`). Raises
    ValueError."""
    from icbdcache.commands.master import parse_master_url

    return parse_master_url(text)


def parse_listen_text(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``--metrics-listen``. Raises ValueError."""
    from icbdcache.server import parse_listen

    return parse_listen(text)


def parse_compress_text(text: str) -> str:
    """``plain`` or ``zstd[:LEVEL]``, checked and kept as text (``plain`` must not read as
    "not given"). Raises ValueError."""
    from icbdcache.replication.client import parse_compress

    parse_compress(text)
    return text


TRANSFER_GROUP = "replication (see docs/replica.md)"


def transfer_options(*, in_serve: bool) -> tuple[Option, ...]:
    """The master and transfer options of ``replica``, and of ``serve`` (``in_serve``: where
    ``--master`` is optional and turns the replica on)."""
    g = TRANSFER_GROUP
    return (
        Option("master", required=not in_serve, metavar="URL", group=g,
               parse=parse_master_url_text,
               help="the master, http://HOST:PORT or https://HOST:PORT"
                    + (": also replicate into --store" if in_serve else "")),
        Option("site", metavar="NAME", group=g, help="this site's name at the master"),
        Option("subscribe", "list", metavar="IMI", group=g,
               help="subscribe to this iMI at registration (repeatable; the master's "
                    "subscriptions of the site are pulled too)"),
        Option("compress", metavar="plain|zstd[:LEVEL]", parse=parse_compress_text, group=g,
               help="chunk streams compressed with zstd at LEVEL (1-19, default 3), or plain "
                    "(default)"),
        Option("master-ca", metavar="FILE", group=g,
               help="PEM CA that signs the master's certificate (https; default: the "
                    "system's CAs)"),
        Option("master-cert", metavar="FILE", group=g,
               help="PEM client certificate presented to the master"),
        Option("master-key", metavar="FILE", group=g, help="PEM private key of --master-cert"),
        Option("master-token-file", metavar="FILE", group=g,
               help="file holding this site's token (the last word of its first line)"),
        Option("site-address", metavar="HOST:PORT", group=g,
               help="this site's NBD address, shown by 'icbd-cache admin status'"
                    + (" (default: the first --listen)" if in_serve else "")),
        Option("pull-batch", "count", default=256, metavar="N", group=g,
               help="chunk digests per request (default 256, at most 4096)"),
        Option("pull-parallel", "count", default=3, metavar="N", group=g,
               help="chunk requests in flight (default 3, at most 8)"),
        *trust_options(g),
    ) + ((Option("on-demand", "bool", default=False, group=g,
                 help="take each subscribed version's manifest only (served, and the "
                      "iMI's latest, at once): a chunk crosses from the master when a "
                      "client first reads it, never in a background pull"),)
         if in_serve else ())


def trust_options(group: str | None = None) -> tuple[Option, ...]:
    """What a site trusts (``replica``, ``serve --master``, ``bundle import``)."""
    return (
        Option("trust-key", "list", metavar="FILE", group=group,
               help="public key (FILE.pub of icbd-cache keygen) whose signature a manifest "
                    "must carry (repeatable: during a key rotation, the old and the new)"),
        Option("revoked-key", "list", metavar="FILE|KEY_ID", group=group,
               help="refuse manifests signed by this key (a key file or its 16-hex-digit "
                    "id; repeatable)"),
        Option("insecure-no-signature", "bool", default=False, group=group,
               help="take manifests nobody signed (anyone on the path can then change what "
                    "workstations boot); without it a site needs --trust-key"),
    )


def trust_from_args(args: argparse.Namespace) -> Trust:
    """The Trust of the options; warns loudly on stderr when insecure. Raises ValueError
    naming the option or file."""
    from icbdcache.replication.signing import INSECURE_WARNING, KeyFileError, trust_from

    try:
        trust = trust_from(list(args.trust_key or []), list(args.revoked_key or []),
                           bool(args.insecure_no_signature))
    except KeyFileError as e:
        raise ValueError(str(e)) from e
    if trust.insecure:
        print(f"icbd-cache: {INSECURE_WARNING}", file=sys.stderr)
    return trust


def client_from_args(args: argparse.Namespace) -> MasterClient:
    """The MasterClient of the options. Raises ValueError naming the option and file."""
    from icbdcache.replication.auth import AuthConfigError, read_token
    from icbdcache.replication.client import MasterClient, parse_compress
    for opt, f in (("--master-ca", args.master_ca), ("--master-cert", args.master_cert),
                   ("--master-key", args.master_key),
                   ("--master-token-file", args.master_token_file)):
        if f is not None and not os.path.isfile(f):
            raise ValueError(f"{opt} {f}: "
                             f"{'not a file' if os.path.exists(f) else 'no such file'}")
    token = None
    if args.master_token_file:
        try:
            token = read_token(args.master_token_file)
        except AuthConfigError as e:
            raise ValueError(str(e)) from e
    try:
        return MasterClient(args.master, ca=args.master_ca, cert=args.master_cert,
                            key=args.master_key, token=token, site=args.site or None,
                            zstd_level=parse_compress(args.compress) if args.compress else None)
    except ssl.SSLError as e:
        raise ValueError(f"cannot use --master-ca/--master-cert/--master-key: {e}") from e
    except OSError as e:
        raise ValueError(f"cannot read the TLS files: {e.strerror or e}") from e


def config_from_args(args: argparse.Namespace, address: str = "") -> ReplicaConfig:
    """The ReplicaConfig of the options. Raises ValueError."""
    from icbdcache.replication.replica import ReplicaConfig
    from icbdcache.replication.wire import MAX_BATCH

    if not args.site:
        raise ValueError("--master needs --site NAME")
    if args.pull_parallel > 8:
        raise ValueError(f"--pull-parallel {args.pull_parallel}: at most 8 (the master "
                         "answers 429 to a ninth stream of one site)")
    if args.pull_batch > MAX_BATCH:
        raise ValueError(f"--pull-batch {args.pull_batch}: at most {MAX_BATCH} digests a "
                         "request")
    for what, name in [("--site", args.site)] + [("--subscribe", s)
                                                  for s in args.subscribe or []]:
        why = check_name(what, name)
        if why is not None:
            raise ValueError(why)
    trust = trust_from_args(args)
    return ReplicaConfig(site=args.site, subscribe=list(args.subscribe or []),
                         address=args.site_address or address, batch=args.pull_batch,
                         parallel=args.pull_parallel, once=bool(getattr(args, "once", False)),
                         on_demand=bool(getattr(args, "on_demand", False)), trust=trust)


def serve_services(args: argparse.Namespace, listen: list[tuple[str, int]], *,
                   workers: int, store: str | None) -> list[ReplicaService]:
    """``serve --master``: the replica service for the node (none without ``--master``),
    from the resolved options of :func:`transfer_options`. Raises ValueError, also for a
    replication option given without ``--master``."""
    from icbdcache.replication.replica import ReplicaService

    if not args.master:
        explicit = given(args)
        named = [o.flag for o in transfer_options(in_serve=True) if o.dest in explicit]
        if named:
            raise ValueError(f"{', '.join(named)}: the replication options need --master URL")
        return []
    if not store:
        raise ValueError("--master needs --store DIR (the store it replicates into)")
    address = ""
    if listen:
        host, port = listen[0]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cfg = config_from_args(args, address)
    return [ReplicaService(client_from_args(args), cfg)]


def cmd_replica(args: argparse.Namespace) -> int:
    from icbdcache.loop import new_event_loop
    from icbdcache.replication.replica import Replica
    from icbdcache.store import Store, StoreError

    try:
        cfg = config_from_args(args)
        client = client_from_args(args)
    except ValueError as e:
        print(f"icbd-cache replica: {e}", file=sys.stderr)
        return 2
    try:
        store = Store(args.store, size_limit=args.store_size)
        if args.store_size is not None:
            store.set_bound(args.store_size)  # what imports must fit in (docs/store.md)
    except StoreError as e:
        print(f"icbd-cache replica: {e}", file=sys.stderr)
        return 2
    replica = Replica(store, client, cfg)

    async def run() -> int:
        from icbdcache import activation

        metrics = None
        if args.metrics_listen:
            from icbdcache.metrics import MetricsServer, ReplicaCollector, new_registry

            metrics = MetricsServer(new_registry(ReplicaCollector(lambda: replica)),
                                    *args.metrics_listen)
            await metrics.start()
        task = asyncio.ensure_future(replica.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(kv(
            event="reload", result="nothing to reload (restart to change settings)")))
        watchdog = activation.Watchdog()
        activation.ready("replicating")
        watchdog.start()
        try:
            return await task
        except asyncio.CancelledError:
            if cfg.once:  # stopped before everything subscribed was complete
                print("icbd-cache replica: stopped by a signal before every subscribed "
                      "version was complete", file=sys.stderr)
                return 1
            return 0
        finally:
            activation.stopping()
            watchdog.stop()
            if metrics is not None:
                await metrics.close()
            await replica.drain()
            replica.state = "stopped" if not cfg.once else replica.state
            replica.save_state()
            await client.close()

    loop = new_event_loop()
    try:
        try:
            code = loop.run_until_complete(run())
        except OSError as e:  # --metrics-listen's address
            print(f"icbd-cache replica: {e}", file=sys.stderr)
            return 2
        if cfg.once and code == 0 and not args.quiet:
            def served(key: str) -> bool:  # not withdrawn (retired, or a revoked key's)
                meta = store.version(key)
                return meta is not None and not meta.retired

            done = ", ".join(k for k, v in replica.state_dict()["versions"].items()
                             if v["complete"] and served(k)) or "nothing subscribed"
            c = replica.counters
            print(f"replicated {done}: {c.chunks} chunks, {c.chunk_bytes} bytes of chunks, "
                  f"{c.wire_bytes} bytes on the wire")
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        store.close()
    return code


REPLICA = Command(
    "replica", "keep a site's store in step with a master (pull new versions)",
    textwrap.fill(
        "Register with the master as --site, subscribe, and pull the newest version of each "
        "subscribed iMI: its manifest, then only the chunks the store lacks (a delta against "
        "everything held), each checked against its digest; pinned, and made the iMI's "
        "latest once complete. Keeps long-polling for new versions until stopped (SIGTERM), "
        "or with --once stops when what is subscribed is complete. 'icbd-cache serve "
        "--master' does the same inside the NBD server.", 78),
    REPLICA_EXAMPLES + "\nexit status (--once): 0 complete, 1 a pull failed, the master has no "
                       "version of a subscribed iMI, refused us or stayed unreachable, 2 bad "
                       "usage",
    (store_option(),
     store_size_option("bound of the store's chunks; a version that does not fit beside the "
                       "pinned ones is an error (store full)"),
     Option("once", "bool", default=False,
            help="pull what is subscribed, then exit (0 when complete)"),
     Option("metrics-listen", metavar="HOST:PORT", parse=parse_listen_text,
            help="serve Prometheus metrics (state, lag, pull progress) at "
                 "http://HOST:PORT/metrics (docs/metrics.md)"),
     *transfer_options(in_serve=False)),
    doc="replica.md", config_file=True)

#: The replica's table.
COMMANDS = (REPLICA,)


def register(sub: Any) -> None:
    """Add ``replica`` to ``sub`` (argparse subparsers)."""
    REPLICA.add_parser(sub, cmd_replica)


__all__ = ["COMMANDS", "client_from_args", "register", "serve_services", "transfer_options",
           "trust_from_args", "trust_options"]
