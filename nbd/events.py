"""Events produced by the state machines (frozen, slotted dataclasses).

Server side: :class:`OptionHaggled` (informational), :class:`StartTLS`,
:class:`TransmissionStarted`, :class:`Request`, :class:`WritePiece`, :class:`RequestRejected`,
:class:`Disconnect`.
Client side: :class:`Negotiated`, :class:`ExportListed`, :class:`Reply`, :class:`ReplyChunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbd import wire
from nbd.constants import Cmd, Errno, Opt, TransmissionFlag


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server tells a client about one export.

    ``size`` is in bytes; block sizes (bytes) follow proto.md 'Block size constraints'.
    ``flags`` are the transmission flags without HAS_FLAGS (added on the wire).
    """

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = wire.MAX_PAYLOAD
    #: The catalog's own answer for this export (opaque to the protocol), handed back
    #: unchanged in :class:`TransmissionStarted`, so the caller never resolves the name twice.
    handle: object = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class OptionHaggled:
    """One option was answered during option haggling (for logs and tests)."""

    option: int
    reply: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server acknowledged NBD_OPT_STARTTLS: upgrade the transport to TLS now, then call
    ``tls_started()`` on the state machine. No more plaintext may be read."""


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """Option haggling ended with NBD_OPT_GO or NBD_OPT_EXPORT_NAME on ``export``."""


    export: ExportInfo
    structured_replies: bool
    meta_contexts: tuple[str, ...]
    no_zeroes: bool
    option: Opt
    #: The export name exactly as the client sent it (may carry a suffix such as ``?boot=``).
    requested: str = ""


@dataclass(slots=True)
class Request:
    """A valid transmission request to carry out and answer with a reply method.

    ``offset`` and ``length`` are bytes, already checked against the export size and limits;
    ``flags`` are the request's :class:`~nbd.constants.CmdFlag` bits as a plain int.
    ``data`` is the WRITE payload (``length`` bytes), else empty; for a ``streamed`` WRITE it
    is empty too and the payload follows as :class:`WritePiece` events, in order, the last one
    with ``last`` set (the request is answered once that one has been carried out).

    Not frozen, unlike the other events: one is made per request on the hot path, and a frozen
    dataclass costs four times as much to build (1.3 vs 0.36 us measured). Treat it as
    read-only.
    """

    cookie: int
    command: Cmd
    flags: int
    offset: int
    length: int
    data: memoryview | bytes = b""
    streamed: bool = False


@dataclass(slots=True)
class WritePiece:
    """Part of the payload of a ``streamed`` WRITE ``request``: ``data`` goes at ``offset``
    (bytes, in the export). Pieces come in order and together cover the request exactly;
    ``last`` marks the final one. ``data`` may be a view of received bytes (read-only)."""

    request: Request
    offset: int
    data: memoryview | bytes
    last: bool


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the state machine answered with an error by itself (already queued)."""

    cookie: int
    command: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client sent NBD_CMD_DISC (``clean``) or NBD_OPT_ABORT; close after sending."""

    clean: bool = True


# ---------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The client state machine reached transmission."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExportListed:
    """Result of NBD_OPT_LIST: (name, description) pairs."""

    exports: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class OptionRefused:
    """The server answered an option with an error reply."""

    option: int
    reply: int
    message: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The final answer to the request with ``cookie``.

    ``data`` holds the READ payload (whole, reassembled from structured chunks, holes as zeros);
    ``extents`` the BLOCK_STATUS (length, flags) pairs of the first selected context.
    """

    cookie: int
    error: Errno
    data: bytes = b""
    extents: tuple[tuple[int, int], ...] = ()
    message: str = ""
