"""Scale-out: one receiver and several worker processes sharing one PostgreSQL and one spool.

The cluster helpers here (:class:`Cluster`, :func:`make_studies`, :func:`push`) are also used by
``benchmarks/scale.py``.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, Association
from sqlalchemy import select, update

from fracture_node.db import migrate
from fracture_node.db import schema as s
from fracture_node.db.reporting import NewReport
from fracture_node.db.store import NewInstance, Store, utcnow
from tests.support import free_port, postgres_database, wait_for_port, wait_until

BIN = Path(sys.executable).with_name("fracture-node")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# Data -------------------------------------------------------------------------------------------
def make_cr(study_uid: str, series_uid: str, number: int, patient_id: str, size: int = 64,
            rng: np.random.Generator | None = None) -> Dataset:
    """A small valid CR image (16-bit, 12 bits stored, explicit VR little endian)."""
    rng = rng or np.random.default_rng()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CR"
    ds.PatientName = "Scale^Test"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.BodyPartExamined = "HAND"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def make_studies(n_studies: int, per_study: int, seed: int = 9) -> list[list[Dataset]]:
    """``n_studies`` studies of ``per_study`` CR images each."""
    rng = np.random.default_rng(seed)
    studies = []
    for k in range(n_studies):
        study, series = generate_uid(), generate_uid()
        studies.append([make_cr(study, series, i + 1, f"SCALE{k:04d}", rng=rng)
                        for i in range(per_study)])
    return studies


def associate(port: int, ae_title: str = "FRACTURE_NODE") -> Association:
    """An association to the receiver, proposing CR Image Storage in explicit VR LE."""
    ae = AE(ae_title="SCALE_SCU")
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.network_timeout = 600
    ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise AssertionError("the receiver refused the association")
    return assoc


def send(assoc: Association, datasets: list[Dataset]) -> None:
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0x0000:
            raise AssertionError(f"C-STORE of {ds.SOPInstanceUID} failed: {status}")


def push(port: int, datasets: list[Dataset], associations: int) -> None:
    """Send ``datasets`` over ``associations`` successive associations, each released."""
    size = -(-len(datasets) // associations)
    for start in range(0, len(datasets), size):
        assoc = associate(port)
        try:
            send(assoc, datasets[start:start + size])
        finally:
            assoc.release()


# Processes --------------------------------------------------------------------------------------
class NodeProcess:
    """One ``fracture-node serve --role ROLE`` process of the cluster."""

    def __init__(self, cluster: Cluster, role: str, index: int) -> None:
        self.role = role
        self.log_path = cluster.root / f"{role}-{index}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN), "serve", "--config", str(cluster.config), "--role", role],
                cwd=cluster.root, stdout=log, stderr=subprocess.STDOUT)
        # A node's name in SQL (fracture_node.dicom.scp.node_name): host, configured port, pid.
        self.name = f"{socket.gethostname()}:{cluster.port}:{self.proc.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"node_started"' in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the {self.role} did not start:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Cluster:
    """One configuration shared by every process: one PostgreSQL database, one spool folder and
    one reports folder (a network file system in production, a local folder here)."""

    def __init__(self, root: Path, db_url: str, model: Path, pacs_port: int | None,
                 *, claim_timeout_s: float = 5.0, max_attempts: int = 5,
                 stable_after_s: float = 1.0, fsync: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.db_url = db_url
        lines = [
            "[node]", f"port = {self.port}", 'bind_address = "127.0.0.1"', 'state_dir = "state"',
            "[storage]", f'spool_dir = "{root / "shared" / "spool"}"',
            f'reports_dir = "{root / "shared" / "reports"}"', f"fsync = {str(fsync).lower()}",
            "min_free_bytes = 0",
            "[database]", f'url = "{db_url}"', "auto_upgrade = false",
            "[model]", f'path = "{model}"', 'device = "cpu"', "max_wait_ms = 50",
            "decode_threads = 1", f"claim_timeout_s = {claim_timeout_s}",
            f"max_attempts = {max_attempts}",
            "[study]", f"stable_after_s = {stable_after_s}",
            "[delivery]", "timeout_s = 5.0", "first_retry_s = 1.0", "max_retry_s = 2.0",
            "[metrics]", "enabled = false",
            "[logging]", 'format = "json"',
        ]
        if pacs_port is not None:
            lines += ["[[destinations]]", 'name = "pacs"', 'ae_title = "PACS"',
                      'host = "127.0.0.1"', f"port = {pacs_port}"]
        self.config = root / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        migrate.upgrade(db_url)  # once, before any node starts (auto_upgrade = false)
        self.store = Store(db_url)
        self.nodes: list[NodeProcess] = []

    def start(self, role: str) -> NodeProcess:
        node = NodeProcess(self, role, len(self.nodes))
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL if node.proc.poll() is None else signal.SIGTERM, 10)
        self.store.dispose()


def results_count(store: Store) -> int:
    return len(store.rows(s.Result))


def everything_done(store: Store, n_instances: int, n_studies: int) -> bool:
    states = store.instance_states()
    if states.get(s.PROCESSED, 0) + states.get(s.NOT_PROCESSED, 0) + states.get(s.FAILED, 0) \
            < n_instances:
        return False
    studies = store.rows(s.Study)
    if len(studies) < n_studies or any(st.report_due for st in studies):
        return False
    deliveries = store.delivery_states()
    return sum(deliveries.values()) == len(store.rows(s.Report)) and set(deliveries) <= {
        s.DELIVERED}


# Fixtures ---------------------------------------------------------------------------------------
@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp playing the PACS (AE title PACS), one file per object received."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+uf", "-aet", "PACS", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port, out
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


# Tests ------------------------------------------------------------------------------------------
N_STUDIES, PER_STUDY = 50, 10


def test_worker_killed_midway_loses_and_duplicates_nothing(
        tmp_path: Path, pg_url: str, tiny_model: Path, pacs: tuple[int, Path]) -> None:
    """With one receiver and two workers, SIGKILL of a worker midway still gives every instance
    one result, every study one report, and every report one delivery."""
    cluster = Cluster(tmp_path / "cluster", pg_url, tiny_model, pacs[0], claim_timeout_s=5.0)
    try:
        _run_kill_scenario(cluster, pacs[1])
    finally:
        cluster.close()


def _run_kill_scenario(cluster: Cluster, pacs_dir: Path) -> None:
    store = cluster.store
    receiver = cluster.start("receiver")
    workers = [cluster.start("worker"), cluster.start("worker")]
    for node in (receiver, *workers):
        node.wait_started()
    wait_for_port(cluster.port)
    assert workers[0].name != workers[1].name

    # The receiver never loads the model: torch is not even mapped into the process.
    maps = Path(f"/proc/{receiver.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert '"worker_started"' not in receiver.log()

    studies = make_studies(N_STUDIES, PER_STUDY)
    # One association brings the first image of every study and stays open until after the
    # kill, so no study is due before it (the kill can then only hit claims, never a delivery
    # in flight, which is at-least-once by nature).
    holder = associate(cluster.port)
    send(holder, [study[0] for study in studies])
    rest = [ds for study in studies for ds in study[1:]]
    pusher = threading.Thread(target=push, args=(cluster.port, rest, 3), daemon=True)
    pusher.start()

    victim = workers[0]
    wait_until(lambda: results_count(store) >= 100, 120, "100 results")
    stranded: list[int] = []
    for _ in range(200):  # freeze the victim while it holds claims, then kill it
        victim.proc.send_signal(signal.SIGSTOP)
        stranded = list(store.run(lambda ses: ses.execute(
            select(s.Instance.id).where(s.Instance.state == s.CLAIMED,
                                        s.Instance.claimed_by == victim.name)).scalars().all()))
        if stranded:
            break
        victim.proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    victim.proc.kill()
    victim.proc.wait(10)
    assert stranded, "the victim never held a claim"
    # systemd (Restart=on-failure) would start it again: a new process, a new name.
    replacement = cluster.start("worker")

    pusher.join(180)
    assert not pusher.is_alive()
    holder.release()

    wait_until(lambda: everything_done(store, N_STUDIES * PER_STUDY, N_STUDIES), 150,
               "all instances scored, all studies reported and delivered")
    replacement.wait_started()
    wait_until(lambda: len(list(pacs_dir.iterdir())) >= N_STUDIES, 30, "SRs at the PACS")

    instances = store.rows(s.Instance)
    results = store.rows(s.Result)
    assert len(instances) == N_STUDIES * PER_STUDY
    assert {i.state for i in instances} == {s.PROCESSED}
    assert len(results) == len(instances)
    assert {r.instance_id for r in results} == {i.id for i in instances}
    by_instance = {r.instance_id: r for r in results}
    # Every claim stranded by the dead worker was taken back and scored by a live one.
    assert all(by_instance[i].worker != victim.name for i in stranded)
    assert all(next(x for x in instances if x.id == i).attempts >= 2 for i in stranded)
    assert {r.worker for r in results} <= {w.name for w in (*workers, replacement)}
    assert len({r.worker for r in results}) >= 2

    reports = store.rows(s.Report)
    assert len(reports) == N_STUDIES
    assert Counter((r.study_instance_uid, r.version) for r in reports).most_common(1)[0][1] == 1
    assert {r.study_instance_uid for r in reports} == {st[0].StudyInstanceUID for st in studies}
    assert all((r.version, r.instances_total, r.instances_unprocessed) == (1, PER_STUDY, 0)
               for r in reports)

    deliveries = store.rows(s.Delivery)
    assert len(deliveries) == len(reports)
    assert {d.state for d in deliveries} == {s.DELIVERED}
    ok = Counter(a.delivery_id for a in store.rows(s.DeliveryAttempt) if a.ok)
    assert sorted(ok.values()) == [1] * len(deliveries)
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs_dir.iterdir()]
    assert len(received) == len(reports)
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(
        r.sop_instance_uid for r in reports)

    for node in (receiver, workers[1], replacement):
        assert node.stop() == 0


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    migrate.upgrade(pg_url)
    store = Store(pg_url)
    yield store
    store.dispose()


def _study_left_open(store: Store, node: str) -> tuple[str, int]:
    """A finished study whose only association is still open in SQL, its receiver ``node``
    gone ten minutes ago; returns the Study Instance UID and the association id."""
    assoc = store.open_association(node=node, calling_ae_title="PACS",
                                   called_ae_title="FRACTURE_NODE", peer_address="127.0.0.1",
                                   peer_port=1)
    study = generate_uid()
    past = utcnow() - dt.timedelta(minutes=10)
    store.add_instance(NewInstance(
        sop_instance_uid=generate_uid(), sop_class_uid=CR_IMAGE_STORAGE, study_instance_uid=study,
        series_instance_uid=None, transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR",
        size_bytes=1, sha256="0" * 64, spool_path="x.dcm", received_at=past,
        association_id=assoc))
    [claimed] = store.claim_instances("w", 1)
    store.finish_unprocessed("w", claimed.id, s.NOT_PROCESSED, "test", None)
    store.run(lambda ses: ses.execute(update(s.Association).where(s.Association.id == assoc)
                                       .values(started_at=past)))
    return study, assoc


def test_silent_open_association_stops_blocking_its_study(pg_store: Store) -> None:
    """An association left open by a receiver that never came back blocks its study only until
    it has been silent for the bound (network + DIMSE timeouts)."""
    study, _ = _study_left_open(pg_store, f"{socket.gethostname()}:11112:999999")
    now = utcnow()
    assert pg_store.due_studies(now, association_silence_s=None) == []
    assert pg_store.due_studies(now, association_silence_s=3600) == []
    assert pg_store.due_studies(now) == [study]


def test_restarted_receiver_interrupts_associations_of_its_previous_run(pg_store: Store) -> None:
    """A receiver restarting on the same host and port (a new pid) closes the associations its
    previous process left open, and only those."""
    host = socket.gethostname()
    study, assoc = _study_left_open(pg_store, f"{host}:11112:999999")
    other, _ = _study_left_open(pg_store, f"{host}:11113:999999")
    assert pg_store.interrupt_open_associations(f"{host}:11112:{os.getpid()}") == 1
    [row] = pg_store.rows(s.Association, s.Association.id == assoc)
    assert row.outcome == "interrupted"
    assert pg_store.due_studies(utcnow(), association_silence_s=None) == [study]


def test_heartbeat_keeps_a_live_workers_claims_and_dead_ones_are_taken_back(
        pg_store: Store) -> None:
    """Claims renewed by their (live) worker survive the claim timeout; the others return to
    the queue."""
    for _ in range(2):
        _study_left_open(pg_store, "receiver:1:1")
    ids = [i.id for i in pg_store.rows(s.Instance)]
    pg_store.run(lambda ses: ses.execute(update(s.Instance).values(state=s.QUEUED)))
    [live] = pg_store.claim_instances("live", 1)
    [dead] = pg_store.claim_instances("dead", 1)
    old = utcnow() - dt.timedelta(minutes=5)
    pg_store.run(lambda ses: ses.execute(update(s.Instance).where(s.Instance.id.in_(ids))
                                          .values(claimed_at=old)))
    assert pg_store.renew_claims("live", [live.id, dead.id]) == 1
    assert pg_store.take_back_stale_claims(dt.timedelta(minutes=1), max_attempts=3) == (1, 0)
    states = {i.id: (i.state, i.claimed_by) for i in pg_store.rows(s.Instance)}
    assert states == {live.id: (s.CLAIMED, "live"), dead.id: (s.QUEUED, None)}


def test_study_reported_by_another_node_meanwhile_is_not_reported_again(
        pg_store: Store) -> None:
    """A reporter that listed a study as due before another node reported it makes no second
    report (neither from a fresh snapshot nor from its stale one)."""
    study, assoc = _study_left_open(pg_store, "receiver:1:1")
    pg_store.close_association(assoc, "released")
    [due] = pg_store.due_studies(utcnow())
    stale = pg_store.study_snapshot(due)
    assert stale is not None

    def report(version: int) -> NewReport:
        return NewReport(study_instance_uid=study, version=version,
                         sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                         path="r.dcm", instances_total=1, instances_positive=0,
                         instances_unprocessed=1, max_probability=None, model_sha256=None)

    assert pg_store.add_report(stale, report(1), "other-node", ["pacs"], 60) is not None
    assert pg_store.study_snapshot(due) is None
    assert pg_store.add_report(stale, report(1), "this-node", ["pacs"], 60) is None
    assert [r.version for r in pg_store.rows(s.Report)] == [1]
