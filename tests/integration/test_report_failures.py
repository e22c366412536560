"""A study whose report fails: recorded with a scrubbed reason, backed off, parked, reprocessed.

Real failures (the spool file of every instance gone) drive the state machine; library
exceptions that quote header values (pydicom's own, raised on the study's real values) drive
the property test that no such value reaches a log line, an exception text or an SQL column.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fracture_node
from fracture_node import cli
from fracture_node.db import schema as s
from fracture_node.db.audit import Audit
from fracture_node.errors import ReportError, describe
from fracture_node.stages import report as studies
from tests.support.node import Node, make_node, sample_study


@pytest.fixture
def failing_node(tmp_path: Path, db_url: str, tiny_model: Path) -> Iterator[Node]:
    """A processing node that retries a failed report after 0.2 s, 0.4 s, and parks it at 3."""
    n = make_node(tmp_path, db_url, tiny_model)
    n.config = dataclasses.replace(n.config, study=dataclasses.replace(
        n.config.study, report_max_attempts=3, report_first_retry_s=0.2,
        report_max_retry_s=0.4)).validate()
    n.reporter.config = n.config
    yield n
    n.close()


def _study_row(node: Node) -> Any:
    [row] = node.store.rows(s.Study)
    return row


def _lose_spool_files(node: Node) -> None:
    for row in node.store.rows(s.Instance):
        node.spool.path(row.spool_path).unlink()


def test_failed_report_is_recorded_backed_off_parked_and_reprocessed(
        failing_node: Node, samples_dir: Path) -> None:
    """Every attempt is counted with its reason, the next waits, the third parks the study,
    status shows it, and reprocess (once the cause is fixed) reports it."""
    node = failing_node
    study = sample_study(samples_dir, 2)
    for ds in study:
        node.add(ds)
    node.drain()
    saved = {r.spool_path: node.spool.path(r.spool_path).read_bytes()
             for r in node.store.rows(s.Instance)}
    _lose_spool_files(node)
    assert node.reporter.run_once() == 0
    row = _study_row(node)
    assert row.report_attempts == 1 and row.report_retry_at is not None
    assert row.report_error.startswith("ReportError: no instance of study")
    assert node.reporter.run_once() == 0  # backing off: not tried again yet
    assert _study_row(node).report_attempts == 1
    for expected in (2, 3):
        time.sleep(0.45)
        node.reporter.run_once()
        assert _study_row(node).report_attempts == expected
    row = _study_row(node)
    assert row.report_parked_at is not None and row.report_retry_at is None
    time.sleep(0.45)
    assert node.reporter.run_once() == 0
    assert _study_row(node).report_attempts == 3  # parked: no more attempts
    with Audit(node.config.database_url) as auditor:
        state = auditor.status(row.report_parked_at)
    assert state["parked_studies"] == 1
    [parked] = state["parked"]
    assert parked["study_instance_uid"] == study[0].StudyInstanceUID
    assert parked["attempts"] == 3 and parked["error"].startswith("ReportError")
    with Audit(node.config.database_url) as auditor:
        [asked] = auditor.ask("reports_failed", row.first_received_at - dt.timedelta(days=1),
                              row.report_parked_at + dt.timedelta(days=1))
    assert (asked["study_instance_uid"], asked["state"], asked["attempts"]) == (
        study[0].StudyInstanceUID, "parked", 3)
    assert asked["error"] == parked["error"]
    for rel, data in saved.items():  # the cause is fixed
        node.spool.path(rel).write_bytes(data)
    assert node.store.reprocess_studies() == 1
    assert node.reporter.run_once() == 1
    row = _study_row(node)
    assert (row.report_attempts, row.report_parked_at, row.report_error) == (0, None, None)
    assert len(node.store.rows(s.Report)) == 1


def test_new_instance_takes_a_parked_study_back(failing_node: Node, samples_dir: Path) -> None:
    """A parked study gets another chance when a new instance of it arrives."""
    node = failing_node
    first, second = sample_study(samples_dir, 2)
    node.add(first)
    node.drain()
    _lose_spool_files(node)
    for _ in range(3):
        node.reporter.run_once()
        time.sleep(0.45)
    assert _study_row(node).report_parked_at is not None
    node.add(second)
    node.drain()
    assert node.reporter.run_once() == 1  # reported with the instance it can read
    assert _study_row(node).report_parked_at is None


def test_reprocess_command_takes_parked_studies_back(failing_node: Node, samples_dir: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``fracture-node reprocess`` makes every parked study due again and says how many."""
    node = failing_node
    node.add(sample_study(samples_dir, 1)[0])
    node.drain()
    _lose_spool_files(node)
    for _ in range(3):
        node.reporter.run_once()
        time.sleep(0.45)
    assert _study_row(node).report_parked_at is not None
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{node.config.database_url}"\n'
                      f'[node]\nstate_dir = "{tmp_path / "state"}"\n')
    assert cli.main(["reprocess", "--config", str(config)]) == 0
    assert "1 studies due for a report again" in capsys.readouterr().out
    row = _study_row(node)
    assert row.report_parked_at is None and row.report_attempts == 0 and row.report_due


# No header value in logs, exception texts or SQL ------------------------------------------------

_OWN_TEXT = "\n".join(p.read_text(encoding="utf-8")
                      for p in Path(fracture_node.__file__).parent.rglob("*.py"))
"""Our own source. Hypothesis feeds string constants of the code under test into text
strategies ("reprocess", "1.2.840.10008.1.1"): such a value in a log line is our wording, not
a copied header value, so it cannot show a leak."""


def _leaked(value: str, seen: str) -> bool:
    """True when ``value`` (a header value we set) shows up in ``seen``. Values that cannot be
    told apart from our own text are not checked: too short, found in our source, or only
    digits and dots (every UID in the log is made of them)."""
    if len(value) < 6 or value in _OWN_TEXT or not value.strip("0123456789. "):
        return False
    return value in seen


_PHI_TEXT = st.text(alphabet=st.sampled_from(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzАБВГДЕЖЗИКЛМНОПРСТабвгдежзиклмн"
    "0123456789^-. '"), min_size=6, max_size=24).filter(lambda v: v.strip() == v and len(
    set(v)) > 3)


def _quoting_failure(header: pydicom.Dataset) -> None:
    """Fail the way pydicom and careless code fail on a bad header: quoting its values."""
    pydicom.valuerep.DA(str(header.PatientBirthDate))  # ValueError quoting the value
    raise ValueError(f"cannot use {header.PatientName} ({header.PatientID}) from "
                     f"{header.InstitutionName}")


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_PHI_TEXT, patient_id=_PHI_TEXT, institution=_PHI_TEXT,
       birth=st.one_of(st.from_regex(r"[0-9A-Za-z./-]{6,10}", fullmatch=True),
                       st.sampled_from(["1984-03-12", "19841312", "12.03.1984"])),
       wrap=st.booleans())
def test_header_values_never_reach_logs_errors_or_sql(
        failing_node: Node, samples_dir: Path, monkeypatch: pytest.MonkeyPatch,
        name: str, patient_id: str, institution: str, birth: str, wrap: bool) -> None:
    """Random invalid header values, quoted by the exceptions a failing report raises, appear
    in no log event, no recorded error and no described exception."""
    node = failing_node
    ds = sample_study(samples_dir, 1)[0]
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the values may be Cyrillic
    ds.PatientName, ds.PatientID = name, patient_id
    ds.PatientBirthDate, ds.InstitutionName = birth, institution
    node.add(ds)
    node.drain()

    def build_report(sources: list[pydicom.Dataset], *args: Any, **kwargs: Any) -> Any:
        try:
            _quoting_failure(sources[0])
        except ValueError as exc:
            if wrap:  # our own error carrying the library's text along
                raise ReportError(f"SR not built: {exc}") from exc
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(studies, "build_report", build_report)
    with structlog.testing.capture_logs() as events:
        assert node.reporter.run_once() == 0
    row = node.store.rows(s.Study, s.Study.study_instance_uid == ds.StudyInstanceUID)[0]
    try:
        build_report([ds])
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        described = describe(exc)
    seen = json.dumps(events, default=str) + (row.report_error or "") + described
    assert any(e["event"] == "report_failed" for e in events)
    for value in (name, patient_id, institution, birth):
        assert not _leaked(value, seen), value


_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "InstitutionName",
           "Manufacturer", "PatientBirthTime", "PatientAge", "PatientWeight", "PatientSize",
           "OtherPatientIDs", "IssuerOfPatientID", "PatientComments", "StudyDescription",
           "PhysiciansOfRecord", "AdmittingDiagnosesDescription", "EthnicGroup", "Occupation",
           "AdditionalPatientHistory")
"""Attributes the SR copies from the first source: report.py's Type 2 list, the equipment
names the issue found copied unchecked, and root attributes of the Patient and Study modules
that highdicom copies whenever present (of every VR among them: AS, DS, TM, LO, LT, SH, PN)."""


_ASCII_VRS = frozenset({"DA", "TM", "CS", "SH", "AS", "DS", "IS"})


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(
    _PHI_TEXT, st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", fullmatch=True),
    st.text(alphabet="0123456789:.-x", min_size=6, max_size=20).filter(lambda v: len(set(v)) > 3),
    st.text(alphabet="ABCDEFGHIJ^=\\", min_size=70, max_size=90),
    st.text(alphabet="0123456789.Y-+e ", min_size=6, max_size=24)), min_size=len(_COPIED),
    max_size=len(_COPIED)))
def test_real_report_path_leaks_no_invalid_header_value(
        failing_node: Node, samples_dir: Path, monkeypatch: pytest.MonkeyPatch,
        values: list[str]) -> None:
    """Random invalid values in every attribute the report copies go through the real SR build:
    the study is reported or its failure recorded, and no value reaches a log event or SQL."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    node = failing_node
    ds = sample_study(samples_dir, 1)[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in zip(_COPIED, values, strict=True):
        # As the bytes arrive from a sender: pydicom converts them only when they are read.
        vr = pydicom.datadict.dictionary_VR(keyword)
        raw = value.encode("ascii" if vr in _ASCII_VRS else "utf-8", "replace")
        raw += b" " * (len(raw) % 2)
        tag = pydicom.tag.Tag(keyword)
        ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(raw), raw, 0, True, True)
    node.add(ds)
    node.drain()
    with structlog.testing.capture_logs() as events:
        node.reporter.run_once()
    row = node.store.rows(s.Study, s.Study.study_instance_uid == ds.StudyInstanceUID)[0]
    assert row.report_due is False, row.report_error  # cleaned, so reported
    seen = json.dumps(events, default=str) + (row.report_error or "")
    for value in values:
        assert not _leaked(value, seen), value
