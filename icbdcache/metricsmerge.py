"""One ``/metrics`` for the workers of ``serve --workers N --metrics-listen HOST:PORT``.

Each worker keeps its own counters (:mod:`icbdcache.metrics` reads live objects of the
process). Worker 0 listens at ``--metrics-listen``; every other worker answers on a Unix
socket of its own in a directory the parent made for them (mode 0700): a connection gets the
worker's text exposition, then EOF (:class:`WorkerExposition`). At each scrape worker 0 reads
them all and adds them up (:func:`merge`), so a scrape sees the server, not one worker:

* counters and histograms are summed, sample by sample (same name, same labels);
* gauges are summed (connections, clients, memory, descriptors), except those that describe
  the one store or the server as a whole (:data:`SAME_IN_EVERY_WORKER`: worker 0's value) and
  ``process_start_time_seconds`` (the earliest);
* ``icbd_nbd_clients`` (distinct client addresses per export) is counted over the union of
  the workers' clients, which each worker lists in the internal family :data:`CLIENT_PAIRS`
  (left out of the scrape): a client whose connections reach two workers counts once;
* ``icbd_workers_scraped`` says how many workers answered. A worker that does not answer
  within :data:`PEER_TIMEOUT` (being started again after a crash) is left out of that
  scrape, and a warning names it once.
* The server's counters never go down while worker 0 lives (:class:`Gatherer`): a worker
  that does not answer is counted at its last answer, and one started again (its
  ``process_start_time_seconds`` changed) has its former process's counts added to its own.
  Without this, a sum fell back to what the other workers had counted (an attack measured
  63 → 38 batches after a worker's kill -9), which Prometheus takes for a reset to 0 and
  counts as new increments: ``increase()`` overstated by every worker's whole count.

Families only one worker has (the replica's and PXE's, in worker 0) pass unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from icbdcache.log import kv

log = logging.getLogger("icbdcache.metrics")

#: Gauges every worker reports alike (they describe the shared store or the host): worker
#: 0's value, not a sum.
SAME_IN_EVERY_WORKER = frozenset({"icbd_store_held_bytes", "icbd_store_chunks",
                                  "process_max_fds", "python_info"})
#: The internal gauge of each worker's clients by export (``export``, ``client`` labels).
CLIENT_PAIRS = "icbd_nbd_client_pairs"
#: The gauge of distinct clients by export, counted from :data:`CLIENT_PAIRS`.
CLIENTS = "icbd_nbd_clients"
#: Gauges whose smallest value is the server's.
EARLIEST = frozenset({"process_start_time_seconds"})
#: Seconds worker 0 waits for another worker's exposition.
PEER_TIMEOUT = 2.0
#: Bytes of one worker's exposition at most (beyond: that worker is left out).
MAX_EXPOSITION = 16 << 20


def socket_dir() -> str:
    """A new directory (mode 0700) for the workers' sockets, ``icbd-metrics-PID-*`` under
    ``$TMPDIR`` (or ``/tmp`` when that is too long a path for a Unix socket's 108 bytes); the
    directories of servers killed before they could remove theirs (their PID gone) are
    removed first. Raises OSError."""
    base = tempfile.gettempdir()
    base = base if len(base) <= 64 else "/tmp"
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            pid = name.removeprefix("icbd-metrics-").partition("-")[0]
            gone = pid.isdigit() and not psutil.pid_exists(int(pid))
            if name.startswith("icbd-metrics-") and gone:
                path = os.path.join(base, name)
                st = os.lstat(path)  # a directory of ours, not a link someone put there
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                    shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"icbd-metrics-{os.getpid()}-", dir=base)




def socket_path(directory: str, worker: int) -> str:
    """Where worker ``worker`` (1 or more) answers with its exposition."""
    return os.path.join(directory, f"worker-{worker}.sock")


Key = tuple[str, tuple[tuple[str, str], ...]]


class _Merged:
    """A collector that yields given families (for :func:`generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


#: Family types whose counts only grow in a process's life, and the samples of them that do
#: (not ``_created``: a time).
GROWING_TYPES = frozenset({"counter", "histogram", "summary"})
GROWING_SUFFIXES = ("_total", "_count", "_sum", "_bucket")

#: (family name, sample key) -> value
Counts = dict[tuple[str, Key], float]


def growing(text: str) -> tuple[Counts, float | None]:
    """The samples of ``text`` that only grow while its process lives (counters, histogram
    counts, sums and buckets), and its ``process_start_time_seconds`` (None if it has none).
    Raises ValueError on text that is not an exposition."""
    counts: Counts = {}
    start = None
    for fam in text_string_to_metric_families(text):
        if fam.name == "process_start_time_seconds":
            start = next((s.value for s in fam.samples), None)
        if fam.type not in GROWING_TYPES:
            continue
        for s in fam.samples:
            if s.name.endswith(GROWING_SUFFIXES):
                counts[(fam.name, (s.name, tuple(sorted(s.labels.items()))))] = s.value
    return counts, start


def merge(texts: Sequence[str], *, answered: int | None = None,
          carried: Counts | None = None) -> bytes:
    """The text exposition of the server: ``texts`` (worker 0's first, then the others'
    that answered) added up family by family (the module's rules), plus ``carried`` (growing
    samples of workers' former processes, or of workers that did not answer: :class:`Gatherer`),
    with the gauge ``icbd_workers_scraped`` = ``answered`` (default: ``len(texts)``).
    Raises ValueError on text that is not an exposition."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[Key, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            have = families.get(fam.name)
            if have is None:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            elif have.type != fam.type:
                raise ValueError(f"{fam.name} is a {have.type} in one worker and a {fam.type} "
                                 "in another")
            into = values[fam.name]
            for s in fam.samples:
                key: Key = (s.name, tuple(sorted(s.labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = s.value
                elif fam.name in EARLIEST:
                    into[key] = min(old, s.value)
                elif fam.name not in SAME_IN_EVERY_WORKER:
                    into[key] = old + s.value
    for (name, key), value in (carried or {}).items():
        summed = values.get(name)
        if summed is not None:  # (a family no process has now: left out)
            summed[key] = summed.get(key, 0.0) + value
    pairs = values.pop(CLIENT_PAIRS, None)
    families.pop(CLIENT_PAIRS, None)
    if pairs is not None and CLIENTS in values:
        # distinct clients of the server: each address once, whatever workers it reached
        union: dict[str, set[str]] = {}
        for (_, labels), _value in pairs.items():
            lab = dict(labels)
            union.setdefault(lab.get("export", ""), set()).add(lab.get("client", ""))
        values[CLIENTS] = {(CLIENTS, (("export", export),)): float(len(clients))
                           for export, clients in sorted(union.items())}
    out: list[Metric] = []
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
        out.append(fam)
    out.append(GaugeMetricFamily("icbd_workers_scraped", "Workers of serve --workers whose "
                                 "counters this scrape adds up",
                                 value=len(texts) if answered is None else answered))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged(out))
    return generate_latest(reg)


async def read_peer(path: str, timeout: float = PEER_TIMEOUT) -> str:
    """One worker's exposition from its socket ``path``. Raises OSError (not there, refused,
    too big, not UTF-8), TimeoutError."""
    async def read() -> str:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            data = bytearray()
            while chunk := await reader.read(1 << 16):
                data += chunk
                if len(data) > MAX_EXPOSITION:
                    raise OSError(f"{path}: more than {MAX_EXPOSITION} bytes")
            try:
                return data.decode()
            except UnicodeDecodeError as e:
                raise OSError(f"{path}: not UTF-8 ({e})") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(read(), timeout)


class _PeerCounts:
    """What worker 0 remembers of another worker: the growing samples of its last answer,
    those of its former processes, and its process's start time."""

    __slots__ = ("before", "last", "start")

    def __init__(self) -> None:
        self.last: Counts = {}
        self.before: Counts = {}
        self.start: float | None = None


class Gatherer:
    """Worker 0's side: its own registry and the other workers' sockets, added up; the
    server's counters never go down while it lives (the module's notes)."""

    def __init__(self, registry: CollectorRegistry, peers: Sequence[str]) -> None:
        self.registry = registry
        self.peers = list(peers)
        self._missing: set[str] = set()
        self._counts = {p: _PeerCounts() for p in self.peers}
        #: one scrape at a time: two in flight (a pair of Prometheus servers) that ended in
        #: the other order across a worker's restart took the old process's answer for a
        #: new process and carried the counts twice (helper-49)
        self._scraping = asyncio.Lock()

    async def exposition(self) -> bytes:
        """The server's exposition (:func:`merge`); a worker that does not answer is left
        out (its counters at their last answer) and named in one warning until it answers
        again. An answer from a process that started before the one last seen (stale) is
        taken as no answer. Scrapes run one at a time."""
        async with self._scraping:
            return await self._exposition()

    async def _exposition(self) -> bytes:
        own = generate_latest(self.registry).decode()
        got = await asyncio.gather(*(read_peer(p) for p in self.peers),
                                   return_exceptions=True)
        texts = [own]
        carried: Counts = {}
        for path, text in zip(self.peers, got, strict=True):
            peer = self._counts[path]
            if not isinstance(text, BaseException):
                try:
                    counts, start = growing(text)
                except ValueError as e:
                    text = e
                else:
                    if peer.start is not None and start is not None and start < peer.start:
                        text = ValueError("an answer of a process older than its last one")
            if isinstance(text, BaseException):
                if path not in self._missing:
                    self._missing.add(path)
                    log.warning(kv(event="metrics_worker", socket=path,
                                   error=str(text) or type(text).__name__,
                                   scrape="without it"))
                for key in peer.last.keys() | peer.before.keys():
                    carried[key] = (carried.get(key, 0.0) + peer.last.get(key, 0.0)
                                    + peer.before.get(key, 0.0))
                continue
            self._missing.discard(path)
            if peer.start is not None and start != peer.start:  # a new process: carry over
                for key, value in peer.last.items():
                    peer.before[key] = peer.before.get(key, 0.0) + value
            peer.start, peer.last = start, counts
            for key, value in peer.before.items():
                carried[key] = carried.get(key, 0.0) + value
            texts.append(text)
        try:
            return merge(texts, carried=carried)
        except ValueError as e:
            log.warning(kv(event="metrics_merge", error=e, scrape="worker 0 alone"))
            # the others' counters at their last answers: the sums still never go down
            everyone: Counts = {}
            for peer in self._counts.values():
                for part in (peer.last, peer.before):
                    for key, value in part.items():
                        everyone[key] = everyone.get(key, 0.0) + value
            return merge([own], answered=1, carried=everyone)


class WorkerExposition:
    """A worker other than 0: its exposition to each connection at ``path``, then EOF."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.registry = registry
        self.path = path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen at ``path`` (one left by a crashed worker is replaced). Raises OSError."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._answer, self.path)

    async def _answer(self, _reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(generate_latest(self.registry))
            await asyncio.wait_for(writer.drain(), PEER_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


__all__ = ["EARLIEST", "SAME_IN_EVERY_WORKER", "Gatherer", "WorkerExposition", "merge",
           "read_peer", "socket_dir", "socket_path"]
