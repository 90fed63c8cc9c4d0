"""The NBD protocol, sans-IO.

Pure state machines for both ends of an NBD connection (NetworkBlockDevice/nbd, doc/proto.md):
bytes go in, events and bytes come out. Nothing here opens sockets, reads a clock or imports
asyncio except :mod:`nbd.aio`, the thin adapter.

Modules: :mod:`nbd.constants` (wire values), :mod:`nbd.wire` (struct formats and limits),
:mod:`nbd.events`, :mod:`nbd.errors`, :mod:`nbd.server` (server side), :mod:`nbd.client`
(client side), :mod:`nbd.aio` (asyncio adapter for the client).
"""

from nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]
