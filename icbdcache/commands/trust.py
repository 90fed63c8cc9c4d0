"""``icbd-cache keygen`` (a master's signing key pair) and ``icbd-cache bundle create|import``
(a version carried to a site on a disk). See docs/replication.md, 'TRUST' and 'OFFLINE
BUNDLES'."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any

from icbdcache.commands.options import Command, Option
from icbdcache.commands.replica import trust_from_args, trust_options
from icbdcache.commands.store import progress_bar, store_option

_RAW = argparse.RawDescriptionHelpFormatter


def cmd_keygen(args: argparse.Namespace) -> int:
    from icbdcache.replication.signing import KeyFileError, generate

    try:
        kid = generate(args.out)
    except KeyFileError as e:
        print(f"icbd-cache keygen: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"key {kid}: private {args.out} (mode 0600: keep it on the master), public "
              f"{args.out}.pub (give it to the sites: --trust-key)")
    return 0


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from icbdcache.replication.bundle import BundleError, create
    from icbdcache.store import Store, StoreError

    if not os.path.exists(os.path.join(args.store, "data.mdb")):
        print(f"icbd-cache bundle create: no store at {args.store}", file=sys.stderr)
        return 2
    try:
        store = Store(args.store, readonly=True)
    except StoreError as e:
        print(f"icbd-cache bundle create: {e}", file=sys.stderr)
        return 2
    try:
        info = create(store, args.version, args.out, since=args.since)
    except (BundleError, StoreError, OSError) as e:
        print(f"icbd-cache bundle create: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if not args.quiet:
        signed = f"signed by key {info.key_id}" if info.key_id else "UNSIGNED"
        since = f" new since {info.since}" if info.since else ""
        print(f"bundle {args.out}: {info.key}, {info.chunks} chunks{since} "
              f"({info.chunk_bytes} bytes), {info.file_bytes} bytes, {signed}")
    return 0


def cmd_bundle_import(args: argparse.Namespace) -> int:
    from icbdcache.replication.bundle import BundleError, import_bundle
    from icbdcache.store import Store, StoreError

    try:
        trust = trust_from_args(args)
    except ValueError as e:
        print(f"icbd-cache bundle import: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.file):
        print(f"icbd-cache bundle import: {args.file}: no such file", file=sys.stderr)
        return 2
    try:
        store = Store(args.store, size_limit=args.store_size)
    except StoreError as e:
        print(f"icbd-cache bundle import: {e}", file=sys.stderr)
        return 2
    try:
        with progress_bar(None, f"import {os.path.basename(args.file)}") as bar:
            done = import_bundle(store, args.file, trust,
                                 progress=None if bar.disable else bar.update)
    except (BundleError, StoreError, OSError) as e:
        print(f"icbd-cache bundle import: {e}; nothing was imported", file=sys.stderr)
        return 1
    finally:
        store.close()
    if not args.quiet:
        signed = f"signed by key {done.key_id}" if done.key_id else "unsigned"
        if done.already:
            print(f"{done.key} is already held here ({signed}): nothing to do")
        else:
            print(f"imported {done.key} ({signed}): {done.chunks} chunks checked, "
                  f"{done.added} bytes added to the store; pinned, latest")
    return 0


KEYGEN = Command(
    "keygen", "make an ed25519 key pair to sign manifests with",
    textwrap.fill(
        "Write a new private key to FILE (mode 0600) and its public key to FILE.pub. The "
        "master signs each version's manifest with the private key (publish --signing-key); "
        "sites take only manifests signed by a key they are given (--trust-key FILE.pub). "
        "An existing file is never overwritten.", 78),
    "examples:\n"
    "  icbd-cache keygen --out /etc/icbd-cache/master.key\n"
    "  icbd-cache publish lab.img --imi lab --store /srv/master \\\n"
    "      --signing-key /etc/icbd-cache/master.key",
    (Option("out", required=True, metavar="FILE",
            help="the private key's file (the public key goes to FILE.pub)"),),
    doc="replication.md")

BUNDLE_CREATE = Command(
    "bundle create", "write a version's signed manifest and chunks into one file",
    textwrap.fill(
        "Write IMI@VERSION of a master's store (its signed manifest, boot files and chunks) "
        "into FILE, to be carried to a site without a link and imported there with "
        "'icbd-cache bundle import'. With --since IMI@U only the chunks U lacks are written "
        "(the site must hold U).", 78),
    "examples:\n"
    "  icbd-cache bundle create lab@8 --store /srv/master --out /media/usb/lab-8.bundle\n"
    "  icbd-cache bundle create lab@8 --since lab@7 --store /srv/master --out lab-8.delta\n"
    "\nexit status: 0 written, 1 the version cannot be bundled, 2 bad usage",
    (Option("version", positional=True, metavar="IMI@VERSION", help="the version to bundle"),
     store_option(),
     Option("out", required=True, metavar="FILE", help="the bundle file to write"),
     Option("since", metavar="IMI@VERSION",
            help="only the chunks this version lacks (a delta for a site that holds it)")),
    doc="replication.md")

BUNDLE_IMPORT = Command(
    "bundle import", "check a bundle and make its version available, as a pull would",
    textwrap.fill(
        "Check FILE whole (the manifest's signature under --trust-key, every chunk against "
        "its digests, the boot files), then store it: the version is pinned, complete and "
        "the iMI's latest, exactly as a pull leaves it. A bundle that fails any check imports "
        "nothing.", 78),
    "examples:\n"
    "  icbd-cache bundle import /media/usb/lab-8.bundle --store /var/lib/icbd-cache/store \\\n"
    "      --trust-key /etc/icbd-cache/master.key.pub\n"
    "\nexit status: 0 imported (or already held), 1 refused (nothing imported), 2 bad usage",
    (Option("file", positional=True, help="the bundle"),
     store_option(),
     Option("store-size", "size", metavar="BYTES",
            help="bound of the store's chunks (a version that cannot fit is refused)"),
     *trust_options()),
    doc="replication.md")

#: The tables of this module's commands.
COMMANDS = (KEYGEN, BUNDLE_CREATE, BUNDLE_IMPORT)


def register(sub: Any) -> None:
    """Add ``keygen`` and ``bundle create|import`` to ``sub`` (argparse subparsers)."""
    KEYGEN.add_parser(sub, cmd_keygen)
    bundle = sub.add_parser(
        "bundle", help="a version in one file, for a site without a link to its master",
        description="Offline bundles: 'bundle create' at the master, 'bundle import' at the "
                    "site. See docs/replication.md.",
        epilog="examples:\n  icbd-cache bundle create lab@8 --store /srv/master --out "
               "lab-8.bundle\n  icbd-cache bundle import lab-8.bundle --trust-key "
               "master.key.pub", formatter_class=_RAW)
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND")
    BUNDLE_CREATE.add_parser(bsub, cmd_bundle_create)
    BUNDLE_IMPORT.add_parser(bsub, cmd_bundle_import)

    def usage(args: argparse.Namespace) -> int:
        bundle.print_help()
        return 2

    bundle.set_defaults(func=usage, verbose=0, quiet=False)


__all__ = ["COMMANDS", "register"]
