"""PXE commands of the CLI: ``icbd-cache pxe serve | render | extract`` (see docs/pxe.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from icbdcache.storecli import DEFAULT_STORE

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


def _port(text: str) -> int | None:
    if text.lower() == "off":
        return None
    n = int(text)
    if not 0 <= n < 65536:
        raise argparse.ArgumentTypeError(f"port {n} out of range")
    return n


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"the store (default $ICBD_STORE or {DEFAULT_STORE}); boot files are "
                        "kept in DIR/boot/IMI@VERSION/")


def _boot_args(p: argparse.ArgumentParser) -> None:
    _store_arg(p)
    g = p.add_argument_group("boot configs")
    g.add_argument("--nbd-host", required=True, metavar="HOST",
                   help="the NBD server (icbd-cache serve) as workstations reach it")
    g.add_argument("--nbd-port", type=int, default=10809, metavar="PORT",
                   help="its port (default 10809)")
    g.add_argument("--pins", metavar="FILE",
                   help="machines pinned to an iMI or version (TOML [[pin]] mac=, boot=, "
                        "optional ip=, append=; or JSON)")
    g.add_argument("--default-imi", metavar="NAME",
                   help="iMI whose latest version the menus boot by default (default: the "
                        "first by name)")
    g.add_argument("--menu-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="menu wait before the default entry boots; 0 = no menu (default 5)")
    g.add_argument("--versions", type=int, default=1, metavar="N",
                   help="newest versions of each iMI in the menus (default 1)")
    g.add_argument("--overlay", default="tmpfs", metavar="MODE",
                   help="tmpfs (read-only root under a tmpfs overlay; default), tmpfs:SIZE, or "
                        "none (root mounted rw: needs a copy-on-write export)")
    g.add_argument("--ip", default="pxe", choices=("pxe", "dhcp", "none"),
                   help="initramfs network setup: pxe = reuse the PXE lease (IPAPPEND 1 / "
                        "iPXE ${ip}; default), dhcp = ip=dhcp, none = nothing")
    g.add_argument("--append", default="", metavar="ARGS",
                   help="more kernel arguments for every entry, e.g. 'console=ttyS0,115200 "
                        "quiet'")
    g.add_argument("--serial", metavar="'PORT BAUD'",
                   help="PXELINUX also on a serial port, e.g. '0 115200'")
    g.add_argument("--title", default="icbd-cache", help="menu title")
    g.add_argument("--http-base", metavar="URL",
                   help="absolute base URL in iPXE scripts (default: paths relative to the "
                        "script, which iPXE resolves against the script's own URL)")
    g.add_argument("--syslinux-dir", metavar="DIR",
                   help="pxelinux.0 and the .c32 modules (default: Debian's /usr/lib/PXELINUX "
                        "and /usr/lib/syslinux/modules/bios)")


def _check_store(path: str) -> None:
    """Raise OSError unless ``path`` holds a store (never create an empty one by a typo)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no store at {path} (icbd-cache import creates one)")


def _settings(args: argparse.Namespace) -> Any:
    from pxe.render import BootSettings, load_pins

    pins = load_pins(args.pins) if args.pins else []
    s = BootSettings(
        nbd_host=args.nbd_host, nbd_port=args.nbd_port, default_imi=args.default_imi,
        menu_timeout=args.menu_timeout, versions=args.versions, overlay=args.overlay,
        ip=args.ip, append=args.append, serial=args.serial, title=args.title,
        http_base=args.http_base, pins=pins,
    )
    s.check()
    return s


def cmd_serve(args: argparse.Namespace) -> int:
    from icbdcache.store import StoreError
    from pxe.render import ConfigError
    from pxe.service import PxeConfig, run

    try:
        _check_store(args.store)
        settings = _settings(args)
        cfg = PxeConfig(
            store=args.store, settings=settings, listen=args.listen, tftp_port=args.tftp_port,
            http_port=args.http_port, syslinux_dir=args.syslinux_dir,
            refresh_interval=args.refresh, tftp_timeout=args.tftp_timeout,
            tftp_retries=args.tftp_retries, tftp_max_blksize=args.tftp_max_blksize,
        )
        if cfg.tftp_port is None and cfg.http_port is None:
            raise ConfigError("both --tftp-port and --http-port are off: nothing to serve")
        return run(cfg)
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
    _boot_args(p)
    g = p.add_argument_group("servers")
    g.add_argument("--listen", default="0.0.0.0", metavar="ADDR",
                   help="address of both servers (default 0.0.0.0)")
    g.add_argument("--tftp-port", type=_port, default=69, metavar="PORT",
                   help="TFTP port (default 69; 0 = any free port; off)")
    g.add_argument("--http-port", type=_port, default=8080, metavar="PORT",
                   help="HTTP port (default 8080; 0 = any free port; off)")
    g.add_argument("--refresh", type=float, default=10.0, metavar="SECONDS",
                   help="look for new versions this often, besides on every config request "
                        "(default 10)")
    g.add_argument("--tftp-timeout", type=float, default=1.0, metavar="SECONDS",
                   help="TFTP retransmit interval unless the client asks (default 1)")
    g.add_argument("--tftp-retries", type=int, default=5, metavar="N",
                   help="retransmissions of one packet before a transfer is dropped (default 5)")
    g.add_argument("--tftp-max-blksize", type=int, default=65464, metavar="BYTES",
                   help="largest TFTP block size granted (default 65464)")
    verbosity(p)

    p = psub.add_parser("render", help="write the boot tree to a directory",
                        description="Write what 'pxe serve' serves (pxelinux.0 and modules, "
                                    "pxelinux.cfg/, boot.ipxe, ipxe/, boot/IMI@VERSION/) into "
                                    "a directory for tftpd-hpa, dnsmasq or a web server. Run "
                                    "it again after each import.",
                        epilog="example:\n  icbd-cache pxe render --store DIR --out /srv/tftp "
                               "--nbd-host 192.168.10.5 --pins /etc/icbd-cache/pins.toml",
                        formatter_class=raw)
    _boot_args(p)
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
