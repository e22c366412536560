"""Raw model throughput against the whole pipeline's (spooled instance -> SQL result), one run.

    .venv/bin/python benchmarks/pipeline.py [--instances 256] [--batch 16] [--model PATH]
        [--source dataset|samples] [--rounds 3] [--backlog 10000]

Prints one JSON object:

- ``raw_images_per_s``: the model's work alone on prepared batches of the serving batch size,
  inputs already in memory: ``Explainer.explain_batch`` (score + saliency map, what the worker
  runs with ``[saliency] enabled``, the default) or, with ``--saliency off``,
  ``Classifier.predict_batch``; ``predict_only_images_per_s`` is always ``predict_batch``;
- ``pipeline_images_per_s``: the worker claiming queued instances from SQL, reading them from the
  spool, decoding (pydicom + pylibjpeg), normalising, letterboxing, scoring and committing results,
  from the first claim to the last commit;
- ``ratio`` = pipeline / raw (target on CPU: at least 0.9);
- with ``--rounds R`` (default 3): raw and pipeline are measured R times, alternately (raw, then
  the pipeline on fresh copies of the instances, then raw again...), and the figures above are the
  medians; ``rounds`` lists each round's raw, pipeline and ratio. On a shared 2-core machine one
  batch's throughput wanders by several percent from minute to minute, so a single raw figure
  measured before a single pipeline run can move the ratio by as much as the pipeline's own cost;
  alternating the two cancels that drift and the spread shows what is left of it;
- ``worker_infer_share``: of the worker's wall time over all rounds, the share spent in the
  network call (score + saliency map); the rest is claiming, waiting for decodes, the saliency
  regions, stacking the batch and committing the results;
- with ``--backlog N``: resident memory of the process before and while N further instances wait in
  the queue (nothing waiting lives in RAM), in MiB.

Instances are real radiographs: the dataset's test-split JPEGs wrapped as uncompressed CR objects
(``dataset``: what most PACS send after their own decompression), or the shared DICOM samples in
their compressed transfer syntaxes (``samples``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from fracture_node.allocator import allocator_name  # noqa: E402
from fracture_node.config import (  # noqa: E402
    TRAINED_BODY_PARTS,
    Config,
    ModelConfig,
    NodeConfig,
    SaliencyConfig,
    ScopeConfig,
)
from fracture_node.db import migrate  # noqa: E402
from fracture_node.db.store import NewInstance, Store, utcnow  # noqa: E402
from fracture_node.ml.infer import ENGINES, Classifier  # noqa: E402
from fracture_node.spool import Spool  # noqa: E402
from fracture_node.stages.score import Worker  # noqa: E402


def cr_from_jpeg(path: Path) -> pydicom.Dataset:
    """An uncompressed CR object carrying a dataset JPEG's pixels (8-bit, MONOCHROME2)."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CR", "Bench^Mark", "BENCH"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def sources(kind: str, n: int) -> list[bytes]:
    """``n`` instances (``dataset`` or ``samples``, see the module docstring), serialised."""
    return serialise(source_datasets(kind, n))


def source_datasets(kind: str, n: int) -> list[pydicom.Dataset]:
    if kind == "dataset":
        import csv

        root = SHARED / "datasets" / "fracture-xr"
        with (root / "labels.csv").open() as fh:
            files = [root / r["file"] for r in csv.DictReader(fh) if r["split"] == "test"]
        datasets = [cr_from_jpeg(p) for p in files[:n]]
    else:
        names = ["CR_hip_RG2_JLSL.dcm", "CR_extremity_RG3_J2KI.dcm", "CR_chest_RG1_JLSN.dcm",
                 "CR_hip_RG2_JPLL.dcm", "DX_J2KR_1416x1420_u16.dcm", "CR_hip_RG2_JPLY_fixed.dcm"]
        datasets = [pydicom.dcmread(SHARED / "dicom-samples" / names[i % len(names)])
                    for i in range(n)]
    return datasets


def serialise(datasets: list[pydicom.Dataset]) -> list[bytes]:
    """The objects as files, each with a new SOP Instance UID (a new instance to the node)."""
    out = []
    for ds in datasets:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def enqueue(store: Store, spool: Spool, blobs: list[bytes]) -> None:
    for data in blobs:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        digest = hashlib.sha256(data).hexdigest()
        rel = spool.relative_path(ds.StudyInstanceUID, ds.SOPInstanceUID, digest)
        spool.write(rel, data)
        store.add_instance(NewInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=None,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality="CR",
            size_bytes=len(data), sha256=digest, spool_path=rel, received_at=utcnow(),
            association_id=None))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--source", choices=["dataset", "samples"], default="dataset")
    parser.add_argument("--rounds", type=int, default=3,
                        help="raw and pipeline measured this many times, alternately; medians "
                             "are reported (default 3)")
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument("--db", default="", help="database URL (default: a SQLite file)")
    parser.add_argument("--saliency", choices=["on", "off"], default="on",
                        help="[saliency] enabled in the worker (default on, as in the daemon)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="[model] engine (default auto, as in the daemon); the model file is "
                             "copied to a temporary folder, where its ONNX graph is exported")
    parser.add_argument("--threads", type=int, default=0, help="[model] threads")
    parser.add_argument("--sub-batch", type=int, default=0,
                        help="[model] sub_batch: images per pass of the network (0: the "
                             "engine's default, 2 on a CPU; the batch size: whole batches)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fn-bench-"))
    import shutil

    from fracture_node.ml.infer import bundled_model_path

    model = tmp / "model" / "fracture-model.pt"
    model.parent.mkdir()
    shutil.copy(args.model or bundled_model_path(), model)
    args.model = model
    url = args.db or f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    config = Config(node=NodeConfig(state_dir=tmp),
                    model=ModelConfig(path=args.model, device=args.device,
                                      max_batch=args.batch, max_wait_ms=50,
                                      decode_threads=args.decode_threads),
                    saliency=SaliencyConfig(enabled=args.saliency == "on"),
                    # the backlog uses the 16 x 16 C-spine CR sample: admit it
                    scope=ScopeConfig(body_parts=(*TRAINED_BODY_PARTS, "CSPINE"),
                                      min_side=8)).validate()
    store, spool = Store(url), Spool(config.spool_dir, fsync=False)
    saliency = SaliencyConfig(enabled=args.saliency == "on")
    classifier = Classifier.load(
        args.model, args.device, engine=args.engine, threads=args.threads,
        saliency=(saliency.method, saliency.layer) if saliency.enabled else None,
        sub_batch=args.sub_batch or None)
    originals = source_datasets(args.source, args.instances)
    blobs = serialise(originals)

    # Raw: the model alone on prepared inputs of the serving batch size.
    from fracture_node.dicom.pixels import load_dicom_file

    prepared = []
    for i, data in enumerate(blobs[: args.batch]):
        path = tmp / f"raw{i}.dcm"
        path.write_bytes(data)
        prepared.append(classifier.prepare(load_dicom_file(path)))
    batch = np.stack(prepared)
    runs = max(3, args.instances // args.batch)

    def throughput(fn: Any) -> float:
        fn(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(runs):
            fn(batch)
        return runs * len(batch) / (time.perf_counter() - started)

    worker = Worker(config, store, spool, classifier, node="bench")
    in_network = [0.0]
    infer = worker._infer

    def timed_infer(stacked: Any) -> Any:
        started = time.perf_counter()
        try:
            return infer(stacked)
        finally:
            in_network[0] += time.perf_counter() - started

    worker._infer = timed_infer  # type: ignore[method-assign]
    rounds: list[dict[str, float]] = []
    worker_s = 0.0
    for index in range(max(1, args.rounds)):
        predict_only = throughput(classifier.predict_batch)
        raw = (throughput(worker.explainer.explain_batch) if worker.explainer is not None
               else predict_only)
        # Pipeline: spooled + queued instances to committed results (new instances each round).
        enqueue(store, spool, blobs if index == 0 else serialise(originals))
        started = time.perf_counter()
        done = 0
        while done < len(blobs):
            done += worker.run_once()
        elapsed = time.perf_counter() - started
        worker_s += elapsed
        pipeline = len(blobs) / elapsed
        rounds.append({"predict_only": round(predict_only, 2), "raw": round(raw, 2),
                       "pipeline": round(pipeline, 2), "ratio": round(pipeline / raw, 3)})
    worker.stop()

    def median(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    result = {
        "benchmark": "pipeline_vs_raw",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "device": str(classifier.device), "engine": classifier.engine,
        # glibc's malloc, as `serve` runs; `LD_PRELOAD=libjemalloc.so.2` compares jemalloc
        # (fracture_node/allocator.py, docs/benchmarks.md)
        "allocator": allocator_name(),
        "model": classifier.name, "model_sha256": classifier.sha256[:12],
        "input_size": classifier.input_size, "batch": args.batch,
        "sub_batch": classifier.sub_batch,
        "decode_threads": args.decode_threads, "source": args.source,
        "instances": len(blobs),
        "saliency": (f"{worker.explainer.method}@{worker.explainer.layer}"
                     if worker.explainer is not None else "off"),
        "rounds": rounds,
        "predict_only_images_per_s": round(median("predict_only"), 2),
        "raw_images_per_s": round(median("raw"), 2),
        "pipeline_images_per_s": round(median("pipeline"), 2),
        "ratio": round(median("ratio"), 3),
        "ratio_range": [min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)],
        "worker_infer_share": round(in_network[0] / worker_s, 3),
        "load_average": os.getloadavg()[0],
    }
    if args.backlog:
        # Small objects (the 16x16 CR sample): what is measured is what the worker holds in
        # memory while N instances wait, not the size of the objects.
        tiny = pydicom.dcmread(SHARED / "dicom-samples" / "CR_cspine_tiny16x16_explicitVR.dcm")
        fresh = []
        for _ in range(args.backlog):  # new UIDs so that each is its own instance
            ds = tiny
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            fresh.append(buf.getvalue())
        enqueue(store, spool, fresh)
        before = rss_mib()
        worker = Worker(config, store, spool, classifier, node="bench2")
        samples = []
        for _ in range(20):
            worker.run_once()
            samples.append(rss_mib())
        worker.stop()
        result.update({"backlog": args.backlog, "queue_depth": store.queue_depth(),
                       "rss_before_mib": round(before, 1),
                       "rss_while_processing_max_mib": round(max(samples), 1),
                       "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024, 1)})
    print(json.dumps(result))
    store.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
