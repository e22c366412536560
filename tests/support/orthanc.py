"""Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``) as a real DICOMweb peer."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import free_port, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancWeb:
    """A running Orthanc: ``request`` speaks its REST API, ``dicomweb_url`` is its DICOMweb root."""

    def __init__(self, http: int, users: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
        self.http = http
        self.users = users
        self.proc = proc

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Any:
        """Call the REST API (as the first user when authentication is on); JSON answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method=method, headers=headers or {})
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read() or b"null")

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the instances of a study, as DICOM JSON (empty when the study is unknown)."""
        try:
            found = self.request("GET", f"/dicom-web/studies/{study_uid}/instances",
                                 headers={"Accept": "application/dicom+json"})
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        return list(found or [])


@contextlib.contextmanager
def orthanc_web(workdir: Path, users: dict[str, str] | None = None,
                dicomweb_servers: dict[str, Any] | None = None, http: int | None = None
                ) -> Iterator[OrthancWeb]:
    """Start Orthanc with DICOMweb on port ``http`` (default: a free one); HTTP Basic when
    ``users`` is given. ``dicomweb_servers`` becomes its ``DicomWeb.Servers`` (STOW peers).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    http = http or free_port()
    config = {
        "Name": "test-pacs", "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"), "HttpPort": http, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {}, "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": dicomweb_servers or {}},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    with (workdir / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(http, timeout=60)
            yield OrthancWeb(http, users or {}, proc)
        finally:
            proc.terminate()
            proc.wait(30)


class Orthanc:
    """A running Orthanc server (see :func:`start_orthanc`)."""

    http: int
    dicom: int
    proc: subprocess.Popen[bytes]
    log: object

    def request(self, method: str, path: str, body: bytes | None = None) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method=method)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()  # type: ignore[attr-defined]


def start_orthanc(workdir: Path, node_port: int, dicom_port: int) -> Orthanc:
    """Start Orthanc on a fixed DICOM port (the node's configuration names it)."""
    orthanc = Orthanc.__new__(Orthanc)
    orthanc.http, orthanc.dicom = free_port(), dicom_port
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "test-pacs", "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"), "HttpPort": orthanc.http,
        "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
        "DicomModalities": {"fracture": ["FRACTURE_NODE", "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    orthanc.log = (workdir / "orthanc.log").open("wb")
    orthanc.proc = subprocess.Popen([ORTHANC, str(path)], stdout=orthanc.log,
                                    stderr=subprocess.STDOUT)
    wait_for_port(orthanc.http, timeout=60)
    wait_for_port(dicom_port, timeout=60)
    return orthanc
