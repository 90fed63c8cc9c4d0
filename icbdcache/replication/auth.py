"""Credentials of the replication API: token files, TLS contexts, and the checks the master
makes on each request (docs/replication.md, 'Authentication').

* Replica tokens: a file of ``SITE TOKEN`` lines; a token is valid for its site's endpoints
  only (``*`` as SITE: any site).
* Client certificates: with a client CA, the master asks for one (optional) and accepts any
  certificate that verifies against it.
* Registry site tokens (``icbd-cache admin site add NAME``): made here (:func:`new_token`),
  kept in the registry only as their SHA-256 (:func:`token_digest`), each bound to its site;
  the master looks a presented token up there (so masters sharing a registry agree, and a
  revoked token stops working at its next request).
* Admin tokens: a file of ``TOKEN`` or ``NAME TOKEN`` lines; without any, the admin API answers
  loopback addresses only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import ssl
from dataclasses import dataclass, field

#: A token-file SITE that makes a token valid for every site.
ANY_SITE = "*"
#: Random bytes of a registry site token (it is sent as URL-safe base64: 43 characters).
TOKEN_BYTES = 32
#: Why a replica-facing request is refused: no credentials at all, a token nobody knows.
NO_CREDENTIALS = ("this master hands images only to sites it knows: send the site's token "
                  "(Authorization: Bearer TOKEN; a site's --master-token-file) or a client "
                  "certificate")
UNKNOWN_TOKEN = "unknown or revoked token"


class AuthConfigError(ValueError):
    """A token, certificate or key file cannot be used (the file is named in the message)."""


def _lines(path: str, what: str) -> list[list[str]]:
    """The words of each meaningful line of ``path`` (``#`` comments and blank lines
    skipped). Raises AuthConfigError naming the option ``what``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"{what} {path}: {getattr(e, 'strerror', None) or e}") from e
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out.append(words)
    return out


def load_site_tokens(path: str) -> dict[str, str]:
    """Token -> site of a ``--token-file`` (``SITE TOKEN`` a line). Raises AuthConfigError
    on a line without exactly two words, or a file with no token."""
    tokens: dict[str, str] = {}
    for n, words in enumerate(_lines(path, "--token-file"), 1):
        if len(words) != 2:
            raise AuthConfigError(f"--token-file {path}: entry {n} is not 'SITE TOKEN'")
        tokens[words[1]] = words[0]
    if not tokens:
        raise AuthConfigError(f"--token-file {path}: no token in it")
    return tokens


def load_admin_tokens(path: str) -> set[str]:
    """The tokens of an ``--admin-token-file`` (``TOKEN`` or ``NAME TOKEN`` a line: the last
    word is the token). Raises AuthConfigError on a longer line or a file with no token."""
    tokens: set[str] = set()
    for n, words in enumerate(_lines(path, "--admin-token-file"), 1):
        if len(words) > 2:
            raise AuthConfigError(f"--admin-token-file {path}: entry {n} is not "
                                  "'TOKEN' or 'NAME TOKEN'")
        tokens.add(words[-1])
    if not tokens:
        raise AuthConfigError(f"--admin-token-file {path}: no token in it")
    return tokens


def read_token(path: str) -> str:
    """The one token a client sends, from a file: the last word of its first meaningful line
    (so a master's ``SITE TOKEN`` or admin file works as is). Raises AuthConfigError."""
    lines = _lines(path, "token file")
    if not lines:
        raise AuthConfigError(f"token file {path}: no token in it")
    return lines[0][-1]


def new_token() -> str:
    """A new site token: :data:`TOKEN_BYTES` random bytes as URL-safe base64 (no ``#``, no
    whitespace, so it fits a token file as is)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """What the registry keeps of a site token: its SHA-256, 64 hex digits. A token is random
    and long, so the digest alone neither gives it back nor can be guessed from."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def token_site_problem(site: str) -> str | None:
    """Why ``site`` cannot be given a registry token, or None: a name the API refuses, or
    ``*`` (which a token file reads as any site)."""
    from icbdcache.replication.wire import bad_name

    if site == ANY_SITE:
        return "'*' is no site name (a token file's '*' means any site)"
    return bad_name(site)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _match(token: str, candidates: set[str] | dict[str, str]) -> str | None:
    """The candidate equal to ``token`` (constant-time per comparison), or None."""
    found = None
    for c in candidates:
        if hmac.compare_digest(c.encode(), token.encode()):
            found = c
    return found


def is_loopback(host: str | None) -> bool:
    """Whether a peer address is a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class Auth:
    """What the master accepts. ``site_tokens``: token -> site (``--token-file``);
    ``client_ca``: whether TLS client certificates are checked (the ssl context does the
    verifying); ``closed``: replica-facing requests need credentials even without a token
    file or client CA (a master reachable from the network: its sites hold registry tokens);
    ``admin_tokens``: empty means admin from loopback only."""

    site_tokens: dict[str, str] = field(default_factory=dict)
    client_ca: bool = False
    admin_tokens: set[str] = field(default_factory=set)
    closed: bool = False

    @property
    def replica_auth(self) -> bool:
        """Whether replica-facing requests need credentials at all."""
        return bool(self.site_tokens) or self.client_ca or self.closed

    def file_owner(self, token: str) -> str | None:
        """The site (or ``*``) of a ``--token-file`` token, or None."""
        found = _match(token, self.site_tokens)
        return self.site_tokens[found] if found is not None else None

    def check_replica(self, authorization: str | None, has_client_cert: bool,
                      site: str | None = None, *,
                      registry_owner: str | None = None) -> str | None:
        """Why a replica-facing request is refused (401), or None. ``site``: the site named
        in the path of a site endpoint (a token must belong to it, or be a token file's
        ``*``); ``registry_owner``: the site the registry binds the presented token to (the
        caller looked it up by :func:`token_digest`), None if it knows none."""
        if not self.replica_auth:
            return None
        token = bearer(authorization)
        if token is not None:
            owner = self.file_owner(token)
            if owner is not None and (site is None or owner in (ANY_SITE, site)):
                return None
            if owner is None and registry_owner is not None:
                owner = registry_owner
                if site is None or owner == site:
                    return None
            if owner is not None:
                return f"this token is not for site {site!r}"  # quoted: it is logged
            if not has_client_cert:
                return UNKNOWN_TOKEN
        if has_client_cert and self.client_ca:
            return None
        return NO_CREDENTIALS

    def token_site(self, authorization: str | None) -> str | None:
        """The site a valid bearer token in ``authorization`` belongs to, or None (no token,
        an unknown one, or a ``*`` token valid for every site)."""
        token = bearer(authorization)
        if token is None or not self.site_tokens:
            return None
        found = _match(token, self.site_tokens)
        if found is None:
            return None
        owner = self.site_tokens[found]
        return None if owner == ANY_SITE else owner

    def check_admin(self, authorization: str | None, peer: str | None) -> tuple[int, str] | None:
        """(status, reason) refusing an admin request, or None. 401 without a configured
        admin token, 403 for a non-loopback peer when no admin token is configured."""
        if not self.admin_tokens:
            if is_loopback(peer):
                return None
            return 403, "the admin API answers loopback only (no --admin-token-file)"
        token = bearer(authorization)
        if token is not None and _match(token, self.admin_tokens) is not None:
            return None
        return 401, "admin token required"


def server_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) from PEM files; with ``client_ca``, clients are
    asked for a certificate (optional) and one they present must verify against it.
    Raises AuthConfigError naming the file that cannot be used."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise AuthConfigError(f"cannot use --tls-cert {cert} with --tls-key {key}: {e}") from e
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise AuthConfigError(f"--client-ca {client_ca}: {e}") from e
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> ssl.SSLContext:
    """A client TLS context (TLS 1.2 or newer) that verifies the server against ``ca`` (PEM;
    None: the system's CAs) and, with ``cert``/``key``, presents a client certificate.
    Raises AuthConfigError naming the file that cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise AuthConfigError(f"CA file {ca}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if bool(cert) != bool(key):
        raise AuthConfigError("a client certificate and its key go together")
    if cert and key:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise AuthConfigError(f"cannot use client certificate {cert} with key {key}: "
                                  f"{e}") from e
    return ctx
