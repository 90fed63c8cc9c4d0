"""The layer interface every part of an export's stack implements, and the flags built from it.

Notes on the design
-------------------
* An export is a stack of layers in the spirit of nbdkit's filters: each layer holds ``next``
  (the layer below it; None at the bottom) and answers the same requests (``pread``,
  ``pwrite``, ``zero``, ``trim``, ``flush``, ``cache``, ``extents``) and questions
  (``can_write``, ``can_flush``, ``can_fua``, ``can_trim``, ``can_zero``, ``can_fast_zero``,
  ``can_cache``, ``can_multi_conn``, ``can_extents``).
* Whatever a layer does not define passes through to ``next``. Requests are bound straight to
  ``next``'s method when the layer is made (:meth:`Layer.__init__`), so a layer that does not
  touch reads costs no call on the read path. At the bottom (no ``next``) a request a layer
  does not implement fails the way a read-only disk would (EPERM via PermissionError), and
  every ``can_*`` answers False.
* A connection asks the stack once, when it starts transmission, for the transmission flags
  (:func:`transmission_flags`): a flag is advertised exactly when the stack says it carries
  the request out, so SEND_CACHE can never be advertised over a layer that drops CACHE.
* Per connection: :meth:`Layer.connect` is called on the top of the stack when a client
  starts transmission and returns the layer that connection talks to (the shared layer
  itself, or a per-client layer such as a copy-on-write overlay); :meth:`Layer.disconnect`
  when it closes. Both pass down the stack, so a layer below (the boot-profile recorder)
  sees every client.
* Offsets and lengths are bytes, already checked against ``size`` by the NBD state machine.
  Errors are OSError with a host errno, which the server maps to the NBD error values
  (NBD proto.md, 'Error values').
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field

from nbd.constants import StateFlag, TransmissionFlag

Buffer = bytes | bytearray | memoryview
#: What ``pread`` returns: the buffers now, or an awaitable of them (a cache miss, later).
ReadResult = list[Buffer] | Awaitable[list[Buffer]]
#: What a write-like request returns: None when done, or an awaitable that completes when done.
WriteResult = Awaitable[None] | None

#: Extent flags of ``base:allocation`` for a hole that reads as zeros.
HOLE = int(StateFlag.HOLE | StateFlag.ZERO)

#: The requests that pass through to ``next`` unless a layer defines them.
_REQUESTS = ("pread", "pwrite", "zero", "trim", "flush", "cache", "extents")


@dataclass(frozen=True)
class Client:
    """Who opened a connection: ``identity`` (the peer's IP address, or ``unix:pid=N``),
    ``options`` from the export name (``NAME?boot=ID``), and ``now`` (monotonic seconds)."""

    identity: str
    options: dict[str, str] = field(default_factory=dict)
    now: float = 0.0


class Layer:
    """One layer of an export's stack; ``next`` is the layer below (None at the bottom).

    ``size`` (bytes) is ``next``'s unless the layer sets its own.
    """

    size: int = 0
    next: Layer | None

    def __init__(self, next: Layer | None = None) -> None:
        self.next = next
        if next is not None:
            self.size = next.size
            cls = type(self)
            for name in _REQUESTS:
                if getattr(cls, name) is getattr(Layer, name):
                    setattr(self, name, getattr(next, name))

    # ---------------------------------------------------------------- requests

    def pread(self, offset: int, length: int) -> ReadResult:
        """``length`` bytes at ``offset`` as buffers that stay valid until sent."""
        raise OSError(5, "no layer below answers reads")

    def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> WriteResult:
        """Write ``data`` at ``offset``; with ``fua`` (NBD_CMD_FLAG_FUA) durable before the
        reply. Raises PermissionError on a read-only stack."""
        raise PermissionError("read-only export")

    def zero(self, offset: int, length: int, no_hole: bool = False,
             fua: bool = False) -> WriteResult:
        """Make the range read as zeros; ``no_hole`` (NBD_CMD_FLAG_NO_HOLE) keeps it
        allocated. Raises PermissionError on a read-only stack."""
        raise PermissionError("read-only export")

    def trim(self, offset: int, length: int, fua: bool = False) -> WriteResult:
        """The range is unused; its contents become unspecified (NBD_CMD_TRIM)."""
        raise PermissionError("read-only export")

    def flush(self) -> WriteResult:
        """Make completed writes durable (NBD_CMD_FLUSH)."""
        return None

    def cache(self, offset: int, length: int) -> None:
        """The range will be read soon (NBD_CMD_CACHE): a hint, never an error."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents from ``offset``: (length in bytes, flags) pairs that
        cover at most ``length`` bytes, at least the first byte."""
        return [(length, 0)]

    # ---------------------------------------------------------------- questions

    def can_write(self) -> bool:
        return self.next.can_write() if self.next is not None else False

    def can_flush(self) -> bool:
        return self.next.can_flush() if self.next is not None else False

    def can_fua(self) -> bool:
        return self.next.can_fua() if self.next is not None else False

    def can_trim(self) -> bool:
        return self.next.can_trim() if self.next is not None else False

    def can_zero(self) -> bool:
        return self.next.can_zero() if self.next is not None else False

    def can_fast_zero(self) -> bool:
        return self.next.can_fast_zero() if self.next is not None else False

    def can_cache(self) -> bool:
        return self.next.can_cache() if self.next is not None else False

    def can_multi_conn(self) -> bool:
        return self.next.can_multi_conn() if self.next is not None else False

    def can_extents(self) -> bool:
        return self.next.can_extents() if self.next is not None else False

    # ---------------------------------------------------------------- connections

    def connect(self, client: Client) -> Layer:
        """A connection of ``client`` starts transmission: return the layer it talks to
        (this one, shared by every connection, unless a layer makes one per client). The
        default tells the layers below and returns ``self``. May raise OSError (the
        connection is then refused)."""
        if self.next is not None:
            self.next.connect(client)
        return self

    def disconnect(self, client: Client, view: Layer) -> None:
        """A connection of ``client`` that talked to ``view`` (from :meth:`connect`) ended."""
        if self.next is not None:
            self.next.disconnect(client, view)

    def close(self) -> None:
        """Release what this layer holds (not the layers below: their owner closes them)."""


def transmission_flags(top: Layer) -> TransmissionFlag:
    """The transmission flags of a stack, from its answers (NBD proto.md, 'Transmission
    flags'): each SEND_* flag exactly when the stack carries the request out, READ_ONLY when
    it cannot write. HAS_FLAGS and SEND_DF are the state machine's to add."""
    f = TransmissionFlag(0)
    if not top.can_write():
        f |= TransmissionFlag.READ_ONLY
    else:
        if top.can_trim():
            f |= TransmissionFlag.SEND_TRIM
        if top.can_zero():
            f |= TransmissionFlag.SEND_WRITE_ZEROES
            if top.can_fast_zero():
                f |= TransmissionFlag.SEND_FAST_ZERO
        if top.can_fua():
            f |= TransmissionFlag.SEND_FUA
    if top.can_flush():
        f |= TransmissionFlag.SEND_FLUSH
    if top.can_cache():
        f |= TransmissionFlag.SEND_CACHE
    if top.can_multi_conn():
        f |= TransmissionFlag.CAN_MULTI_CONN
    return f
