"""HTTPS and WSS with real processes: a trainer trains a round through the coordinator's own TLS (uvicorn's
--ssl-certfile) and through the README's nginx reverse proxy, fetching the model's blobs over https, with a private CA
it is told of by SSL_CERT_FILE. The certificates are made here; nothing is fetched.

The nginx test skips only where nginx is not installed (./dev installs it).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.cli import main
from tests.conftest import ROOT, free_port

JOB = ("--inner-steps", "4", "--batch", "4", "--deadline-seconds", "120", "--rounds", "1", "--verify-share", "0")
# the config the README gives, as written there, with this test's ports and files in place of the example's
README_LISTEN, README_UPSTREAM = "listen 443 ssl;", "http://127.0.0.1:8000"
README_CERT = "/etc/letsencrypt/live/swarm.example.org/fullchain.pem"
README_KEY = "/etc/letsencrypt/live/swarm.example.org/privkey.pem"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signs for 127.0.0.1 and localhost: (CA PEM, chain PEM, key PEM)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmgrad test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "chain.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def certificates(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """The certificates, with this test process trusting the CA as a trainer is told to (SSL_CERT_FILE)."""
    paths = make_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(paths[0]))
    return paths


def readme_nginx_server_block() -> str:
    """The nginx configuration in README.md's "Behind a TLS reverse proxy" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Behind a TLS reverse proxy", 1)[1]
    return re.search(r"```nginx\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def nginx(tmp_path, certificates):
    """Start nginx with the README's server block; yields a function (upstream port) -> the proxy's https URL."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx is not installed (./dev installs it)")
    started: list[subprocess.Popen] = []
    logs = tmp_path / "nginx"
    logs.mkdir()

    def start(upstream_port: int) -> str:
        port = free_port()
        block = readme_nginx_server_block()
        for old, new in ((README_LISTEN, f"listen 127.0.0.1:{port} ssl;"),
                         (README_UPSTREAM, f"http://127.0.0.1:{upstream_port}"),
                         (README_CERT, str(certificates[1])), (README_KEY, str(certificates[2]))):
            assert old in block, f"the README's nginx block no longer has {old!r}"
            block = block.replace(old, new)
        temp = "".join(f"{kind}_temp_path {logs}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
        config = logs / "nginx.conf"
        config.write_text(f"user root;\ndaemon off;\nworker_processes 1;\npid {logs}/nginx.pid;\n"
                          f"error_log {logs}/error.log info;\nevents {{}}\n"
                          f"http {{\naccess_log {logs}/access.log;\n{temp}{block}}}\n")
        proc = subprocess.Popen([binary, "-e", str(logs / "error.log"), "-p", str(logs), "-c", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        started.append(proc)
        deadline = time.time() + 20
        while time.time() < deadline:
            assert proc.poll() is None, (logs / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"https://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"nginx did not listen within 20 s:\n{(logs / 'error.log').read_text()}")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def trains_a_round_over_https(processes, coordinator, url: str, ca: Path) -> None:
    """A trainer told of the CA joins at `url`, fetches the model as blobs over https and trains the one round."""
    trainer = processes.trainer(url, env={"SSL_CERT_FILE": str(ca)})
    status = coordinator.wait_for(lambda s: s["state"] == "finished", 240, "a round trained over https")
    assert trainer.wait(60) == 0, trainer.output()
    (node,) = status["nodes"]
    assert node["kind"] == "trainer" and node["updates_accepted"] == 1
    fetched = re.search(r"model fetched as \d+ chunks \((\d+) bytes\): (\d+) bytes from peers, (\d+) from the "
                        r"coordinator", trainer.output())
    assert fetched is not None, trainer.output()
    total, from_peers, from_coordinator = map(int, fetched.groups())
    # the whole fp32 model, and its signed manifest, came from the coordinator over https
    assert total == 4 * status["job"]["params"] and from_peers == 0 and from_coordinator > total


def test_a_trainer_trains_over_the_coordinators_own_https_and_wss(processes, loopback_namespace, certificates):
    ca, chain, key = certificates
    coordinator = processes.coordinator(*JOB, "--ssl-certfile", str(chain), "--ssl-keyfile", str(key))
    coordinator.url = coordinator.url.replace("http://", "https://")  # this process trusts the CA (SSL_CERT_FILE)
    ready = coordinator.wait_ready()
    assert f"swarmgrad coordinator: {coordinator.url}" in coordinator.output()

    # the blob route over https: the CA makes it verify, and without it the certificate is refused
    blob = f"{coordinator.url}/api/blobs/{ready['manifest']}"
    with urllib.request.urlopen(blob, timeout=10) as r:
        assert r.status == 200 and "immutable" in r.headers["Cache-Control"]
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(blob, timeout=10, context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(coordinator.url.replace("https://", "http://") + "/api/status", timeout=10)

    trains_a_round_over_https(processes, coordinator, coordinator.url, ca)
    # the command line reads it over https too, with the same SSL_CERT_FILE
    shown = subprocess.run([sys.executable, "-m", "server", "status", "--coordinator", coordinator.url, "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert '"state": "finished"' in shown.stdout


def test_a_coordinator_given_half_a_certificate_or_a_key_that_does_not_fit_refuses_to_start(tmp_path, capsys):
    ca, chain, key = make_certificates(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["--data-dir", str(tmp_path / "data"), "--ssl-certfile", str(chain)])
    assert exited.value.code == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    other_key = make_certificates(tmp_path / "other")[2]
    assert main(["--data-dir", str(tmp_path / "data"), "--ssl-certfile", str(chain), "--ssl-keyfile",
                 str(other_key)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_trainer_trains_through_the_readmes_nginx_config(processes, loopback_namespace, certificates, nginx,
                                                            tmp_path):
    ca = certificates[0]
    coordinator = processes.coordinator(*JOB)  # plain HTTP on loopback, behind the proxy
    coordinator.wait_ready()
    proxy = nginx(coordinator.port)
    with urllib.request.urlopen(proxy + "/api/status", timeout=10) as r:
        assert r.status == 200

    trains_a_round_over_https(processes, coordinator, proxy, ca)
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert re.search(r'"GET /ws HTTP/1\.1" 101 ', access), access  # the WebSocket upgrade went through nginx
    assert re.search(r'"GET /api/blobs/[0-9a-f]{64} HTTP/1\.1" 200 ', access), access  # and so did the blobs
