"""Client certificates: ``serve --tls-ca FILE --tls-verify-peer``, ``tls-name=``, and
``--tls-identity subject``, against a running server with libnbd's clients.

One throwaway CA (trustme) signs the server's certificate and the good client's. libnbd reads
``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` from its ``tls-certificates``
directory (nbd_set_tls_certificates(3)) and presents the client certificate when asked. The
refused clients hold a self-signed certificate, one from another CA, an expired one from the
right CA, or none.
"""

from __future__ import annotations

import datetime
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import Server, make_image, require, sha256_file
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from icbdcache import tlspeer

MiB = 1 << 20
ServerFactory = Callable[..., Server]


class Lab:
    """The CA, the server's files, and libnbd certificate directories by client."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        srv = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert, self.server_key = root / "srv.pem", root / "srv.key"
        srv.cert_chain_pems[0].write_to_path(str(self.server_cert))
        srv.private_key_pem.write_to_path(str(self.server_key))

    def client_dir(self, name: str, cert: bytes | None = None, key: bytes | None = None) -> Path:
        """A libnbd directory trusting the lab CA and holding ``cert``/``key`` (PEM) if
        given."""
        d = self.root / name
        d.mkdir()
        self.ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
        if cert is not None and key is not None:
            (d / "client-cert.pem").write_bytes(cert)
            (d / "client-key.pem").write_bytes(key)
        return d

    def issued(self, name: str, common_name: str, **kw: object) -> Path:
        leaf = self.ca.issue_cert(common_name, common_name=common_name, **kw)  # type: ignore[arg-type]
        return self.client_dir(name, leaf.cert_chain_pems[0].bytes(),
                               leaf.private_key_pem.bytes())


def self_signed(common_name: str) -> tuple[bytes, bytes]:
    """A certificate signed by its own key (PEM cert, PEM key), valid now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", 8 * MiB)


def serve(factory: ServerFactory, lab: Lab, *exports: str, extra: tuple[str, ...] = ()) -> Server:
    args = [a for e in exports for a in ("--export", e)]
    return factory(*args, "--tls-cert", str(lab.server_cert), "--tls-key",
                   str(lab.server_key), "--tls-ca", str(lab.ca_file), *extra)


def nbds(srv: Server, export: str, certs: Path) -> str:
    return f"nbds://{srv.host}:{srv.port}/{export}?tls-certificates={certs}"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


def size_of(srv: Server, export: str, certs: Path) -> subprocess.CompletedProcess[str]:
    return run("nbdinfo", "--size", nbds(srv, export, certs))


# ------------------------------------------------------------------ --tls-verify-peer


def test_certificate_from_the_ca_connects_others_are_refused(
        server_factory: ServerFactory, lab: Lab, disk: Path, tmp_path: Path) -> None:
    require("nbdinfo", "nbdcopy")
    srv = serve(server_factory, lab, f"lab={disk}", extra=("--tls-verify-peer",))
    good = lab.issued("good", "ws1.lab")
    out = size_of(srv, "lab", good)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 8 * MiB
    copy = tmp_path / "copy.img"
    out = run("nbdcopy", nbds(srv, "lab", good), str(copy))
    assert out.returncode == 0, out.stderr
    assert sha256_file(copy) == sha256_file(disk)

    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    refused = {
        "self-signed": lab.client_dir("self", *self_signed("ws1.lab")),
        "other CA": (lambda leaf: lab.client_dir("other", leaf.cert_chain_pems[0].bytes(),
                                                  leaf.private_key_pem.bytes()))(
            trustme.CA().issue_cert("ws1.lab", common_name="ws1.lab")),
        "expired": lab.issued("expired", "ws1.lab", not_before=past,
                              not_after=past + datetime.timedelta(days=1)),
        "no certificate": lab.client_dir("none"),
    }
    for why, certs in refused.items():
        out = size_of(srv, "lab", certs)
        assert out.returncode != 0 and out.stdout == "", f"{why}: {out.stdout}"
        out = run("nbdcopy", nbds(srv, "lab", certs), str(tmp_path / "refused.img"))
        assert out.returncode != 0, why
    # the refusals happened in the TLS handshake, logged as such; the server still serves
    assert srv.log_text().count("TLS handshake failed") >= 1
    out = size_of(srv, "lab", good)
    assert out.returncode == 0 and int(out.stdout) == 8 * MiB, out.stderr


def qemu_img_info(srv: Server, export: str, certs: Path) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "info", "--output=json", "--object",
               f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
               f"driver=nbd,host={srv.host},port={srv.port},export={export},tls-creds=tls0")


def test_qemu_img_with_tls_creds(server_factory: ServerFactory, lab: Lab, disk: Path) -> None:
    """qemu's tls-creds-x509 reads ca-cert.pem, client-cert.pem and client-key.pem from its
    directory: the lab's certificate connects, a self-signed one is refused."""
    require("qemu-img")
    srv = serve(server_factory, lab, f"lab={disk}", extra=("--tls-verify-peer",))
    out = qemu_img_info(srv, "lab", lab.issued("good", "ws1.lab"))
    assert out.returncode == 0, out.stderr
    assert f'"virtual-size": {8 * MiB}' in out.stdout
    out = qemu_img_info(srv, "lab", lab.client_dir("self", *self_signed("ws1.lab")))
    assert out.returncode != 0 and "virtual-size" not in out.stdout


def test_verify_peer_implies_tls_required(server_factory: ServerFactory, lab: Lab,
                                          disk: Path) -> None:
    require("nbdinfo")
    srv = serve(server_factory, lab, f"lab={disk}", extra=("--tls-verify-peer",))
    out = run("nbdinfo", "--size", srv.uri("lab"))
    assert out.returncode != 0 and out.stdout == ""


def test_ca_without_verify_peer_checks_only_presented_certificates(
        server_factory: ServerFactory, lab: Lab, disk: Path) -> None:
    """--tls-ca alone: a client without a certificate is served; one presenting a certificate
    the CA did not sign fails the handshake."""
    require("nbdinfo")
    srv = serve(server_factory, lab, f"lab={disk}")
    assert int(size_of(srv, "lab", lab.client_dir("none")).stdout) == 8 * MiB
    out = size_of(srv, "lab", lab.client_dir("self", *self_signed("ws1.lab")))
    assert out.returncode != 0 and out.stdout == ""


# ------------------------------------------------------------------------- tls-name=


def test_tls_name_limits_an_export_to_named_certificates(
        server_factory: ServerFactory, lab: Lab, disk: Path) -> None:
    require("nbdinfo")
    srv = serve(server_factory, lab, f"lab={disk}", f"ops={disk},tls-name=ops1.lab",
                extra=("--tls-verify-peer",))
    ops, ws = lab.issued("ops", "ops1.lab"), lab.issued("ws", "ws1.lab")
    assert int(size_of(srv, "ops", ops).stdout) == 8 * MiB
    assert int(size_of(srv, "lab", ws).stdout) == 8 * MiB
    out = size_of(srv, "ops", ws)
    assert out.returncode != 0 and out.stdout == ""
    listed = run("nbdinfo", "--list", "--json", nbds(srv, "", ws))
    assert listed.returncode == 0, listed.stderr
    assert '"ops"' not in listed.stdout and '"lab"' in listed.stdout
    assert re.search(r"reason=\"export tls-name\" why=\"the certificate.s names are not in the "
                     r"tls-name= list of export ops\"", srv.log_text()), srv.log_text()[-2000:]


# ----------------------------------------------------------------- --tls-identity


def test_identity_by_subject_shares_an_overlay_across_certificate_holders(
        server_factory: ServerFactory, lab: Lab, disk: Path) -> None:
    """With --tls-identity subject, two connections with the same certificate subject write
    and read one overlay; another subject from the same address sees the base image."""
    nbdsh = Path("/usr/bin/python3")
    require("nbdinfo")
    srv = serve(server_factory, lab, f"lab={disk},cow",
                extra=("--tls-verify-peer", "--tls-identity", "subject"))
    a, b = lab.issued("a", "ws1.lab"), lab.issued("b", "ws2.lab")
    script = ("import nbd,sys\n"
              "h=nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1])\n"
              "if sys.argv[2]=='w': h.pwrite(b'\\xab'*4096, 0); h.flush()\n"
              "sys.stdout.write(h.pread(4096, 0).hex()[:8])\n")
    runs = []
    for certs, op in ((a, "w"), (a, "r"), (b, "r")):
        runs.append(subprocess.run([str(nbdsh), "-I", "-c", script, nbds(srv, "lab", certs), op],
                                   capture_output=True, text=True, timeout=60,
                                   cwd=lab.root, check=False))
    for r in runs:
        assert r.returncode == 0, r.stderr
    base = disk.read_bytes()[:4].hex()
    assert [r.stdout for r in runs] == ["abababab", "abababab", base]
    log = srv.log_text()
    assert log.count(',CN=ws1.lab"') == 2 and log.count(',CN=ws2.lab"') == 1  # whose


# ------------------------------------------------------------------------- unit level


def test_peer_names_and_subject_text() -> None:
    cert = {"subject": ((("commonName", "ws1.lab"),), (("organizationName", "Lab, Inc"),)),
            "subjectAltName": (("DNS", "ws1.lab"), ("IP Address", "10.0.0.5"),
                               ("email", "a@lab"), ("othername", "<unsupported>"))}
    assert tlspeer.peer_names(cert) == {"ws1.lab", "10.0.0.5", "a@lab"}
    assert tlspeer.subject_text(cert) == "CN=ws1.lab,O=Lab\\, Inc"
    assert tlspeer.peer_names({}) == frozenset() and tlspeer.subject_text(None) == ""


# ------------------------------------------------------------ upstream over TLS (nbds://)


def test_store_faults_from_a_tls_upstream_with_a_client_certificate(
        server_factory: ServerFactory, lab: Lab, disk: Path, tmp_path: Path) -> None:
    """A site server faults ``lab`` from an upstream that verifies client certificates: with
    the lab's certificate it serves the upstream's bytes; with a self-signed one the upstream
    refuses it in the handshake, and the site serves without that export."""
    require("nbdcopy")
    up = serve(server_factory, lab, f"lab={disk}", extra=("--tls-verify-peer",))
    good = lab.issued("site", "site1.lab")
    uri = f"nbds://127.0.0.1:{up.port}/lab?tls-certificates={good}"
    site = server_factory("--store", str(tmp_path / "store"), "--create-store",
                          "--export", f"lab@1={uri}")
    copy = tmp_path / "copy.img"
    out = run("nbdcopy", site.uri("lab@1"), str(copy))
    assert out.returncode == 0, out.stderr
    assert sha256_file(copy) == sha256_file(disk)

    bad = lab.client_dir("bad-site", *self_signed("site1.lab"))
    uri = f"nbds://127.0.0.1:{up.port}/lab?tls-certificates={bad}"
    site2 = server_factory("--store", str(tmp_path / "store2"), "--create-store",
                           "--export", f"lab@1={uri}")
    out = run("nbdinfo", "--size", site2.uri("lab@1"))
    assert out.returncode != 0 and out.stdout == ""
    assert "unreachable" in site2.log_text()


def test_nbds_uri_parsing(lab: Lab) -> None:
    from icbdcache.sources.nbd import parse_uri

    certs = lab.issued("p", "site1.lab")
    t = parse_uri(f"nbds://up.example:10900/lab%20x?tls-certificates={certs}")
    assert (t.address, t.export, t.server_hostname) == (("up.example", 10900), "lab x", None)
    assert t.ssl is not None and t.ssl.check_hostname
    t = parse_uri(f"nbds+unix:///lab?socket=/run/s&tls-certificates={certs}"
                  "&tls-verify-peer=false")
    assert t.address == "/run/s" and t.ssl is not None and not t.ssl.check_hostname
    assert parse_uri("nbd://h/lab").ssl is None
    for bad in ("nbd://h/lab?tls-certificates=/x", "nbds://h/lab?tls-certificates=/nonexistent",
                "nbds://h/lab?tls-verify-peer=maybe"):
        with pytest.raises(ValueError):
            parse_uri(bad)
