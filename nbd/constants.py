"""Wire constants of the NBD protocol (NBD proto.md, 'Values').

Every magic number, flag and type of the protocol lives here, as IntEnum/IntFlag families so that
logs print readable names.
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag

#: "NBDMAGIC": first 8 bytes of the server greeting (proto.md, 'Newstyle negotiation').
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": follows NBDMAGIC in newstyle negotiation, and starts every client option.
IHAVEOPT = 0x49484156454F5054
#: Magic of every option reply (proto.md, 'Fixed newstyle negotiation').
REPLY_MAGIC_OPT = 0x0003E889045565A9
#: Magic of a transmission request (proto.md, 'Request message').
REQUEST_MAGIC = 0x25609513
#: Magic of a simple reply (proto.md, 'Simple reply message').
SIMPLE_REPLY_MAGIC = 0x67446698
#: Magic of a structured reply chunk (proto.md, 'Structured reply chunk message').
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: Magic of an extended request (proto.md, 'Extended headers'); recognised only to reject it.
EXTENDED_REQUEST_MAGIC = 0x21E41C71


class HandshakeFlag(IntFlag):
    """16-bit handshake flags sent by the server after IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32-bit client flags sent in reply to the handshake flags."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """16-bit per-export transmission flags (proto.md, 'Transmission flags')."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(IntEnum):
    """Option types of option haggling (proto.md, 'Option types')."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    # 9 was once reserved for an NBD_OPT_BLOCK_SIZE that never shipped; the meta-context
    # options took 9 and 10 (as in qemu, libnbd and nbdkit).
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types; errors have bit 31 set (proto.md, 'Option reply types')."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


class Info(IntEnum):
    """Information types in NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request types of the transmission phase (proto.md, 'Request types')."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    """16-bit command flags of a request (proto.md, 'Command flags')."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    """Flags of a structured reply chunk."""

    DONE = 1 << 0


_REPLY_ERR = 1 << 15


class ReplyType(IntEnum):
    """Structured reply chunk types (proto.md, 'Structured reply types')."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _REPLY_ERR | 1
    ERROR_OFFSET = _REPLY_ERR | 2


class StateFlag(IntFlag):
    """Extent flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(IntEnum):
    """Error values on the wire (proto.md, 'Error values'); not the host's errno numbers."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @classmethod
    def from_os(cls, err: int) -> Errno:
        """Map a host errno to the wire value the spec allows (unknown ones become EINVAL)."""
        return _FROM_OS.get(err, cls.EINVAL)


_FROM_OS = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}

#: The only metadata context this implementation knows.
BASE_ALLOCATION = "base:allocation"
