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
#: size in NBD_INFO_BLOCK_SIZE (proto.md, 'Block size constraints': at least 32 MiB is what the
#: kernel and qemu assume when no constraint is given).
MAX_PAYLOAD = 32 * 1024 * 1024
#: A write whose payload exceeds this is not drained but ends the connection: reading that much
#: data only to throw it away is an easy denial of service.
MAX_DRAIN = 64 * 1024 * 1024
#: Preferred and minimum block sizes advertised (bytes).
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
#: Maximum number of extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk.
MAX_EXTENTS = 1 << 16
