"""Certificates for the TLS tests (a CA, server and client certificates, a rogue CA) and a
Storage SCP alone on a free port (``scp_node``), as fixtures."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fracture_node.config import Config, TlsConfig
from fracture_node.db import schema as s
from fracture_node.db.store import Store
from fracture_node.dicom.scp import Receiver
from fracture_node.metrics import Metrics
from fracture_node.spool import Spool
from tests.support.node import node_config


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _issue(folder: Path, name: str, ca: str, subject: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj",
             f"/CN={subject}", "-out", f"{name}.csr", cwd=folder)
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, and a rogue CA with a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-subj", f"/CN=Test {ca}", "-days", "2", "-out", f"{ca}.crt", cwd=d)
    _issue(d, "server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1")
    _issue(d, "client", "ca", "MODALITY", "DNS:modality.test")
    _issue(d, "rogue", "rogue-ca", "ROGUE", "DNS:rogue.test")
    return Pki(ca=d / "ca.crt", server_cert=d / "server.crt", server_key=d / "server.key",
               client_cert=d / "client.crt", client_key=d / "client.key",
               rogue_cert=d / "rogue.crt", rogue_key=d / "rogue.key")


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_config(pki: Pki, **kw: Any) -> TlsConfig:
    return TlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key,
                     ca_certificates=pki.ca, **kw)


class ScpNode:
    """A Storage SCP alone (receiver, store, spool, metrics) on a free port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database_url)
        self.spool = Spool(config.spool_dir, fsync=True, min_free_bytes=0)
        self.metrics = Metrics()
        self.receiver = Receiver(config, self.store, self.spool, metrics=self.metrics)
        self.receiver.start()
        self.port = self.receiver.port

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "fracture_node_associations_rejected_total", {"reason": reason}) or 0.0

    def wait_rows(self, *where: Any, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.store.rows(s.Association, *where)
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def stop(self) -> None:
        self.receiver.stop(drain_timeout_s=5)
        self.store.dispose()


@pytest.fixture
def scp_node(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    """Start receivers with node (and TLS) settings over one SQLite database."""
    nodes: list[ScpNode] = []

    def start(tls: TlsConfig | None = None, **node: Any) -> ScpNode:
        config = node_config(tmp_path, sqlite_url, **node)
        if tls is not None:
            config = dataclasses.replace(config, tls=tls).validate()
        running = ScpNode(config)
        nodes.append(running)
        return running

    yield start
    for running in nodes:
        running.stop()
