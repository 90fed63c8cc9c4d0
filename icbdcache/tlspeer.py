"""TLS contexts of ``serve`` and of its NBD upstreams, and what a verified peer certificate says.

Notes on the design:

- Client certificates are trusted only through the CA bundle given (``--tls-ca``): the
  server context is built from :data:`ssl.PROTOCOL_TLS_SERVER` and never loads the system's
  trust store, so a certificate a public CA issued to anyone does not open an export.
- OpenSSL checks the chain and the validity dates (notBefore/notAfter) during the handshake; a
  certificate that fails either ends the handshake with an alert, before any NBD option.
- The names of a verified certificate (:func:`peer_names`) are its subject's commonName values
  and its subjectAltName entries (DNS, email, URI, IP address); an export's ``tls-name=``
  list is matched against them. :func:`subject_text` is the subject as one string, the client
  identity under ``--tls-identity subject``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

#: What :meth:`ssl.SSLSocket.getpeercert` returns for a verified certificate.
PeerCert = Mapping[str, Any]

#: Short names of subject attributes, for :func:`subject_text` (RFC 4514's where it has one).
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "domainComponent": "DC", "emailAddress": "emailAddress", "serialNumber": "serialNumber"}


def server_context(cert: str, key: str, ca: str | None = None,
                   verify_peer: bool = False) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) from the PEM files ``cert`` (chain) and
    ``key``. With ``ca`` (a PEM bundle) client certificates are checked against it alone:
    required with ``verify_peer``, else checked only when a client presents one. Raises
    OSError (a file) or ssl.SSLError (its contents); ValueError for ``verify_peer`` without
    ``ca``."""
    if verify_peer and not ca:
        raise ValueError("verifying client certificates needs a CA bundle")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: str | None = None, cert: str | None = None,
                   key: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client-side context for an NBD upstream: the server is verified against ``ca`` (a PEM
    bundle; None: the system's trust store) and its name, unless ``verify`` is false; ``cert``
    and ``key`` (PEM) are presented when the upstream asks for a client certificate. Raises
    OSError or ssl.SSLError; ValueError for ``cert`` without ``key`` or the reverse."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (tls-cert= and tls-key=)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def peer_names(cert: PeerCert | None) -> frozenset[str]:
    """The names a verified certificate vouches for: subject commonName values and
    subjectAltName entries (DNS, email, URI, IP address); empty for None or an empty dict
    (no certificate, or one that was not verified)."""
    if not cert:
        return frozenset()
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                names.add(str(value))
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI", "IP Address"):
            names.add(str(value))
    return frozenset(names)


def subject_text(cert: PeerCert | None) -> str:
    """The subject of a verified certificate as ``CN=ws1,O=Lab`` (attributes in certificate
    order; ``,`` ``+`` ``=`` and ``\\`` in values escaped with ``\\``); ``""`` without one."""
    if not cert:
        return ""
    parts: list[str] = []
    for rdn in cert.get("subject", ()):
        parts.append("+".join(f"{_SHORT.get(attr, attr)}={_escape(str(value))}"
                              for attr, value in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = []
    for ch in value:
        if ch in ',+=\\"<>;':
            out.append("\\")
        out.append(ch)
    return "".join(out)
