"""The STOW-RS service: Orthanc stores a study into the node; bad parts and clients refused."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from fracture_node.config import Config
from fracture_node.db import schema as s
from fracture_node.db.store import Store
from fracture_node.destination import Destination
from fracture_node.dicom.stow import stow_many
from fracture_node.metrics import Metrics
from fracture_node.spool import Spool
from fracture_node.web.server import HttpServer, node_server
from fracture_node.web.stow import stow_service
from tests.support.node import node_config, sample_study
from tests.support.orthanc import orthanc_web
from tests.support.scp import Pki
from tests.support.web import PASSWORDS, basic, web_config

DICOM_JSON = "application/dicom+json"
BOUNDARY = "fn-test-boundary-1234"


class WebNode:
    """The receiving half of a node with ``[http] stow_rs`` on, served on loopback."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database_url)
        self.spool = Spool(config.spool_dir, fsync=True, min_free_bytes=0)
        self.metrics = Metrics()
        service = stow_service(config, self.store, self.spool, lambda: None, self.metrics)
        routers, extra = service.mount() if service else ((), {})
        self.server: HttpServer = node_server(config, self.store, routers=routers, extra=extra)
        self.server.start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()
        self.store.dispose()


def _web_node(tmp_path: Path, db_url: str, **http: Any) -> WebNode:
    base = node_config(tmp_path, db_url)
    config = web_config(base.node.state_dir, base, **{"stow_rs": True, **http})
    return WebNode(config)


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[WebNode]:
    """A node serving STOW-RS over the database of ``db_url`` (SQLite, then PostgreSQL)."""
    n = _web_node(tmp_path, db_url)
    yield n
    n.stop()


@pytest.fixture
def sqlite_node(tmp_path: Path, sqlite_url: str) -> Iterator[WebNode]:
    """A node serving STOW-RS over SQLite."""
    n = _web_node(tmp_path, sqlite_url)
    yield n
    n.stop()


def _instances(samples_dir: Path, n: int, study_uid: str | None = None) -> list[bytes]:
    """``n`` PS3.10 files of one study, made from the 16 x 16 CR sample."""
    out = []
    for ds in sample_study(samples_dir, n, study_uid):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _body(parts: list[tuple[str, bytes]], close: bool = True) -> bytes:
    out = b""
    for ctype, data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _post(node: WebNode, parts: list[tuple[str, bytes]], path: str = "/dicom-web/studies",
          auth: tuple[str, str] | None = ("sam", PASSWORDS["sam"]), close: bool = True,
          content_type: str | None = None) -> httpx.Response:
    ctype = content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return httpx.post(node.url + path, content=_body(parts, close), auth=auth,
                      headers={"Content-Type": ctype, "Accept": DICOM_JSON}, timeout=30)


def _sequence(answer: httpx.Response, tag: str) -> list[dict[str, Any]]:
    return list(answer.json().get(tag, {}).get("Value", []))


def _listed(answer: httpx.Response, tag: str) -> list[str]:
    return [item["00081155"]["Value"][0] for item in _sequence(answer, tag)
            if item.get("00081155", {}).get("Value")]


def test_orthanc_stores_a_study_into_the_node_over_stow_rs(
        node: WebNode, samples_dir: Path, tmp_path: Path) -> None:
    """Orthanc's /dicom-web/servers/{name}/stow stores a whole study: each instance on disk
    with its bytes, in SQL queued for the model, under one released STOW-RS association."""
    files = _instances(samples_dir, 3)
    server = {"fracture": {"Url": node.url + "/dicom-web/", "Username": "sam",
                           "Password": PASSWORDS["sam"]}}
    with orthanc_web(tmp_path / "orthanc", dicomweb_servers=server) as orthanc:
        for data in files:
            orthanc.request("POST", "/instances", data)
        [study_id] = orthanc.request("GET", "/studies")
        orthanc.request("POST", "/dicom-web/servers/fracture/stow",
                        json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    rows = node.store.rows(s.Instance)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(_uid(d) for d in files)
    assert all(r.state == s.QUEUED for r in rows)
    for row in rows:
        data = node.spool.path(row.spool_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
    [assoc] = node.store.rows(s.Association)
    assert (assoc.calling_ae_title, assoc.called_ae_title, assoc.outcome) == (
        "sam", "STOW-RS", "released")
    assert assoc.instances_stored == 3


def test_response_lists_every_stored_instance(sqlite_node: WebNode, samples_dir: Path) -> None:
    """A 200 in application/dicom+json names each stored instance with its SOP class."""
    files = _instances(samples_dir, 2)
    answer = _post(sqlite_node, [("application/dicom", d) for d in files])
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith(DICOM_JSON)
    assert _listed(answer, "00081199") == [_uid(d) for d in files]
    assert "00081198" not in answer.json()
    classes = {i["00081150"]["Value"][0] for i in _sequence(answer, "00081199")}
    assert classes == {"1.2.840.10008.5.1.4.1.1.1"}


def test_unauthenticated_client_is_refused_and_nothing_stored(
        sqlite_node: WebNode, samples_dir: Path) -> None:
    """Without credentials: 401 with a Basic challenge, no instance, no association row."""
    answer = _post(sqlite_node, [("application/dicom", _instances(samples_dir, 1)[0])],
                   auth=None)
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")
    assert sqlite_node.store.rows(s.Instance) == []
    assert sqlite_node.store.rows(s.Association) == []


def test_viewer_may_not_store(sqlite_node: WebNode, samples_dir: Path) -> None:
    """A user without the sender role gets 403 and nothing is stored."""
    answer = _post(sqlite_node, [("application/dicom", _instances(samples_dir, 1)[0])],
                   auth=basic("vera"))
    assert answer.status_code == 403
    assert sqlite_node.store.rows(s.Instance) == []


def test_bad_part_fails_alone_with_its_reason(sqlite_node: WebNode, samples_dir: Path) -> None:
    """A part that is not a DICOM file fails with 0xC000 and a store_failures row; the good
    part beside it is stored; the answer is 202."""
    good = _instances(samples_dir, 1)[0]
    answer = _post(sqlite_node, [("application/dicom", b"not a DICOM file at all"),
                                 ("application/dicom", good)])
    assert answer.status_code == 202
    assert _listed(answer, "00081199") == [_uid(good)]
    [failed] = _sequence(answer, "00081198")
    assert failed["00081197"]["Value"] == [0xC000]
    [failure] = sqlite_node.store.rows(s.StoreFailure)
    assert (failure.status, failure.reason) == (0xC000, "unparseable")
    assert [r.sop_instance_uid for r in sqlite_node.store.rows(s.Instance)] == [_uid(good)]


def test_non_dicom_part_is_refused(sqlite_node: WebNode) -> None:
    """A text/plain part fails with 0xC000 (409: nothing stored)."""
    answer = _post(sqlite_node, [("text/plain", b"hello")])
    assert answer.status_code == 409
    [failed] = _sequence(answer, "00081198")
    assert failed["00081197"]["Value"] == [0xC000]
    assert [f.reason for f in sqlite_node.store.rows(s.StoreFailure)] == ["not_dicom_part"]


def test_other_media_type_is_415(sqlite_node: WebNode, samples_dir: Path) -> None:
    """A request that is not multipart/related; type="application/dicom" gets 415."""
    answer = _post(sqlite_node, [("application/dicom", _instances(samples_dir, 1)[0])],
                   content_type=f"multipart/related; type=\"application/dicom+json\"; "
                                f"boundary={BOUNDARY}")
    assert answer.status_code == 415
    assert sqlite_node.store.rows(s.Instance) == []


def test_instance_of_another_study_fails_with_a900(sqlite_node: WebNode,
                                                   samples_dir: Path) -> None:
    """POST .../studies/{study} refuses an instance of another study with 0xA900."""
    data = _instances(samples_dir, 1)[0]
    answer = _post(sqlite_node, [("application/dicom", data)],
                   path=f"/dicom-web/studies/{generate_uid()}")
    assert answer.status_code == 409
    [failed] = _sequence(answer, "00081198")
    assert failed["00081155"]["Value"] == [_uid(data)]
    assert failed["00081197"]["Value"] == [0xA900]


def test_sop_class_the_node_does_not_store_fails_with_0122(sqlite_node: WebNode,
                                                           samples_dir: Path) -> None:
    """An instance of a SOP class that is not a storage class fails with 0x0122."""
    ds = pydicom.dcmread(io.BytesIO(_instances(samples_dir, 1)[0]))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.20.1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    answer = _post(sqlite_node, [("application/dicom", buf.getvalue())])
    [failed] = _sequence(answer, "00081198")
    assert failed["00081197"]["Value"] == [0x0122]


def test_truncated_body_keeps_whole_parts_and_fails_the_rest(sqlite_node: WebNode,
                                                             samples_dir: Path) -> None:
    """A body cut inside its second part: the first is stored, the cut one is listed as failed,
    and the association row says aborted."""
    first, second = _instances(samples_dir, 2)
    body = _body([("application/dicom", first), ("application/dicom", second)])
    cut = body[: body.index(second) + 100]
    answer = httpx.post(sqlite_node.url + "/dicom-web/studies", content=cut, auth=basic("sam"),
                        headers={"Content-Type": "multipart/related; type=\"application/dicom\""
                                                 f"; boundary={BOUNDARY}"})
    assert answer.status_code == 202
    assert _listed(answer, "00081199") == [_uid(first)]
    [assoc] = sqlite_node.store.rows(s.Association)
    assert assoc.outcome == "aborted"


def test_identical_copy_is_acknowledged_once(sqlite_node: WebNode, samples_dir: Path) -> None:
    """Sending the same instance twice lists it as stored both times and keeps one row."""
    data = _instances(samples_dir, 1)[0]
    for _ in range(2):
        assert _post(sqlite_node, [("application/dicom", data)]).status_code == 200
    [row] = sqlite_node.store.rows(s.Instance)
    assert row.duplicates == 1


def test_stow_rs_is_off_by_default(tmp_path: Path, sqlite_url: str, samples_dir: Path) -> None:
    """With [http] enabled but stow_rs left off, /dicom-web/studies does not exist."""
    n = _web_node(tmp_path, sqlite_url, stow_rs=False)
    try:
        answer = _post(n, [("application/dicom", _instances(samples_dir, 1)[0])])
        assert answer.status_code in (404, 405)
        assert n.store.rows(s.Instance) == []
    finally:
        n.stop()


def test_peer_outside_allowed_peers_is_refused(tmp_path: Path, sqlite_url: str,
                                               samples_dir: Path) -> None:
    """[node] allowed_peers limits STOW-RS clients as it limits C-STORE callers: 403, and a
    rejected associations row, as for a refused caller."""
    base = node_config(tmp_path, sqlite_url)
    base = dataclasses.replace(base, node=dataclasses.replace(
        base.node, allowed_peers=("192.0.2.0/24",)))
    n = WebNode(web_config(base.node.state_dir, base, stow_rs=True))
    try:
        answer = _post(n, [("application/dicom", _instances(samples_dir, 1)[0])])
        assert answer.status_code == 403
        assert n.store.rows(s.Instance) == []
        [assoc] = n.store.rows(s.Association)
        assert (assoc.outcome, assoc.reason, assoc.called_ae_title) == (
            "rejected", "peer_not_allowed", "STOW-RS")
    finally:
        n.stop()


def test_our_stow_client_stores_into_our_service_over_tls(
        tmp_path: Path, sqlite_url: str, samples_dir: Path, pki: Pki) -> None:  # noqa: F811
    """A DICOMweb destination pointing at another node's HTTPS STOW-RS service (verified with
    ca_bundle, Basic as a sender) delivers: the instances are in that node's SQL."""
    base = node_config(tmp_path, sqlite_url)
    config = web_config(base.node.state_dir, base, stow_rs=True, tls=True,
                        certificate=pki.server_cert, private_key=pki.server_key)
    n = WebNode(config)
    try:
        assert n.url.startswith("https://")
        files = [tmp_path / f"{i}.dcm" for i in range(2)]
        for path, data in zip(files, _instances(samples_dir, 2), strict=True):
            path.write_bytes(data)
        dest = Destination(name="peer-node", dicomweb_url=n.url + "/dicom-web", auth="basic",
                           username="sam", secret_env="PEER_PW", ca_bundle=pki.ca)
        outcomes = stow_many(files, dest, timeout_s=20, environ={"PEER_PW": PASSWORDS["sam"]})
        assert [o.ok for o in outcomes] == [True, True]
        assert len(n.store.rows(s.Instance)) == 2
    finally:
        n.stop()
