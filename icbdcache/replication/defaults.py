"""The master's defaults that commands need before the master itself is imported (its HTTP
server, aiohttp, takes about 0.1 s to import: ``icbd-cache replica`` and every other command
start without it)."""

from __future__ import annotations

#: Default port of the master's HTTP API.
DEFAULT_MASTER_PORT = 10810
#: Seconds of grace a chunk stream's client has (to send its body, and before its reading
#: is held to STREAM_MIN_RATE): a client that reads nothing is cut after about this long.
STALL_TIMEOUT = 60.0
#: Bytes a second a chunk stream's client must take, on average, once the grace is over.
STREAM_MIN_RATE = 16 << 10
#: Chunk streams sent at once (each holds up to two slices, about 8 MiB, and a worker thread);
#: more wait their turn. One site (known by its token) may hold SITE_STREAMS of them, running
#: or waiting; without tokens that name sites, one address ADDRESS_STREAMS (429 beyond).
MAX_STREAMS = 32
SITE_STREAMS = 8
ADDRESS_STREAMS = 16
#: LMDB address space reserved for a master's store (bytes; nothing is allocated). A process
#: cannot read past a map another process grew (LMDB: MDB_MAP_RESIZED), and ``publish`` grows a
#: master's store while ``master`` reads it, so both reserve this much up front.
MASTER_MAP_SIZE = 1 << 40
