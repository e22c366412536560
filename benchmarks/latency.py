"""Latency: from the last instance of a three-image study to the SR acknowledged by the PACS.

    .venv/bin/python benchmarks/latency.py [--studies 20] [--model PATH] [--engine auto]
        [--sub-batch 0]

A real ``fracture-node serve`` process (SQLite, the bundled model unless ``--model``) receives
three-image studies from pynetdicom and reports to DCMTK storescp playing the PACS. For each study:
t0 = the C-STORE response of its last instance, t1 = the delivery recorded as acknowledged in SQL
(``delivery_attempts.attempted_at``, the attempt's start, + its duration: every object stored).
Printed: p50/p95/max of t1 - t0 - stable_after_s, i.e. the time the node adds beyond the
stability wait it is configured to observe; ``sr_p50_s``/``sr_p95_s`` the same up to the SR's own
acknowledgement (``deliveries.report_delivered_at``), which differs with ``--overlays``.
``--engine`` is ``[model] engine`` (``auto``, the default, is openvino on a CPU, onnxruntime
where openvino cannot be imported); the model
file is copied into the temporary folder first, so that its ONNX graph is exported there, never
beside the bundled model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from pynetdicom import AE

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).with_name("fracture-node")
sys.path.insert(0, str(REPO))
from benchmarks.ingest import free_port, wait_port  # noqa: E402
from benchmarks.pipeline import cr_from_jpeg  # noqa: E402
from fracture_node.ml.infer import ENGINES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--stable-after", type=float, default=1.0)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--saliency", choices=["on", "off"], default="on",
                        help="[saliency] enabled (the daemon's default: on)")
    parser.add_argument("--overlays", choices=["none", "sc", "gsps", "both"], default="none",
                        help="the destination's overlays (the default: none, the SR alone)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="[model] engine (the daemon's default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="[model] threads")
    parser.add_argument("--sub-batch", type=int, default=0,
                        help="[model] sub_batch (0: automatic, 2 images per pass on a CPU)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fn-latency-"))
    import csv

    root = SHARED / "datasets" / "fracture-xr"
    with (root / "labels.csv").open() as fh:
        jpegs = [root / r["file"] for r in csv.DictReader(fh) if r["split"] == "test"][:9]
    templates = [cr_from_jpeg(p) for p in jpegs]

    pacs_port, fn_port = free_port(), free_port()
    (tmp / "pacs").mkdir()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(tmp / "pacs"),
                             str(pacs_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    model = private_model(tmp, args.model)
    model_line = (f'path = "{model}"\nengine = "{args.engine}"\nthreads = {args.threads}\n'
                  f'sub_batch = {args.sub_batch}\n')
    config = tmp / "fn.toml"
    config.write_text(
        f'[node]\nport = {fn_port}\nbind_address = "127.0.0.1"\nstate_dir = "{tmp / "fn"}"\n'
        f"[study]\nstable_after_s = {args.stable_after}\n[model]\n{model_line}max_wait_ms = 50\n"
        '[logging]\nlevel = "warning"\n[metrics]\nenabled = false\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f'port = {pacs_port}\noverlays = "{args.overlays}"\n'
        f"[saliency]\nenabled = {'true' if args.saliency == 'on' else 'false'}\n")
    node = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ends: dict[str, float] = {}
    engine = "unknown"
    try:
        wait_port(pacs_port)
        wait_port(fn_port, timeout=300)
        ae = AE(ae_title="MODALITY")
        # The port is bound before the model loads (slow on a busy machine): the first
        # association waits in the backlog until the node serves, past pynetdicom's 30 s.
        ae.acse_timeout = 300
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        for i in range(args.studies):
            study = generate_uid()
            assoc = ae.associate("127.0.0.1", fn_port, ae_title="FRACTURE_NODE")
            for k in range(3):
                ds = templates[(3 * i + k) % len(templates)]
                ds.StudyInstanceUID = study
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                assoc.send_c_store(ds)
            ends[study] = time.time()  # wall clock: compared with SQL timestamps
            assoc.release()
            time.sleep(args.stable_after + 1.5)  # studies one after another, as a modality does
        deadline = time.monotonic() + 120
        db = tmp / "fn" / "fracture-node.db"
        rows: list[tuple[str, str, float, str | None]] = []
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as conn:
                rows = conn.execute(
                    "SELECT r.study_instance_uid, a.attempted_at, a.duration_ms, "
                    "d.report_delivered_at "
                    "FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
                    "JOIN reports r ON r.id = d.report_id WHERE a.ok").fetchall()
            if len(rows) >= len(ends):
                break
            time.sleep(0.5)
        engine = engine_used(node.pid)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.terminate()
    lat, sr_lat = [], []
    for study_uid, attempted, duration_ms, sr_stored in rows:
        lat.append(_ts(attempted) + duration_ms / 1000 - ends[study_uid] - args.stable_after)
        if sr_stored is not None:
            sr_lat.append(_ts(sr_stored) - ends[study_uid] - args.stable_after)
    arr = np.array(sorted(lat))
    sr = np.array(sorted(sr_lat)) if sr_lat else np.array([np.nan])
    print(json.dumps({
        "benchmark": "latency", "date": time.strftime("%Y-%m-%d"),
        "saliency": args.saliency, "overlays": args.overlays, "engine": args.engine,
        "sub_batch": args.sub_batch,
        "engine_used": engine,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "studies": len(ends), "reported": len(lat), "stable_after_s": args.stable_after,
        "p50_s": round(float(np.percentile(arr, 50)), 3),
        "p95_s": round(float(np.percentile(arr, 95)), 3),
        "max_s": round(float(arr.max()), 3),
        # the SR alone (deliveries.report_delivered_at: when the PACS answered its C-STORE);
        # with overlays, the SR goes first in the association and the overlays after it
        "sr_p50_s": round(float(np.percentile(sr, 50)), 3),
        "sr_p95_s": round(float(np.percentile(sr, 95)), 3),
        "load_average": os.getloadavg()[0],
    }))
    return 0


def private_model(tmp: Path, source: Path | None = None) -> Path:
    """A copy of the model file (the bundled one unless ``source``) in ``tmp/model``, with its
    ONNX graph when one lies beside it (as the serving install ships the bundled model): the
    node never writes beside the bundled model, and a node on the onnxruntime engine runs the
    graph without importing torch, as a hospital's would; without a graph it exports one there."""
    import shutil

    from fracture_node.ml.infer import bundled_model_path

    source = source or bundled_model_path()
    model = tmp / "model" / "fracture-model.pt"
    model.parent.mkdir(parents=True)
    shutil.copy(source, model)
    if source.with_suffix(".onnx").is_file():
        shutil.copy(source.with_suffix(".onnx"), model.with_suffix(".onnx"))
    return model


def engine_used(pid: int) -> str:
    """The engine a running node loaded, read from its memory map: ``openvino``,
    ``onnxruntime`` or ``torch`` when only that engine's library is mapped, the names joined by
    ``+`` when several are (``unknown`` when none is)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    mapped = {"openvino": "libopenvino" in maps,
              "onnxruntime": "libonnxruntime" in maps or "onnxruntime_pybind11" in maps,
              "torch": "libtorch" in maps}
    return "+".join(name for name, found in mapped.items() if found) or "unknown"


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()


if __name__ == "__main__":
    raise SystemExit(main())
