"""Kernel and initrd of each iMI version, kept with the version.

A version boots with the kernel and initramfs inside its own root file system, so that a
workstation's kernel always matches the modules it finds under ``/lib/modules``. They are
taken, without mounting anything, from the version's ext4 image with e2fsprogs' ``debugfs``:
``/vmlinuz`` and ``/initrd.img`` (Debian's symlinks, followed inside the image), else
``/boot/vmlinuz`` / ``/boot/initrd.img``, else the newest ``/boot/vmlinuz-VER`` with its
``/boot/initrd.img-VER``. ``icbd-cache import --kernel F --initrd F`` gives them explicitly
instead (for images that are not ext4, or whose kernel lives elsewhere). ``import`` keeps them
at once, best effort (:func:`prepare_at_import`); ``pxe serve``, ``render`` and ``extract`` do
it for versions that have none yet.

Either way the two files are copied to ``STORE/boot/IMI@VERSION/{vmlinuz,initrd.img}`` (beside
the store's ``data.mdb``) and their paths recorded in the version's
:class:`~icbdcache.store.VersionMeta` (``kernel``, ``initrd``) relative to the store
(``boot/IMI@VERSION/vmlinuz``), so that any process finds them whatever its working directory,
and a store moved or copied elsewhere keeps them. (Paths recorded by older releases, absolute
or relative to the importer's directory, are read as the store's own copy when they end in
``boot/IMI@VERSION/NAME``.) Versions are immutable, so a version's boot files never change once
kept.

The image read is the version's snapshot file when one of its sources is a local file of the
right size; otherwise the image is assembled in a temporary sparse file from the chunks the
store holds (zero chunks stay holes). A version whose chunks are not all local (an upstream
still being faulted in) fails with a message naming ``icbd-cache warm IMI@VERSION --all``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from icbdcache.log import kv
from icbdcache.store.chunks import DIGEST_SIZE, UNKNOWN, ZERO
from icbdcache.store.lmdbstore import Store, VersionMeta

log = logging.getLogger("icbdcache.bootfiles")

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
#: Symlinks followed inside an image before giving up (a loop).
MAX_SYMLINKS = 8
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]*$")


class BootFilesError(Exception):
    """A version's kernel or initrd cannot be found, extracted or kept."""


@dataclass(frozen=True)
class BootFiles:
    """Where a version's kernel and initrd are kept (absolute paths)."""

    key: str
    kernel: Path
    initrd: Path
    how: str = "kept"  # or "copied", "extracted /boot/vmlinuz-... /boot/initrd.img-..."


def boot_root(store_path: str | os.PathLike[str]) -> Path:
    """``STORE/boot``: the directory of every version's boot files."""
    return Path(store_path) / "boot"


def check_key(key: str) -> str:
    """``key`` if it is safe as a directory and URL path component; raises BootFilesError."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise BootFilesError(f"version name {key!r} cannot be used in boot paths "
                             "(letters, digits and . _ + @ - only)")
    return key


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, read 1 MiB at a time. Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def stored_path(key: str, name: str) -> str:
    """The path recorded for a kept boot file: ``boot/KEY/NAME``, relative to the store."""
    return f"boot/{key}/{name}"


def _in_store(meta: VersionMeta) -> bool:
    """Whether the recorded kernel and initrd name the store's own copies (``boot/KEY/NAME``,
    relative, or an older release's path ending so)."""
    return all(rec is not None and PurePosixPath(rec).parts[-3:] == ("boot", meta.key, name)
               for rec, name in ((meta.kernel, KERNEL_NAME), (meta.initrd, INITRD_NAME)))


def kept(store: Store, meta: VersionMeta) -> BootFiles | None:
    """The version's boot files (absolute paths) if they are kept under ``STORE/boot/KEY`` and
    recorded."""
    if not meta.kernel or not meta.initrd or not _in_store(meta):
        return None
    d = boot_root(store.path) / meta.key
    k, i = d / KERNEL_NAME, d / INITRD_NAME
    if not k.is_file() or not i.is_file():
        return None
    return BootFiles(meta.key, k, i)


def prepare(store: Store, meta: VersionMeta, *, force: bool = False,
            image: str | os.PathLike[str] | None = None) -> BootFiles:
    """Make sure the version's kernel and initrd are kept with it: copy the files recorded at
    import, or extract them from the image (``image``: the version's raw image, when the
    caller has it at hand); record their paths in the store. Returns them.
    Raises BootFilesError with the reason."""
    key = check_key(meta.key)
    if not force:
        have = kept(store, meta)
        if have is not None:
            return have
    dest = boot_root(store.path) / key
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as tmp:
        k_tmp, i_tmp = Path(tmp) / KERNEL_NAME, Path(tmp) / INITRD_NAME
        if meta.kernel and meta.initrd and not _in_store(meta):
            # given at import: keep a copy with the version (the originals may go away)
            for src, dst in ((meta.kernel, k_tmp), (meta.initrd, i_tmp)):
                try:
                    shutil.copyfile(src, dst)
                except OSError as e:
                    raise BootFilesError(f"{key}: cannot copy {src}: {e}") from e
            how = "copied"
        else:
            with VersionImage(store, meta, image) as img:
                kpath, ipath = find_boot_files(img)
                debugfs_dump(img, kpath, k_tmp)
                debugfs_dump(img, ipath, i_tmp)
            how = f"extracted {kpath} {ipath}"
        k_dst, i_dst = dest / KERNEL_NAME, dest / INITRD_NAME
        for tmp_file, dst in ((k_tmp, k_dst), (i_tmp, i_dst)):
            os.chmod(tmp_file, 0o644)
            os.replace(tmp_file, dst)
    record_kept(store, key)
    log.info(kv(event="boot_files", version=key, how=how, kernel_bytes=k_dst.stat().st_size,
                initrd_bytes=i_dst.stat().st_size))
    return BootFiles(key, k_dst, i_dst, how)


#: ext2/3/4 superblock magic (little-endian 0xEF53) and its offset in the image.
EXT_MAGIC, EXT_MAGIC_OFFSET = b"\x53\xef", 1024 + 0x38


def is_ext(image: str | os.PathLike[str]) -> bool:
    """Whether ``image`` starts with an ext2/3/4 superblock (read, nothing mounted)."""
    try:
        with open(image, "rb") as f:
            f.seek(EXT_MAGIC_OFFSET)
            return f.read(2) == EXT_MAGIC
    except OSError:
        return False


def prepare_at_import(store: Store, meta: VersionMeta,
                      image: str | os.PathLike[str]) -> BootFiles | None:
    """``icbd-cache import``: keep the new version's boot files now, from the file being
    imported: the ``--kernel``/``--initrd`` given (copied), or those inside an ext2/3/4 image
    (extracted). None when neither applies (another kind of image, nothing given). Raises
    BootFilesError (or OSError) with the reason; the caller only warns."""
    if bool(meta.kernel) != bool(meta.initrd):
        raise BootFilesError("--kernel and --initrd go together")
    if not meta.kernel and not is_ext(image):
        return None
    return prepare(store, meta, force=True, image=image)


def record_kept(store: Store, key: str) -> None:
    """Record ``boot/KEY/vmlinuz`` and ``boot/KEY/initrd.img`` (relative to the store) as the
    version's boot files, in one transaction that changes nothing else of it. Raises
    StoreError if the version is gone."""
    def change(m: VersionMeta) -> None:
        m.kernel, m.initrd = stored_path(key, KERNEL_NAME), stored_path(key, INITRD_NAME)

    store.update_version(key, change)


# ------------------------------------------------------------------------------ image access


class VersionImage:
    """Context manager giving a path to the version's raw image: its snapshot file, or a
    temporary sparse copy assembled from the store's chunks (removed on exit)."""

    def __init__(self, store: Store, meta: VersionMeta,
                 image: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.meta = meta
        self.image = image
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.image is not None:
            return Path(self.image)
        for src in self.meta.sources:
            if "://" in src:
                continue
            try:
                if os.path.getsize(src) == self.meta.size:
                    return Path(src)
            except OSError:
                continue
        return self._assemble()

    def _assemble(self) -> Path:
        m = self.meta
        blob = self.store.chunk_map(m.key)
        fd, name = tempfile.mkstemp(prefix=f".{m.key}-", suffix=".img",
                                    dir=boot_root(self.store.path))
        self.tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.truncate(m.size)
                for i in range(m.chunks):
                    d = bytes(blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                    if d == ZERO:
                        continue
                    data = self.store.get_chunk(d) if d != UNKNOWN else None
                    if data is None:
                        raise BootFilesError(
                            f"{m.key} is not fully in the store and has no local snapshot "
                            f"file: run 'icbd-cache warm {m.key} --all', or import it with "
                            "--kernel F --initrd F")
                    f.seek(i * m.chunk_size)
                    f.write(data)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.tmp

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- debugfs


def _debugfs(image: Path, request: str) -> tuple[str, str]:
    """Run one read-only debugfs request; return (stdout, stderr). debugfs reports most
    failures on stderr with exit status 0, so callers check the output themselves."""
    exe = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    if exe is None:
        raise BootFilesError("debugfs is not installed (package e2fsprogs)")
    try:
        p = subprocess.run([exe, "-R", request, str(image)], capture_output=True, text=True,
                           errors="replace", timeout=120, check=False)
    except subprocess.TimeoutExpired as e:
        raise BootFilesError(f"debugfs {request!r} on {image} timed out") from e
    err = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("debugfs "))
    if p.returncode != 0 or "Bad magic number" in err or "superblock" in err.lower():
        raise BootFilesError(f"{image} is not an ext2/3/4 image debugfs can read: "
                             f"{err.strip() or p.returncode}")
    return p.stdout, err


def _quote(path: str) -> str:
    if any(c in path for c in '"\n\\'):
        raise BootFilesError(f"unsupported character in path {path!r}")
    return f'"{path}"'


@dataclass(frozen=True)
class _Stat:
    kind: str  # "regular", "symlink", "directory", ...
    size: int
    link: str | None  # a symlink's target


_TYPE_RX = re.compile(r"Type:\s*(\S+)")
_SIZE_RX = re.compile(r"\bSize:\s*(\d+)")
_FAST_LINK_RX = re.compile(r'Fast link dest:\s*"(.*)"')


def _stat(image: Path, path: str) -> _Stat | None:
    out, _ = _debugfs(image, f"stat {_quote(path)}")
    m = _TYPE_RX.search(out)
    if m is None:
        return None  # "File not found by ext2_lookup"
    kind = m.group(1)
    sm = _SIZE_RX.search(out)
    size = int(sm.group(1)) if sm else 0
    link = None
    if kind == "symlink":
        fm = _FAST_LINK_RX.search(out)
        if fm:
            link = fm.group(1)
        else:  # a slow symlink keeps its target in a data block
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / "link"
                _debugfs(image, f"dump {_quote(path)} {_quote(str(dst))}")
                link = dst.read_bytes().decode(errors="replace") if dst.exists() else None
    return _Stat(kind, size, link)


def resolve(image: Path, path: str) -> str | None:
    """Follow symlinks inside the image (relative ones from the link's directory, absolute
    ones from the image's root); the final path of a regular file, or None."""
    cur = PurePosixPath(path)
    for _ in range(MAX_SYMLINKS + 1):
        st = _stat(image, str(cur))
        if st is None:
            return None
        if st.kind == "regular":
            return str(cur)
        if st.kind != "symlink" or not st.link:
            return None
        target = PurePosixPath(st.link)
        cur = target if target.is_absolute() else cur.parent / target
        cur = PurePosixPath(os.path.normpath(str(cur)))
        if not cur.is_absolute():
            cur = PurePosixPath("/") / cur
    return None


def _version_sort_key(name: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~_]", name)]


def list_dir(image: Path, path: str) -> list[str]:
    """Names in a directory of the image (``ls -p`` output parsed)."""
    out, _ = _debugfs(image, f"ls -p {_quote(path)}")
    names = []
    for line in out.splitlines():
        # /inode/mode/uid/gid/name/size/
        parts = line.split("/")
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            names.append(parts[5])
    return names


def find_boot_files(image: Path) -> tuple[str, str]:
    """(kernel path, initrd path) inside an ext4 image; raises BootFilesError."""
    for k, i in (("/vmlinuz", "/initrd.img"), ("/boot/vmlinuz", "/boot/initrd.img")):
        kp, ip = resolve(image, k), resolve(image, i)
        if kp and ip:
            return kp, ip
    names = list_dir(image, "/boot")
    kernels = sorted((n for n in names if n.startswith("vmlinuz-")), key=_version_sort_key,
                     reverse=True)
    for kname in kernels:
        ver = kname.removeprefix("vmlinuz-")
        kp = resolve(image, f"/boot/{kname}")
        ip = resolve(image, f"/boot/initrd.img-{ver}")
        if kp and ip:
            return kp, ip
    if kernels:
        raise BootFilesError(f"{image}: kernel {kernels[0]} has no /boot/initrd.img-"
                             f"{kernels[0].removeprefix('vmlinuz-')}")
    raise BootFilesError(f"{image}: no /vmlinuz and no /boot/vmlinuz-* (give --kernel and "
                         "--initrd to icbd-cache import or publish)")


def debugfs_dump(image: Path, path: str, dest: Path) -> None:
    """Copy one regular file out of the image to ``dest``; raises BootFilesError."""
    st = _stat(image, path)
    if st is None or st.kind != "regular":
        raise BootFilesError(f"{image}: {path} is not a regular file")
    _, err = _debugfs(image, f"dump {_quote(path)} {_quote(str(dest))}")
    if not dest.is_file() or dest.stat().st_size != st.size:
        raise BootFilesError(f"{image}: could not extract {path}: {err.strip()}")
