"""The replication master: ``icbd-cache publish`` into a store, ``icbd-cache master`` over it
(a real process on 127.0.0.1), its HTTP API v1 (docs/replication.md), credentials, TLS, the
admin API and ``icbd-cache admin``.

Assertions are on bytes, counts and states; waits are bounded by deadlines, never measured.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import trustme
import xxhash
from conftest import BIN, free_port, stop_process, trusted, wait_port

from icbdcache.replication import wire
from icbdcache.replication.auth import Auth, load_admin_tokens, load_site_tokens
from icbdcache.store.chunks import CHUNK_SIZE, ZERO, digest

CLI = str(BIN / "icbd-cache")
#: Chunks of the test image; index % 3 == 2 is all zeros, chunk 7 repeats chunk 1, others
#: with index % 5 == 4 are compressible text, the rest random.
N_CHUNKS = 100
TAIL = 12345  # a short last chunk


def make_image(path: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    chunks = []
    for i in range(N_CHUNKS):
        if i % 3 == 2:
            chunks.append(bytes(CHUNK_SIZE))
        elif i == 7:
            chunks.append(chunks[1])
        elif i % 5 == 4:  # compressible, and distinct
            chunks.append((f"chunk {i} ".encode() * CHUNK_SIZE)[:CHUNK_SIZE])
        else:
            chunks.append(rng.randbytes(CHUNK_SIZE))
    chunks.append(rng.randbytes(TAIL))
    path.write_bytes(b"".join(chunks))
    return path


def chunk_map(path: Path) -> bytes:
    data = path.read_bytes()
    return b"".join(digest(data[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE))


def chunks_by_digest(path: Path) -> dict[bytes, bytes]:
    data = path.read_bytes()
    out = {}
    for i in range(0, len(data), CHUNK_SIZE):
        c = data[i : i + CHUNK_SIZE]
        out[digest(c)] = c
    return out


# ------------------------------------------------------------------------------ HTTP helpers


def http(method: str, url: str, body: bytes | dict[str, Any] | None = None, *,
         token: str | None = None, ctx: ssl.SSLContext | None = None,
         timeout: float = 60.0) -> tuple[int, Message, bytes]:
    """(status, headers, body) of one request; a JSON body for a dict."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data: bytes | None
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    else:
        data = body
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(url: str, **kw: Any) -> Any:
    status, _, body = http("GET", url, **kw)
    assert status == 200, body
    return json.loads(body)


def decode_stream(body: bytes, encoding: str | None) -> list[wire.ChunkFrame]:
    dec = wire.ChunkStreamDecoder(encoding)
    frames: list[wire.ChunkFrame] = []
    for i in range(0, len(body), 7919):  # fed in odd pieces, as a network would
        frames += dec.feed(body[i : i + 7919])
    dec.close()
    return frames


# ------------------------------------------------------------------------------ processes


@dataclass
class Master:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    store: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)


MasterFactory = Callable[..., Master]


@pytest.fixture
def start_master(tmp_path: Path) -> Iterator[MasterFactory]:
    """Call with a store and master arguments; every master started is stopped (by PID)."""
    started: list[Master] = []

    def factory(store: Path, *args: str, tls: bool = False) -> Master:
        port = free_port()
        log = tmp_path / f"master-{port}.log"
        cmd = [CLI, "master", "--store", str(store), "--listen", f"127.0.0.1:{port}", "-v",
               *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        m = Master(proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}", log, store)
        started.append(m)
        try:
            wait_port("127.0.0.1", port)
        except TimeoutError:
            m.stop(signal.SIGKILL)
            raise RuntimeError(f"master did not start: {log.read_text()}") from None
        return m

    yield factory
    for m in started:
        m.stop()


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([CLI, *trusted(args)], capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def publish(img: Path, store: Path, imi: str = "lab", *args: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("publish", str(img), "--store", str(store), "--imi", imi, *args,
                   check=check)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return make_image(tmp_path / "lab-1.img")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "master-store"


# ------------------------------------------------------------------------------ publish + API


def test_publish_catalog_manifest_and_chunks(img: Path, store: Path,
                                             start_master: MasterFactory) -> None:
    p = publish(img, store, "lab", "--master-url", "http://master.example:10810")
    assert p.stdout.startswith("published lab@1: ")
    m = start_master(store)
    cat = get_json(f"{m.url}/v1/catalog")
    assert cat["generation"] >= 1
    [rec] = cat["versions"]
    local_map = chunk_map(img)
    size = img.stat().st_size
    by_digest = chunks_by_digest(img)
    distinct = sum(len(c) for d, c in by_digest.items() if d != ZERO)
    assert rec == {**rec, "imi": "lab", "version": "1", "size": size, "chunk_size": CHUNK_SIZE,
                   "manifest": xxhash.xxh3_128_hexdigest(local_map), "retired": False,
                   "distinct_bytes": distinct, "master": "http://master.example:10810"}

    status, headers, body = http("GET", f"{m.url}/v1/manifest/lab/1")
    assert status == 200
    assert body == local_map
    assert headers["Content-Type"] == wire.CONTENT_TYPE
    assert headers["X-Icbd-Manifest"] == rec["manifest"]
    assert int(headers["X-Icbd-Size"]) == size
    assert int(headers["X-Icbd-Chunk-Size"]) == CHUNK_SIZE

    # every non-zero chunk (more than one slice), one twice, and one the master never had
    wanted = [local_map[i : i + 16] for i in range(0, len(local_map), 16)]
    wanted = [d for d in wanted if d != ZERO]
    unknown = bytes(range(1, 17))
    ask = [*wanted, unknown, wanted[0]]
    assert len(ask) > 64
    sizes = {}
    for query, encoding in (("", None), ("?zstd=3", "zstd")):
        status, headers, body = http("POST", f"{m.url}/v1/chunks{query}", b"".join(ask))
        assert status == 200
        assert headers.get(wire.ENCODING_HEADER) == encoding
        frames = decode_stream(body, encoding)
        assert [f.digest for f in frames] == ask
        for f in frames:
            assert f.data == (None if f.digest == unknown else by_digest[f.digest])
        sizes[encoding] = len(body)
    assert sizes[None] == sum(20 + len(by_digest[d]) for d in ask if d != unknown) + 20 + 20
    assert sizes["zstd"] < sizes[None]  # the text chunks compress

    # the store holds the distinct non-zero chunks only (zero chunks are not stored)
    stats = json.loads(run_cli("stats", "--store", str(store), "--json").stdout)
    assert stats["held_bytes"] == distinct
    assert stats["chunks"] == len({d for d in by_digest if d != ZERO})
    ls = json.loads(run_cli("ls", "--store", str(store), "--json").stdout)
    assert [(r["imi"], r["version"], r["pinned"], r["latest"]) for r in ls] == [
        ("lab", "1", True, True)]

    # counters: two chunk requests, one missing chunk each, bytes as sent
    st = get_json(f"{m.url}/v1/admin/status")["master"]
    assert st["chunk_requests"] == 2
    assert st["chunks_missing"] == 2
    assert st["chunks_sent"] == 2 * (len(ask) - 1)
    assert st["manifests"] == 1
    assert st["raw_bytes"] == 2 * sizes[None]
    assert st["wire_bytes"] == sizes[None] + sizes["zstd"]

    # one chunk by GET, cacheable forever by any HTTP cache; the catalog is not cacheable
    status, headers, body = http("GET", f"{m.url}/v1/chunk/{wanted[3].hex()}")
    assert status == 200 and body == by_digest[wanted[3]]
    assert "immutable" in headers["Cache-Control"]
    assert http("GET", f"{m.url}/v1/catalog")[1]["Cache-Control"] == "no-store"
    assert "immutable" in http("GET", f"{m.url}/v1/manifest/lab/1")[1]["Cache-Control"]


def test_bad_requests_and_404s(img: Path, store: Path, start_master: MasterFactory) -> None:
    publish(img, store)
    m = start_master(store)
    d = digest(img.read_bytes()[:CHUNK_SIZE])
    cases: list[tuple[str, str, bytes | dict[str, Any] | None, int]] = [
        ("POST", "/v1/chunks", b"", 400),
        ("POST", "/v1/chunks", d + b"x", 400),
        ("POST", "/v1/chunks", d * (wire.MAX_BATCH + 1), 413),
        ("POST", "/v1/chunks?zstd=0", d, 400),
        ("POST", "/v1/chunks?zstd=20", d, 400),
        ("POST", "/v1/chunks?zstd=fast", d, 400),
        ("GET", "/v1/manifest/lab/9", None, 404),
        ("GET", "/v1/manifest/nope/1", None, 404),
        ("GET", "/v1/boot/lab/1/kernel", None, 404),  # none kept for this image
        ("GET", "/v1/boot/lab/1/bzimage", None, 404),
        ("GET", "/v1/watch?since=x", None, 400),
        ("POST", "/v1/admin/retire", {"imi": "lab", "version": "9"}, 404),
        ("POST", "/v1/admin/retire", {"imi": "lab"}, 400),
        ("POST", "/v1/admin/subscribe", b"not json", 400),
        ("POST", "/v1/sites/a@b/register", {"address": "", "subscribe": []}, 400),
        ("POST", "/v1/sites/s1/register", {"address": 5}, 400),
        ("POST", "/v1/sites/s1/register", {"subscribe": ["lab", "x/y"]}, 400),
        ("POST", "/v1/sites/s1/keepalive", b"[1, 2]", 400),
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/chunk/" + "ab" * 16, None, 404),
        ("GET", "/v1/chunk/xyz", None, 400),
        ("GET", "/v1/chunk/" + "ab" * 15, None, 400),
    ]
    for method, path, body, want in cases:
        status, headers, answer = http(method, m.url + path, body)
        assert status == want, (method, path, answer)
        assert headers["Content-Type"].startswith("application/json"), path
        assert isinstance(json.loads(answer)["error"], str)
    # a report with nonsense in it is kept, and the admin view still answers
    junk = {"state": 5, "versions": {"lab@1": {"need": "lots", "held": None}, "x": 3}}
    assert http("POST", f"{m.url}/v1/sites/s2/keepalive", junk)[0] == 200
    assert http("POST", f"{m.url}/v1/admin/subscribe", {"site": "s2", "imi": "lab"})[0] == 200
    [s2] = get_json(f"{m.url}/v1/admin/status")["sites"]
    assert s2["lag"] == {"lab": {"latest": "lab@1", "complete": False, "behind_bytes": 0}}
    # exactly MAX_BATCH is fine
    status, _, body = http("POST", f"{m.url}/v1/chunks", d * wire.MAX_BATCH)
    assert status == 200
    frames = decode_stream(body, None)
    assert len(frames) == wire.MAX_BATCH and all(f.data is not None for f in frames)


def test_publish_refuses_existing_version_and_counts_versions(img: Path, store: Path,
                                                              tmp_path: Path) -> None:
    publish(img, store)
    again = publish(img, store, "lab", "--version", "1", check=False)
    assert again.returncode == 2
    assert "lab@1 is already published" in again.stderr
    img2 = make_image(tmp_path / "lab-2.img", seed=2)
    out = publish(img2, store).stdout
    assert out.startswith("published lab@2: ")
    bad = publish(img2, store, "la@b", check=False)
    assert bad.returncode == 2 and "may not contain" in bad.stderr
    missing = publish(tmp_path / "nope.img", store, check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    e = publish(empty, store, "other", check=False)
    assert e.returncode == 2 and "empty image" in e.stderr


def test_publish_stores_only_new_non_zero_chunks(img: Path, store: Path,
                                                 tmp_path: Path) -> None:
    """Trim-aware publishing: v2 = v1 with 10 chunks freed and zeroed (what fstrim does to an
    image on a loop device) and 4 chunks rewritten. Publishing v2 adds exactly the 4 new chunks
    to the store, and its distinct bytes drop by the freed chunks."""
    publish(img, store)
    data = bytearray(img.read_bytes())
    rng = random.Random(9)
    random_chunks = [i for i in range(N_CHUNKS) if i % 3 != 2 and i % 5 != 4 and i not in (1, 7)]
    freed, rewritten = random_chunks[:10], random_chunks[10:14]
    for i in freed:
        data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] = bytes(CHUNK_SIZE)
    for i in rewritten:
        data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] = rng.randbytes(CHUNK_SIZE)
    v2 = tmp_path / "lab-2.img"
    v2.write_bytes(bytes(data))
    out = publish(v2, store).stdout
    assert f" {4 * CHUNK_SIZE} bytes added to the store," in out
    d1 = sum(len(c) for d, c in chunks_by_digest(img).items() if d != ZERO)
    d2 = sum(len(c) for d, c in chunks_by_digest(v2).items() if d != ZERO)
    assert d2 == d1 - 10 * CHUNK_SIZE
    assert f"{d2} bytes of distinct non-zero chunks" in out


def test_boot_files_served(img: Path, store: Path, tmp_path: Path,
                           start_master: MasterFactory) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"KERNEL" * 1000)
    initrd.write_bytes(b"INITRD" * 3000)
    publish(img, store, "lab", "--kernel", str(kernel), "--initrd", str(initrd))
    kernel.unlink()  # kept with the version, the original may go
    m = start_master(store)
    status, _, body = http("GET", f"{m.url}/v1/boot/lab/1/kernel")
    assert status == 200 and body == b"KERNEL" * 1000
    status, _, body = http("GET", f"{m.url}/v1/boot/lab/1/initrd")
    assert status == 200 and body == b"INITRD" * 3000


def test_publish_while_running_wakes_watch(img: Path, store: Path, tmp_path: Path,
                                           start_master: MasterFactory) -> None:
    publish(img, store)
    m = start_master(store)
    g0 = get_json(f"{m.url}/v1/catalog")["generation"]
    # nothing changes: the poll answers at its timeout with the same generation
    same = get_json(f"{m.url}/v1/watch?since={g0}&timeout=1")
    assert same["generation"] == g0
    result: dict[str, Any] = {}

    def watch() -> None:
        result["body"] = get_json(f"{m.url}/v1/watch?since={g0}&timeout=60")

    t = threading.Thread(target=watch)
    t.start()
    img2 = make_image(tmp_path / "lab-2.img", seed=2)
    publish(img2, store)
    t.join(90)
    assert not t.is_alive()
    body = result["body"]
    assert body["generation"] > g0
    assert [v["version"] for v in body["versions"]] == ["1", "2"]
    # the new version is served at once, manifest and chunks
    status, _, mf = http("GET", f"{m.url}/v1/manifest/lab/2")
    assert status == 200 and mf == chunk_map(img2)
    # without since, the watch answers at once
    assert get_json(f"{m.url}/v1/watch")["generation"] == body["generation"]


def test_sigterm_with_a_pending_watch(img: Path, store: Path,
                                      start_master: MasterFactory) -> None:
    """A long poll pending when the master gets SIGTERM is answered, with the catalog, before
    the master exits 0."""
    publish(img, store)
    m = start_master(store)
    g = get_json(f"{m.url}/v1/catalog")["generation"]
    host, port = m.url.removeprefix("http://").rsplit(":", 1)
    poll = HTTPConnection(host, int(port), timeout=60)
    try:
        poll.request("GET", f"/v1/watch?since={g}&timeout=60")  # sent: pending at the master
        # a request sent after the poll and answered: the master has read the poll too
        assert get_json(f"{m.url}/v1/catalog")["generation"] == g
        assert m.stop() == 0
        answer = poll.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["generation"] == g
    finally:
        poll.close()
    assert b"event=stopping" in m.log.read_bytes()


def test_replica_gone_mid_stream(img: Path, store: Path, start_master: MasterFactory) -> None:
    """A replica that closes its connection in the middle of a chunk stream costs the master
    nothing: no error logged, the next request is served."""
    publish(img, store)
    m = start_master(store)
    d = chunk_map(img)[:16]
    body = d * wire.MAX_BATCH  # 256 MiB of frames
    port = int(m.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chunks HTTP/1.1\r\nHost: master\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = 0
        while got < 1 << 20:
            b = s.recv(1 << 16)
            assert b, "the stream ended before 1 MiB"
            got += len(b)
    deadline = time.monotonic() + 20
    while b"event=chunks_cut" not in m.log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"event=chunks_cut" in m.log.read_bytes()
    status, _, answer = http("POST", f"{m.url}/v1/chunks", d)
    assert status == 200 and decode_stream(answer, None)[0].data == img.read_bytes()[:CHUNK_SIZE]
    log = m.log.read_bytes()
    assert b"Traceback" not in log and b"ERROR" not in log
    st = get_json(f"{m.url}/v1/admin/status")["master"]
    assert st["chunk_requests"] == 2
    assert st["chunks_sent"] < wire.MAX_BATCH  # it stopped reading when the replica left


# ------------------------------------------------------------------------------ credentials


def test_tokens(img: Path, store: Path, tmp_path: Path, start_master: MasterFactory) -> None:
    publish(img, store)
    tokens = tmp_path / "tokens"
    tokens.write_text("# sites\nsite-a tok-a\n\n* tok-any  # any site\n")
    m = start_master(store, "--token-file", str(tokens))
    url = f"{m.url}/v1/catalog"
    assert http("GET", url)[0] == 401
    assert http("GET", url, token="wrong")[0] == 401
    status, _, body = http("GET", url, token="tok-a")
    assert status == 200 and json.loads(body)["versions"][0]["version"] == "1"
    assert http("GET", url, token="tok-any")[0] == 200
    assert http("POST", f"{m.url}/v1/chunks", b"\1" * 16)[0] == 401
    assert http("GET", f"{m.url}/v1/manifest/lab/1")[0] == 401
    reg = {"address": "10.0.0.5:10809", "subscribe": ["lab"]}
    assert http("POST", f"{m.url}/v1/sites/site-a/register", reg, token="tok-a")[0] == 200
    # a site's token is not another site's
    assert http("POST", f"{m.url}/v1/sites/site-b/register", reg, token="tok-a")[0] == 401
    assert http("POST", f"{m.url}/v1/sites/site-b/register", reg, token="tok-any")[0] == 200
    # replica tokens are no admin credentials, but admin without a token file is loopback
    assert http("GET", f"{m.url}/v1/admin/status")[0] == 200


def test_register_keepalive_and_admin(img: Path, store: Path, tmp_path: Path,
                                      start_master: MasterFactory) -> None:
    publish(img, store)
    admin_tok = tmp_path / "admin-token"
    admin_tok.write_text("ops s3cret\n")
    m = start_master(store, "--admin-token-file", str(admin_tok), "--down-after", "2",
                     "--keepalive-interval", "0.5")
    status, _, body = http("POST", f"{m.url}/v1/sites/site-a/register",
                           {"address": "10.0.0.5:10809", "subscribe": ["lab"]})
    assert status == 200
    answer = json.loads(body)
    assert answer["subscriptions"] == ["lab"] and answer["interval"] == 0.5
    assert answer["generation"] >= 2  # publish, then the subscription
    http("POST", f"{m.url}/v1/sites/site-b/register", {"address": "10.0.1.5:10809",
                                                      "subscribe": ["lab"]})
    report = {"address": "10.0.0.5:10809", "state": "idle", "error": None, "pulling": None,
              "behind_bytes": 0,
              "versions": {"lab@1": {"held": 100, "need": 100, "complete": True}}}

    # admin: no token 401, wrong 401, replica-style call with the right one 200
    assert http("GET", f"{m.url}/v1/admin/status")[0] == 401
    assert http("GET", f"{m.url}/v1/admin/status", token="ops")[0] == 401
    adm = ["admin", "--master", m.url, "--admin-token-file", str(admin_tok)]
    refused = run_cli("admin", "--master", m.url, "status", check=False)
    assert refused.returncode == 1 and "401" in refused.stderr

    # site-a keeps sending keep-alives (every 0.2 s, from a thread); site-b falls silent
    # and is shown DOWN
    stop = threading.Event()
    answers: list[int] = []

    def keep_alive() -> None:
        while not stop.is_set():
            answers.append(http("POST", f"{m.url}/v1/sites/site-a/keepalive", report)[0])
            stop.wait(0.2)

    alive = threading.Thread(target=keep_alive)
    alive.start()
    try:
        _admin_checks(m, adm, img, report)
    finally:
        stop.set()
        alive.join(30)
    assert answers and set(answers) == {200}


def _admin_checks(m: Master, adm: list[str], img: Path, report: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = json.loads(run_cli(*adm, "status", "--json").stdout)
        sites = {s["name"]: s for s in st["sites"]}
        if sites["site-a"]["up"] and not sites["site-b"]["up"]:
            break
        time.sleep(0.2)
    sites = {s["name"]: s for s in st["sites"]}
    assert sites["site-a"]["up"] and not sites["site-b"]["up"]
    assert st["down_after"] == 2.0
    a, b = sites["site-a"], sites["site-b"]
    assert a["state"] == "idle" and b["state"] == "down"
    assert a["address"] == "10.0.0.5:10809"
    assert a["lag"] == {"lab": {"latest": "lab@1", "complete": True, "behind_bytes": 0}}
    assert b["lag"]["lab"]["complete"] is False
    assert b["lag"]["lab"]["behind_bytes"] == sum(
        len(c) for d, c in chunks_by_digest(img).items() if d != ZERO)
    assert st["imis"] == {"lab": {"latest": "1", "versions": ["1"]}}
    table = run_cli(*adm, "status").stdout
    line = {ln.split()[0]: ln for ln in table.splitlines() if ln.startswith("site-")}
    assert " up " in line["site-a"] and "lab@1" in line["site-a"] and "lab:ok" in line["site-a"]
    assert " DOWN " in line["site-b"] and "lab@1:-" in line["site-b"]
    assert table.splitlines()[0].split()[:4] == ["SITE", "UP", "SEEN", "STATE"]

    # subscribe / unsubscribe
    out = run_cli(*adm, "subscribe", "site-a", "win").stdout
    assert "lab, win" in out
    answer = json.loads(http("POST", f"{m.url}/v1/sites/site-a/keepalive", report)[2])
    assert answer["subscriptions"] == ["lab", "win"]
    run_cli(*adm, "unsubscribe", "site-a", "lab")
    answer = json.loads(http("POST", f"{m.url}/v1/sites/site-a/keepalive", report)[2])
    assert answer["subscriptions"] == ["win"]

    # ls, retire
    ls = json.loads(run_cli(*adm, "ls", "--json").stdout)
    assert ls["imis"]["lab"]["latest"] == "1"
    assert [v["version"] for v in ls["imis"]["lab"]["versions"]] == ["1"]
    assert ls["imis"]["lab"]["distinct_bytes"] == b["lag"]["lab"]["behind_bytes"]
    assert "lab" in run_cli(*adm, "ls").stdout
    g = get_json(f"{m.url}/v1/catalog")["generation"]
    assert run_cli(*adm, "retire", "lab@1").stdout.strip() == "retired lab@1"
    cat = get_json(f"{m.url}/v1/catalog")
    assert cat["generation"] > g and cat["versions"][0]["retired"] is True
    assert http("GET", f"{m.url}/v1/manifest/lab/1")[0] == 404
    nope = run_cli(*adm, "retire", "lab@7", check=False)
    assert nope.returncode == 1 and "404" in nope.stderr
    assert run_cli(*adm, "retire", "lab", check=False).returncode == 2
    st = json.loads(run_cli(*adm, "status", "--json").stdout)
    assert st["imis"]["lab"] == {"latest": None, "versions": []}


@dataclass
class PKI:
    ca: Path
    wrong_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client: Path  # key and certificate, signed by client_ca
    stranger: Path  # key and certificate from another CA


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca, clients, other = trustme.CA(), trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    files = {n: tmp_path / f"{n}.pem" for n in (
        "ca", "wrong_ca", "server_cert", "server_key", "client_ca", "client", "stranger")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["wrong_ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    leaf.private_key_pem.write_to_path(str(files["server_key"]))
    clients.cert_pem.write_to_path(str(files["client_ca"]))
    clients.issue_cert("site-a").private_key_and_cert_chain_pem.write_to_path(
        str(files["client"]))
    other.issue_cert("site-x").private_key_and_cert_chain_pem.write_to_path(
        str(files["stranger"]))
    return PKI(**files)


def _ctx(ca: Path, cert: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx


def test_tls_and_client_certificates(img: Path, store: Path, pki: PKI,
                                     start_master: MasterFactory) -> None:
    publish(img, store)
    m = start_master(store, "--tls-cert", str(pki.server_cert), "--tls-key",
                     str(pki.server_key), "--client-ca", str(pki.client_ca), tls=True)
    url = f"{m.url}/v1/catalog"
    # the wrong CA: the client refuses the master
    with pytest.raises(urllib.error.URLError) as e:
        http("GET", url, ctx=_ctx(pki.wrong_ca))
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
    # the right CA, no credentials: refused by the master
    assert http("GET", url, ctx=_ctx(pki.ca))[0] == 401
    # a client certificate from the client CA, no token: accepted
    status, _, body = http("GET", url, ctx=_ctx(pki.ca, pki.client))
    assert status == 200 and json.loads(body)["versions"][0]["imi"] == "lab"
    status, _, body = http("POST", f"{m.url}/v1/chunks?zstd=1",
                           chunk_map(img)[:16], ctx=_ctx(pki.ca, pki.client))
    assert status == 200
    [frame] = decode_stream(body, "zstd")
    assert frame.data == img.read_bytes()[:CHUNK_SIZE]
    # a certificate from another CA does not pass the handshake
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        http("GET", url, ctx=_ctx(pki.ca, pki.stranger))
    # plain HTTP to the TLS port gets nothing useful
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http("GET", url.replace("https://", "http://"), timeout=5)
    # the admin CLI over TLS with --ca
    port = m.url.rsplit(":", 1)[1]
    st = run_cli("admin", "--master", f"https://localhost:{port}", "--ca", str(pki.ca),
                 "status", "--json")
    assert json.loads(st.stdout)["imis"]["lab"]["latest"] == "1"
    bad = run_cli("admin", "--master", f"https://localhost:{port}", "--ca", str(pki.wrong_ca),
                  "status", check=False)
    assert bad.returncode == 1 and "certificate" in bad.stderr


def test_master_refuses_bad_settings(store: Path, tmp_path: Path) -> None:
    port = str(free_port())
    common = ["master", "--store", str(store), "--listen", f"127.0.0.1:{port}"]
    p = run_cli(*common, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key",
                str(tmp_path / "nope.key"), check=False)
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run_cli(*common, "--client-ca", str(tmp_path / "ca.pem"), check=False)
    assert p.returncode == 2 and "--client-ca needs --tls-cert" in p.stderr
    bad = tmp_path / "tokens"
    bad.write_text("only-one-word\n")
    p = run_cli(*common, "--token-file", str(bad), check=False)
    assert p.returncode == 2 and "SITE TOKEN" in p.stderr
    p = run_cli(*common, "--registry", "zookeeper://x", check=False)
    assert p.returncode == 2 and "unknown registry" in p.stderr


def test_help_has_examples() -> None:
    for cmd in (["master"], ["publish"], ["admin"], ["admin", "status"],
                ["admin", "retire"]):
        out = run_cli(*cmd, "--help").stdout
        assert "example" in out, cmd


@pytest.fixture
def etcd_uri(tmp_path: Path) -> Iterator[str]:
    try:
        import aetcd  # noqa: F401
    except ImportError:
        pytest.skip("aetcd is not installed (pip install -e '.[etcd]'; scripts/setup does)")
    from etcd import EtcdMissing, EtcdServer

    try:
        server = EtcdServer.start(tmp_path / "etcd")
    except EtcdMissing as e:
        pytest.skip(str(e))
    try:
        yield server.uri("/master-test")
    finally:
        server.stop()


def test_master_with_etcd_registry(img: Path, store: Path, tmp_path: Path, etcd_uri: str,
                                   start_master: MasterFactory) -> None:
    """The registry in etcd, chunks and maps in the store: publish before and while the
    master runs, a long poll woken through etcd, sites and admin status."""
    publish(img, store, "lab", "--registry", etcd_uri)
    m = start_master(store, "--registry", etcd_uri)
    cat = get_json(f"{m.url}/v1/catalog")
    assert [v["version"] for v in cat["versions"]] == ["1"]
    assert http("GET", f"{m.url}/v1/manifest/lab/1")[2] == chunk_map(img)
    result: dict[str, Any] = {}

    def watch() -> None:
        result["body"] = get_json(f"{m.url}/v1/watch?since={cat['generation']}&timeout=60")

    t = threading.Thread(target=watch)
    t.start()
    img2 = make_image(tmp_path / "lab-2.img", seed=2)
    publish(img2, store, "lab", "--registry", etcd_uri)
    t.join(90)
    assert not t.is_alive()
    assert [v["version"] for v in result["body"]["versions"]] == ["1", "2"]
    again = publish(img2, store, "lab", "--version", "2", "--registry", etcd_uri, check=False)
    assert again.returncode == 2 and "already published" in again.stderr
    status, _, body = http("POST", f"{m.url}/v1/sites/site-a/register",
                           {"address": "10.0.0.5:10809", "subscribe": ["lab"]})
    assert status == 200 and json.loads(body)["subscriptions"] == ["lab"]
    st = get_json(f"{m.url}/v1/admin/status")
    [site] = st["sites"]
    assert site["name"] == "site-a" and site["up"] is True
    assert site["lag"]["lab"]["latest"] == "lab@2"
    assert st["imis"]["lab"] == {"latest": "2", "versions": ["1", "2"]}


def test_regional_master_serves_children(img: Path, store: Path, tmp_path: Path,
                                         etcd_uri: str, start_master: MasterFactory) -> None:
    """docs/replication.md, 'Serving children': a regional site's store that holds a version
    (here imported with --copy, as a replica would have pulled it), served by its own
    ``icbd-cache master`` on the shared etcd registry, answers children as the central master
    does: same catalog, same manifest, same chunks; MISSING for what it lacks."""
    publish(img, store, "lab", "--registry", etcd_uri)
    regional = tmp_path / "regional-store"
    run_cli("import", str(img), "--imi", "lab", "--version", "1", "--copy", "--pin",
            "--store", str(regional), "-q")
    central, relay = start_master(store, "--registry", etcd_uri), start_master(
        regional, "--registry", etcd_uri)
    assert (get_json(f"{relay.url}/v1/catalog")["versions"]
            == get_json(f"{central.url}/v1/catalog")["versions"])
    status, headers, manifest = http("GET", f"{relay.url}/v1/manifest/lab/1")
    assert status == 200 and manifest == chunk_map(img)
    assert headers["X-Icbd-Manifest"] == get_json(
        f"{central.url}/v1/catalog")["versions"][0]["manifest"]
    ask = [manifest[i : i + 16] for i in range(0, len(manifest), 16)]
    ask = [d for d in ask if d != ZERO]
    by_digest = chunks_by_digest(img)
    frames = decode_stream(http("POST", f"{relay.url}/v1/chunks?zstd=1", b"".join(ask))[2],
                           "zstd")
    assert [(f.digest, f.data) for f in frames] == [(d, by_digest[d]) for d in ask]
    # a version published later is in the shared catalog but not (yet) in the regional store
    img2 = make_image(tmp_path / "lab-2.img", seed=2)
    publish(img2, store, "lab", "--registry", etcd_uri)
    assert http("GET", f"{relay.url}/v1/manifest/lab/2")[0] == 404
    new = [d for d in {digest(c) for c in chunks_by_digest(img2).values()} - set(ask)
           if d != ZERO]
    frames = decode_stream(http("POST", f"{relay.url}/v1/chunks", b"".join(new))[2], None)
    assert frames and all(f.data is None for f in frames)


# ------------------------------------------------------------------------------ units


def test_auth_rules(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("a ta\n* tany\n")
    tokens = load_site_tokens(str(f))
    assert tokens == {"ta": "a", "tany": "*"}
    auth = Auth(site_tokens=tokens)
    assert auth.check_replica(None, False) is not None
    assert auth.check_replica("Bearer nope", False) is not None
    assert auth.check_replica("Bearer ta", False) is None
    assert auth.check_replica("bearer ta", False, "a") is None
    assert auth.check_replica("Bearer ta", False, "b") is not None
    assert auth.check_replica("Bearer tany", False, "b") is None
    assert auth.check_replica("Basic ta", False) is not None
    with_ca = Auth(client_ca=True)
    assert with_ca.check_replica(None, True) is None
    assert with_ca.check_replica(None, False) is not None
    assert Auth().check_replica(None, False) is None  # nothing configured: open
    g = tmp_path / "admin"
    g.write_text("# admins\nops s3cret\nbare\n")
    admin = Auth(admin_tokens=load_admin_tokens(str(g)))
    assert admin.check_admin("Bearer s3cret", "10.1.2.3") is None
    assert admin.check_admin("Bearer bare", "10.1.2.3") is None
    assert admin.check_admin("Bearer ops", "127.0.0.1") == (401, "admin token required")
    assert Auth().check_admin(None, "127.0.0.1") is None
    assert Auth().check_admin(None, "::1") is None
    refused = Auth().check_admin(None, "10.1.2.3")
    assert refused is not None and refused[0] == 403


def test_image_helper_shape(img: Path) -> None:
    m = chunk_map(img)
    entries = [m[i : i + 16] for i in range(0, len(m), 16)]
    assert len(entries) == N_CHUNKS + 1
    assert sum(e == ZERO for e in entries) == len(range(2, N_CHUNKS, 3))
    assert entries[7] == entries[1]
    assert os.path.getsize(img) == N_CHUNKS * CHUNK_SIZE + TAIL
