"""Struct formats and named limits of the NBD wire format (all big-endian, proto.md).

Each limit says where it comes from. Sizes are in bytes.
"""

from __future__ import annotations

import struct

#: Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
GREETING = struct.Struct(">QQH")
#: Client flags, 32 bits, in reply to the greeting.
CLIENT_FLAGS = struct.Struct(">I")
#: Option request header: IHAVEOPT, option, length of the data that follows.
OPTION_HEADER = struct.Struct(">QII")
#: Option reply header: reply magic, option, reply type, length of the data that follows.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: NBD_OPT_EXPORT_NAME reply: export size in bytes, transmission flags (then 124 zero bytes
#: unless NO_ZEROES was negotiated).
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: Request: magic, command flags, type, cookie, offset (bytes), length (bytes).
REQUEST = struct.Struct(">IHHQQI")
#: Simple reply: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, flags, type, cookie, length of the chunk data.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: NBD_REPLY_TYPE_OFFSET_DATA / OFFSET_HOLE payload prefix: offset; (hole) length.
OFFSET = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")
#: NBD_REPLY_TYPE_ERROR payload prefix: error, length of the message.
ERROR_PAYLOAD = struct.Struct(">IH")
#: NBD_REPLY_TYPE_BLOCK_STATUS: metadata context id, then (length, flags) descriptors.
BLOCK_STATUS_HEADER = struct.Struct(">I")
EXTENT = struct.Struct(">II")
#: NBD_REP_INFO payloads.
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

#: Length of the zero padding after an NBD_OPT_EXPORT_NAME reply without NO_ZEROES.
ZERO_PAD = 124
#: Longest option data the server accepts before it drops the connection (bytes). An option may
#: carry an export name of at most 4096 bytes plus a few queries (proto.md says strings SHOULD NOT
#: exceed 4096 bytes); anything much larger is junk or an attack.
MAX_OPTION_LENGTH = 64 * 1024
#: Longest string (export name, query, description) accepted, per proto.md 'Strings'.
MAX_STRING = 4096
#: Largest read or write payload this implementation accepts, advertised as the maximum block
#: size in NBD_INFO_BLOCK_SIZE. proto.md ('Block size constraints') lets a server refuse more
#: than 32 MiB, but the reference servers take more (nbdkit up to 64 MiB, nbd-server without a
#: bound) and clients written against them send it; a WRITE this large is streamed (see
#: :data:`WRITE_PIECE`), so it does not cost its size in memory.
MAX_PAYLOAD = 64 * 1024 * 1024
#: What a client assumes the server takes when it advertises no block size (proto.md: 32 MiB
#: is what the kernel and qemu assume).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: A WRITE whose payload is longer than this is delivered in pieces of at most this many bytes
#: (:class:`nbd.events.WritePiece`), each ending at a multiple of it in the export (except the
#: last), instead of being held whole. A power of two, a multiple of 4096.
WRITE_PIECE = 1024 * 1024
#: A WRITE refused with an error has its payload read and discarded (drained, without holding
#: it) when it is at most this long; a longer one ends the connection: a length that large is
#: a client that lost track of the stream, and reading it only to throw it away is an easy
#: denial of service.
MAX_DRAIN = 2 * MAX_PAYLOAD
#: Preferred and minimum block sizes advertised (bytes).
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
#: Maximum number of extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk.
MAX_EXTENTS = 1 << 16
