"""TLS (NBD_OPT_STARTTLS) against a running ``icbd-cache serve``.

A throwaway CA and server certificate are made per test with trustme. libnbd's clients
(nbdinfo, nbdcopy) take ``nbds://HOST:PORT/NAME?tls-certificates=DIR``, DIR holding
``ca-cert.pem`` (and ``client-cert.pem``/``client-key.pem`` for client certificates, unused
here), see nbd_set_tls_certificates(3). Raw-byte checks use Python's ssl module on the socket
once the server has acknowledged STARTTLS (proto.md, 'TLS support').
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import Server, make_image, require, sha256_file
from nbdraw import RawClient, closed_by_server, expected

from nbd import wire
from nbd.constants import (
    IHAVEOPT,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)

MiB = 1 << 20
ServerFactory = Callable[..., Server]


@dataclass
class PKI:
    """Files of one test CA: ``certs`` is a libnbd certificates directory."""

    ca: trustme.CA
    certs: Path
    server_cert: Path
    server_key: Path
    wrong_certs: Path  # a libnbd directory whose CA did not sign the server certificate

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs / "ca-cert.pem"))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "ca-cert.pem"))
    server_cert, server_key = tmp_path / "server-cert.pem", tmp_path / "server-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(server_cert))
    cert.private_key_pem.write_to_path(str(server_key))
    wrong = tmp_path / "wrong-certs"
    wrong.mkdir()
    trustme.CA().cert_pem.write_to_path(str(wrong / "ca-cert.pem"))
    return PKI(ca, certs, server_cert, server_key, wrong)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", 16 * MiB)


def serve_tls(factory: ServerFactory, pki: PKI, disk: Path, *, required: bool) -> Server:
    args = ["--export", f"lab={disk}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key)]
    if required:
        args.append("--tls-required")
    return factory(*args)


def nbds(srv: Server, export: str, certs: Path) -> str:
    return f"nbds://{srv.host}:{srv.port}/{export}?tls-certificates={certs}"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


def starttls(c: RawClient, pki: PKI) -> None:
    """NBD_OPT_STARTTLS, then the TLS handshake on the same socket."""
    assert c.ask(Opt.STARTTLS) == Rep.ACK
    c.sock = pki.client_context().wrap_socket(c.sock, server_hostname="127.0.0.1")
    c.structured = False  # what was negotiated in plaintext no longer counts


def read_ok(c: RawClient, disk: Path, offset: int = 0, length: int = 64 * 1024) -> None:
    err, data = c.read(offset, length)
    assert err == 0 and data == expected(disk, offset, length)


# --------------------------------------------------------------------- libnbd clients


@pytest.mark.parametrize("required", [False, True], ids=["tls-offered", "tls-required"])
def test_nbdinfo_over_tls(server_factory: ServerFactory, pki: PKI, disk: Path,
                          required: bool) -> None:
    require("nbdinfo")
    srv = serve_tls(server_factory, pki, disk, required=required)
    out = run("nbdinfo", nbds(srv, "lab", pki.certs))
    assert out.returncode == 0, out.stderr
    assert "with TLS" in out.stdout
    assert f"export-size: {16 * MiB}" in out.stdout
    assert "tls=yes" in srv.log_text()


def test_nbdcopy_over_tls(server_factory: ServerFactory, pki: PKI, disk: Path,
                          tmp_path: Path) -> None:
    require("nbdcopy")
    srv = serve_tls(server_factory, pki, disk, required=True)
    copy = tmp_path / "copy.img"
    out = run("nbdcopy", nbds(srv, "lab", pki.certs), str(copy))
    assert out.returncode == 0, out.stderr
    assert sha256_file(copy) == sha256_file(disk)


def test_plaintext_client_on_a_tls_offering_server(
        server_factory: ServerFactory, pki: PKI, disk: Path) -> None:
    """Without --tls-required, TLS is optional (SELECTIVETLS): plaintext clients are served."""
    require("nbdinfo")
    srv = serve_tls(server_factory, pki, disk, required=False)
    out = run("nbdinfo", "--size", srv.uri("lab"))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 16 * MiB


def test_wrong_ca_fails(server_factory: ServerFactory, pki: PKI, disk: Path) -> None:
    require("nbdinfo")
    srv = serve_tls(server_factory, pki, disk, required=True)
    out = run("nbdinfo", "--size", nbds(srv, "lab", pki.wrong_certs))
    assert out.returncode != 0 and out.stdout == ""
    assert "certificate" in out.stderr.lower(), out.stderr  # gnutls: verification failed
    # The failed handshake did not hurt the server.
    out = run("nbdinfo", "--size", nbds(srv, "lab", pki.certs))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 16 * MiB


# ------------------------------------------------------------------- --tls-required


def test_tls_required_plaintext_nbdinfo_fails(
        server_factory: ServerFactory, pki: PKI, disk: Path) -> None:
    require("nbdinfo")
    srv = serve_tls(server_factory, pki, disk, required=True)
    out = run("nbdinfo", "--size", srv.uri("lab"))
    assert out.returncode != 0 and out.stdout == ""
    assert "TLS" in out.stderr, out.stderr  # libnbd: "server requires TLS encryption first"
    assert srv.proc.poll() is None


def test_tls_required_options_refused_before_starttls(
        server_factory: ServerFactory, pki: PKI, disk: Path) -> None:
    srv = serve_tls(server_factory, pki, disk, required=True)
    with RawClient(srv.port) as c:
        c.handshake()
        info = RawClient.info_data(b"lab")
        for opt, data in ((Opt.GO, info), (Opt.LIST, b""), (Opt.INFO, info),
                          (Opt.STRUCTURED_REPLY, b""), (99, b"junk")):
            c.option(opt, data)
            ropt, rep, _ = c.option_reply()
            assert (ropt, rep) == (opt, Rep.ERR_TLS_REQD), f"option {opt}: {rep:#x}"
        # The same connection can still upgrade and be served.
        starttls(c, pki)
        assert c.go("lab") == Rep.ACK
        read_ok(c, disk)
    # NBD_OPT_EXPORT_NAME has no error reply: before TLS it ends the connection.
    with RawClient(srv.port) as c:
        c.handshake()
        c.option(Opt.EXPORT_NAME, b"lab")
        assert closed_by_server(c.sock)


def test_abort_before_tls_is_allowed(server_factory: ServerFactory, pki: PKI,
                                     disk: Path) -> None:
    srv = serve_tls(server_factory, pki, disk, required=True)
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.ask(Opt.ABORT) == Rep.ACK
        assert closed_by_server(c.sock)


# ---------------------------------------------------------------- STARTTLS state


def test_starttls_forgets_structured_reply(server_factory: ServerFactory, pki: PKI,
                                           disk: Path) -> None:
    srv = serve_tls(server_factory, pki, disk, required=False)
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.structured_reply() == Rep.ACK
        assert c.ask(Opt.STRUCTURED_REPLY) == Rep.ERR_INVALID  # already negotiated
        starttls(c, pki)
        assert c.ask(Opt.STRUCTURED_REPLY) == Rep.ACK  # forgotten, so negotiated anew
        c.structured = True
        assert c.go("lab") == Rep.ACK
        cookie = c.request(Cmd.READ, 0, 4096)
        magic, flags, rtype, rcookie, length = wire.STRUCTURED_REPLY.unpack(
            c.recv_exact(wire.STRUCTURED_REPLY.size))
        assert magic == STRUCTURED_REPLY_MAGIC  # structured replies are on
        assert (flags, rtype, rcookie, length) == (
            ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + 4096)
        assert c.recv_exact(8 + 4096) == wire.OFFSET.pack(0) + expected(disk, 0, 4096)


def test_starttls_without_renegotiation_gives_simple_replies(
        server_factory: ServerFactory, pki: PKI, disk: Path) -> None:
    srv = serve_tls(server_factory, pki, disk, required=False)
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.structured_reply() == Rep.ACK
        starttls(c, pki)
        assert c.go("lab") == Rep.ACK
        cookie = c.request(Cmd.READ, 4096, 4096)
        (magic,) = wire.U32.unpack(c.recv_exact(4))
        assert magic == SIMPLE_REPLY_MAGIC  # simple reply: structured replies were forgotten
        _, err, rcookie = wire.SIMPLE_REPLY.unpack(wire.U32.pack(magic) + c.recv_exact(12))
        assert (err, rcookie) == (0, cookie)
        assert c.recv_exact(4096) == expected(disk, 4096, 4096)


def test_second_starttls_is_invalid(server_factory: ServerFactory, pki: PKI,
                                    disk: Path) -> None:
    srv = serve_tls(server_factory, pki, disk, required=True)
    with RawClient(srv.port) as c:
        c.handshake()
        starttls(c, pki)
        assert c.ask(Opt.STARTTLS) == Rep.ERR_INVALID
        assert c.go("lab") == Rep.ACK
        read_ok(c, disk, 1 * MiB)


def test_garbage_instead_of_tls_handshake(server_factory: ServerFactory, pki: PKI,
                                          disk: Path) -> None:
    """After the STARTTLS ACK, plaintext (an option) instead of a ClientHello: the server
    drops that connection and keeps serving others."""
    srv = serve_tls(server_factory, pki, disk, required=True)
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.ask(Opt.STARTTLS) == Rep.ACK
        c.send(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 0) + b"\x16\x03\x01" + bytes(300))
        assert closed_by_server(c.sock)
    with RawClient(srv.port) as c:
        c.handshake()
        starttls(c, pki)
        assert c.go("lab") == Rep.ACK
        read_ok(c, disk)
