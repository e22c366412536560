"""A node's parts in one process (configuration, receiver, worker, reporter, deliverer) over a
real database and spool, and studies made from the DICOM samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fracture_node.config import TRAINED_BODY_PARTS, Config, Destination, NodeConfig, ScopeConfig
from fracture_node.db.store import NewInstance, Store, utcnow
from fracture_node.dicom.report import AlgorithmInfo
from fracture_node.dicom.scp import Receiver
from fracture_node.ml.infer import Classifier
from fracture_node.spool import Spool
from fracture_node.stages.deliver import Deliverer
from fracture_node.stages.report import Reporter
from fracture_node.stages.score import Worker
from tests.support import free_port

TEST_SCOPE = ScopeConfig(body_parts=(*TRAINED_BODY_PARTS, "CSPINE", "CHEST"), min_side=8)
"""The suites' fast stand-in radiograph is the 16 x 16 C-spine CR sample, and several decoding
tests use the chest samples; the default ``[scope]`` (min_side 64, limbs only) assesses neither.
Tests of the scope itself use the default (tests/unit/test_scope.py, test_pipeline.py)."""


def node_config(tmp_path: Path, url: str, **node: object) -> Config:
    """A configuration for an in-process node on a free port with its state under tmp_path
    (scope: :data:`TEST_SCOPE`)."""
    base = Config(node=NodeConfig(state_dir=tmp_path / "state", port=0), scope=TEST_SCOPE)
    base = dataclasses.replace(
        base, node=dataclasses.replace(base.node, **node),  # type: ignore[arg-type]
        database=dataclasses.replace(base.database, url=url),
    )
    return base.validate()


class RunningReceiver:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database_url)
        self.spool = Spool(config.spool_dir, fsync=True, min_free_bytes=0)
        self.receiver = Receiver(config, self.store, self.spool)
        self.receiver.start()
        self.port = self.receiver.port

    def stop(self) -> None:
        self.receiver.stop(drain_timeout_s=5)
        self.store.dispose()


SAMPLE = "CR_cspine_tiny16x16_explicitVR.dcm"


class Node:
    """The processing half of a node, driven step by step by the test."""

    def __init__(self, config: Config, model: Path) -> None:
        self.config = config
        self.store = Store(config.database_url)
        self.spool = Spool(config.spool_dir, fsync=False)
        self.classifier = Classifier.load(model, "cpu")
        self.worker = Worker(config, self.store, self.spool, self.classifier, "test-worker")
        algo = AlgorithmInfo(self.classifier.name, self.classifier.version,
                             self.classifier.sha256, 0.5, "balanced")
        self.reporter = Reporter(config, self.store, self.spool, "test-node", algo)
        self.deliverer = Deliverer(config, self.store, "test-node")

    def add(self, ds: pydicom.Dataset, association_id: int | None = None) -> int:
        """Spool a dataset and queue it, as the SCP does."""
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        rel = self.spool.relative_path(ds.StudyInstanceUID, ds.SOPInstanceUID, digest)
        self.spool.write(rel, data)
        return self.store.add_instance(NewInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality=ds.Modality,
            size_bytes=len(data), sha256=digest, spool_path=rel, received_at=utcnow(),
            association_id=association_id))

    def drain(self) -> None:
        while self.worker.run_once():
            pass

    def close(self) -> None:
        self.worker.stop()
        self.store.dispose()


def study_of(samples_dir: Path, names: list[str], study_uid: str | None = None,
             **attributes: object) -> list[pydicom.Dataset]:
    """Copies of the named samples made into one study (new SOP Instance UIDs), with
    ``attributes`` set on each (e.g. ``PatientName``)."""
    study_uid = study_uid or generate_uid()
    out: list[pydicom.Dataset] = []
    for name in names:
        ds = pydicom.dcmread(samples_dir / name)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def sample_study(samples_dir: Path, n: int, study_uid: str | None = None) -> list[pydicom.Dataset]:
    """``n`` instances of one study, made from the 16 x 16 CR sample."""
    return study_of(samples_dir, [SAMPLE] * n, study_uid)


def make_node(tmp_path: Path, db_url: str, model: Path, pacs_port: int | None = None,
          deadline_s: float = 3600.0, **model_cfg: object) -> Node:
    config = node_config(tmp_path, db_url)
    dests = (Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                         port=pacs_port or free_port()),)
    config = dataclasses.replace(
        config, destinations=dests,
        model=dataclasses.replace(config.model, path=model, **model_cfg),  # type: ignore[arg-type]
        study=dataclasses.replace(config.study, stable_after_s=0.0),
        delivery=dataclasses.replace(config.delivery, first_retry_s=0.2, max_retry_s=0.4,
                                     timeout_s=3.0, deadline_s=deadline_s))
    return Node(config.validate(), model)


def walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from walk(item)
