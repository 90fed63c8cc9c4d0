"""A real pair of iMI versions for ``icbd-bench replication``, built once and cached.

A recipe names the packages of each version: ``v1`` is scripts/build-test-imi's Debian image
(optionally grown, packages installed from the suite's main archive with scripts/update-imi);
``v2`` is ``v1`` updated the way an administrator does (scripts/update-imi: security upgrades,
packages installed, others purged; fstrim at the end of each step). The pair is cached under
``${XDG_CACHE_HOME:-~/.cache}/icbd-cache/bench/pair-<recipe>-<key>/`` as ``v1.img``, ``v2.img``
and ``pair.json`` (the recipe, sizes in bytes, sha256, seconds each step took); ``<key>`` is a
hash of the recipe and the test iMI's build key, so a changed recipe builds a new pair.

``python -m bench.imipair [--recipe full|quick] [--force]`` builds (or finds) a pair and prints
its directory on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILD_TEST_IMI = REPO / "scripts" / "build-test-imi"
UPDATE_IMI = REPO / "scripts" / "update-imi"


@dataclass(frozen=True)
class Recipe:
    """What each version of a pair holds.

    ``grow``: v1's image size (``truncate -s`` syntax, None: the test iMI's own size);
    ``v1_install``: packages installed into v1 (suite's main archive only, no security
    updates, as a point release); ``v2_install``/``v2_purge``: what the update of v2 installs
    and purges; ``v2_upgrade``: whether v2 takes the security upgrades.
    """

    name: str
    grow: str | None
    v1_install: tuple[str, ...]
    v2_install: tuple[str, ...]
    v2_purge: tuple[str, ...]
    v2_upgrade: bool = True

    def key(self, base_key: str) -> str:
        """A hash of the recipe and the base image's key (16 hex digits)."""
        text = json.dumps([self.name, self.grow, self.v1_install, self.v2_install,
                           self.v2_purge, self.v2_upgrade, base_key])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The benchmark's pair: a Debian workstation with about 1.4 GB used in a 2 GiB image; v2 takes
#: the security updates, gains a web browser and loses two editors.
FULL = Recipe(
    name="full", grow="2G",
    v1_install=("python3", "perl", "gcc", "g++", "make", "git", "vim-nox", "emacs-nox",
                "libreoffice-core"),
    v2_install=("firefox-esr",), v2_purge=("emacs-nox", "vim-nox"), v2_upgrade=True)
#: A small pair for --quick: the test iMI (about 350 MB used), and it updated with less
#: installed and tzdata purged.
QUICK = Recipe(name="quick", grow=None, v1_install=(), v2_install=("less",),
               v2_purge=("tzdata",), v2_upgrade=True)
RECIPES = {r.name: r for r in (FULL, QUICK)}


class PairError(RuntimeError):
    """The pair cannot be built here; ``unavailable`` is True when a tool said so with exit
    status 77 (not root, no mirror...)."""

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


@dataclass(frozen=True)
class Pair:
    """Two versions of an iMI: paths of the raw images and a description (``pair.json``)."""

    v1: Path
    v2: Path
    meta: dict[str, Any]


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/icbd-cache/bench``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "icbd-cache" / "bench"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (holes read as zeros)."""
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _run_tool(argv: Sequence[str], what: str, log: Callable[[str], None]) -> str:
    """Run a build script; return its last stdout line. Raises PairError (unavailable on
    exit status 77)."""
    log(f"imipair: {what}")
    p = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-12:]
        raise PairError(f"{what}: exit {p.returncode}: " + " | ".join(tail),
                        unavailable=p.returncode == 77)
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def _used_bytes(stderr_tail: str) -> int | None:
    m = re.search(r"(\d+) bytes used", stderr_tail)
    return int(m.group(1)) if m else None


def _update(src: Path, dst: Path, args: Sequence[str], what: str,
            log: Callable[[str], None]) -> dict[str, Any]:
    """scripts/update-imi SRC DST ARGS; returns seconds taken and the used bytes it reported."""
    t0 = time.monotonic()
    argv = [str(UPDATE_IMI), str(src), str(dst), *args]
    log(f"imipair: {what}: {' '.join(argv[3:]) or '(no changes)'}")
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-12:]
        raise PairError(f"{what}: update-imi exit {p.returncode}: " + " | ".join(tail),
                        unavailable=p.returncode == 77)
    return {"seconds": round(time.monotonic() - t0, 1), "fs_used_bytes": _used_bytes(p.stderr),
            "args": list(args)}


def build_pair(recipe: Recipe, force: bool = False,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
               root: Path | None = None) -> Pair:
    """The cached pair of ``recipe``, built first if needed (several minutes for FULL: the
    packages come from the Debian mirror). Raises PairError."""
    base_dir = Path(_run_tool([str(BUILD_TEST_IMI)], "the test iMI (scripts/build-test-imi)",
                              log))
    base = base_dir / "imi.ext4"
    base_key = base_dir.name
    out = (root or cache_root()) / f"pair-{recipe.name}-{recipe.key(base_key)}"
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "pair.json"
    v1, v2 = out / "v1.img", out / "v2.img"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and meta_path.exists() and v1.exists() and v2.exists():
            return Pair(v1, v2, json.loads(meta_path.read_text()))
        meta_path.unlink(missing_ok=True)
        steps: dict[str, Any] = {}
        v1_args: list[str] = []
        if recipe.grow:
            v1_args += ["--grow", recipe.grow]
        if recipe.v1_install:
            v1_args += ["--install", *recipe.v1_install]
        steps["v1"] = _update(base, v1, v1_args, "v1", log)
        v2_args: list[str] = ["--upgrade"] if recipe.v2_upgrade else []
        if recipe.v2_install:
            v2_args += ["--install", *recipe.v2_install]
        if recipe.v2_purge:
            v2_args += ["--purge", *recipe.v2_purge]
        steps["v2"] = _update(v1, v2, v2_args, "v2 (v1 updated in place)", log)
        files = {}
        for name, path in (("v1", v1), ("v2", v2)):
            st = path.stat()
            files[name] = {"bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
                           "sha256": sha256_file(path)}
        meta = {"recipe": recipe.name, "key": recipe.key(base_key), "base": str(base),
                "base_key": base_key, "grow": recipe.grow,
                "v1_install": list(recipe.v1_install), "v2_install": list(recipe.v2_install),
                "v2_purge": list(recipe.v2_purge), "v2_upgrade": recipe.v2_upgrade,
                "steps": steps, "files": files, "built": time.time()}
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(meta_path)
        return Pair(v1, v2, meta)


def pair_from_dir(path: Path) -> Pair:
    """A pair given as a directory holding ``v1.img`` and ``v2.img`` (any raw images; sizes
    and sha256 are computed here). Raises PairError when a file is missing."""
    v1, v2 = path / "v1.img", path / "v2.img"
    for p in (v1, v2):
        if not p.is_file():
            raise PairError(f"{p} is missing (--pair DIR needs DIR/v1.img and DIR/v2.img)")
    files = {}
    for name, p in (("v1", v1), ("v2", v2)):
        st = p.stat()
        files[name] = {"bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
                       "sha256": sha256_file(p)}
    return Pair(v1, v2, {"recipe": "given", "dir": str(path), "files": files})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.imipair``: build or find a pair, print its directory."""
    p = argparse.ArgumentParser(prog="python -m bench.imipair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    p.add_argument("--force", action="store_true", help="build again even if cached")
    args = p.parse_args(argv)
    try:
        pair = build_pair(RECIPES[args.recipe], force=args.force)
    except PairError as e:
        print(f"imipair: {e}", file=sys.stderr)
        return 77 if e.unavailable else 1
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(pair.meta["files"], indent=1), file=sys.stderr)
        print(pair.v1.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
