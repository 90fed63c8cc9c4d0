"""Errors of the NBD package.

The two protocol errors (after h11): the peer broke the protocol (:class:`RemoteProtocolError`),
or we were asked to (:class:`LocalProtocolError`). Besides them, two answers a well-behaved
server may give: an error reply to a request (:class:`RequestError`) and a refused option
during the handshake (:class:`NegotiationError`). A server's export catalog raises
:class:`ExportUnavailable` for an export it knows but will not give this client now.
"""

from __future__ import annotations

from nbd.constants import Errno, Opt, Rep


class ProtocolError(Exception):
    """Base class of the protocol errors of this package."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow, and the connection cannot go on.

    Whatever bytes the state machine queued before raising (a final error reply, for example)
    should still be sent, then the connection closed.
    """


class LocalProtocolError(ProtocolError):
    """This side asked the state machine for something the protocol state does not allow."""


class ExportUnavailable(Exception):
    """A server's catalog refuses an export it knows to this client, for now (the message says
    why). The server state machine answers NBD_REP_ERR_POLICY with that message (NBD_OPT_GO,
    INFO, SET_META_CONTEXT) or closes the connection (NBD_OPT_EXPORT_NAME)."""


class RequestError(Exception):
    """The server answered a transmission request with an error (proto.md, 'Error values').

    Not a protocol error: the connection goes on. ``error`` is the wire value (values the spec
    does not define arrive as EINVAL); ``message`` is the server's text from a structured
    error reply, empty after a simple reply.
    """

    def __init__(self, error: Errno, message: str = "") -> None:
        super().__init__(error, message)
        self.error = error
        self.message = message

    def __str__(self) -> str:
        name = f"NBD_{self.error.name} ({int(self.error)})"
        return f"{name}: {self.message}" if self.message else name


class NegotiationError(Exception):
    """The server refused an option during the handshake with an NBD_REP_ERR_* reply, e.g.
    NBD_REP_ERR_UNKNOWN for an export it does not have or NBD_REP_ERR_TLS_REQD.

    ``option`` and ``reply`` are the wire values; ``message`` is the server's text.
    """

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        super().__init__(option, reply, message)
        self.option = option
        self.reply = reply
        self.message = message

    def __str__(self) -> str:
        opt = Opt(self.option).name if self.option in _OPTS else str(self.option)
        rep = Rep(self.reply).name if self.reply in _REPS else f"{self.reply:#x}"
        text = f"NBD_OPT_{opt} refused with NBD_REP_{rep}"
        return f"{text}: {self.message}" if self.message else text


_OPTS = {int(o) for o in Opt}
_REPS = {int(r) for r in Rep}
