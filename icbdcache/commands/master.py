"""Master commands of the CLI: ``master``, ``publish``, and ``admin`` (a client of the admin
API, docs/replication.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import textwrap
import time
from typing import Any

from icbdcache.commands.options import Command, Option
from icbdcache.commands.store import store_option
from icbdcache.replication.auth import AuthConfigError, client_ssl_context, read_token
from icbdcache.replication.defaults import (
    ADDRESS_STREAMS,
    DEFAULT_MASTER_PORT,
    MASTER_MAP_SIZE,
    MAX_STREAMS,
    SITE_STREAMS,
    STALL_TIMEOUT,
    STREAM_MIN_RATE,
)

STREAMS_GROUP = "chunk streams (docs/replication.md, Limits)"
DEFAULT_MASTER_URL = os.environ.get("ICBD_MASTER", f"http://127.0.0.1:{DEFAULT_MASTER_PORT}")
_RAW = argparse.RawDescriptionHelpFormatter


def parse_master_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 10810) or ``:PORT``. Raises ValueError."""
    from icbdcache.server import parse_listen

    bare = not text.startswith("[") and ":" not in text
    bare = bare or (text.startswith("[") and text.endswith("]"))
    return parse_listen(f"{text}:{DEFAULT_MASTER_PORT}" if bare else text)


def parse_master_url(text: str) -> str:
    """A master's URL: ``http://HOST:PORT`` or ``https://HOST:PORT``. Raises ValueError
    saying what is missing (``master:10810`` lacks its scheme)."""
    from urllib.parse import urlsplit

    u = urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname:
        hint = "" if "://" in text else f" (the scheme is missing: http://{text})"
        raise ValueError(f"{text!r} is not a master URL: give http://HOST:PORT or "
                         f"https://HOST:PORT{hint}")
    return text


# ---------------------------------------------------------------------------- master


def cmd_master(args: argparse.Namespace) -> int:
    from icbdcache.loop import new_event_loop
    from icbdcache.replication import master
    from icbdcache.replication.registry import RegistryError
    from icbdcache.store import StoreError

    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        print("icbd-cache master: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.client_ca and not args.tls_cert:
        print("icbd-cache master: --client-ca needs --tls-cert and --tls-key (client "
              "certificates come over TLS)", file=sys.stderr)
        return 2
    for opt, f in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                   ("--client-ca", args.client_ca), ("--token-file", args.token_file),
                   ("--admin-token-file", args.admin_token_file)):
        if f is not None and not os.path.isfile(f):
            what = "not a file" if os.path.exists(f) else "no such file"
            print(f"icbd-cache master: {opt} {f}: {what}", file=sys.stderr)
            return 2
    cfg = master.MasterConfig(store=args.store, host=host, port=port, registry=args.registry,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
                       token_file=args.token_file, admin_token_file=args.admin_token_file,
                       down_after=args.down_after, keepalive_interval=args.keepalive_interval,
                       max_streams=args.max_streams, site_streams=args.site_streams,
                       address_streams=args.address_streams,
                       stream_min_rate=max(1, args.stream_min_rate),
                       stream_stall=args.stream_stall, insecure_open=args.insecure_open)
    loop = new_event_loop()
    try:
        loop.run_until_complete(master.serve(cfg))
    except (AuthConfigError, StoreError, RegistryError, ValueError, OSError) as e:
        print(f"icbd-cache master: {e}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    return 0


# ---------------------------------------------------------------------------- publish


def cmd_publish(args: argparse.Namespace) -> int:
    from icbdcache.commands.store import check_name, keep_boot_files, progress_bar
    from icbdcache.replication.publish import PublishError, publish
    from icbdcache.replication.registry import RegistryError, open_registry
    from icbdcache.store import Store, StoreError

    problems = [m for m in (check_name("--imi", args.imi),
                            None if args.version is None else check_name("--version",
                                                                         args.version))
                if m is not None]
    if bool(args.kernel) != bool(args.initrd):
        problems.append("--kernel and --initrd go together")
    for opt, f in (("--kernel", args.kernel), ("--initrd", args.initrd), ("FILE", args.file)):
        if f is not None and not os.path.isfile(f) and not (
                opt == "FILE" and os.path.exists(f) and not os.path.isdir(f)):
            what = "not a file" if os.path.exists(f) else "no such file"
            problems.append(f"{opt} {f}: {what}")
    if problems:
        for m in problems:
            print(f"icbd-cache publish: {m}", file=sys.stderr)
        return 2
    signing_key = None
    if args.signing_key:
        from icbdcache.replication.signing import KeyFileError, load_private

        try:
            signing_key = load_private(args.signing_key)
        except KeyFileError as e:
            print(f"icbd-cache publish: --signing-key {e}", file=sys.stderr)
            return 2
    from icbdcache.store.index import sector_note

    note = sector_note(os.path.getsize(args.file)) if os.path.isfile(args.file) else None
    if note is not None:
        print(f"icbd-cache publish: warning: {args.file}: {note}", file=sys.stderr)
    try:
        store = Store(args.store, map_size=MASTER_MAP_SIZE)
    except StoreError as e:
        print(f"icbd-cache publish: {e}", file=sys.stderr)
        return 2

    def keep_boot(meta: Any, image: str) -> None:
        keep_boot_files(store, meta, image, quiet=args.quiet, command="publish")

    async def run() -> int:
        registry = open_registry(args.registry, store=store)
        try:
            size = os.path.getsize(args.file) if os.path.isfile(args.file) else 0
            with progress_bar(size, f"publish {args.imi}") as bar:
                done = await publish(store, registry, args.file, args.imi, args.version,
                                     master_url=args.master_url or "", kernel=args.kernel,
                                     initrd=args.initrd,
                                     progress=None if bar.disable else bar.update,
                                     keep_boot=keep_boot, signing_key=signing_key)
        finally:
            await registry.close()
        r = done.record
        if not args.quiet:
            signed = ""
            if signing_key is not None:
                from icbdcache.replication.signing import key_id

                signed = f", signed by key {key_id(signing_key.public_key())}"
            print(f"published {r.key}: {r.size} bytes, {done.chunks} chunks, "
                  f"{r.distinct_bytes} bytes of distinct non-zero chunks, {done.added} bytes "
                  f"added to the store, manifest {r.manifest}{signed}, {done.seconds:.1f} s")
        return 0

    try:
        return asyncio.run(run())
    except (PublishError, RegistryError, StoreError, OSError, ValueError) as e:
        print(f"icbd-cache publish: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()


# ---------------------------------------------------------------------------- admin


class AdminError(Exception):
    """The admin request failed (the master's message, or why it could not be reached)."""


async def admin_request(url: str, method: str, path: str, body: Any = None, *,
                        token: str | None = None, ssl_ctx: ssl.SSLContext | None = None,
                        timeout: float = 30.0) -> Any:
    """One admin API call: ``method`` on ``url`` + ``/v1/admin/`` + ``path`` with a JSON
    ``body``; returns the decoded JSON answer. Raises AdminError with the master's error
    message (and HTTP status) or the connection problem."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    full = f"{url.rstrip('/')}/v1/admin/{path}"
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.request(method, full, json=body, headers=headers,
                                ssl=ssl_ctx if ssl_ctx is not None else True) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                answer = None
            if resp.status >= 400:
                msg = answer.get("error") if isinstance(answer, dict) else None
                hint = " (give --admin-token-file FILE)" if resp.status == 401 and not token \
                    else ""
                raise AdminError(f"{resp.status} {msg or resp.reason}{hint}")
            return answer
    except aiohttp.ClientConnectorCertificateError as e:
        from icbdcache.replication.client import is_name_mismatch
        if is_name_mismatch(e.certificate_error):
            hint = f" (it is not issued for {e.host}: its subjectAltName must list it)"
        elif ssl_ctx is None:
            hint = " (give --ca FILE, the CA that signed it)"
        else:
            hint = " (not signed by --ca)"
        raise AdminError(f"cannot verify the master's certificate at {url}{hint}: "
                         f"{e.certificate_error}") from e
    except (aiohttp.ClientError, OSError) as e:
        hint = " (a master with --tls-cert speaks HTTPS only: use https://)" if isinstance(
            e, aiohttp.ServerDisconnectedError) and url.startswith("http://") else ""
        raise AdminError(f"cannot reach the master at {url}: {e}{hint}") from e
    except TimeoutError as e:
        raise AdminError(f"no answer from the master at {url} within {timeout} s") from e


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}MiB"


def status_table(status: dict[str, Any]) -> str:
    """The ``admin status`` table: one line per site (name, UP/DOWN, age of its last
    keep-alive, state, versions held complete, lag per subscribed iMI), then the iMIs, then
    which clients run which version at each site."""
    rows = [("SITE", "UP", "SEEN", "STATE", "ADDRESS", "HELD", "LAG")]
    warning = (status.get("access") or {}).get("warning")
    for s in status.get("sites", []):
        held = sorted(k for k, v in (s.get("versions") or {}).items()
                      if isinstance(v, dict) and v.get("complete"))
        lag = []
        for imi, entry in sorted((s.get("lag") or {}).items()):
            if entry.get("latest") is None:
                lag.append(f"{imi}:-")
            elif entry.get("complete"):
                lag.append(f"{imi}:ok")
            else:
                lag.append(f"{entry['latest']}:-{_mib(int(entry.get('behind_bytes') or 0))}")
        rows.append((s["name"], "up" if s.get("up") else "DOWN", _age(s.get("age")),
                     str(s.get("state") or "-"), s.get("address") or "-",
                     ",".join(held) or "-", " ".join(lag) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if warning:
        lines = [f"WARNING: {warning}", "", *lines]
    lines.append("")
    lines.append(f"generation {status.get('generation')}, sites down after "
                 f"{status.get('down_after')} s")
    access = status.get("access") or {}
    if "sites_need_credentials" in access:
        lines.append("sites need credentials" if access["sites_need_credentials"] else
                     "sites need no credentials" + (" (loopback only)" if access.get("loopback")
                                                    else ""))
    for imi, info in sorted((status.get("imis") or {}).items()):
        lines.append(f"{imi}: latest {info.get('latest') or '-'}, versions "
                     f"{', '.join(info.get('versions') or []) or '-'}")
    for s in status.get("sites", []):
        for key, clients in sorted((s.get("clients") or {}).items()):
            if not isinstance(clients, list):
                continue
            who = ", ".join(str(c.get("address")) + (f" ({c['mac']})" if c.get("mac") else "")
                            for c in clients if isinstance(c, dict))
            lines.append(f"{s['name']}: {key} runs on {who}")
    return "\n".join(lines)


def ls_table(listing: dict[str, Any]) -> str:
    """The ``admin ls`` table: one line per published version."""
    rows = [("IMI", "VERSION", "SIZE", "DISTINCT", "PUBLISHED", "STATE")]
    for imi, info in sorted((listing.get("imis") or {}).items()):
        for v in info.get("versions", []):
            state = "retired" if v.get("retired") else (
                "latest" if v.get("version") == info.get("latest") else "")
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.get("published") or 0))
            rows.append((imi, str(v.get("version")), str(v.get("size")),
                         str(v.get("distinct_bytes")), when, state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


async def site_add_offline(site: str, store_dir: str | None, registry_spec: str | None,
                           replace: bool) -> dict[str, Any]:
    """``admin site add`` without a running master: the token made here and written straight
    into the registry (``embedded`` in ``store_dir``, an existing store, or ``etcd://...``),
    as ``publish`` writes versions. The answer has the API's shape
    (``sites_need_credentials`` None: no master asked). Raises AdminError."""
    from icbdcache.replication.auth import new_token, token_digest, token_site_problem
    from icbdcache.replication.registry import RegistryError, open_registry
    from icbdcache.store import Store, StoreError

    bad = token_site_problem(site)
    if bad is not None:
        raise AdminError(bad)
    store = None
    etcd = bool(registry_spec and registry_spec.startswith("etcd://"))
    if not etcd:
        if store_dir is None:
            raise AdminError("give --store DIR (the master's store) or --registry "
                             "etcd://...")
        if not os.path.exists(os.path.join(store_dir, "data.mdb")):
            raise AdminError(f"--store {store_dir}: no store there (icbd-cache publish makes "
                             "the master's store)")
    try:
        if not etcd:
            store = Store(store_dir or "", map_size=MASTER_MAP_SIZE)
        registry = open_registry(registry_spec, store=store)
        try:
            token, created = new_token(), time.time()
            replaced = await registry.set_site_token(site, token_digest(token), created,
                                                     replace=replace)
        finally:
            await registry.close()
    except (RegistryError, StoreError, ValueError) as e:
        raise AdminError(str(e)) from e
    finally:
        if store is not None:
            store.close()
    return {"site": site, "token": token, "created": created, "replaced": replaced,
            "sites_need_credentials": None}


def handover(answer: dict[str, Any], master_url: str | None) -> str:
    """What ``admin site add`` says on stderr once the token is on stdout: where it lives,
    how to hand it to the site, how to revoke it."""
    site = answer.get("site")
    url = master_url or "https://MASTER:10810"

    def wrap(text: str, width: int) -> str:
        return textwrap.fill(text, width, break_on_hyphens=False)

    lines = [
        wrap(f"site {site}: a new token" + (" (the earlier one no longer works)"
                                            if answer.get("replaced") else "")
             + ", printed once: the master keeps only its SHA-256. Hand it to the site over "
             "a channel you trust (scp, your configuration management), into a file only "
             "the site's service reads (mode 600), and give the site:", 78),
        f"  icbd-cache serve --store DIR --master {url} --site {site} \\",
        "      --master-token-file /etc/icbd-cache/site.token --subscribe IMI \\",
        "      --trust-key /etc/icbd-cache/signing.key.pub",
        wrap("(or 'icbd-cache replica' with the same options). The token travels in every "
             "request: across a network, serve the master over https (--tls-cert). "
             f"'icbd-cache admin forget {site}' revokes it at once.", 78),
    ]
    if answer.get("sites_need_credentials") is False:
        lines.append(wrap("note: this master answers sites without credentials (it listens "
                          "on loopback only, or has --insecure-open): the token counts once "
                          "it listens on the network without --insecure-open.", 78))
    return "\n".join(lines)


def cmd_admin(args: argparse.Namespace) -> int:
    from icbdcache.store import split_key

    try:
        token = read_token(args.admin_token_file) if args.admin_token_file else None
        ssl_ctx = client_ssl_context(args.ca) if args.ca else None
    except AuthConfigError as e:
        print(f"icbd-cache admin: {e}", file=sys.stderr)
        return 2
    action = args.action
    if action == "site":
        action = f"site {args.site_action}"
    elif args.store is not None or args.registry is not None:
        print(f"icbd-cache admin {action}: --store and --registry are for 'site add' only "
              "(the other actions ask the running master: --master URL)", file=sys.stderr)
        return 2
    body: dict[str, Any] | None
    if action == "site add":
        method, path, body = "POST", "site/add", {"site": args.site, "replace": args.force}
        if args.store is not None or args.registry is not None:
            try:
                answer = asyncio.run(site_add_offline(args.site, args.store, args.registry,
                                                      args.force))
            except AdminError as e:
                print(f"icbd-cache admin {action}: {e}", file=sys.stderr)
                return 1
            return _print_answer(args, action, answer)
    elif action in ("ls", "status"):
        method, path, body = "GET", action, None
    elif action in ("subscribe", "unsubscribe"):
        method, path, body = "POST", action, {"site": args.site, "imi": args.imi}
    elif action == "forget":
        method, path, body = "POST", action, {"site": args.site}
    else:
        imi, version = split_key(args.version)
        if version is None:
            print(f"icbd-cache admin {action}: give IMI@VERSION, not {args.version!r}",
                  file=sys.stderr)
            return 2
        method, path, body = "POST", action, {"imi": imi, "version": version}
        if action == "retire" and args.force:
            body["force"] = True
    try:
        answer = asyncio.run(admin_request(args.master, method, path, body, token=token,
                                           ssl_ctx=ssl_ctx))
    except AdminError as e:
        print(f"icbd-cache admin {action}: {e}", file=sys.stderr)
        return 1
    return _print_answer(args, action, answer)


def _print_answer(args: argparse.Namespace, action: str, answer: Any) -> int:
    """Print the master's ``answer`` to ``action`` (JSON with ``--json``); exit status 0."""
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif action == "site add":
        print(answer.get("token"))  # alone on stdout: 'admin site add s > s.token'
        sys.stdout.flush()
        print(handover(answer, None if args.store is not None or args.registry is not None
                       else args.master), file=sys.stderr)
    elif action == "status":
        print(status_table(answer))
    elif action == "ls":
        print(ls_table(answer))
    elif action == "retire":
        running = answer.get("running") or {}
        print(f"retired {answer.get('retired')}" + (
            f" (kept at {', '.join(sorted(running))} for the clients that run it)"
            if running else ""))
    elif action == "unretire":
        print(f"unretired {answer.get('unretired')}")
    elif action == "forget":
        site = answer.get("forgot")
        print(f"forgot {site}" + (" (its token revoked)" if answer.get("revoked") else ""))
        if answer.get("token_file"):
            print(f"icbd-cache admin forget: warning: {site} still has a token in the "
                  "master's --token-file: remove its line there and restart the master",
                  file=sys.stderr)
    else:
        print(f"{args.site}: subscriptions {', '.join(answer.get('subscriptions', [])) or '-'}")
    return 0


# ---------------------------------------------------------------------------- tables


def _registry_option(help: str = "embedded (default: in the store) or "
                                  "etcd://HOST:PORT[,...][/PREFIX]") -> Option:
    return Option("registry", metavar="SPEC", help=help)


MASTER = Command(
    "master", "run the master: the replication API over a store and its registry",
    textwrap.fill(
        "Serve the replication API v1 (docs/replication.md) over HTTP(S): the catalog of "
        "published versions, manifests and chunk streams for replicas, their registration "
        "and keep-alives, and the admin API. Versions are published into the same store "
        "with 'icbd-cache publish', also while the master runs.", 78),
    "examples:\n"
    "  icbd-cache master --store /srv/master\n"
    "  icbd-cache master --store /srv/master --listen 0.0.0.0:10810 \\\n"
    "      --tls-cert master.pem --tls-key master.key --client-ca sites-ca.pem \\\n"
    "      --token-file /etc/icbd-cache/tokens --admin-token-file /etc/icbd-cache/admin\n"
    "  icbd-cache master --config /etc/icbd-cache/master.toml\n"
    "token file: one 'SITE TOKEN' a line ('*' as SITE: any site), # comments\n"
    "on an address other than loopback the master needs site credentials: --token-file,\n"
    "--client-ca, or tokens made with 'icbd-cache admin site add NAME' (else it refuses to\n"
    "start, unless --insecure-open)",
    (store_option(),
     Option("listen", default=("0.0.0.0", DEFAULT_MASTER_PORT), metavar="HOST:PORT",
            parse=parse_master_listen,
            help=f"address of the HTTP(S) API (default 0.0.0.0:{DEFAULT_MASTER_PORT})"),
     _registry_option(),
     Option("tls-cert", metavar="FILE", help="PEM certificate (chain): serve HTTPS"),
     Option("tls-key", metavar="FILE", help="PEM private key of --tls-cert"),
     Option("client-ca", metavar="FILE",
            help="accept replicas with a client certificate signed by this CA"),
     Option("token-file", metavar="FILE",
            help="replica tokens, 'SITE TOKEN' a line; with it (or --client-ca) replicas must "
                 "authenticate"),
     Option("admin-token-file", metavar="FILE",
            help="admin tokens, one a line; without it the admin API answers loopback only"),
     Option("down-after", "seconds", default=30.0, metavar="SECONDS",
            help="a site without a keep-alive this long is shown down (default 30)"),
     Option("keepalive-interval", "seconds", default=5.0, metavar="SECONDS",
            help="keep-alive interval asked of replicas (default 5)"),
     Option("max-streams", "count", default=MAX_STREAMS, metavar="N", group=STREAMS_GROUP,
            help=f"chunk streams sent at once; more wait (default {MAX_STREAMS})"),
     Option("site-streams", "count", default=SITE_STREAMS, metavar="N", group=STREAMS_GROUP,
            help="chunk streams one site may hold, when its token names it (default "
                 f"{SITE_STREAMS}; 429 beyond)"),
     Option("address-streams", "count", default=ADDRESS_STREAMS, metavar="N",
            group=STREAMS_GROUP,
            help="chunk streams one address may hold when no token names its site (sites "
                 f"behind one NAT share it; default {ADDRESS_STREAMS}; 429 beyond)"),
     Option("stream-min-rate", "size", default=STREAM_MIN_RATE, metavar="BYTES",
            group=STREAMS_GROUP,
            help="bytes a second a chunk stream's client must take, after --stream-stall "
                 "(default 16K)"),
     Option("stream-stall", "seconds", default=STALL_TIMEOUT, metavar="SECONDS",
            group=STREAMS_GROUP,
            help="grace a chunk stream's client has to send its request and before "
                 f"--stream-min-rate applies (default {STALL_TIMEOUT:g})"),
     Option("insecure-open", "bool", default=False,
            help="on a non-loopback address, serve every image to anyone who reaches it, "
                 "without site credentials (warned at start and in 'admin status'); without "
                 "it such a master needs --token-file, --client-ca or site tokens "
                 "('admin site add')")),
    doc="replication.md", config_file=True)

PUBLISH = Command(
    "publish", "publish an image file as a new iMI version of the master",
    textwrap.fill(
        "Read FILE (a raw image, ideally a read-only snapshot) once, copy its non-zero "
        "chunks into the master's store, pin the version, keep its kernel and initrd, and "
        "record it in the registry, where replicas see it. A published version never "
        "changes. Run fstrim on the image's file system first: freed blocks then cost "
        "nothing to send.", 78),
    "examples:\n"
    "  icbd-cache publish /snap/lab-8.img --imi lab --store /srv/master \\\n"
    "      --signing-key /etc/icbd-cache/master.key\n"
    "  icbd-cache publish lab.img --imi lab --version 8 --store /srv/master \\\n"
    "      --master-url https://master:10810 --kernel vmlinuz --initrd initrd.img",
    (Option("file", positional=True, help="the raw image (a read-only snapshot)"),
     Option("imi", required=True, metavar="IMI",
            help="iMI name (no '@', '/', '?' or whitespace)"),
     Option("version", metavar="VERSION", help="version name (default: the next number)"),
     store_option(),
     _registry_option(),
     Option("master-url", metavar="URL",
            help="URL of the master serving this store (recorded with the version)"),
     Option("kernel", metavar="FILE", help="the version's kernel (PXE)"),
     Option("initrd", metavar="FILE", help="the version's initrd (PXE)"),
     Option("signing-key", metavar="FILE",
            help="sign the version's manifest with this private key (icbd-cache keygen); "
                 "sites take only manifests signed by a key they trust")),
    doc="replication.md")

ADMIN = Command(
    "admin", "the master's admin API: ls, status, subscribe, unsubscribe, retire, unretire, "
    "forget, site add",
    textwrap.fill(
        "Ask a running master (its admin API, docs/replication.md): 'status' shows every "
        "site (up or DOWN, last keep-alive, state, versions held, lag per iMI), 'ls' the "
        "published versions; subscribe/unsubscribe a site to an iMI; retire a version "
        "(no longer offered to replicas; refused while sites report clients running it, "
        "unless --force), unretire it; forget a site (its token stops working at once); "
        "'site add NAME' makes a site's token (printed once on stdout, kept hashed by the "
        "master; --store/--registry write it without a running master).", 78),
    "examples:\n"
    "  icbd-cache admin status\n"
    "  icbd-cache admin --master https://master:10810 --ca ca.pem \\\n"
    "      --admin-token-file admin.token status --json\n"
    "  icbd-cache admin subscribe site-a lab\n"
    "  icbd-cache admin retire lab@3\n"
    "  icbd-cache admin site add site-a > site-a.token\n"
    "  icbd-cache admin site add site-a --store /srv/master > site-a.token",
    (Option("master", default=DEFAULT_MASTER_URL, metavar="URL", parse=parse_master_url,
            help=f"the master's URL (default $ICBD_MASTER or {DEFAULT_MASTER_URL})"),
     Option("admin-token-file", metavar="FILE",
            help="file holding the admin token (its first line's last word)"),
     Option("ca", metavar="FILE", help="CA (PEM) that signed the master's certificate"),
     Option("json", "bool", default=False, help="print the API's JSON answer"),
     Option("force", "bool", default=False,
            help="retire: even while clients run the version (each site keeps it for them "
                 "until they boot anew); site add: replace the site's token (the old one "
                 "stops working)"),
     store_option(None, "site add: write the token into this master store's registry "
                        "itself (no running master needed, e.g. before its first start)"),
     _registry_option("site add, with --store or alone: the registry to write the token "
                      "into (embedded, the default: in --store; or etcd://...)")),
    doc="replication.md")

#: The master side's tables.
COMMANDS = (MASTER, PUBLISH, ADMIN)


def _add_admin(sub: Any) -> None:
    p = ADMIN.add_parser(sub, cmd_admin)
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = acts.add_parser("ls", help="published versions per iMI",
                         epilog="example:\n  icbd-cache admin ls", formatter_class=_RAW)
    st = acts.add_parser("status", help="every site: up/DOWN, last seen, state, held, lag",
                         epilog="example:\n  icbd-cache admin status --json",
                         formatter_class=_RAW)
    actions = [ls, st]
    for name, what in (("subscribe", "subscribe SITE to IMI (its new versions are pulled)"),
                       ("unsubscribe", "drop the subscription of SITE to IMI")):
        a = acts.add_parser(name, help=what, epilog=f"example:\n  icbd-cache admin {name} "
                                                    "site-a lab", formatter_class=_RAW)
        a.add_argument("site", help="site name")
        a.add_argument("imi", help="iMI name")
        actions.append(a)
    a = acts.add_parser("retire", help="retire IMI@VERSION (no longer offered to replicas; "
                        "refused while clients run it, unless --force)",
                        epilog="example:\n  icbd-cache admin retire lab@3\n"
                               "  icbd-cache admin retire lab@3 --force", formatter_class=_RAW)
    a.add_argument("version", help="IMI@VERSION")
    actions.append(a)
    a = acts.add_parser("unretire", help="offer a retired IMI@VERSION again",
                        epilog="example:\n  icbd-cache admin unretire lab@3",
                        formatter_class=_RAW)
    a.add_argument("version", help="IMI@VERSION")
    actions.append(a)
    a = acts.add_parser("forget", help="remove SITE (its record, subscriptions, keep-alives) "
                        "and revoke its token",
                        epilog="example:\n  icbd-cache admin forget old-site",
                        formatter_class=_RAW)
    a.add_argument("site", help="site name")
    actions.append(a)
    site = acts.add_parser("site", help="site credentials: 'site add NAME' makes a token",
                           epilog="example:\n  icbd-cache admin site add site-a > "
                                  "site-a.token", formatter_class=_RAW)
    site_acts = site.add_subparsers(dest="site_action", metavar="ACTION", required=True)
    a = site_acts.add_parser(
        "add", help="a new token for SITE (created if new), printed once on stdout",
        epilog="examples:\n  icbd-cache admin site add site-a > site-a.token\n"
               "  icbd-cache admin site add site-a --store /srv/master > site-a.token\n"
               "  icbd-cache admin site add site-a --force > site-a.token   # a new one",
        formatter_class=_RAW)
    a.add_argument("site", help="site name")
    actions.append(a)
    for a in actions:  # the options also after the action: admin status --json
        ADMIN.add_options(a, suppress=True)


def register(sub: Any) -> None:
    """Add ``master``, ``publish`` and ``admin`` to ``sub`` (argparse subparsers)."""
    MASTER.add_parser(sub, cmd_master)
    PUBLISH.add_parser(sub, cmd_publish)
    _add_admin(sub)


__all__ = ["COMMANDS", "admin_request", "ls_table", "register", "status_table"]
