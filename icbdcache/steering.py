"""``serve --workers N``: listening sockets that send every connection of one client address
to the same worker process.

Notes on the design
-------------------
* A copy-on-write overlay belongs to a client (its address, docs/serve.md) and lives in one
  process; so all connections of one address must reach the same worker (a kernel client opens
  several, and reconnects).
* The parent makes, for each listen address, one ``SO_REUSEPORT`` socket per worker, bound and
  listening in worker order (the kernel's reuseport group keeps them in that order), and
  attaches a classic BPF program to the group (``SO_ATTACH_REUSEPORT_CBPF``): it hashes the
  client's source address (IPv4, or the last 32 bits of an IPv6 one) and returns the index of
  the socket, hence of the worker. Worker ``i`` keeps socket ``i`` and closes the others.
* The hash depends only on the address and N: a server restarted with the same N sends each
  client to the same worker index (whose ``--cow-dir`` part holds its overlay).
* A worker that dies takes its socket out of the group; the kernel then moves the last socket
  into its place, so clients of the moved worker change worker until the server restarts.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct

#: setsockopt(SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF) (asm-generic/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51

# classic BPF (linux/filter.h): code, jt, jf, k
_LD_H_ABS, _LD_W_ABS = 0x28, 0x20
_JEQ_K, _JA = 0x15, 0x05
_MUL_K, _RSH_K, _MOD_K = 0x24, 0x74, 0x94
_RET_A = 0x16
_SKF_AD_PROTOCOL = (-0x1000) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_PROTOCOL (0)
_SKF_NET = (-0x100000) & 0xFFFFFFFF  # SKF_NET_OFF: offsets into the IP header
_ETH_P_IP = 0x0800
_INSN = struct.Struct("=HBBI")


def program(workers: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program that picks socket ``hash(source address) % workers``."""
    return [
        (_LD_H_ABS, 0, 0, _SKF_AD_PROTOCOL),   # 0: A = ethertype
        (_JEQ_K, 0, 2, _ETH_P_IP),             # 1: IPv4? 2 : 4
        (_LD_W_ABS, 0, 0, _SKF_NET + 12),      # 2: A = IPv4 source
        (_JA, 0, 0, 1),                        # 3: -> 5
        (_LD_W_ABS, 0, 0, _SKF_NET + 20),      # 4: A = IPv6 source, last 32 bits
        (_MUL_K, 0, 0, 0x9E3779B1),            # 5: mix (Fibonacci hashing)
        (_RSH_K, 0, 0, 16),                    # 6
        (_MOD_K, 0, 0, workers),               # 7: A %= workers
        (_RET_A, 0, 0, 0),                     # 8: the socket's index
    ]


def worker_of(address: str, workers: int) -> int:
    """The worker index :func:`program` picks for a client ``address`` (for tests and logs)."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    a = int.from_bytes(packed[-4:], "big")
    return (((a * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % workers


def attach(sock: socket.socket, workers: int) -> None:
    """Attach the steering program to ``sock``'s reuseport group. Raises OSError where the
    kernel does not support it."""
    insns = program(workers)
    buf = ctypes.create_string_buffer(b"".join(_INSN.pack(*i) for i in insns))
    fprog = struct.pack("@HP", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def steered_listeners(addresses: list[tuple[str, int]], workers: int,
                      backlog: int = 1024) -> list[list[socket.socket]]:
    """For each worker, its listening sockets (one per address ``getaddrinfo`` gives for each
    (host, port)), made in worker order and steered by client address. Raises OSError (the
    address is in use, the kernel refuses the program); nothing is left open then."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    made: list[socket.socket] = []
    try:
        for host, port in addresses:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                group = []
                for i in range(workers):
                    s = socket.socket(family, kind, proto)
                    made.append(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind(addr)
                    addr = s.getsockname()  # port 0: the others take the port it got
                    s.listen(backlog)
                    group.append(s)
                    per_worker[i].append(s)
                attach(group[0], workers)
    except BaseException:
        for s in made:
            with contextlib.suppress(OSError):
                s.close()
        raise
    return per_worker
