"""Whether a master may answer sites without credentials (docs/replication.md, 'Site
credentials').

A master reachable from the network hands images only to sites it knows. At start,
:func:`decide` looks at the address it listens on and the credentials it has:

* a token file or a client CA: sites must authenticate (as before);
* neither, on a loopback address only (127.0.0.0/8, ::1, a name that resolves to those
  only): open, for one-machine walkthroughs and the demo;
* neither, on any other address: sites must present a registry token
  (``icbd-cache admin site add NAME``); with none in the registry yet the master refuses to
  start (:class:`ExposureError`), unless ``--insecure-open`` says to serve anyone, which is
  then warned about at start and in ``admin status`` (:attr:`Access.warning`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any


class ExposureError(ValueError):
    """The master would serve every image to anyone who reaches it, and nobody said so."""


def is_loopback_listen(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only: a loopback address, or a name
    whose every address is one. The wildcard (``0.0.0.0``, ``::``, empty) and any name that
    does not resolve are not."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


@dataclass(frozen=True)
class Access:
    """How a running master lets sites in. ``address``: what it listens on (``HOST:PORT``);
    ``loopback``: only this machine reaches it; ``token_file``/``client_ca``: configured;
    ``registry_tokens``: site tokens the registry held at start; ``insecure_open``: the admin
    asked for an open master although the network reaches it."""

    address: str
    loopback: bool
    token_file: bool = False
    client_ca: bool = False
    registry_tokens: int = 0
    insecure_open: bool = False

    @property
    def open(self) -> bool:
        """Whether replica-facing requests need no credentials at all."""
        return not (self.token_file or self.client_ca) and (self.loopback
                                                             or self.insecure_open)

    @property
    def warning(self) -> str | None:
        """The warning of an open master the network reaches, or None."""
        if not self.open or self.loopback:
            return None
        return (f"--insecure-open: this master answers anyone who reaches {self.address} "
                "without credentials: any host may register as any site and pull every "
                "published image (create site tokens with 'icbd-cache admin site add NAME' "
                "and restart without --insecure-open)")

    def view(self) -> dict[str, Any]:
        """``admin status``'s ``access``: ``listen``, ``loopback``,
        ``sites_need_credentials``, ``token_file``, ``client_ca``, ``insecure_open``,
        ``warning`` (None unless open to the network)."""
        return {"listen": self.address, "loopback": self.loopback,
                "sites_need_credentials": not self.open, "token_file": self.token_file,
                "client_ca": self.client_ca, "insecure_open": self.insecure_open,
                "warning": self.warning}


def decide(host: str, port: int, *, token_file: bool, client_ca: bool, registry_tokens: int,
           insecure_open: bool, loopback: bool | None = None) -> Access:
    """The :class:`Access` of a master about to listen on ``host:port``. ``registry_tokens``:
    site tokens in its registry now; ``loopback``: whether ``host`` is loopback only (default:
    :func:`is_loopback_listen`). Raises ExposureError when the network would reach a master
    with no site credentials at all and ``insecure_open`` is not given, or when
    ``insecure_open`` comes with a token file or a client CA (they contradict)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
    if loopback is None:
        loopback = is_loopback_listen(host)
    if insecure_open and (token_file or client_ca):
        raise ExposureError("--insecure-open contradicts --token-file and --client-ca (with "
                            "them, sites must authenticate): give one or the other")
    access = Access(address, loopback, token_file, client_ca, registry_tokens, insecure_open)
    if loopback or token_file or client_ca or registry_tokens or insecure_open:
        return access
    raise ExposureError(
        f"refusing to listen on {address} without site credentials: any host that reaches it "
        "could register as any site and pull every published image. Give each site a token "
        "first ('icbd-cache admin site add NAME --store DIR' prints it; more later through "
        "the admin API), or --token-file FILE, or --client-ca FILE (with --tls-cert); or "
        "listen on a loopback address (127.0.0.1) only; or, on a network where every host "
        "may have every image, --insecure-open")


__all__ = ["Access", "ExposureError", "decide", "is_loopback_listen"]
