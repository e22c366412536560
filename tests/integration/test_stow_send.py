"""STOW-RS destinations: real Orthanc (DICOMweb plugin) and a local fake for the failures."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from fracture_node.config import Config
from fracture_node.db import audit
from fracture_node.db import schema as s
from fracture_node.destination import Destination
from fracture_node.dicom.report import AlgorithmInfo, ImageFinding, build_report, write_report
from fracture_node.dicom.stow import stow_many
from fracture_node.metrics import Metrics
from tests.support import free_port
from tests.support.node import Node, node_config, sample_study
from tests.support.orthanc import OrthancWeb, orthanc_web
from tests.support.stow_fake import fake_stow, response

PASSWORD = "s3cret-Pa55"


def web(url: str, **kw: object) -> Destination:
    return Destination(name="web", dicomweb_url=url, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sr_files(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two reports of one study, built from a real CR header and written to disk."""
    src = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)
    folder = tmp_path_factory.mktemp("sr")
    out = []
    for n in (1, 2):
        sr = build_report(
            [src], [ImageFinding(src.SOPInstanceUID, src.SOPClassUID, 0.9, True)], [],
            AlgorithmInfo("fracture-densenet", "1.4.0", "ab" * 32, 0.42, "balanced"),
            version=1, series_instance_uid=generate_uid(),
            device_observer_uid=generate_uid(), station_ae_title="FRACTURE_NODE",
            software_version="0.1.0")
        write_report(sr, folder / f"sr{n}.dcm")
        out.append(folder / f"sr{n}.dcm")
    return out


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancWeb]:
    """Orthanc with DICOMweb and HTTP Basic on (user ``fn``)."""
    with orthanc_web(tmp_path / "orthanc", users={"fn": PASSWORD}) as running:
        yield running


def _uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def test_orthanc_stores_both_reports_and_lists_them_in_qido(
        orthanc: OrthancWeb, sr_files: list[Path], tmp_path: Path) -> None:
    """Basic auth with the password from a file: Orthanc stores both SRs, QIDO-RS lists them."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    dest = web(orthanc.dicomweb_url, auth="basic", username="fn", secret_file=secret)
    outcomes = stow_many(sr_files, dest, timeout_s=20)
    assert [o.ok for o in outcomes] == [True, True]
    study = str(pydicom.dcmread(sr_files[0], stop_before_pixels=True).StudyInstanceUID)
    found = {i["00080018"]["Value"][0] for i in orthanc.study_instances(study)}
    assert found == set(_uids(sr_files))


def test_wrong_password_fails_with_401_and_never_shows_the_secret(
        orthanc: OrthancWeb, sr_files: list[Path]) -> None:
    """Orthanc refuses a wrong password: each object fails with HTTP 401, the secret in no log
    line or error, and nothing is stored."""
    wrong = "not-the-Pa55word"
    dest = web(orthanc.dicomweb_url, auth="basic", username="fn", secret_env="PACS_PASSWORD")
    with capture_logs() as logs:
        outcomes = stow_many(sr_files, dest, timeout_s=20, environ={"PACS_PASSWORD": wrong})
    assert not any(o.ok for o in outcomes)
    assert all("HTTP 401" in (o.error or "") for o in outcomes)
    assert wrong not in repr(outcomes) and wrong not in repr(logs)
    assert orthanc.request("GET", "/instances") == []


def test_failed_sop_sequence_fails_that_instance_with_its_reason(sr_files: list[Path]) -> None:
    """A 200 whose FailedSOPSequence names one object fails that one with the Failure Reason
    as status; the other, referenced, is stored."""
    with fake_stow(lambda ds: (200, response([ds[1]], [(ds[0], 0xA700)]))) as server:
        first, second = stow_many(sr_files, web(server.url), timeout_s=10)
    assert not first.ok and first.status == 0xA700
    assert "FailedSOPSequence" in (first.error or "") and "0xA700" in (first.error or "")
    assert second.ok and second.status == 0


def test_instance_missing_from_referenced_sop_sequence_is_not_delivered(
        sr_files: list[Path]) -> None:
    """A 200 that lists only one of two objects leaves the other not confirmed, so failed."""
    with fake_stow(lambda ds: (200, response([ds[0]]))) as server:
        first, second = stow_many(sr_files, web(server.url), timeout_s=10)
    assert first.ok
    assert not second.ok and "does not list the instance" in (second.error or "")


def test_200_without_a_response_document_stores_nothing(sr_files: list[Path]) -> None:
    """A bare 200 (no DICOM JSON body) confirms nothing: every object fails."""
    with fake_stow(lambda ds: (200, None)) as server:
        outcomes = stow_many(sr_files, web(server.url), timeout_s=10)
    assert [o.ok for o in outcomes] == [False, False]


@pytest.mark.parametrize("code", [400, 503])
def test_http_error_status_fails_every_object_with_it(sr_files: list[Path], code: int) -> None:
    """A 4xx or 5xx answer fails each object, the error naming the HTTP status."""
    with fake_stow(lambda ds: (code, None)) as server:
        outcomes = stow_many(sr_files, web(server.url), timeout_s=10)
    assert not any(o.ok for o in outcomes)
    assert all(f"HTTP {code}" in (o.error or "") and o.status is None for o in outcomes)


def test_409_still_counts_the_instances_it_stored(sr_files: list[Path]) -> None:
    """A 409 Conflict that references one object and fails the other stores the first."""
    with fake_stow(lambda ds: (409, response([ds[0]], [(ds[1], 0xC122)]))) as server:
        first, second = stow_many(sr_files, web(server.url), timeout_s=10)
    assert first.ok and not second.ok and second.status == 0xC122


def test_destination_that_is_down_fails_with_cannot_connect(sr_files: list[Path]) -> None:
    """Nothing listening on the port: each object fails with "cannot connect"."""
    dest = web(f"http://127.0.0.1:{free_port()}/dicom-web")
    outcomes = stow_many(sr_files, dest, timeout_s=5)
    assert all(not o.ok and "cannot connect" in (o.error or "") for o in outcomes)


def test_sr_and_overlays_go_in_one_request_to_the_study(sr_files: list[Path]) -> None:
    """Every object of a delivery goes in one POST to .../studies/{StudyInstanceUID}."""
    with fake_stow() as server:
        outcomes = stow_many(sr_files, web(server.url + "/"), timeout_s=10)
    assert all(o.ok for o in outcomes)
    [request] = server.received
    study = request["datasets"][0].StudyInstanceUID
    assert request["path"] == f"/dicom-web/studies/{study}"
    assert [str(d.SOPInstanceUID) for d in request["datasets"]] == _uids(sr_files)


def test_bearer_token_from_the_environment_is_sent(sr_files: list[Path]) -> None:
    """auth = "bearer" sends "Authorization: Bearer <token>" and the objects are stored."""
    with fake_stow(token="tok-123") as server:
        dest = web(server.url, auth="bearer", secret_env="PACS_TOKEN")
        outcomes = stow_many(sr_files, dest, timeout_s=10, environ={"PACS_TOKEN": "tok-123"})
    assert all(o.ok for o in outcomes)
    assert server.received[0]["authorization"] == "Bearer tok-123"


def test_wrong_bearer_token_fails_with_401_without_showing_it(sr_files: list[Path]) -> None:
    """A refused token fails each object with HTTP 401; the token is in no error or log."""
    with fake_stow(token="tok-123") as server, capture_logs() as logs:
        dest = web(server.url, auth="bearer", secret_env="PACS_TOKEN")
        outcomes = stow_many(sr_files, dest, timeout_s=10, environ={"PACS_TOKEN": "tok-999"})
    assert all("HTTP 401" in (o.error or "") for o in outcomes)
    assert "tok-999" not in repr(outcomes) + repr(logs)


def test_missing_secret_file_fails_the_attempt_naming_the_file(sr_files: list[Path],
                                                                tmp_path: Path) -> None:
    """A secret file deleted after start-up fails the attempt (retried later), naming it."""
    gone = tmp_path / "token"
    with fake_stow() as server:
        dest = web(server.url, auth="bearer", secret_file=gone)
        outcomes = stow_many(sr_files, dest, timeout_s=10)
        assert server.received == []
    assert all(not o.ok and str(gone) in (o.error or "") for o in outcomes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost: (ca, cert, key)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-subj",
            "/CN=Test CA", "-days", "2", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-subj",
            "/CN=localhost", "-out", "server.csr")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "server.ext",
            "-out", "server.crt")
    return d / "ca.crt", d / "server.crt", d / "server.key"


def _server_tls(pki: tuple[Path, Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki[1]), str(pki[2]))
    return ctx


def test_https_destination_verified_with_ca_bundle_is_delivered(
        sr_files: list[Path], pki: tuple[Path, Path, Path]) -> None:
    """Over https, a server certificate signed by ca_bundle is accepted."""
    with fake_stow(tls=_server_tls(pki)) as server:
        outcomes = stow_many(sr_files, web(server.url, ca_bundle=pki[0]), timeout_s=10)
    assert all(o.ok for o in outcomes)


def test_https_destination_not_signed_by_a_trusted_ca_fails_tls(
        sr_files: list[Path], pki: tuple[Path, Path, Path]) -> None:
    """Without its CA in the trust store, the server's certificate fails the TLS check."""
    with fake_stow(tls=_server_tls(pki)) as server:
        outcomes = stow_many(sr_files, web(server.url), timeout_s=10)
        assert server.received == []
    assert all(not o.ok and "TLS" in (o.error or "") for o in outcomes)


# Through the delivery stage ------------------------------------------------------------------


def _web_node(tmp_path: Path, db_url: str, model: Path, dest: Destination,
              deadline_s: float = 3600.0, metrics: Metrics | None = None) -> Node:
    config = node_config(tmp_path, db_url)
    config = dataclasses.replace(
        config, destinations=(dest,), model=dataclasses.replace(config.model, path=model),
        study=dataclasses.replace(config.study, stable_after_s=0.0),
        delivery=dataclasses.replace(config.delivery, first_retry_s=0.2, max_retry_s=0.4,
                                     timeout_s=5.0, deadline_s=deadline_s))
    node = Node(Config.validate(config), model)
    node.deliverer.metrics = metrics
    return node


def test_report_is_delivered_into_the_study_in_orthanc(
        tmp_path: Path, db_url: str, tiny_model: Path, samples_dir: Path,
        orthanc: OrthancWeb) -> None:
    """A scored study's SR goes to Orthanc by STOW-RS and is found in that study by QIDO-RS."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    dest = Destination(name="orthanc-web", dicomweb_url=orthanc.dicomweb_url, auth="basic",
                       username="fn", secret_file=secret)
    node = _web_node(tmp_path, db_url, tiny_model, dest)
    try:
        study = sample_study(samples_dir, 2)
        for ds in study:
            node.add(ds)
        node.drain()
        assert node.reporter.run_once() == 1
        assert node.deliverer.run_once() == 1
        [report] = node.store.rows(s.Report)
        [attempt] = node.store.rows(s.DeliveryAttempt)
        assert attempt.ok and attempt.status == 0
    finally:
        node.close()
    found = orthanc.study_instances(study[0].StudyInstanceUID)
    assert [i["00080018"]["Value"][0] for i in found] == [report.sop_instance_uid]
    assert found[0]["00080060"]["Value"] == ["SR"]


def test_refused_stow_is_retried_dead_lettered_audited_and_counted(
        tmp_path: Path, sqlite_url: str, tiny_model: Path, samples_dir: Path) -> None:
    """A destination that keeps answering with a FailedSOPSequence: attempts recorded with the
    reason, backed off, dead-lettered at the deadline, listed by `audit deliveries`, counted
    in the metrics; after `retry` and a healthy answer, delivered."""
    refuse = True

    def answer(ds: list[pydicom.Dataset]) -> tuple[int, dict[str, object]]:
        return (200, response([], [(ds[0], 0xA700)])) if refuse else (200, response(ds))

    metrics = Metrics()
    with fake_stow(answer) as server:
        node = _web_node(tmp_path, sqlite_url, tiny_model, web(server.url), deadline_s=1.5,
                         metrics=metrics)
        try:
            node.add(sample_study(samples_dir, 1)[0])
            node.drain()
            node.reporter.run_once()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not node.store.delivery_states().get(s.DEAD):
                node.deliverer.run_once()
                time.sleep(0.1)
            attempts = node.store.rows(s.DeliveryAttempt)
            assert node.store.delivery_states() == {s.DEAD: 1}
            assert len(attempts) >= 2 and not any(a.ok for a in attempts)
            assert all(a.status == 0xA700 and "FailedSOPSequence" in a.error for a in attempts)
            gaps = [(b.attempted_at - a.attempted_at).total_seconds()
                    for a, b in zip(attempts, attempts[1:], strict=False)]
            assert min(gaps) >= 0.15
            failed = metrics.deliveries.labels("web", "failed")._value.get()
            assert failed == len(attempts)
            now = dt.datetime.now(dt.UTC)
            with audit.Audit(sqlite_url) as auditor:
                [row] = auditor.ask("deliveries", now - dt.timedelta(hours=1), now)
            assert row["state"] == s.DEAD and row["destination"] == "web"
            assert row["last_status"] == 0xA700 and "0xA700" in row["last_error"]
            refuse = False
            assert node.store.retry_dead_deliveries(deadline_s=60) == 1
            assert node.deliverer.run_once() == 1
            assert len(server.received) == len(attempts) + 1
        finally:
            node.close()


def test_sr_and_both_overlays_arrive_in_the_study_in_orthanc(
        tmp_path: Path, sqlite_url: str, saliency_model: Path, samples_dir: Path,
        orthanc: OrthancWeb) -> None:
    """overlays = "both": the SR, a Secondary Capture and a GSPS per image reach the study in
    Orthanc by STOW-RS, each delivery object recorded as stored."""
    from tests.support.saliency import HIP, TINY, saliency_config, saliency_study

    dest = Destination(name="viewer", dicomweb_url=orthanc.dicomweb_url, auth="basic",
                       username="fn", secret_env="ORTHANC_PW", overlays="both")
    config = saliency_config(tmp_path, sqlite_url, saliency_model, [dest])
    node = Node(config, saliency_model)
    try:
        study = saliency_study(samples_dir, [HIP, TINY])
        for ds in study:
            node.add(ds)
        node.drain()
        assert node.reporter.run_once() == 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ORTHANC_PW", PASSWORD)
            assert node.deliverer.run_once() == 1
        carried = node.store.rows(s.DeliveryObject)
        assert len(carried) == 4 and all(c.delivered_at is not None for c in carried)
    finally:
        node.close()
    found = orthanc.study_instances(study[0].StudyInstanceUID)
    classes = sorted(i["00080016"]["Value"][0] for i in found)
    assert classes == sorted(["1.2.840.10008.5.1.4.1.1.88.34",
                              *["1.2.840.10008.5.1.4.1.1.7"] * 2,
                              *["1.2.840.10008.5.1.4.1.1.11.1"] * 2])
