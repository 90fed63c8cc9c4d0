"""Allow-lists of client networks (``--allow CIDR``): who may connect at all, and per export.

An empty list allows everyone (no ``--allow`` given). Addresses are compared as IP addresses:
an IPv4 client on a dual-stack socket (``::ffff:10.1.2.3``) is matched as ``10.1.2.3``.
Connections over a Unix socket are local and never refused here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(text: str) -> str:
    """Check ``text`` as a network (``10.0.0.0/8``, ``192.168.1.7``, ``fd00::/8``) and return
    it in canonical form. Raises ValueError naming the forms."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network: give an address or ADDRESS/PREFIX, "
                         "e.g. 10.0.0.0/8 or 192.168.1.7") from None
    return str(net)


class AllowList:
    """The networks of ``cidrs`` (checked by :func:`parse_cidr`); empty: everyone."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(parse_cidr(c), strict=False) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return ",".join(map(str, self.networks)) or "any"

    def allows(self, host: str) -> bool:
        """Whether address ``host`` is in one of the networks (always, for an empty list;
        never, for something that is not an IP address while the list is not empty)."""
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


__all__ = ["AllowList", "parse_cidr"]
