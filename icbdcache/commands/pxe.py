"""PXE commands of the CLI: ``icbd-cache pxe serve | render | extract`` (see docs/pxe.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from icbdcache.commands.store import DEFAULT_STORE

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
"""


#: ``--tftp-port off`` as parsed (None would read as "not given" in ``serve --pxe``).
OFF = -1


def _port(text: str) -> int:
    if text.lower() == "off":
        return OFF
    n = int(text)
    if not 0 <= n < 65536:
        raise argparse.ArgumentTypeError(f"port {n} out of range")
    return n


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"the store (default $ICBD_STORE or {DEFAULT_STORE}); boot files are "
                        "kept in DIR/boot/IMI@VERSION/")


class _Options:
    """The options of ``pxe serve`` (and ``render``), spelled ``--NAME``, or ``--pxe-NAME`` in
    ``icbd-cache serve --pxe``. With a prefix every default is None at parse time, so that an
    option given without ``--pxe`` can be refused; :meth:`get` supplies the default."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.defaults: dict[str, Any] = {}

    def add(self, g: Any, name: str, default: Any = None, **kw: Any) -> None:
        if self.prefix:
            self.defaults[name] = default
            default = None
        g.add_argument(f"--{self.prefix}{name}", default=default, **kw)

    def dest(self, name: str) -> str:
        return f"{self.prefix}{name}".replace("-", "_")

    def get(self, args: argparse.Namespace, name: str) -> Any:
        value = getattr(args, self.dest(name))
        return self.defaults.get(name) if value is None else value

    def given(self, args: argparse.Namespace) -> list[str]:
        """The prefixed options given on the command line."""
        return [f"--{self.prefix}{n}" for n in self.defaults
                if getattr(args, self.dest(n), None) is not None]


def _boot_args(g: Any, o: _Options, *, nbd_required: bool = True) -> None:
    o.add(g, "nbd-host", required=nbd_required, metavar="HOST",
          help="the NBD server (icbd-cache serve) as workstations reach it"
          + ("" if nbd_required else " (default: the first --listen address, unless 0.0.0.0)"))
    o.add(g, "nbd-port", type=int, default=10809, metavar="PORT",
          help="its port (default 10809)" if nbd_required else
               "its port (default: the first --listen port)")
    o.add(g, "pins", metavar="FILE",
          help="machines pinned to an iMI or version (TOML [[pin]] mac=, boot=, optional ip=, "
               "append=; or JSON)")
    o.add(g, "default-imi", metavar="NAME",
          help="iMI whose latest version the menus boot by default (default: the first by "
               "name)")
    o.add(g, "menu-timeout", type=float, default=5.0, metavar="SECONDS",
          help="menu wait before the default entry boots; 0 = no menu (default 5)")
    o.add(g, "versions", type=int, default=1, metavar="N",
          help="newest versions of each iMI in the menus (default 1)")
    o.add(g, "overlay", default="tmpfs", metavar="MODE",
          help="tmpfs (read-only root under a tmpfs overlay; default), tmpfs:SIZE, or none "
               "(root mounted rw: needs a copy-on-write export)")
    o.add(g, "ip", default="pxe", choices=("pxe", "dhcp", "none"),
          help="initramfs network setup: pxe = reuse the PXE lease (IPAPPEND 1 / iPXE ${ip}; "
               "default), dhcp = ip=dhcp, none = nothing")
    o.add(g, "append", default="", metavar="ARGS",
          help="more kernel arguments for every entry, e.g. 'console=ttyS0,115200 quiet'")
    o.add(g, "serial", metavar="'PORT BAUD'",
          help="PXELINUX also on a serial port, e.g. '0 115200'")
    o.add(g, "title", default="icbd-cache", metavar="TEXT", help="menu title")
    o.add(g, "http-base", metavar="URL",
          help="absolute base URL in iPXE scripts (default: paths relative to the script, "
               "which iPXE resolves against the script's own URL)")
    o.add(g, "syslinux-dir", metavar="DIR",
          help="pxelinux.0 and the .c32 modules (default: Debian's /usr/lib/PXELINUX and "
               "/usr/lib/syslinux/modules/bios)")


def _server_args(g: Any, o: _Options) -> None:
    o.add(g, "listen", default="0.0.0.0", metavar="ADDR",
          help="address of both servers (default 0.0.0.0)" if not o.prefix else
               "address of both servers (default: the host of the first --listen)")
    o.add(g, "tftp-port", type=_port, default=69, metavar="PORT",
          help="TFTP port (default 69, which needs root; 0 = any free port; off)")
    o.add(g, "http-port", type=_port, default=8080, metavar="PORT",
          help="HTTP port (default 8080; 0 = any free port; off)")
    o.add(g, "refresh", type=float, default=10.0, metavar="SECONDS",
          help="look for new versions this often, besides on every config request "
               "(default 10)")
    o.add(g, "tftp-timeout", type=float, default=1.0, metavar="SECONDS",
          help="TFTP retransmit interval unless the client asks (default 1)")
    o.add(g, "tftp-retries", type=int, default=5, metavar="N",
          help="retransmissions of one packet before a transfer is dropped (default 5)")
    o.add(g, "tftp-max-blksize", type=int, default=65464, metavar="BYTES",
          help="largest TFTP block size granted (default 65464)")


#: The options of ``pxe serve`` and ``pxe render``, and those of ``serve --pxe``.
PLAIN, IN_SERVE = _Options(), _Options("pxe-")


def _check_store(path: str) -> None:
    """Raise OSError unless ``path`` holds a store (never create an empty one by a typo)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no store at {path} (icbd-cache import creates one)")


def _settings(args: argparse.Namespace, o: _Options = PLAIN, *, nbd_host: str | None = None,
              nbd_port: int | None = None) -> Any:
    """BootSettings from the options (``nbd_host``/``nbd_port``: when not given). Raises
    ConfigError (a ValueError) or OSError (the pins file)."""
    from pxe.render import BootSettings, load_pins

    pins_file = o.get(args, "pins")
    port_given = getattr(args, o.dest("nbd-port"))
    s = BootSettings(
        nbd_host=o.get(args, "nbd-host") or nbd_host or "",
        nbd_port=port_given if port_given is not None or nbd_port is None else nbd_port,
        default_imi=o.get(args, "default-imi"), menu_timeout=o.get(args, "menu-timeout"),
        versions=o.get(args, "versions"), overlay=o.get(args, "overlay"), ip=o.get(args, "ip"),
        append=o.get(args, "append"), serial=o.get(args, "serial"), title=o.get(args, "title"),
        http_base=o.get(args, "http-base"), pins=load_pins(pins_file) if pins_file else [],
    )
    s.check()
    return s


def _pxe_config(args: argparse.Namespace, o: _Options, store: str, settings: Any,
                listen: str | None = None) -> Any:
    """The PxeConfig of the server options. Raises ConfigError."""
    from pxe.render import ConfigError
    from pxe.service import PxeConfig

    cfg = PxeConfig(
        store=store, settings=settings, listen=getattr(args, o.dest("listen")) or listen
        or o.get(args, "listen"), tftp_port=_on(o.get(args, "tftp-port")),
        http_port=_on(o.get(args, "http-port")), syslinux_dir=o.get(args, "syslinux-dir"),
        refresh_interval=o.get(args, "refresh"), tftp_timeout=o.get(args, "tftp-timeout"),
        tftp_retries=o.get(args, "tftp-retries"),
        tftp_max_blksize=o.get(args, "tftp-max-blksize"),
    )
    if cfg.tftp_port is None and cfg.http_port is None:
        raise ConfigError(f"both --{o.prefix}tftp-port and --{o.prefix}http-port are off: "
                          "nothing to serve")
    return cfg


def _on(port: int) -> int | None:
    return None if port == OFF else port


_ANY_ADDRESS = ("0.0.0.0", "::", "")


def serve_pxe_config(args: argparse.Namespace, serve: Any) -> Any:
    """``icbd-cache serve --pxe``: the PxeConfig (or None without ``--pxe``) for the
    ServeConfig ``serve``. The NBD host and port in the boot configs default to the first
    ``--listen`` address, which must then be a specific one; TFTP and HTTP listen on its
    host. Raises ValueError (ConfigError) or OSError (the pins file) for the user."""
    from pxe.render import ConfigError

    if not getattr(args, "pxe", False):
        given = IN_SERVE.given(args)
        if given:
            raise ConfigError(f"{', '.join(given)} without --pxe")
        return None
    if not serve.store:
        raise ConfigError("--pxe needs --store DIR (it boots the store's versions)")
    if serve.workers > 1:
        raise ConfigError("--pxe needs --workers 1 (one TFTP and one HTTP server)")
    host, port = serve.listen[0] if serve.listen else ("", 10809)
    if not args.pxe_nbd_host and host in _ANY_ADDRESS:
        where = f"--listen {host or '0.0.0.0'}:{port}" if serve.listen else "--unix only"
        raise ConfigError(f"--pxe with {where}: give --pxe-nbd-host HOST, the address "
                          "workstations reach this server at")
    settings = _settings(args, IN_SERVE, nbd_host=host, nbd_port=port)
    return _pxe_config(args, IN_SERVE, serve.store, settings,
                       listen=None if host in _ANY_ADDRESS else host)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """``--pxe`` and the ``--pxe-*`` options of ``icbd-cache serve``."""
    g = p.add_argument_group(
        "network boot (--pxe; the options of 'icbd-cache pxe serve' as --pxe-NAME; "
        "see docs/pxe.md)")
    g.add_argument("--pxe", action="store_true", default=None,
                   help="also serve the store's boot tree over TFTP (PXELINUX) and HTTP (iPXE) "
                        "in this process; needs --store")
    _boot_args(g, IN_SERVE, nbd_required=False)
    _server_args(g, IN_SERVE)


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache.store import StoreError
    from pxe.render import ConfigError
    from pxe.service import run

    try:
        _check_store(args.store)
        cfg = _pxe_config(args, PLAIN, args.store, _settings(args))
        return int(run(cfg))
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
    return 0 if tree.entries else 1


def cmd_extract(args: argparse.Namespace) -> int:
    from icbdcache.store import Store, StoreError
    from pxe import bootfiles

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


def add_parsers(sub: Any, verbosity: Any) -> dict[str, Any]:
    """Add ``pxe`` and its subcommands; return the handler of ``pxe`` by name."""
    raw = argparse.RawDescriptionHelpFormatter
    pxe = sub.add_parser(
        "pxe", help="boot configs and boot files for PXELINUX and iPXE (TFTP, HTTP)",
        description="Network boot of diskless workstations into the versions of a store: "
                    "pxelinux.cfg and iPXE menus naming each version's NBD export, the "
                    "versions' kernels and initrds, served over TFTP and HTTP or written to a "
                    "directory. See docs/pxe.md.",
        epilog=PXE_EXAMPLES, formatter_class=raw)
    psub = pxe.add_subparsers(dest="pxe_command", metavar="SUBCOMMAND")

    p = psub.add_parser("serve", help="serve the boot tree over TFTP and HTTP",
                        description="Serve the boot tree of a store: TFTP (RFC 1350, with "
                                    "blksize, tsize and timeout) for PXE ROMs and PXELINUX, "
                                    "HTTP for iPXE. Configs follow the store as versions are "
                                    "published. Never a DHCP server: see docs/pxe.md for a "
                                    "proxy-DHCP setup.",
                        epilog="example:\n  icbd-cache pxe serve --store DIR --tftp-port 69 "
                               "--http-port 8080 --nbd-host 192.168.10.5 --nbd-port 10809",
                        formatter_class=raw)
    _store_arg(p)
    _boot_args(p.add_argument_group("boot configs"), PLAIN)
    _server_args(p.add_argument_group("servers"), PLAIN)
    verbosity(p)

    p = psub.add_parser("render", help="write the boot tree to a directory",
                        description="Write what 'pxe serve' serves (pxelinux.0 and modules, "
                                    "pxelinux.cfg/, boot.ipxe, ipxe/, boot/IMI@VERSION/) into "
                                    "a directory for tftpd-hpa, dnsmasq or a web server. Run "
                                    "it again after each import.",
                        epilog="example:\n  icbd-cache pxe render --store DIR --out /srv/tftp "
                               "--nbd-host 192.168.10.5 --pins /etc/icbd-cache/pins.toml",
                        formatter_class=raw)
    _store_arg(p)
    _boot_args(p.add_argument_group("boot configs"), PLAIN)
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    verbosity(p)

    p = psub.add_parser("extract", help="keep each version's kernel and initrd with it",
                        description="Extract the kernel and initrd of versions from their ext4 "
                                    "images (debugfs, nothing mounted), or copy the ones given "
                                    "at import, into STORE/boot/IMI@VERSION/, and record them.",
                        epilog="example:\n  icbd-cache pxe extract --store DIR\n"
                               "  icbd-cache pxe extract lab@7 --force",
                        formatter_class=raw)
    p.add_argument("version", nargs="*", help="IMI@VERSION or IMI (latest); default: all")
    _store_arg(p)
    p.add_argument("--force", action="store_true", help="extract again even if kept")
    verbosity(p)

    def cmd_pxe(args: argparse.Namespace) -> int:
        handler = {"serve": cmd_serve, "render": cmd_render,
                   "extract": cmd_extract}.get(args.pxe_command or "")
        if handler is None:
            pxe.print_help()
            return 2
        return handler(args)

    pxe.set_defaults(verbose=0, quiet=False)  # for 'icbd-cache pxe' without a subcommand
    return {"pxe": cmd_pxe}
