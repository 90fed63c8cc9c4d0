"""Signed manifests: ed25519 keys, the statement a master signs for each version, and what a
site trusts (docs/replication.md, 'TRUST').

A **statement** describes one version completely: its iMI and version names, its size and chunk
size (bytes), the BLAKE3-256 of its chunk map (``map``) and of its strong map (``strong``, the
BLAKE3-256 of every chunk), its ``manifest`` id (the catalog's xxh3-128 of the chunk map), the
sha256 of its kernel and initrd (None when it has none), when it was signed (``time``, seconds
since the epoch) and the id of the signing key (``key_id``). Its text is canonical JSON (sorted
keys, no spaces, ASCII), and the **signature** is ed25519 over that text, kept as hex.

A site holds the public keys it trusts (``--trust-key FILE``, repeatable: during a rotation the
old and the new key) and the keys it refuses (``--revoked-key FILE|KEY_ID``). A manifest is
taken only when its statement verifies under a trusted key that is not revoked and describes
exactly the maps received (:func:`check_maps`); every chunk is then checked against its strong
digest before it is stored or served. A key's id is the first 16 hex digits of the sha256 of
its 32 raw public bytes.

Key files are PEM: the private key PKCS#8 (mode 0600), the public key SubjectPublicKeyInfo
(``FILE.pub``), as ``openssl pkey`` reads them. The ``cryptography`` package does the ed25519
arithmetic (it is also what the TLS test tools use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from icbdcache.store.chunks import strong_hex

log = logging.getLogger("icbdcache.signing")

#: The ``type`` of a manifest statement, and its layout's version.
STATEMENT_TYPE = "icbd-manifest"
STATEMENT_V = 1
#: Hex digits of a key id.
KEY_ID_LEN = 16


class KeyFileError(Exception):
    """A key file cannot be read, is not an ed25519 key of the kind asked for, or cannot be
    written (the message names the file)."""


class SignatureError(Exception):
    """A manifest refused: unsigned, signed by a key not trusted or revoked, a signature that
    does not verify, or a statement that does not describe what was received. The message
    names the version and the key id."""


def key_id(public: Ed25519PublicKey) -> str:
    """The id of ``public``: the first KEY_ID_LEN hex digits of sha256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LEN]


def generate(out: str) -> str:
    """Make a key pair: the private key in ``out`` (mode 0600, PEM PKCS#8), the public key in
    ``out.pub`` (mode 0644, PEM). Returns the key id. Refuses (KeyFileError) to overwrite
    either file."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((out, private, 0o600), (out + ".pub", public, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise KeyFileError(f"{path} exists (a key is never overwritten)") from None
        except OSError as e:
            raise KeyFileError(f"{path}: {e.strerror or e}") from e
        try:
            os.fchmod(fd, mode)  # whatever the umask
            os.write(fd, data)
        finally:
            os.close(fd)
    return key_id(key.public_key())


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e}") from e


def load_private(path: str) -> Ed25519PrivateKey:
    """The ed25519 private key of PEM file ``path``. Raises KeyFileError."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an ed25519 key (make one with icbd-cache keygen)")
    return key


def load_public(path: str) -> Ed25519PublicKey:
    """The ed25519 public key of PEM file ``path`` (a public key, or a private key whose
    public half is taken). Raises KeyFileError."""
    raw = _read(path)
    if b"PRIVATE KEY" in raw:
        return load_private(path).public_key()
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a PEM public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an ed25519 key (make one with icbd-cache keygen)")
    return key


@dataclass
class Statement:
    """What a master signs for one version (see the module docstring). Sizes in bytes,
    ``time`` in seconds since the epoch, digests hex."""

    imi: str
    version: str
    size: int
    chunk_size: int
    map: str
    strong: str
    manifest: str
    kernel: str | None
    initrd: str | None
    time: float
    key_id: str
    type: str = STATEMENT_TYPE
    v: int = STATEMENT_V

    @property
    def key(self) -> str:
        return f"{self.imi}@{self.version}"

    def text(self) -> str:
        """The canonical JSON text that is signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True)

    @classmethod
    def parse(cls, text: str) -> Statement:
        """The statement of ``text``. Raises SignatureError if it is not one (or not in its
        canonical form, which is what was signed)."""
        try:
            d = json.loads(text)
            st = cls(imi=str(d["imi"]), version=str(d["version"]), size=int(d["size"]),
                     chunk_size=int(d["chunk_size"]), map=str(d["map"]),
                     strong=str(d["strong"]), manifest=str(d["manifest"]),
                     kernel=None if d.get("kernel") is None else str(d["kernel"]),
                     initrd=None if d.get("initrd") is None else str(d["initrd"]),
                     time=float(d["time"]), key_id=str(d["key_id"]), type=str(d["type"]),
                     v=int(d["v"]))
        except (ValueError, KeyError, TypeError, RecursionError, AttributeError) as e:
            raise SignatureError(f"not a manifest statement: {e}") from e
        if st.type != STATEMENT_TYPE or st.v != STATEMENT_V:
            raise SignatureError(f"a statement of type {st.type!r} v{st.v}, not "
                                 f"{STATEMENT_TYPE!r} v{STATEMENT_V}")
        return st


def make_statement(imi: str, version: str, size: int, chunk_size: int, chunk_map: bytes,
                   strong_map: bytes, manifest: str, kernel_sha: str | None,
                   initrd_sha: str | None, key: Ed25519PrivateKey) -> tuple[str, str]:
    """Sign the version described by the arguments with ``key``: (statement text, hex
    signature)."""
    st = Statement(imi, version, size, chunk_size, strong_hex(chunk_map),
                   strong_hex(strong_map), manifest, kernel_sha, initrd_sha,
                   round(time.time(), 3), key_id(key.public_key()))
    text = st.text()
    return text, key.sign(text.encode()).hex()


def check_maps(st: Statement, key: str, size: int, chunk_size: int, chunk_map: bytes,
               strong_map: bytes) -> None:
    """Raise SignatureError unless ``st`` describes version ``key`` (``IMI@VERSION``) of
    ``size`` bytes in chunks of ``chunk_size`` with exactly these maps."""
    why = None
    if st.key != key:
        why = f"it is the statement of {st.key[:100]!r}"
    elif (st.size, st.chunk_size) != (size, chunk_size):
        why = (f"it says {st.size} bytes in chunks of {st.chunk_size}, not {size} in "
               f"{chunk_size}")
    elif st.map != strong_hex(chunk_map):
        why = "its chunk map is not the one received"
    elif st.strong != strong_hex(strong_map):
        why = "its strong map is not the one received"
    if why is not None:
        raise SignatureError(f"manifest of {key} refused: the signed statement (key "
                             f"{st.key_id}) does not describe it: {why}")


@dataclass
class Trust:
    """What a site trusts: ``keys`` (key id -> public key), ``revoked`` key ids, and
    ``insecure`` (``--insecure-no-signature``: manifests are taken unsigned)."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    insecure: bool = False

    def verify(self, key: str, statement: str | None, signature: str | None) -> Statement:
        """The statement of version ``key`` if ``signature`` is a good signature of it by a
        trusted key that is not revoked. Raises SignatureError naming the key id. (Callers
        that are ``insecure`` do not call it for unsigned manifests.)"""
        if not statement or not signature:
            raise SignatureError(f"manifest of {key} refused: it is not signed, and this site "
                                 "takes only signed manifests (--trust-key FILE; "
                                 "--insecure-no-signature takes unsigned ones)")
        st = Statement.parse(statement)
        kid = st.key_id
        if kid in self.revoked:
            raise SignatureError(f"manifest of {key} refused: signed by key {kid}, which is "
                                 "revoked here (--revoked-key)")
        pub = self.keys.get(kid)
        if pub is None:
            trusted = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"manifest of {key} refused: signed by key {kid}, which this "
                                 f"site does not trust (trusted: {trusted})")
        try:
            pub.verify(bytes.fromhex(signature), statement.encode())
        except (InvalidSignature, ValueError):
            raise SignatureError(f"manifest of {key} refused: its signature does not verify "
                                 f"under key {kid} (tampered with, or not signed by it)") \
                from None
        return st

    def revoked_signer(self, meta: Any) -> str | None:
        """The key id of the revoked key that signed the stored version ``meta`` (its
        ``statement``), or None: not signed, signed by a key not revoked, or an insecure
        site (which revokes nothing)."""
        if self.insecure or not self.revoked:
            return None
        st = statement_of(meta)
        return st.key_id if st is not None and st.key_id in self.revoked else None

    def accepts(self, key: str, statement: str | None, signature: str | None) -> bool:
        """Whether :meth:`verify` passes (or the site is insecure)."""
        if self.insecure:
            return True
        try:
            self.verify(key, statement, signature)
        except SignatureError:
            return False
        return True


def parse_key_ref(text: str) -> str:
    """A revoked key named by a key file or its id: the key id. Raises KeyFileError."""
    t = text.strip().lower()
    if len(t) == KEY_ID_LEN and all(c in "0123456789abcdef" for c in t) \
            and not os.path.exists(text):
        return t
    return key_id(load_public(text))


def trust_from(trust_keys: list[str], revoked: list[str], insecure: bool) -> Trust:
    """The Trust of a site's options. Raises KeyFileError (a file named), ValueError (no key
    and not insecure, or both)."""
    if insecure and trust_keys:
        raise ValueError("--insecure-no-signature and --trust-key contradict each other")
    if insecure and revoked:
        raise ValueError("--insecure-no-signature takes manifests without checking who signed "
                         "them: --revoked-key would have no effect; drop one of them")
    if not insecure and not trust_keys:
        raise ValueError("no --trust-key: this site would take manifests nobody signed; give "
                         "the master's public key (--trust-key FILE.pub, from icbd-cache "
                         "keygen) or, knowingly, --insecure-no-signature")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in trust_keys:
        pub = load_public(path)
        keys[key_id(pub)] = pub
    return Trust(keys, {parse_key_ref(r) for r in revoked}, insecure)


INSECURE_WARNING = ("WARNING: --insecure-no-signature: manifests are taken without a "
                    "signature; anyone between the master and this site can change what its "
                    "workstations boot")


def statement_of(meta: Any) -> Statement | None:
    """The parsed statement a stored version carries (``meta.statement``), or None."""
    text = getattr(meta, "statement", None)
    if not text:
        return None
    try:
        return Statement.parse(text)
    except SignatureError:
        return None


__all__ = ["INSECURE_WARNING", "KeyFileError", "SignatureError", "Statement", "Trust",
           "check_maps", "generate", "key_id", "load_private", "load_public", "make_statement",
           "parse_key_ref", "statement_of", "trust_from"]
