"""The two protocol errors (after h11): the peer broke the protocol, or we were asked to."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of the protocol errors of this package."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow, and the connection cannot go on.

    Whatever bytes the state machine queued before raising (a final error reply, for example)
    should still be sent, then the connection closed.
    """


class LocalProtocolError(ProtocolError):
    """This side asked the state machine for something the protocol state does not allow."""
