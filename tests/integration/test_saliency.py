"""Saliency in the running pipeline: stored with each result, in the SR, sent as overlays."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from structlog.testing import capture_logs

from fracture_node.config import Config, Destination
from fracture_node.db import schema as s
from fracture_node.dicom.pixels import read_pixels
from fracture_node.ml.explain import Explainer
from fracture_node.saliency import SaliencyRecord
from tests.support import free_port, storescp_running
from tests.support.node import Node
from tests.support.saliency import HIP, PATIENT, TINY, dciodvfy, saliency_config, saliency_study


def _dest(name: str, port: int, overlays: str = "none") -> Destination:
    return Destination(name=name, ae_title="PACS", host="127.0.0.1", port=port,
                       overlays=overlays)




@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(config: Config) -> Node:
        node = Node(config, config.model.path)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.close()


def _saliency(node: Node) -> dict[str, dict[str, Any]]:
    """results.saliency by SOP Instance UID, parsed."""
    uids = {i.id: i.sop_instance_uid for i in node.store.rows(s.Instance)}
    return {uids[r.instance_id]: json.loads(r.saliency) for r in node.store.rows(s.Result)}


def _items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _region_groups(sr: pydicom.Dataset) -> list[tuple[str, list[float]]]:
    """(referenced image, polygon) of each TID 1410 image region in the SR."""
    out = []
    for item in _items(sr):
        if item.get("ValueType") == "SCOORD":
            [ref] = [c for c in item.ContentSequence if c.ValueType == "IMAGE"]
            uid = ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            out.append((str(uid), [float(v) for v in item.GraphicData]))
    return out


def _report(node: Node) -> pydicom.Dataset:
    [report] = node.store.rows(s.Report)
    return pydicom.dcmread(node.config.reports_dir / report.path)


# The worker -----------------------------------------------------------------------------------


def test_worker_stores_saliency_in_source_pixels(tmp_path: Path, db_url: str,
                                                 saliency_model: Path, samples_dir: Path,
                                                 make_node: Any) -> None:
    """Each result keeps method, layer, heat map and regions inside its own image's pixels."""
    node = make_node(saliency_config(tmp_path, db_url, saliency_model, [], method="gradcam",
                             layer="last"))
    hip, tiny = saliency_study(samples_dir, [HIP, TINY])
    node.add(hip)
    node.add(tiny)
    node.drain()
    stored = _saliency(node)
    assert set(stored) == {hip.SOPInstanceUID, tiny.SOPInstanceUID}
    for ds in (hip, tiny):
        record = stored[ds.SOPInstanceUID]
        assert (record["method"], record["layer"]) == ("gradcam", "last")
        assert record["source_shape"] == [ds.Rows, ds.Columns]
        assert 1 <= len(record["regions"]) <= 3
        for region in record["regions"]:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
            px, py = region["peak_point"]
            assert x0 <= px <= x1 and y0 <= py <= y1
    assert stored[hip.SOPInstanceUID]["regions"][0]["peak"] == 1.0


def test_probabilities_with_saliency_equal_predict_batch(tmp_path: Path, sqlite_url: str,
                                                         saliency_model: Path,
                                                         samples_dir: Path,
                                                         make_node: Any) -> None:
    """Scoring through the explainer gives predict_batch's probabilities (test-time
    augmentation included)."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model, []))
    assert node.classifier.tta and node.worker.explainer is not None
    study = saliency_study(samples_dir, [HIP, TINY, HIP])
    for ds in study:
        node.add(ds)
    node.drain()
    batch = np.stack([node.classifier.prepare(read_pixels(ds)) for ds in study])
    expected = node.classifier.predict_batch(batch)
    by_id = {r.instance_id: r.probability for r in node.store.rows(s.Result)}
    got = [by_id[i] for i in sorted(by_id)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert all(r.saliency is not None for r in node.store.rows(s.Result))


def test_saliency_off_stores_null(tmp_path: Path, sqlite_url: str, saliency_model: Path,
                                  samples_dir: Path, make_node: Any) -> None:
    """With [saliency] enabled = false the worker scores without an explainer, saliency NULL."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model, [], enabled=False))
    assert node.worker.explainer is None
    node.add(saliency_study(samples_dir, [TINY])[0])
    node.drain()
    [result] = node.store.rows(s.Result)
    assert result.saliency is None and 0.0 <= result.probability <= 1.0


class _OutOfMemory(Explainer):
    """A real explainer on a GPU that runs out of memory in the backward pass."""

    def explain_batch(self, batch: Any) -> Any:
        raise RuntimeError(f"CUDA out of memory while explaining {PATIENT}")


def test_saliency_failure_keeps_the_score(tmp_path: Path, sqlite_url: str,
                                          saliency_model: Path, samples_dir: Path,
                                          make_node: Any) -> None:
    """When the explainer fails, the image is still scored (as predict_batch would), saliency
    NULL, and the log names the failure without patient data."""
    config = saliency_config(tmp_path, sqlite_url, saliency_model, [])
    node = make_node(config)
    node.worker.stop()
    node.worker = type(node.worker)(config, node.store, node.spool, node.classifier,
                                    "test-worker", explainer=_OutOfMemory(node.classifier))
    [ds] = saliency_study(samples_dir, [TINY])
    node.add(ds)
    with capture_logs() as logs:
        node.drain()
    [result] = node.store.rows(s.Result)
    assert result.saliency is None
    expected = node.classifier.predict_batch(node.classifier.prepare(read_pixels(ds)))
    assert result.probability == pytest.approx(float(expected[0]), abs=1e-9)
    [failed] = [e for e in logs if e["event"] == "saliency_failed"]
    assert failed["error"] == "RuntimeError"
    assert PATIENT not in repr(logs)


# The SR ---------------------------------------------------------------------------------------


def test_sr_carries_the_stored_regions_of_positive_images(tmp_path: Path, db_url: str,
                                                          saliency_model: Path,
                                                          samples_dir: Path,
                                                          make_node: Any) -> None:
    """Every stored region of a positive image is a TID 1410 polygon on that image in the SR."""
    node = make_node(saliency_config(tmp_path, db_url, saliency_model, []))
    study = saliency_study(samples_dir, [HIP, TINY])
    for ds in study:
        node.add(ds)
    node.drain()
    assert node.reporter.run_once() == 1
    stored = _saliency(node)
    groups = _region_groups(_report(node))
    want = sorted((uid, [b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3], b[0], b[1]])
                  for uid, rec in stored.items() for b in (r["box"] for r in rec["regions"]))
    assert len(want) >= 2
    assert sorted(groups) == [(u, pytest.approx(p, abs=1e-3)) for u, p in want]


def test_negative_images_have_no_regions_in_the_sr(tmp_path: Path, sqlite_url: str,
                                                   saliency_model: Path, samples_dir: Path,
                                                   make_node: Any) -> None:
    """With positive_only (the default), a negative image's regions stay in SQL, not in the SR."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model, [], operating_point="0.99"))
    node.add(saliency_study(samples_dir, [HIP])[0])
    node.drain()
    node.reporter.run_once()
    assert all(rec["regions"] for rec in _saliency(node).values())
    assert _region_groups(_report(node)) == []


def test_positive_only_false_reports_regions_of_negatives(tmp_path: Path, sqlite_url: str,
                                                          saliency_model: Path,
                                                          samples_dir: Path,
                                                          make_node: Any) -> None:
    """With positive_only = false, a negative image's regions are in the SR too."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model, [], operating_point="0.99",
                             positive_only=False))
    [hip] = saliency_study(samples_dir, [HIP])
    node.add(hip)
    node.drain()
    node.reporter.run_once()
    groups = _region_groups(_report(node))
    assert groups and {uid for uid, _ in groups} == {hip.SOPInstanceUID}


# Overlays -------------------------------------------------------------------------------------


@pytest.fixture
def second_pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A second DCMTK storescp, for a destination that wants overlays."""
    out = tmp_path / "viewer"
    with storescp_running(out) as port:
        yield port, out


def _received(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.filename = str(path)
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_overlays_go_only_to_the_destinations_that_ask(
        tmp_path: Path, db_url: str, saliency_model: Path, samples_dir: Path, make_node: Any,
        storescp: tuple[int, Path], second_pacs: tuple[int, Path]) -> None:
    """A destination with overlays = both gets the SR, a Secondary Capture and a GSPS per image
    with regions, all valid and in the study; one with none gets the SR alone; SQL shows each."""
    node = make_node(saliency_config(tmp_path, db_url, saliency_model,
                             [_dest("plain", storescp[0]),
                              _dest("viewer", second_pacs[0], "both")]))
    study = saliency_study(samples_dir, [HIP, TINY])
    for ds in study:
        node.add(ds)
    node.drain()
    assert node.reporter.run_once() == 1
    assert node.deliverer.run_once() == 2

    plain, viewer = _received(storescp[1]), _received(second_pacs[1])
    assert {k: len(v) for k, v in plain.items()} == {Comprehensive3DSRStorage: 1}
    assert {k: len(v) for k, v in viewer.items()} == {
        Comprehensive3DSRStorage: 1, SecondaryCaptureImageStorage: 2,
        GrayscaleSoftcopyPresentationStateStorage: 2}
    sources = {ds.SOPInstanceUID for ds in study}
    for sc in viewer[SecondaryCaptureImageStorage]:
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        assert sc.BurnedInAnnotation == "YES"
    for ps in viewer[GrayscaleSoftcopyPresentationStateStorage]:
        ref = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID in sources
    for objects in viewer.values():
        for ds in objects:
            assert ds.StudyInstanceUID == study[0].StudyInstanceUID
            errors, _ = dciodvfy(Path(ds.filename))
            assert errors == [], (ds.SOPClassUID, errors)

    objects = node.store.rows(s.ReportObject)
    assert sorted(o.kind for o in objects) == ["gsps", "gsps", "sc", "sc"]
    deliveries = {d.destination: d for d in node.store.rows(s.Delivery)}
    assert {d.state for d in deliveries.values()} == {s.DELIVERED}
    carried = node.store.rows(s.DeliveryObject)
    assert {c.delivery_id for c in carried} == {deliveries["viewer"].id}
    assert len(carried) == 4 and all(c.delivered_at is not None for c in carried)
    # each object is stamped when the PACS answered it: the SR first, then the overlays
    [attempt] = [a for a in node.store.rows(s.DeliveryAttempt)
                 if a.delivery_id == deliveries["viewer"].id]
    stamps = sorted(c.delivered_at for c in carried)
    assert attempt.attempted_at < deliveries["viewer"].report_delivered_at <= stamps[0]
    assert stamps[-1] <= deliveries["viewer"].delivered_at
    sent = {o.sop_instance_uid for o in objects}
    assert sent == {ds.SOPInstanceUID for v in viewer.values() for ds in v
                    if ds.SOPClassUID != Comprehensive3DSRStorage}


class _PickyPacs:
    """A pynetdicom Storage SCP that refuses presentation states while ``refuse`` is set."""

    def __init__(self) -> None:
        self.refuse = True
        self.stored: list[str] = []
        ae = AE("PACS")
        ae.supported_contexts = StoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        if self.refuse and sop_class == GrayscaleSoftcopyPresentationStateStorage:
            return 0xA700
        self.stored.append(sop_class)
        return 0x0000


@pytest.fixture
def picky_pacs() -> Iterator[_PickyPacs]:
    pacs = _PickyPacs()
    yield pacs
    pacs.server.shutdown()


def test_refused_overlay_is_retried_without_sending_the_sr_again(
        tmp_path: Path, sqlite_url: str, saliency_model: Path, samples_dir: Path,
        make_node: Any, picky_pacs: _PickyPacs) -> None:
    """A refused GSPS leaves the delivery pending with the SR and SC recorded as stored; the
    retry sends only the GSPS."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model,
                             [_dest("pacs", picky_pacs.port, "both")]))
    node.add(saliency_study(samples_dir, [HIP])[0])
    node.drain()
    node.reporter.run_once()
    assert node.deliverer.run_once() == 0
    [delivery] = node.store.rows(s.Delivery)
    assert delivery.state == s.PENDING and delivery.report_delivered_at is not None
    assert "presentation state" in delivery.last_error and "0xA700" in delivery.last_error
    kinds = {o.id: o.kind for o in node.store.rows(s.ReportObject)}
    done = {kinds[c.object_id]: c.delivered_at is not None
            for c in node.store.rows(s.DeliveryObject)}
    assert done == {"sc": True, "gsps": False}

    picky_pacs.refuse = False
    time.sleep(0.5)
    assert node.deliverer.run_once() == 1
    assert sorted(picky_pacs.stored) == sorted([
        Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
        GrayscaleSoftcopyPresentationStateStorage])
    [delivery] = node.store.rows(s.Delivery)
    assert delivery.state == s.DELIVERED
    attempts = node.store.rows(s.DeliveryAttempt)
    assert [a.ok for a in sorted(attempts, key=lambda a: a.id)] == [False, True]


def test_new_report_version_reuses_the_overlay_uids(tmp_path: Path, sqlite_url: str,
                                                    saliency_model: Path, samples_dir: Path,
                                                    make_node: Any) -> None:
    """A late image gives SR version 2; the first image's overlays keep their UIDs and series."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model,
                             [_dest("pacs", free_port(), "both")]))
    first, late = saliency_study(samples_dir, [HIP, TINY])
    node.add(first)
    node.drain()
    node.reporter.run_once()
    node.add(late)
    node.drain()
    assert node.reporter.run_once() == 1
    reports = {r.id: r.version for r in node.store.rows(s.Report)}
    by_version: dict[int, dict[tuple[str, str], tuple[str, str]]] = {1: {}, 2: {}}
    for o in node.store.rows(s.ReportObject):
        by_version[reports[o.report_id]][(o.source_sop_instance_uid, o.kind)] = (
            o.sop_instance_uid, o.series_instance_uid)
    assert set(by_version[1]) == {(first.SOPInstanceUID, "sc"), (first.SOPInstanceUID, "gsps")}
    assert set(by_version[2]) == set(by_version[1]) | {(late.SOPInstanceUID, "sc"),
                                                       (late.SOPInstanceUID, "gsps")}
    for key, value in by_version[1].items():
        assert by_version[2][key] == value
    sc_series = {series for (_, kind), (_, series) in by_version[2].items() if kind == "sc"}
    assert len(sc_series) == 1


def test_new_version_does_not_resend_overlays_the_pacs_holds(
        tmp_path: Path, db_url: str, saliency_model: Path, samples_dir: Path, make_node: Any,
        storescp: tuple[int, Path]) -> None:
    """Version 2 of a study sends its SR and the late image's overlays; the first image's
    overlays, stored by version 1's delivery under the same UIDs, are recorded as stored then
    and not sent again."""
    node = make_node(saliency_config(tmp_path, db_url, saliency_model,
                             [_dest("pacs", storescp[0], "both")]))
    first, late = saliency_study(samples_dir, [HIP, TINY])
    node.add(first)
    node.drain()
    assert node.reporter.run_once() == 1
    assert node.deliverer.run_once() == 1
    v1 = {(ds.SOPClassUID, ds.SOPInstanceUID) for v in _received(storescp[1]).values()
          for ds in v}
    for path in storescp[1].rglob("*"):
        if path.is_file():
            path.unlink()
    node.add(late)
    node.drain()
    assert node.reporter.run_once() == 1
    assert node.deliverer.run_once() == 1
    received = _received(storescp[1])
    assert {k: len(v) for k, v in received.items()} == {
        Comprehensive3DSRStorage: 1, SecondaryCaptureImageStorage: 1,
        GrayscaleSoftcopyPresentationStateStorage: 1}
    sent_v2 = {(ds.SOPClassUID, ds.SOPInstanceUID) for v in received.values() for ds in v}
    assert not sent_v2 & v1
    for ds in received[SecondaryCaptureImageStorage]:
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == late.SOPInstanceUID
    deliveries = sorted(node.store.rows(s.Delivery), key=lambda d: d.id)
    assert [d.state for d in deliveries] == [s.DELIVERED, s.DELIVERED]
    objects = {o.id: o for o in node.store.rows(s.ReportObject)}
    carried = [c for c in node.store.rows(s.DeliveryObject)
               if c.delivery_id == deliveries[1].id]
    assert len(carried) == 4 and all(c.delivered_at is not None for c in carried)
    first_stored = {objects[c.object_id].sop_instance_uid: c.delivered_at
                    for c in node.store.rows(s.DeliveryObject)
                    if c.delivery_id == deliveries[0].id}
    for c in carried:
        uid = objects[c.object_id].sop_instance_uid
        if uid in first_stored:  # not sent again: stored when version 1 was delivered
            assert c.delivered_at == first_stored[uid]
    assert sum(objects[c.object_id].sop_instance_uid in first_stored for c in carried) == 2


def test_discarded_report_takes_its_overlays_and_leaves_the_winners(
        tmp_path: Path, sqlite_url: str, saliency_model: Path, samples_dir: Path,
        make_node: Any) -> None:
    """When another reporter commits the study first, the loser's SR, overlay files and
    .overlays folder are removed, and the winner's files, which its pending delivery needs,
    stay."""
    from fracture_node.stages.report import Reporter

    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model,
                             [_dest("pacs", free_port(), "both")]))
    [hip] = saliency_study(samples_dir, [HIP])
    node.add(hip)
    node.drain()
    winner = Reporter(node.config, node.store, node.spool, "other-node", node.reporter.algorithm)
    loser = node.reporter
    written: list[Path] = []
    build_overlays = loser._overlays

    def overlays_then_lose_the_race(*args: Any) -> Any:
        objects = build_overlays(*args)
        written.extend(loser.reports_dir / o.path for o in objects)
        assert winner.report_study(hip.StudyInstanceUID) == 1  # commits while we build
        return objects

    loser._overlays = overlays_then_lose_the_race  # type: ignore[method-assign]
    with capture_logs() as logs:
        assert loser.report_study(hip.StudyInstanceUID) == 0
    assert [e["event"] for e in logs if e["event"] == "report_discarded"] == ["report_discarded"]

    [report] = node.store.rows(s.Report)
    objects = node.store.rows(s.ReportObject)
    assert report.made_by == "other-node" and sorted(o.kind for o in objects) == ["gsps", "sc"]
    [delivery] = node.store.rows(s.Delivery)
    assert delivery.state == s.PENDING
    kept = {report.path} | {o.path for o in objects}
    on_disk = {str(p.relative_to(node.config.reports_dir))
               for p in node.config.reports_dir.rglob("*") if p.is_file()}
    assert on_disk == kept
    assert len(written) == 2 and not any(p.exists() for p in written)
    assert not written[0].parent.exists()
    assert [p.name for p in node.config.reports_dir.rglob("*.overlays")] == \
        [Path(objects[0].path).parent.name]


def test_unreadable_pixels_drop_the_secondary_capture_only(
        tmp_path: Path, sqlite_url: str, saliency_model: Path, samples_dir: Path,
        make_node: Any) -> None:
    """An image whose spooled pixel data can no longer be read (a damaged file) gets no
    Secondary Capture, but its GSPS and the SR with its regions are still made."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model,
                             [_dest("pacs", free_port(), "both")]))
    [hip] = saliency_study(samples_dir, [HIP])
    node.add(hip)
    node.drain()
    [instance] = node.store.rows(s.Instance)
    path = node.spool.path(instance.spool_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1_000_000])  # the header survives, the pixels do not
    with capture_logs() as logs:
        assert node.reporter.run_once() == 1
    assert [o.kind for o in node.store.rows(s.ReportObject)] == ["gsps"]
    assert _region_groups(_report(node))
    assert [e["kind"] for e in logs if e["event"] == "overlay_failed"] == ["sc"]
    assert PATIENT not in repr(logs)


def test_stored_heat_map_matches_the_source_image(tmp_path: Path, sqlite_url: str,
                                                  saliency_model: Path, samples_dir: Path,
                                                  make_node: Any) -> None:
    """The stored heat map turns back into a map over the whole source image, peak 1."""
    node = make_node(saliency_config(tmp_path, sqlite_url, saliency_model, []))
    [hip] = saliency_study(samples_dir, [HIP])
    node.add(hip)
    node.drain()
    [result] = node.store.rows(s.Result)
    heat = SaliencyRecord.from_json(result.saliency).source_map()
    assert heat.shape == (hip.Rows, hip.Columns)
    assert float(heat.max()) == pytest.approx(1.0)


def _doc_sql(first_line: str) -> str:
    """The SQL block of docs/audit.md that starts with ``first_line``."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
    start = doc.index(first_line)
    return doc[start:doc.index("```", start)].strip().rstrip(";")


def test_audit_sql_of_saliency_and_overlays_runs(
        tmp_path: Path, db_url: str, saliency_model: Path, samples_dir: Path, make_node: Any,
        storescp: tuple[int, Path]) -> None:
    """The queries docs/audit.md gives for regions and for what was sent answer from SQL."""
    import datetime as dt

    from sqlalchemy import text

    node = make_node(saliency_config(tmp_path, db_url, saliency_model,
                             [_dest("pacs", storescp[0], "gsps")]))
    [hip] = saliency_study(samples_dir, [HIP])
    node.add(hip)
    node.drain()
    node.reporter.run_once()
    node.deliverer.run_once()
    postgres = db_url.startswith("postgresql")
    regions_sql = _doc_sql("-- PostgreSQL: the same" if postgres else
                           "-- SQLite: regions per image")
    window: dict[str, Any] = (
        {"since": dt.datetime(2000, 1, 1, tzinfo=dt.UTC), "until": dt.datetime(2100, 1, 1,
                                                                               tzinfo=dt.UTC)}
        if postgres else {"since": "2000-01-01 00:00:00", "until": "2100-01-01 00:00:00"})
    stored = _saliency(node)[hip.SOPInstanceUID]
    with node.store.engine.connect() as conn:
        rows = conn.execute(text(regions_sql), window).all()
        sent = conn.execute(text(_doc_sql("-- Everything sent to each destination")),
                            {"study": hip.StudyInstanceUID}).all()
    assert len(rows) == len(stored["regions"]) >= 1
    assert {r.sop_instance_uid for r in rows} == {hip.SOPInstanceUID}
    assert {r.method for r in rows} == {"hirescam"}
    assert sorted(float(r.peak) for r in rows) == sorted(g["peak"] for g in stored["regions"])
    assert [(r.destination, r.kind) for r in sent] == [("pacs", "gsps"), ("pacs", "sr")]
    assert all(r.delivered_at is not None for r in sent)
