"""Security of the cluster: TLS between client, scheduler and workers; dashboard on localhost.

TLS runs on loopback with certificates generated here (a CA, and one certificate for 127.0.0.1
that the scheduler, the workers and the client present): a real ``dask scheduler`` and a real
``dask worker`` started with TLS required, a real ``sscflow run`` against them, and clients that
must be refused (plaintext, no certificate, a certificate from another CA).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zarr
from helpers import free_port

from sscflow.config import ClusterConfig, TLSConfig, load_config
from sscflow.core import store as st
from sscflow.errors import ConfigError
from sscflow.flow.cluster import dask_client, security

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip


def _certificate(subject: str, issuer_name, signing_key, public_key, *, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")]), critical=False)  # fmt: skip
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(folder: Path, name: str) -> TLSConfig:
    """A CA and a certificate for 127.0.0.1 signed by it: ca.pem, <name>.pem, <name>-key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = _certificate(f"{name} test CA", ca_name, ca_key, ca_key.public_key(), ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("127.0.0.1", ca_name, ca_key, key.public_key(), ca=False)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{name}-key.pem")
    return TLSConfig(ca_file=folder / "ca.pem", cert=folder / f"{name}.pem",
                     key=folder / f"{name}-key.pem")  # fmt: skip


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """``dask scheduler`` and one ``dask worker`` on loopback, TLS required on every comm."""
    folder = tmp_path_factory.mktemp("tls")
    tls = make_pki(folder / "pki", "node")
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    certs = ["--tls-ca-file", str(tls.ca_file), "--tls-cert", str(tls.cert),
             "--tls-key", str(tls.key)]  # fmt: skip
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or "dask"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--protocol", "tls", "--dashboard-address", "127.0.0.1:0",
                               *certs], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]  # fmt: skip
    worker = [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
              "--name", "tls-worker", *certs]  # fmt: skip
    procs.append(subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))  # fmt: skip
    cfg = ClusterConfig(scheduler=address, tls=tls)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with dask_client(cfg) as client:
                    if client.scheduler_info()["workers"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the TLS scheduler and worker did not start"
            time.sleep(1)
        yield folder, cfg
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_client_with_the_cluster_certificates_computes_over_tls(tls_cluster):
    _, cfg = tls_cluster
    with dask_client(cfg) as client:
        assert client.scheduler.address.startswith("tls://")
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        workers = client.scheduler_info()["workers"]
        assert all(addr.startswith("tls://") for addr in workers)


def _refused(address: str, sec) -> bool:
    from distributed import Client

    try:
        with Client(address, security=sec, timeout="5s") as client:
            client.submit(sum, [1]).result(timeout=5)
    except (OSError, TimeoutError):
        return True
    return False


def _handshake_refused(port: int, ca_file: Path, client: TLSConfig | None) -> bool:
    """Open a TLS connection, optionally with a client certificate, and read: a server that
    requires client certificates ends it (TLS 1.3 reports that on the first read)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(5)
                first = tls.recv(1)
    except TimeoutError:  # still connected, waiting: accepted
        return False
    except (ssl.SSLError, ConnectionError):
        return True
    return not first  # the scheduler's first bytes (dask's handshake), or closed: b""


def test_plaintext_and_untrusted_clients_are_refused(tls_cluster, tmp_path):
    from distributed.security import Security

    _, cfg = tls_cluster
    port = cfg.scheduler.rsplit(":", 1)[1]
    assert _refused(f"tcp://127.0.0.1:{port}", None)  # plaintext
    # TLS, trusting the CA, but presenting no certificate of its own (distributed's client
    # cannot even try that, so a bare TLS socket does)
    assert _handshake_refused(int(port), cfg.tls.ca_file, None)
    assert not _handshake_refused(int(port), cfg.tls.ca_file, cfg.tls)  # control
    # a certificate from another CA
    other = make_pki(tmp_path / "other", "intruder")
    assert _refused(cfg.scheduler, Security(tls_ca_file=str(other.ca_file),
                                            tls_client_cert=str(other.cert),
                                            tls_client_key=str(other.key),
                                            require_encryption=True))  # fmt: skip
    # control: the same call with the cluster's own certificates is not refused
    assert not _refused(cfg.scheduler, security(cfg))


def test_tls_settings_are_checked(tmp_path):
    tls = make_pki(tmp_path, "node")
    with pytest.raises(ConfigError, match="must start with tls://"):
        security(ClusterConfig(scheduler="tcp://127.0.0.1:8786", tls=tls))
    with pytest.raises(ConfigError, match=r"missing \['cert', 'key'\]"):
        ClusterConfig(tls=TLSConfig(ca_file=tls.ca_file)).validate("cluster")
    missing = TLSConfig(ca_file=tmp_path / "nope.pem", cert=tls.cert, key=tls.key)
    with pytest.raises(ConfigError, match="nope.pem does not exist"):
        security(ClusterConfig(scheduler="tls://127.0.0.1:8786", tls=missing))


@pytest.mark.slow
def test_sscflow_run_over_tls(tls_cluster, tmp_path):
    """The whole dataflow against the TLS cluster, certificates given in the config file
    (relative to it)."""
    from sscflow.synth import synthesize_cohort

    folder, cfg = tls_cluster
    manifest = synthesize_cohort(2, tmp_path / "synthetic", spacing=6.0, seed=1)
    config = {
        "manifest": str(manifest), "store": str(tmp_path / "cohort.zarr"),
        "cluster": {"scheduler": cfg.scheduler,
                    "tls": {"ca_file": os.path.relpath(cfg.tls.ca_file, tmp_path),
                            "cert": os.path.relpath(cfg.tls.cert, tmp_path),
                            "key": os.path.relpath(cfg.tls.key, tmp_path)}},
        "ingest": {"spacing_mm": 6.0}, "segment": {"min_lung_ml": 5.0},
    }  # fmt: skip
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert load_config(path).cluster.tls.cert == cfg.tls.cert
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "sscflow.cli", "run", str(path)], env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "to_template: 2 done" in done.stdout
    root = zarr.open_group(str(tmp_path / "cohort.zarr"), mode="r")
    for pid in st.patient_ids(root):
        assert st.output_state(root[f"patients/{pid}"], "log_jacobian_template") == "complete"


def test_the_local_cluster_and_its_dashboard_listen_on_localhost_only():
    from urllib.parse import urlparse

    with dask_client(ClusterConfig(n_workers=1, dashboard_address=":0")) as client:
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        info = client.scheduler_info()
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
    assert ClusterConfig().dashboard_address.startswith("127.0.0.1:")
