"""PXE commands of the CLI: ``icbd-cache pxe serve | render | extract`` (see docs/pxe.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from icbdcache.access import parse_cidr
from icbdcache.commands.options import OFF, Command, Option, given, prefixed, reresolve
from icbdcache.commands.store import DEFAULT_STORE, store_option

PXE_EXAMPLES = """\
examples:
  # TFTP (PXELINUX) and HTTP (iPXE) for the versions of a store; workstations mount their
  # root from the NBD server at 192.168.10.5:10809 (icbd-cache serve --store on that host)
  icbd-cache pxe serve --store /var/lib/icbd-cache/store --nbd-host 192.168.10.5

  # the same tree on disk, for tftpd-hpa, dnsmasq's TFTP or a web server
  icbd-cache pxe render --store DIR --out /srv/tftp --nbd-host 192.168.10.5

  # kernel and initrd of every version (extracted from the images), or of one
  icbd-cache pxe extract --store DIR
  icbd-cache pxe extract lab@7 --store DIR --force

  # pxe serve with its settings in a file (keys: the long options with _)
  icbd-cache pxe serve --config /etc/icbd-cache/pxe.toml
"""


BOOT_GROUP, SERVER_GROUP = "boot configs", "servers"

#: The boot options of ``pxe serve`` and ``pxe render`` (``--pxe-NAME`` in ``serve --pxe``).
BOOT_OPTIONS = (
    Option("nbd-host", required=True, metavar="HOST", group=BOOT_GROUP,
           help="the NBD server (icbd-cache serve) as workstations reach it"),
    Option("nbd-port", "int", default=10809, metavar="PORT", group=BOOT_GROUP,
           help="its port (default 10809)"),
    Option("pins", metavar="FILE", group=BOOT_GROUP,
           help="machines pinned to an iMI or version (TOML [[pin]] mac=, boot=, optional ip=, "
                "append=; or JSON)"),
    Option("default-imi", metavar="NAME", group=BOOT_GROUP,
           help="iMI whose latest version the menus boot by default (default: the first by "
                "name)"),
    Option("menu-timeout", "float", default=5.0, metavar="SECONDS", group=BOOT_GROUP,
           help="menu wait before the default entry boots; 0 = no menu (default 5)"),
    Option("versions", "int", default=1, metavar="N", group=BOOT_GROUP,
           help="newest versions of each iMI in the menus (default 1)"),
    Option("overlay", default="tmpfs", metavar="MODE", group=BOOT_GROUP,
           help="tmpfs (read-only root under a tmpfs overlay; default), tmpfs:SIZE, or none "
                "(root mounted rw: needs a copy-on-write export)"),
    Option("reconnect", "float", default=600.0, metavar="SECONDS", group=BOOT_GROUP,
           help="how long a workstation holds its disk requests while the NBD server is away "
                "(a restart, an upgrade), reconnecting with icbd-cache's initrd loaded after "
                "the iMI's; 0 = off, a lost server is a lost root (default 600)"),
    Option("ip", default="pxe", choices=("pxe", "dhcp", "none"), group=BOOT_GROUP,
           help="initramfs network setup: pxe = reuse the PXE lease (IPAPPEND 1 / iPXE ${ip}; "
                "default), dhcp = ip=dhcp, none = nothing"),
    Option("append", default="", metavar="ARGS", group=BOOT_GROUP,
           help="more kernel arguments for every entry, e.g. 'console=ttyS0,115200 quiet'"),
    Option("serial", metavar="'PORT BAUD'", group=BOOT_GROUP,
           help="PXELINUX also on a serial port, e.g. '0 115200'"),
    Option("title", default="icbd-cache", metavar="TEXT", group=BOOT_GROUP, help="menu title"),
    Option("http-base", metavar="URL", group=BOOT_GROUP,
           help="absolute base URL in iPXE scripts (default: paths relative to the script, "
                "which iPXE resolves against the script's own URL)"),
    Option("templates", metavar="DIR", group=BOOT_GROUP,
           help="the admin's boot menu templates (Jinja2): a file named like a default one "
                "(pxelinux-default.j2, ipxe-menu.j2, ...) replaces it (docs/pxe.md); SIGHUP "
                "re-reads them"),
    Option("syslinux-dir", metavar="DIR", group=BOOT_GROUP,
           help="pxelinux.0 and the .c32 modules (default: Debian's /usr/lib/PXELINUX and "
                "/usr/lib/syslinux/modules/bios)"),
)

#: The server options of ``pxe serve`` (``--pxe-NAME`` in ``serve --pxe``).
SERVER_OPTIONS = (
    Option("listen", default="0.0.0.0", metavar="ADDR", group=SERVER_GROUP,
           help="address of both servers (default 0.0.0.0)"),
    Option("tftp-port", "port", default=69, metavar="PORT", group=SERVER_GROUP,
           help="TFTP port (default 69, which needs root; 0 = any free port; off)"),
    Option("http-port", "port", default=8080, metavar="PORT", group=SERVER_GROUP,
           help="HTTP port (default 8080; 0 = any free port; off)"),
    Option("refresh", "float", default=10.0, metavar="SECONDS", group=SERVER_GROUP,
           help="look for new versions this often, besides on every config request "
                "(default 10)"),
    Option("tftp-timeout", "float", default=1.0, metavar="SECONDS", group=SERVER_GROUP,
           help="TFTP retransmit interval unless the client asks (default 1)"),
    Option("tftp-retries", "int", default=5, metavar="N", group=SERVER_GROUP,
           help="retransmissions of one packet before a transfer is dropped (default 5)"),
    Option("tftp-max-blksize", "int", default=65464, metavar="BYTES", group=SERVER_GROUP,
           help="largest TFTP block size granted (default 65464)"),
    Option("allow", "list", metavar="CIDR", parse=parse_cidr, group=SERVER_GROUP,
           help="answer TFTP and HTTP clients of this network only (repeatable; default: "
                "any); SIGHUP re-reads it"),
)


def _pxe_store_option() -> Option:
    return store_option(help=f"the store (default $ICBD_STORE or {DEFAULT_STORE}); boot files "
                             "are kept in DIR/boot/IMI@VERSION/")


PXE_SERVE = Command(
    "pxe serve", "serve the boot tree over TFTP and HTTP",
    "Serve the boot tree of a store: TFTP (RFC 1350, with blksize, tsize and timeout) for PXE "
    "ROMs and PXELINUX, HTTP for iPXE. Configs follow the store as versions are published. "
    "Never a DHCP server: see docs/pxe.md for a proxy-DHCP setup.",
    "example:\n  icbd-cache pxe serve --store DIR --tftp-port 69 --http-port 8080 "
    "--nbd-host 192.168.10.5 --nbd-port 10809\n"
    "  icbd-cache pxe serve --config /etc/icbd-cache/pxe.toml",
    (_pxe_store_option(), *BOOT_OPTIONS, *SERVER_OPTIONS),
    doc="pxe.md", config_file=True)

PXE_RENDER = Command(
    "pxe render", "write the boot tree to a directory",
    "Write what 'pxe serve' serves (pxelinux.0 and modules, pxelinux.cfg/, boot.ipxe, ipxe/, "
    "boot/IMI@VERSION/) into a directory for tftpd-hpa, dnsmasq or a web server. Run it "
    "again after each import.",
    "example:\n  icbd-cache pxe render --store DIR --out /srv/tftp --nbd-host 192.168.10.5 "
    "--pins /etc/icbd-cache/pins.toml",
    (_pxe_store_option(), *BOOT_OPTIONS,
     Option("out", required=True, metavar="DIR", help="the directory to write")),
    doc="pxe.md")

PXE_EXTRACT = Command(
    "pxe extract", "keep each version's kernel and initrd with it",
    "Extract the kernel and initrd of versions from their ext4 images (debugfs, nothing "
    "mounted), or copy the ones given at import, into STORE/boot/IMI@VERSION/, and record "
    "them.",
    "example:\n  icbd-cache pxe extract --store DIR\n  icbd-cache pxe extract lab@7 --force",
    (Option("version", positional=True, nargs="*",
            help="IMI@VERSION or IMI (latest); default: all"),
     _pxe_store_option(),
     Option("force", "bool", default=False, help="extract again even if kept")),
    doc="pxe.md")

#: The pxe commands' tables.
COMMANDS = (PXE_SERVE, PXE_RENDER, PXE_EXTRACT)

#: The group of ``serve``'s PXE options in its ``--help``.
IN_SERVE_GROUP = ("network boot (--pxe; the options of 'icbd-cache pxe serve' as --pxe-NAME; "
                  "see docs/pxe.md)")


def serve_options() -> tuple[Option, ...]:
    """``--pxe`` and the ``--pxe-NAME`` options of ``icbd-cache serve``. Defaults that
    differ: the NBD host and port, and the address TFTP and HTTP listen on, come from
    serve's first ``--listen``."""
    return (
        Option("pxe", "bool", default=False, group=IN_SERVE_GROUP,
               help="also serve the store's boot tree over TFTP (PXELINUX) and HTTP (iPXE) in "
                    "this process; needs --store"),
        *prefixed(BOOT_OPTIONS + SERVER_OPTIONS, "pxe-", group=IN_SERVE_GROUP,
                  nbd_host={"help": "the NBD server (icbd-cache serve) as workstations reach "
                                    "it (default: the first --listen address, unless "
                                    "0.0.0.0)"},
                  nbd_port={"default": None,
                            "help": "its port (default: the first --listen port)"},
                  listen={"default": None,
                          "help": "address of both servers (default: the host of the first "
                                  "--listen)"}),
    )


def _check_store(path: str) -> None:
    """Raise OSError unless ``path`` holds a store (never create an empty one by a typo)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no store at {path} (icbd-cache import creates one)")


def _value(args: argparse.Namespace, prefix: str, name: str) -> Any:
    """The resolved value of option ``name`` (``--PREFIXname``)."""
    return getattr(args, f"{prefix}{name}".replace("-", "_"))


def _settings(args: argparse.Namespace, prefix: str = "", *, nbd_host: str | None = None,
              nbd_port: int | None = None) -> Any:
    """BootSettings from the resolved options (``nbd_host``/``nbd_port``: when not given).
    Raises ConfigError (a ValueError) or OSError (the pins file)."""
    from pxe.render import BootSettings, load_pins

    def v(name: str) -> Any:
        return _value(args, prefix, name)

    pins_file = v("pins")
    port = v("nbd-port")
    s = BootSettings(
        nbd_host=v("nbd-host") or nbd_host or "",
        nbd_port=port if port is not None or nbd_port is None else nbd_port,
        default_imi=v("default-imi"), menu_timeout=v("menu-timeout"), versions=v("versions"),
        overlay=v("overlay"), ip=v("ip"), append=v("append"), serial=v("serial"),
        title=v("title"), http_base=v("http-base"),
        pins=load_pins(pins_file) if pins_file else [], reconnect=v("reconnect"),
        templates=v("templates"),
    )
    s.check()
    return s


def _pxe_config(args: argparse.Namespace, prefix: str, store: str, settings: Any,
                listen: str | None = None) -> Any:
    """The PxeConfig of the server options (``listen``: when not given). Raises
    ConfigError."""
    from pxe.render import ConfigError
    from pxe.service import PxeConfig

    def v(name: str) -> Any:
        return _value(args, prefix, name)

    cfg = PxeConfig(
        store=store, settings=settings, listen=v("listen") or listen or "0.0.0.0",
        tftp_port=_on(v("tftp-port")), http_port=_on(v("http-port")),
        syslinux_dir=v("syslinux-dir"), refresh_interval=v("refresh"),
        tftp_timeout=v("tftp-timeout"), tftp_retries=v("tftp-retries"),
        tftp_max_blksize=v("tftp-max-blksize"), allow=list(v("allow") or []),
    )
    if cfg.tftp_port is None and cfg.http_port is None:
        raise ConfigError(f"both --{prefix}tftp-port and --{prefix}http-port are off: "
                          "nothing to serve")
    return cfg


def _on(port: int) -> int | None:
    return None if port == OFF else port


_ANY_ADDRESS = ("0.0.0.0", "::", "")


def serve_pxe_config(args: argparse.Namespace, serve: Any) -> Any:
    """``icbd-cache serve --pxe``: the PxeConfig (or None without ``--pxe``) for the
    ServeConfig ``serve``, from the resolved options of :func:`serve_options`. The NBD host
    and port in the boot configs default to the first ``--listen`` address, which must then
    be a specific one; TFTP and HTTP listen on its host. Raises ValueError (ConfigError) or
    OSError (the pins file) for the user."""
    from pxe.render import ConfigError

    if not args.pxe:
        explicit = given(args)
        named = [o.flag for o in serve_options()[1:] if o.dest in explicit]
        if named:
            raise ConfigError(f"{', '.join(named)} without --pxe")
        return None
    if not serve.store:
        raise ConfigError("--pxe needs --store DIR (it boots the store's versions)")
    host, port = serve.listen[0] if serve.listen else ("", 10809)
    if not args.pxe_nbd_host and host in _ANY_ADDRESS:
        where = f"--listen {host or '0.0.0.0'}:{port}" if serve.listen else "--unix only"
        raise ConfigError(f"--pxe with {where}: give --pxe-nbd-host HOST, the address "
                          "workstations reach this server at")
    settings = _settings(args, "pxe-", nbd_host=host, nbd_port=port)
    return _pxe_config(args, "pxe-", serve.store, settings,
                       listen=None if host in _ANY_ADDRESS else host)


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache.store import StoreError
    from pxe.render import ConfigError
    from pxe.service import run

    def reload() -> tuple[Any, list[str]]:
        fresh = reresolve(PXE_SERVE, args)
        return _settings(fresh), list(fresh.allow or [])

    try:
        _check_store(args.store)
        cfg = _pxe_config(args, "", args.store, _settings(args))
        return int(run(cfg, reload))
    except (ConfigError, OSError, StoreError) as e:
        print(f"icbd-cache pxe serve: {e}", file=sys.stderr)
        return 2


def cmd_render(args: argparse.Namespace) -> int:
    from icbdcache.store import Store, StoreError
    from pxe.render import ConfigError
    from pxe.tree import SYSLINUX_FILES, BootTree

    try:
        _check_store(args.store)
        settings = _settings(args)
        store = Store(args.store)
    except (ConfigError, OSError, StoreError) as e:
        print(f"icbd-cache pxe render: {e}", file=sys.stderr)
        return 2
    try:
        tree = BootTree(store, settings, args.syslinux_dir)
        tree.refresh(force=True)
        written = tree.write(args.out)
    except OSError as e:
        print(f"icbd-cache pxe render: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    missing = [n for n in SYSLINUX_FILES if n not in tree.loaders]
    print(f"rendered {len(written)} files into {args.out}: {len(tree.entries)} versions, "
          f"default {tree.default_key() or '-'}, "
          f"{sum(1 for p in written if p.startswith('pxelinux.cfg/01-'))} pinned machines")
    if missing:
        print(f"note: no {', '.join(missing)} (install pxelinux syslinux-common); "
              "iPXE boots still work", file=sys.stderr)
    if settings.reconnect > 0 and tree.reconnect_initrd is None:
        print(f"warning: workstations will not reconnect: {tree.reconnect_problem}",
              file=sys.stderr)
    return 0 if tree.entries else 1


def cmd_extract(args: argparse.Namespace) -> int:
    from icbdcache.store import Store, StoreError, bootfiles

    try:
        _check_store(args.store)
        store = Store(args.store)
    except (OSError, StoreError) as e:
        print(f"icbd-cache pxe extract: {e}", file=sys.stderr)
        return 2
    failed = 0
    try:
        metas = store.versions()
        if args.version:
            wanted = []
            for name in args.version:
                m = store.version(name)
                if m is None:
                    print(f"icbd-cache pxe extract: unknown version {name}", file=sys.stderr)
                    return 2
                wanted.append(m)
            metas = wanted
        for m in sorted(metas, key=lambda m: m.key):
            try:
                bf = bootfiles.prepare(store, m, force=args.force)
            except bootfiles.BootFilesError as e:
                print(f"{m.key}: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"{m.key}: kernel {bf.kernel} ({bf.kernel.stat().st_size} bytes), "
                  f"initrd {bf.initrd} ({bf.initrd.stat().st_size} bytes)")
    finally:
        store.close()
    return 1 if failed else 0


def register(sub: Any) -> None:
    """Add ``pxe`` and its subcommands to ``sub`` (argparse subparsers)."""
    pxe = sub.add_parser(
        "pxe", help="boot configs and boot files for PXELINUX and iPXE (TFTP, HTTP)",
        description="Network boot of diskless workstations into the versions of a store: "
                    "pxelinux.cfg and iPXE menus naming each version's NBD export, the "
                    "versions' kernels and initrds, served over TFTP and HTTP or written to a "
                    "directory. See docs/pxe.md.",
        epilog=PXE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = pxe.add_subparsers(dest="pxe_command", metavar="SUBCOMMAND")
    for command, handler in zip(COMMANDS, (cmd_serve, cmd_render, cmd_extract), strict=True):
        command.add_parser(psub, handler)

    def usage(args: argparse.Namespace) -> int:
        pxe.print_help()
        return 2

    # 'icbd-cache pxe' without a subcommand
    pxe.set_defaults(func=usage, verbose=0, quiet=False)
