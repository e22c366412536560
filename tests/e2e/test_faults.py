"""Faults around a real ``fracture-node serve`` process: kill -9 under load, SIGTERM while an
association is in flight, an unreachable PACS, and patient data on the failure paths.

The node runs the small real model (``tiny_model``) on its embedded SQLite database; DCMTK
storescp plays the PACS. The disk-full and database-outage faults are tested one level down
(tests/integration/test_scp.py with an injected ENOSPC: a real small file system needs mount
privileges; tests/integration/test_db_outage.py with a TCP proxy before PostgreSQL).
"""

from __future__ import annotations

import collections
import copy
import io
import os
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from fracture_node.db import schema as s
from fracture_node.db.store import Store
from fracture_node.spool import Spool
from tests.support import free_port, wait_for_port
from tests.support.serve import BIN, ServeProcess, make_study, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = "CR_cspine_tiny16x16_explicitVR.dcm"
SENDERS = 3
KILL_AFTER_S = (0.3, 1.5, 3.0)
"""One round per value: SIGKILL this long after the round's 12th acknowledgement (early: mid
store; later: while studies are scored, reported and delivered)."""


def _node(workdir: Path, model: Path, destinations: list[tuple[str, str, int]],
          node_extra: str = "", extra: str = "") -> ServeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    serve = ServeProcess(workdir, destinations, extra=extra, model=model)
    if node_extra:
        text = serve.config.read_text().replace("[node]\n", f"[node]\n{node_extra}\n", 1)
        serve.config.write_text(text)
    return serve


def _store(serve: ServeProcess) -> Store:
    return Store(f"sqlite:///{serve.workdir / 'state' / 'fracture-node.db'}")


def _kill(serve: ServeProcess) -> None:
    if serve.proc is not None and serve.proc.poll() is None:
        serve.proc.kill()
        serve.proc.wait(30)


# kill -9 under load ----------------------------------------------------------------------------


class Sender(threading.Thread):
    """Pushes new instances of its own studies until stopped; remembers what was answered."""

    def __init__(self, port: int, template: pydicom.Dataset, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.template, self.name_ = port, template, name
        self.acknowledged: list[tuple[str, str]] = []  # (study, sop instance) answered 0x0000
        self.unanswered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title=self.name_)
        ae.add_requested_context(self.template.SOPClassUID,
                                 self.template.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        while not self.stop.is_set():
            study = generate_uid()
            try:
                assoc = ae.associate("127.0.0.1", self.port, ae_title="FRACTURE_NODE")
            except Exception:
                assoc = None
            if assoc is None or not assoc.is_established:
                time.sleep(0.1)
                continue
            try:
                for _ in range(4):
                    ds = copy.deepcopy(self.template)
                    ds.StudyInstanceUID = study
                    ds.SOPInstanceUID = uid = generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = uid
                    try:
                        rsp = assoc.send_c_store(ds)
                    except Exception:
                        rsp = pydicom.Dataset()
                    if int(rsp.get("Status", -1)) == 0x0000:
                        self.acknowledged.append((study, str(uid)))
                    else:
                        self.unanswered += 1
                        break
            finally:
                if assoc.is_established:
                    assoc.release()


def test_kill_9_under_load_loses_and_doubles_nothing(tmp_path: Path, tiny_model: Path,
                                                      storescp: tuple[int, Path],
                                                      samples_dir: Path) -> None:
    """Killed with SIGKILL while several senders push (3 rounds), the node restarts and gives
    every instance it acknowledged exactly one result, in a delivered report, nothing twice."""
    pacs_port, pacs_dir = storescp
    # Three kills can catch one instance in hand three times; max_attempts (the guard against
    # an image that crashes the node) must stay above that for "every acknowledged instance is
    # scored" to be this test's invariant.
    serve = _node(tmp_path / "node", tiny_model, [("pacs", "PACS", pacs_port)])
    serve.config.write_text(serve.config.read_text().replace(
        "[model]\n", f"[model]\nmax_attempts = {len(KILL_AFTER_S) + 1}\n", 1))
    template = pydicom.dcmread(samples_dir / TINY)
    template.PatientName, template.PatientID = "Kill^Nine", "PIDKILL9"
    acknowledged: list[tuple[str, str]] = []
    unanswered = 0
    try:
        for kill_after_s in KILL_AFTER_S:
            serve.start()
            senders = [Sender(serve.port, template, f"SENDER{i}") for i in range(SENDERS)]
            for sender in senders:
                sender.start()
            wait_until(lambda senders=senders: sum(len(x.acknowledged) for x in senders) >= 12,
                       timeout=120, interval=0.05)
            time.sleep(kill_after_s)
            assert serve.proc is not None
            serve.proc.send_signal(signal.SIGKILL)
            serve.proc.wait(30)
            for sender in senders:
                sender.stop.set()
            for sender in senders:
                sender.join(60)
                acknowledged += sender.acknowledged
                unanswered += sender.unanswered
        serve.start()
        studies = {study for study, _ in acknowledged}
        store = _store(serve)

        def settled() -> bool:
            reports = store.rows(s.Report)
            deliveries = store.rows(s.Delivery)
            reported = {r.study_instance_uid for r in reports}
            return (studies <= reported and not store.rows(s.Study, s.Study.report_due.is_(True))
                    and all(d.state == s.DELIVERED for d in deliveries))

        wait_until(settled, timeout=240, interval=0.5)
        instances = store.rows(s.Instance)
        results = store.rows(s.Result)
        reports = store.rows(s.Report)
        store.dispose()
    finally:
        _kill(serve)
    spool = Spool(serve.workdir / "state" / "spool", fsync=False)
    leftovers = spool.sweep_temporaries(older_than_s=0)
    assert list(spool.root.glob("*/.tmp-*")) == []

    current = collections.Counter(i.sop_instance_uid for i in instances
                                  if i.state != s.SUPERSEDED)
    by_uid = {i.sop_instance_uid: i for i in instances if i.state != s.SUPERSEDED}
    result_count = collections.Counter(r.instance_id for r in results)
    acked_uids = [uid for _, uid in acknowledged]
    assert len(acked_uids) == len(set(acked_uids))
    missing = [uid for uid in acked_uids if uid not in by_uid]
    assert missing == [], "acknowledged instances lost"
    assert all(n == 1 for n in current.values()), "an instance recorded twice"
    assert all(n == 1 for n in result_count.values()), "an instance scored twice"
    finals = collections.Counter(by_uid[uid].state for uid in acked_uids)
    assert set(finals) <= {s.PROCESSED, s.NOT_PROCESSED}, collections.Counter(
        (i.state, i.reason, i.attempts) for i in by_uid.values())
    assert all(result_count[by_uid[uid].id] == (by_uid[uid].state == s.PROCESSED)
               for uid in acked_uids)
    versions = collections.Counter((r.study_instance_uid, r.version) for r in reports)
    assert all(n == 1 for n in versions.values())

    # Every acknowledged instance is in the latest SR the PACS received for its study.
    latest: dict[str, pydicom.Dataset] = {}
    for path in pacs_dir.iterdir():
        sr = pydicom.dcmread(path)
        if (sr.StudyInstanceUID not in latest
                or int(sr.InstanceNumber) > int(latest[sr.StudyInstanceUID].InstanceNumber)):
            latest[sr.StudyInstanceUID] = sr
    not_in_report = [uid for study, uid in acknowledged
                     if study not in latest or uid not in str(latest[study])]
    assert not_in_report == []
    received_srs = collections.Counter(p.name for p in pacs_dir.iterdir())
    print(f"\nkill -9: {len(KILL_AFTER_S)} rounds, {SENDERS} senders; acknowledged {len(acked_uids)} "
          f"instances in {len(studies)} studies; unanswered (cut by the kill) {unanswered}; "
          f"states {dict(finals)}; results {sum(result_count.values())} for "
          f"{len(result_count)} instances; reports {len(reports)}; SRs at the PACS "
          f"{len(received_srs)}; instance rows recorded twice 0; interrupted temporary files "
          f"swept {leftovers}")


# SIGTERM drains -------------------------------------------------------------------------------


def test_sigterm_lets_the_association_in_flight_finish(tmp_path: Path, tiny_model: Path,
                                                       samples_dir: Path) -> None:
    """After SIGTERM an established association still gets its stores answered and recorded,
    new connections are refused, and the process exits 0 once it is released."""
    serve = _node(tmp_path / "node", tiny_model, [])
    serve.start()
    try:
        files = make_study(samples_dir, tmp_path / "study", [TINY] * 3)
        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title="DRAIN")
        ae.add_requested_context(datasets[0].SOPClassUID,
                                 datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", serve.port, ae_title="FRACTURE_NODE")
        assert assoc.is_established
        assert int(assoc.send_c_store(datasets[0]).Status) == 0
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "node_stopping" in serve.log(), timeout=30)
        time.sleep(0.5)
        late = AE(ae_title="LATE")
        late.add_requested_context(Verification)
        assert not late.associate("127.0.0.1", serve.port, ae_title="FRACTURE_NODE").is_established
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets[1:]] == [0, 0]
        assoc.release()
        assert serve.proc.wait(60) == 0
        store = _store(serve)
        uids = {r.sop_instance_uid for r in store.rows(s.Instance)}
        [row] = store.rows(s.Association, s.Association.calling_ae_title == "DRAIN")
        store.dispose()
        assert uids == {str(ds.SOPInstanceUID) for ds in datasets}
        assert row.outcome == "released" and row.instances_stored == 3
    finally:
        _kill(serve)


# PACS unreachable ------------------------------------------------------------------------------


def test_unreachable_pacs_is_retried_dead_lettered_then_resent(tmp_path: Path, tiny_model: Path,
                                                               samples_dir: Path) -> None:
    """Deliveries to a PACS that does not answer are retried with back-off, dead-lettered at
    the deadline, and sent by the running node after `fracture-node retry`."""
    pacs_port = free_port()
    serve = _node(tmp_path / "node", tiny_model, [("pacs", "PACS", pacs_port)],
                  extra="[delivery]\ntimeout_s = 2.0\nfirst_retry_s = 0.5\nmax_retry_s = 1.0\n"
                        "deadline_s = 3.0\n")
    serve.start()
    pacs: subprocess.Popen[bytes] | None = None
    try:
        files = make_study(samples_dir, tmp_path / "study", [TINY])
        subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(serve.port),
                        *map(str, files)], capture_output=True, timeout=60, check=True)
        store = _store(serve)
        wait_until(lambda: store.delivery_states().get(s.DEAD), timeout=120)
        attempts = store.rows(s.DeliveryAttempt)
        assert len(attempts) >= 2 and not any(a.ok for a in attempts)
        assert all("cannot connect" in (a.error or "") for a in attempts)

        out = tmp_path / "pacs"
        out.mkdir()
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(pacs_port)
        proc = subprocess.run([str(BIN), "retry", "--config", str(serve.config),
                               "--destination", "pacs"],
                              capture_output=True, text=True, timeout=120, cwd=serve.workdir)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("1 ")
        wait_until(lambda: list(out.iterdir()), timeout=60)
        wait_until(lambda: store.delivery_states() == {s.DELIVERED: 1}, timeout=30)
        attempts = store.rows(s.DeliveryAttempt)
        store.dispose()
        assert [a.ok for a in attempts][-1] is True
        assert sum(a.ok for a in attempts) == 1
    finally:
        _kill(serve)
        if pacs is not None:
            pacs.terminate()
            pacs.wait(10)


# Patient data on the failure paths -------------------------------------------------------------

SECRETS = ("Zyxwv", "Quentin", "PIDSECRET77", "19700101")


@pytest.fixture
def chunked_sending() -> Iterator[None]:
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def _broken_variants(path: Path, out: Path) -> list[Path]:
    """Copies of a file broken at the patient's name (explicit VR: tag, VR, 2-byte length,
    value): truncated, garbage from there on, a wrong length, a huge length, a wrong VR."""
    raw = path.read_bytes()
    at = raw.index(b"Zyxwv")
    variants = {
        "truncated": raw[:at + 20],
        "garbage": raw[:at + 14] + os.urandom(3000),
        "wrong_length": raw[:at - 2] + b"\xff\xff" + raw[at:],
        "huge_length": raw[:at - 4] + b"UN\x00\x00" + b"\xf0\xff\xff\x7f" + raw[at:],
        "wrong_vr": raw[:at - 4] + b"SQ" + raw[at - 2:],
    }
    paths = []
    for name, data in variants.items():
        p = out / f"{name}.dcm"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_no_patient_data_on_failure_paths(tmp_path: Path, tiny_model: Path, samples_dir: Path,
                                          chunked_sending: None) -> None:
    """Malformed objects, a rejected association and failing deliveries leave the patient's
    name, ID and birth date in no log line, metric, SQL column or exception message."""
    serve = _node(tmp_path / "node", tiny_model, [("pacs", "PACS", free_port())],
                  node_extra='allowed_calling_ae_titles = ["GOOD_SCU", "STORESCU"]',
                  extra="[delivery]\ntimeout_s = 2.0\nfirst_retry_s = 0.5\nmax_retry_s = 1.0\n"
                        "deadline_s = 3.0\n")
    serve.start()
    try:
        names = [TINY, "malformed/CR_hip_RG2_JPLY_badSOS_undecodable.dcm",
                 "malformed/DX_chest_J2KR_966_broken_j2k_stream.dcm",
                 "negative_controls/US_rgb_uncompressed.dcm"]
        files = make_study(samples_dir, tmp_path / "study", names, patient="Zyxwv^Quentin",
                           patient_id="PIDSECRET77")
        broken = _broken_variants(files[0], tmp_path)
        ae = AE(ae_title="GOOD_SCU")
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", serve.port, ae_title="FRACTURE_NODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).get("Status", -1)) for f in [*files, *broken]]
        assoc.release()
        assert 0x0000 in statuses and any(st != 0x0000 for st in statuses)
        rogue = AE(ae_title="ROGUE_SCU")
        rogue.add_requested_context(Verification)
        assert rogue.associate("127.0.0.1", serve.port, ae_title="FRACTURE_NODE").is_rejected

        store = _store(serve)
        wait_until(lambda: store.delivery_states().get(s.DEAD), timeout=180)
        assert store.rows(s.StoreFailure) and store.rows(s.Association,
                                                         s.Association.outcome == "rejected")
        sql_text = _all_sql_text(store)
        store.dispose()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{serve.metrics_port}/metrics",
                                         timeout=10).read().decode()
        assert serve.stop() == 0
    finally:
        _kill(serve)
    log = serve.log()
    assert "instance_refused" in log and "association_rejected" in log
    assert "instance_not_processed" in log and "delivery_dead" in log
    for secret in SECRETS:
        assert secret not in log, f"{secret} in the log"
        assert secret not in metrics, f"{secret} in the metrics"
        assert secret not in sql_text, f"{secret} in SQL"


def _all_sql_text(store: Store) -> str:
    """Every value of every row of every table, as text."""
    out = io.StringIO()
    for table in s.Base.metadata.sorted_tables:
        model = next(m.class_ for m in s.Base.registry.mappers if m.local_table is table)
        for row in store.rows(model):
            for column in table.columns:
                out.write(f"{getattr(row, column.key, '')!s}\n")
    return out.getvalue()


# Owner-only files ------------------------------------------------------------------------------


def test_state_files_and_folders_are_owner_only(tmp_path: Path, tiny_model: Path,
                                                storescp: tuple[int, Path],
                                                samples_dir: Path) -> None:
    """The database (and its -wal/-shm), spool and report files are 0600, their folders 0700."""
    serve = _node(tmp_path / "node", tiny_model, [("pacs", "PACS", storescp[0])])
    serve.start()
    try:
        files = make_study(samples_dir, tmp_path / "study", [TINY])
        subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(serve.port),
                        *map(str, files)], capture_output=True, timeout=60, check=True)
        wait_until(lambda: list(storescp[1].iterdir()), timeout=120)
        state = serve.workdir / "state"
        modes: dict[str, str] = {}
        for path in [state, *state.rglob("*")]:
            modes[str(path.relative_to(serve.workdir))] = oct(stat.S_IMODE(path.stat().st_mode))
    finally:
        _kill(serve)
    assert any(p.endswith("fracture-node.db-wal") for p in modes)
    assert any(p.startswith("state/reports/") and p.endswith(".dcm") for p in modes)
    wrong = {p: m for p, m in modes.items()
             if m != ("0o700" if (serve.workdir / p).is_dir() else "0o600")}
    assert wrong == {}

