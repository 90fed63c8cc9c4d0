"""The stress test of issue 11: import, publish, warm, pin and eviction run side by side
against one store while clients read through a server, for a bounded time; then every
client's bytes, every command's outcome, ``ls`` and ``verify`` are checked."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import make_image, require
from shared_store import Loop, Procs, file_sha, ls, nbd_read, pending, procs, run, verify

__all__ = ["procs"]  # the fixture, used by name

MiB = 1 << 20
#: Seconds the commands and clients run side by side.
DURATION = 40.0


def test_import_publish_warm_pin_and_eviction_while_clients_read(
        tmp_path: Path, procs: Procs) -> None:
    require("nbdcopy")
    store = tmp_path / "S"
    # images the new versions rotate through (their chunks dedupe: the pinned bytes stay
    # bounded however many versions are made): ``copied`` for copies (pinned) and
    # publishes, ``sourced`` for imports that leave their bytes in the file; and a bigger
    # one faulted from its file. 108 MiB of distinct data in all.
    copied = [make_image(tmp_path / f"c{n}.img", 16 * MiB, seed=200 + n) for n in range(3)]
    sourced = [make_image(tmp_path / f"s{n}.img", 16 * MiB, seed=300 + n) for n in range(3)]
    big = make_image(tmp_path / "big.img", 48 * MiB, seed=210)
    sha = {p: file_sha(p) for p in [*copied, *sourced, big]}
    run("import", str(big), "--imi", "lab", "--store", str(store), "-q")
    made: dict[str, Path] = {"lab@1": big}  # version -> its image, once it exists
    # every image has a version from the start (copies copied and pinned: a copy has no
    # other source; the others sourced): the reads of every version at the end hold more
    # than --store-size, so eviction must run
    for n, img in enumerate([*copied, *sourced], start=1):
        run("import", str(img), "--imi", "pre", "--store", str(store), "-q",
            *(["--copy", "--pin"] if img in copied else []))
        made[f"pre@{n}"] = img
    lock = threading.Lock()
    # a bound the pinned versions fit in (the copies, lab@1 and one sourced image: 84 MiB of
    # data), below all the data: eviction runs all along
    srv = procs.serve("--store", str(store), "--store-size", "96M", "--hot-size", "0")
    deadline = time.monotonic() + DURATION
    outcomes: list[tuple[str, int, str]] = []

    def command(name: str, args: list[str], image: Path | None, word: str) -> None:
        p = run(*args, check=False)
        outcomes.append((name, p.returncode, p.stderr))
        if p.returncode == 0 and image is not None:
            key = p.stdout.split(":")[0].split()[-1]
            assert p.stdout.startswith(word), p.stdout
            with lock:
                assert key not in made, f"{key} made twice: {args}"
                made[key] = image

    rng = random.Random(11)

    def importer(k: int) -> Callable[[], None]:
        """Importer ``k`` of two that make versions of one iMI side by side (each version
        gets its own number, with its own image's bytes)."""
        def once() -> None:
            n = len([o for o in outcomes if o[0] == "import"]) + k
            img = (copied if n % 2 == 0 else sourced)[(n // 2 + k) % 3]
            extra = ["--copy", "--pin"] if n % 2 == 0 else []
            command("import", ["import", str(img), "--imi", "imp", "--store", str(store),
                               *extra], img, "imported ")
        return once

    def publisher(k: int) -> Callable[[], None]:
        def once() -> None:
            img = copied[(rng.randrange(3) + k) % 3]
            command("publish", ["publish", str(img), "--imi", "pub", "--store", str(store)],
                    img, "published ")
        return once

    def warmer() -> None:
        command("warm", ["warm", "lab@1", "--all", "--store", str(store)], None, "warmed ")

    def pinner() -> None:
        with lock:  # lab@1, and the versions of one sourced image: they fit pinned
            keys = ["lab@1"] + [k for k, img in made.items() if img == sourced[0]]
        key = rng.choice(keys)
        command("pin", ["pin", key, "--store", str(store)]
                + (["--unpin"] if rng.random() < 0.5 else []), None, "")

    def reader() -> tuple[str, str, int, str]:
        with lock:
            key = rng.choice(sorted(made))
            img = made[key]
        r = nbd_read(srv.uri(key))
        assert (r.rc, r.sha, r.size) == (0, sha[img], img.stat().st_size), (key, r.err)
        return key, r.sha, r.rc, r.err

    def until_deadline(fn: object) -> Loop:
        def once() -> None:
            if time.monotonic() < deadline:
                fn()  # type: ignore[operator]
            else:
                time.sleep(0.05)
        return Loop(once)

    loops = [until_deadline(f) for f in (importer(0), importer(1), publisher(0),
                                         publisher(1), warmer, pinner)]
    readers = [Loop(reader) for _ in range(3)]
    time.sleep(DURATION)
    for loop in loops:
        loop.stop()
    reads = [r for loop in readers for r in loop.stop()]

    # every client read the bytes of the version it opened, whole
    assert len(reads) >= 20 and len({k for k, *_ in reads}) >= 4, len(reads)
    # every command succeeded, or refused cleanly
    by = {name: [rc for n, rc, _ in outcomes if n == name]
          for name in ("import", "publish", "warm", "pin")}
    assert all(len(by[n]) >= 2 for n in by), by
    print(f"stress: {len(reads)} reads of {len(made)} versions; "
          + ", ".join(f"{n} {rcs.count(0)}/{len(rcs)} ok" for n, rcs in by.items()))
    bad = [(n, rc, err[-300:]) for n, rc, err in outcomes
           if rc != 0 and not (n in ("import", "publish") and rc == 2 and "store full" in err)]
    assert not bad, bad
    assert pending(store) == []
    rows = ls(store)
    assert set(made) <= set(rows)
    for key, row in rows.items():
        if row["pinned"] and not row["sources"]:
            assert row["held"] == row["needed"], (key, row)
    v = verify(store)
    assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout
    # after it all, one more read of each version made: 108 MiB of distinct data pass
    # through a 96 MiB store
    for key, img in sorted(made.items()):
        r = nbd_read(srv.uri(key))
        assert (r.rc, r.sha) == (0, sha[img]), (key, r.err)
    stats = json.loads(run("stats", "--json", "--store", str(store)).stdout)
    assert stats["evicted_bytes"] > 0 and stats["held_bytes"] <= 96 * MiB + 16 * MiB, stats
    log = srv.text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
