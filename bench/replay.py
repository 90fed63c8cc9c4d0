"""Replay a recorded boot trace with N NBD clients: the trace driver of ``icbd-bench bootstorm``.

Notes on the design:

- A trace is ``t_ms,conn,op,offset,count,lat_us`` CSV (optionally zstd-compressed), as written
  by ``icbd-cache serve --trace``: ``t_ms`` is when the server received the request (ms from the
  first request), ``lat_us`` how long the server took to answer it. A ``# export_size=N``
  comment gives the size of the export it was recorded on. Only reads are replayed.
- **Timing model.** The recording cannot say which request the guest waited for before it sent
  the next one, only what had been answered by then. So request *i* is taken to depend on every
  earlier request the recording shows answered before *i* arrived (``t_j + lat_j <= t_i``), and
  on nothing that was still in flight (the kernel had several reads out at once: those overlap
  in the replay too). Request *i* is issued once all its dependencies are answered, plus the
  think time the recording shows after them::

      issue_i = max(issue_{i-1}, t_i + max_{j in D_i}(done_j - (t_j + lat_j)))

  (replay times ``issue``/``done`` on the client's own clock, recorded ones without). With no
  dependency yet, ``issue_i = t_i``. A server faster than the recorded one shortens the boot, a
  slower one stretches it by its extra latency on the dependency chain, as a real boot would.
  ``--no-think`` (``think_scale`` 0) drops the think times: each request goes out as soon as its
  dependencies are answered. The model is pessimistic for slow servers: reads the recording
  shows one after another are assumed to depend on each other, though the kernel may have sent
  some of them regardless.
- One client is one NBD connection (:func:`nbd.aio.connect`), reads only, all clients in one
  asyncio loop (uvloop when installed). Every reply is checked: length, and an xxh3-64 of its
  bytes against the image the servers serve (``mismatches``).
- Per client: replay time (first request sent to last reply), I/O wait (sum of the request
  latencies: what a boot waits on when its reads do not overlap), I/O busy time (time with at
  least one read in flight), latency percentiles, and ``lag_s``: how late requests left against
  their schedule, summed (a loaded client machine shows up here, not as server latency).
- It runs as a process of its own (``python -m bench.replay run SPEC OUT``) so that it can be
  started in the clients' network namespace with ``ip netns exec``. Progress goes to stdout as
  JSON lines; the results to ``OUT`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash
import zstandard

from nbd import aio
from nbd.errors import NegotiationError, ProtocolError, RequestError

#: The recorded Debian boot shipped with the benchmark.
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "debian-boot.csv.zst"


class TraceError(ValueError):
    """A trace file that cannot be read or has no reads."""


@dataclass(frozen=True)
class Trace:
    """The reads of one recorded boot, in arrival order.

    ``t_ms`` arrival times (ms from the first request), ``offset``/``count`` bytes, ``lat_us``
    the recorded server latency (µs), ``export_size`` the recorded export's size in bytes (None
    when the file does not say).
    """

    path: str
    export_size: int | None
    t_ms: tuple[float, ...]
    offset: tuple[int, ...]
    count: tuple[int, ...]
    lat_us: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.t_ms)

    def head(self, n: int | None) -> Trace:
        """The first ``n`` reads (all of them for None)."""
        if n is None or n >= len(self):
            return self
        return Trace(self.path, self.export_size, self.t_ms[:n], self.offset[:n],
                     self.count[:n], self.lat_us[:n])

    @property
    def read_bytes(self) -> int:
        """Bytes one replay of the trace reads (sum of the request lengths)."""
        return sum(self.count)

    @property
    def duration_s(self) -> float:
        """Recorded time from the first request to the last reply, seconds."""
        return max(t + lat / 1000 for t, lat in zip(self.t_ms, self.lat_us, strict=True)) / 1000

    @property
    def end(self) -> int:
        """One past the last byte any read touches."""
        return max(o + c for o, c in zip(self.offset, self.count, strict=True))

    def chunks(self, chunk_size: int) -> set[int]:
        """Indexes of the ``chunk_size``-byte chunks the reads touch."""
        out: set[int] = set()
        for off, n in zip(self.offset, self.count, strict=True):
            out.update(range(off // chunk_size, (off + n - 1) // chunk_size + 1))
        return out

    def ranges(self, align: int = 4096) -> list[tuple[int, int]]:
        """The union of the read ranges, widened to ``align``: sorted (start, end) in bytes."""
        spans = sorted((o // align * align, -(-(o + c) // align) * align)
                       for o, c in zip(self.offset, self.count, strict=True))
        out: list[tuple[int, int]] = []
        for s, e in spans:
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        return out


def load_trace(path: Path) -> Trace:
    """Read a boot trace (``.zst`` or plain CSV). Raises TraceError, OSError."""
    raw = path.read_bytes()
    if path.suffix == ".zst":
        try:
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        except zstandard.ZstdError as e:
            raise TraceError(f"{path}: {e}") from None
    size: int | None = None
    t: list[float] = []
    off: list[int] = []
    cnt: list[int] = []
    lat: list[int] = []
    for n, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        if line.startswith("#"):
            key, _, value = line[1:].strip().partition("=")
            if key == "export_size":
                size = int(value)
            continue
        if not line.strip():
            continue
        f = line.split(",")
        try:
            if f[2].lower() != "read":
                continue
            t.append(float(f[0]))
            off.append(int(f[3]))
            cnt.append(int(f[4]))
            lat.append(int(f[5]) if len(f) > 5 and f[5] else 0)
        except (IndexError, ValueError):
            raise TraceError(f"{path}:{n}: not t_ms,conn,op,offset,count,lat_us: "
                             f"{line[:80]!r}") from None
    if not t:
        raise TraceError(f"{path}: no reads")
    order = sorted(range(len(t)), key=t.__getitem__)
    t0 = t[order[0]]
    return Trace(str(path), size, tuple(t[i] - t0 for i in order), tuple(off[i] for i in order),
                 tuple(cnt[i] for i in order), tuple(lat[i] for i in order))


@dataclass(frozen=True)
class Plan:
    """What the replay needs of a trace, in seconds: recorded arrival (``t_s``) and reply
    (``done_s``) times, and for each request the requests that become dependencies at it
    (``deps[i]``: answered before ``t_i`` in the recording and not already a dependency of
    an earlier request)."""

    t_s: tuple[float, ...]
    done_s: tuple[float, ...]
    offset: tuple[int, ...]
    count: tuple[int, ...]
    deps: tuple[tuple[int, ...], ...]


def make_plan(trace: Trace) -> Plan:
    """Work out the dependencies of every request (see the module's timing model)."""
    t = [x / 1000 for x in trace.t_ms]
    done = [x + lat / 1e6 for x, lat in zip(t, trace.lat_us, strict=True)]
    by_done = sorted(range(len(t)), key=done.__getitem__)
    deps: list[tuple[int, ...]] = []
    p = 0
    waiting: list[int] = []  # answered by t_i but not earlier than i (equal times)
    for i, ti in enumerate(t):
        while p < len(by_done) and done[by_done[p]] <= ti:
            waiting.append(by_done[p])
            p += 1
        new = tuple(j for j in waiting if j < i)
        waiting = [j for j in waiting if j >= i]
        deps.append(new)
    return Plan(tuple(t), tuple(done), trace.offset, trace.count, tuple(deps))


@dataclass
class ClientResult:
    """One client's replay. Times in seconds, latencies in ms, sizes in bytes.

    ``start_s``: when the client's first request left, from the start of the storm;
    ``connect_s``: TCP connect plus NBD handshake; ``replay_s``: first request sent to last reply;
    ``io_wait_s``: sum of request latencies; ``io_busy_s``: time with a read in flight;
    ``lag_s``: sum over requests of how late each left against its schedule; ``requests``:
    reads answered with data; ``errors``: reads that failed; ``mismatches``: replies whose
    length or bytes differ from the image.
    """

    client: int
    start_s: float = 0.0
    connect_s: float = 0.0
    replay_s: float = 0.0
    io_wait_s: float = 0.0
    io_busy_s: float = 0.0
    lat_p50_ms: float = 0.0
    lat_p95_ms: float = 0.0
    lat_max_ms: float = 0.0
    lag_s: float = 0.0
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    mismatches: int = 0
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between ranks (0.0 if empty)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def busy_time(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals, in their unit."""
    total, cur_s, cur_e = 0.0, 0.0, -1.0
    for s, e in sorted(intervals):
        if s > cur_e:
            if cur_e > cur_s:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e > cur_s:
        total += cur_e - cur_s
    return total


def expected_digests(image: str, plan: Plan) -> list[int]:
    """xxh3-64 of the bytes each request of ``plan`` should return, read from ``image``."""
    fd = os.open(image, os.O_RDONLY)
    try:
        return [xxhash.xxh3_64_intdigest(os.pread(fd, n, off))
                for off, n in zip(plan.offset, plan.count, strict=True)]
    finally:
        os.close(fd)


@dataclass
class Counters:
    """Requests answered so far across all clients, and clients finished (for progress)."""

    done: int = 0
    clients_done: int = 0


@dataclass(frozen=True)
class Target:
    """Where the clients connect: NBD server ``host``:``port``, export name ``export``."""

    host: str
    port: int
    export: str


async def replay_client(cid: int, target: Target, plan: Plan, think_scale: float,
                        expected: Sequence[int] | None, counters: Counters,
                        storm_t0: float) -> ClientResult:
    """Replay ``plan`` once on a new connection; return the client's figures. ``storm_t0`` is
    the storm's start on the :func:`time.monotonic` clock."""
    loop = asyncio.get_running_loop()
    clock = time.monotonic  # uvloop's loop.time() counts whole milliseconds
    res = ClientResult(cid)
    c0 = clock()
    try:
        client = await aio.connect(target.host, target.port, target.export, timeout=60)
    except (OSError, TimeoutError, NegotiationError, ProtocolError) as e:
        res.error = f"connect: {type(e).__name__}: {e}"
        res.errors = len(plan.t_s)
        counters.clients_done += 1
        return res
    res.connect_s = clock() - c0
    n = len(plan.t_s)
    issue = [0.0] * n
    done = [0.0] * n
    futs: list[asyncio.Future[None]] = [loop.create_future() for _ in range(n)]
    t0 = clock()
    res.start_s = t0 - storm_t0
    lost: list[str] = []

    async def one(i: int) -> None:
        try:
            data = await client.pread(plan.offset[i], plan.count[i])
        except RequestError as e:
            res.errors += 1
            if not lost:
                res.error = f"read {plan.offset[i]}+{plan.count[i]}: {e}"
        except ConnectionError as e:
            res.errors += 1
            if not lost:
                lost.append(str(e))
        else:
            res.requests += 1
            res.bytes += len(data)
            if len(data) != plan.count[i] or (
                    expected is not None and xxhash.xxh3_64_intdigest(data) != expected[i]):
                res.mismatches += 1
        finally:
            done[i] = clock() - t0
            counters.done += 1
            futs[i].set_result(None)

    tasks: list[asyncio.Task[None]] = []
    shift: float | None = None  # max over dependencies of done_j - think_scale * recorded done_j
    prev = 0.0
    try:
        for i in range(n):
            for j in plan.deps[i]:
                if not futs[j].done():
                    await futs[j]
                v = done[j] - think_scale * plan.done_s[j]
                if shift is None or v > shift:
                    shift = v
            if lost:
                res.errors += n - i
                break
            due = max(prev, think_scale * plan.t_s[i] + (shift or 0.0))
            now = clock() - t0
            if due > now:
                await asyncio.sleep(due - now)
                now = clock() - t0
            res.lag_s += now - due
            prev = due
            issue[i] = now
            tasks.append(loop.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await client.close()
        counters.clients_done += 1
    if lost:
        res.error = f"connection lost: {lost[0]}"
    m = len(tasks)
    lats = [done[i] - issue[i] for i in range(m)]
    if m:
        res.replay_s = max(done[:m]) - issue[0]
        res.io_wait_s = sum(lats)
        res.io_busy_s = busy_time([(issue[i], done[i]) for i in range(m)])
        res.lat_p50_ms = percentile(lats, 50) * 1000
        res.lat_p95_ms = percentile(lats, 95) * 1000
        res.lat_max_ms = max(lats) * 1000
    return res


async def storm(target: Target, plan: Plan, *, clients: int, mode: str, think_scale: float,
                expected: Sequence[int] | None, progress: Callable[[Counters, float], None],
                interval: float = 0.5) -> list[ClientResult]:
    """Run ``clients`` replays of ``plan``: all at once (``simultaneous``) or one after
    another (``sequential``). ``progress`` is called every ``interval`` seconds."""
    loop = asyncio.get_running_loop()
    counters = Counters()
    t0 = time.monotonic()

    async def report() -> None:
        while True:
            await asyncio.sleep(interval)
            progress(counters, time.monotonic() - t0)

    reporter = loop.create_task(report())
    try:
        if mode == "sequential":
            out = [await replay_client(c, target, plan, think_scale, expected, counters, t0)
                   for c in range(clients)]
        elif mode == "simultaneous":
            out = list(await asyncio.gather(*(
                replay_client(c, target, plan, think_scale, expected, counters, t0)
                for c in range(clients))))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    finally:
        reporter.cancel()
    progress(counters, time.monotonic() - t0)
    return out


@dataclass
class Spec:
    """What one replay process does (written by bootstorm as JSON). ``requests``: replay the
    first N reads only (None: all); ``think_scale``: 1 keeps the recorded think times, 0 drops
    them; ``image``: the served file, to check replies against (None: lengths only)."""

    host: str
    port: int
    export: str
    trace: str
    clients: int
    mode: str
    think_scale: float = 1.0
    requests: int | None = None
    image: str | None = None
    interval_s: float = 0.5


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_spec(spec: Spec, out: Path) -> int:
    """Replay as ``spec`` says, print progress lines, write the results to ``out``."""
    plan = make_plan(load_trace(Path(spec.trace)).head(spec.requests))
    expected = expected_digests(spec.image, plan) if spec.image else None
    total = len(plan.t_s) * spec.clients

    def progress(c: Counters, elapsed: float) -> None:
        print(json.dumps({"done": c.done, "total": total, "clients_done": c.clients_done,
                          "clients": spec.clients, "elapsed_s": round(elapsed, 2)}), flush=True)

    loop = new_event_loop()
    t0 = time.monotonic()
    try:
        results = loop.run_until_complete(storm(
            Target(spec.host, spec.port, spec.export), plan, clients=spec.clients,
            mode=spec.mode, think_scale=spec.think_scale, expected=expected,
            progress=progress, interval=spec.interval_s))
    finally:
        loop.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    doc = {"clients": [asdict(r) for r in results], "wall_s": time.monotonic() - t0,
           "client_cpu_s": ru.ru_utime + ru.ru_stime, "requests_per_client": len(plan.t_s),
           "bytes_per_client": sum(plan.count)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return 0 if all(r.error is None and not r.mismatches for r in results) else 1


async def probe(target: Target, timeout: float) -> int:
    """Connect (retrying until ``timeout`` seconds) and return the export size in bytes.
    Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            client = await aio.connect(target.host, target.port, target.export,
                                       timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, TimeoutError, NegotiationError, ProtocolError) as e:
            last = e
            await asyncio.sleep(0.1)
            continue
        size = client.info.size
        await client.close()
        return size
    raise TimeoutError(f"no NBD export at {target.host}:{target.port}/{target.export}: {last}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.replay run SPEC OUT`` or ``... probe HOST PORT EXPORT [--timeout S]``."""
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="replay as a JSON spec says, results to OUT")
    r.add_argument("spec", type=Path)
    r.add_argument("out", type=Path)
    q = sub.add_parser("probe", help="wait for an NBD export, print its size in bytes")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("export")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        spec = Spec(**json.loads(args.spec.read_text()))
        return run_spec(spec, args.out)
    loop = new_event_loop()
    try:
        size = loop.run_until_complete(probe(Target(args.host, args.port, args.export),
                                             args.timeout))
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        loop.close()
    print(size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
