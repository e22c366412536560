"""Ingest: the same large DX instances pushed by DCMTK storescu to fracture-node and to storescp.

    .venv/bin/python benchmarks/ingest.py [--instances 20] [--rounds 3]

Both receivers run on this machine at once; runs alternate (storescp, fracture-node, storescp, ...)
so that a change of machine load hits both. fracture-node runs as ``fracture-node serve --role
receiver`` (no model in the way: the worker's speed is ``benchmarks/pipeline.py``'s subject) and
does more than storescp: it fsyncs every object and commits a SQL row before answering. Prints one
JSON object with the median times and ``ratio`` = fracture-node / storescp (target: at most 1.0).

    .venv/bin/python benchmarks/ingest.py --busy [--backlog 300] [--engine auto]

``--busy`` adds a third receiver: a full ``fracture-node serve`` (role ``all``: receiver and
worker, the bundled model copied to the temporary folder as ``benchmarks/latency.py`` does,
``[model] engine`` from ``--engine``, whose ``auto`` is OpenVINO on a CPU (ONNX Runtime where
OpenVINO cannot be imported), saliency on) whose worker scores throughout each of its rounds:
before the rounds, and again before each of its
rounds, dataset radiographs (``benchmarks/pipeline.py``'s small CR objects) are pushed to it
until ``--backlog`` instances wait in its queue. Its rounds get new UIDs (a duplicate would be
acknowledged without a write). Outside its rounds the process is paused (SIGSTOP), so that the
storescp and receiver-only rounds run on an otherwise quiet machine, as without ``--busy``. Also
printed: ``busy_node_s``, ``ratio_busy_to_idle`` = busy node / receiver-only (target: at most
1.0: the receiver must not slow down while the worker is busy), ``ratio_busy_to_storescp``, and
per busy round the node's queue (``queued``, ``claimed``) from SQL before and after, the
instances it finished and the CPU seconds it spent during the round, and its resident memory;
``worker_busy_every_round`` says whether the worker held a claimed batch at both ends of every
round with instances still queued after it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).with_name("fracture-node")
sys.path.insert(0, str(REPO))

from fracture_node.ml.infer import ENGINES  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def make_instances(out: Path, n: int) -> list[Path]:
    """~10 MB uncompressed DX objects made from the 2500x2048 12-bit hand radiograph."""
    src = pydicom.dcmread(SHARED / "dicom-samples" / "CR_hand_J2KR_Kakadu_SOTmarker.dcm")
    pixels = src.pixel_array.astype(np.uint16)
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID = "DX", "Bench^Ingest", "BENCH"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def push(port: int, aet: str, files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def renew_uids(files: list[Path]) -> None:
    """New SOP Instance UIDs (and one new study) in place: a node that stored the old ones would
    acknowledge them again without a write."""
    study = generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)


class BusyNode:
    """``fracture-node serve`` with its worker (bundled model, saliency on) kept scoring a backlog
    of queued radiographs; paused (SIGSTOP) between its rounds."""

    def __init__(self, folder: Path, engine: str) -> None:
        sys.path.insert(0, str(REPO))
        from benchmarks.latency import private_model
        from benchmarks.pipeline import sources

        self.folder, self.port = folder, free_port()
        model = private_model(folder)
        self.db = folder / "fn" / "fracture-node.db"
        config = folder / "fn.toml"
        config.write_text(
            f'[node]\nport = {self.port}\nbind_address = "127.0.0.1"\n'
            f'state_dir = "{folder / "fn"}"\nrole = "all"\n'
            f'[model]\npath = "{model}"\nengine = "{engine}"\n[saliency]\nenabled = true\n'
            '[logging]\nlevel = "warning"\n[metrics]\nenabled = false\n')
        # a dozen test-split radiographs as uncompressed CR objects, pushed again and again
        self.templates = [pydicom.dcmread(io.BytesIO(b)) for b in sources("dataset", 12)]
        self.pushed = 0
        self.proc = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def top_up(self, backlog: int) -> int:
        """Push radiographs (studies of three) until ``backlog`` instances are queued; the first
        call waits for the model to load (the port is bound before, callers wait)."""
        from pynetdicom import AE

        need = backlog - self.probe()["queued"]
        if need <= 0:
            return 0
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = 900
        ae.add_requested_context(self.templates[0].SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FRACTURE_NODE")
        if not assoc.is_established:
            raise RuntimeError(f"the busy node on port {self.port} refused the association")
        try:
            for i in range(need):
                if i % 3 == 0:
                    study = generate_uid()
                ds = self.templates[(self.pushed + i) % len(self.templates)]
                ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0:
                    raise RuntimeError(f"the busy node answered C-STORE with {status}")
        finally:
            assoc.release()
        self.pushed += need
        return need

    def wait_scoring(self, timeout: float = 900) -> None:
        """Until the worker has finished its first instance (model loaded, graph exported)."""
        deadline = time.monotonic() + timeout
        while self.probe()["finished"] == 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError("the busy node's worker finished nothing")
            time.sleep(0.5)

    def probe(self) -> dict[str, Any]:
        """The queue from SQL, and the process's CPU seconds and resident memory."""
        from fracture_node.db import schema as s

        counts: dict[str, int] = {}
        if self.db.is_file():
            with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
                counts = dict(conn.execute(
                    "SELECT state, count(*) FROM instances GROUP BY state").fetchall())
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss = next(int(line.split()[1]) for line in
                   Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return {"queued": counts.get(s.QUEUED, 0), "claimed": counts.get(s.CLAIMED, 0),
                "finished": sum(counts.get(state, 0) for state in s.FINAL_INSTANCE_STATES),
                "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
                "rss_mib": round(rss / 1024, 1)}

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def engine_used(self) -> str:
        from benchmarks.latency import engine_used

        return engine_used(self.proc.pid)


def busy_round(busy: BusyNode, files: list[Path], backlog: int) -> tuple[float, dict[str, Any]]:
    """One push to the busy node, its backlog topped up first; the node paused again after."""
    renew_uids(files)
    busy.resume()
    topped_up = busy.top_up(backlog)
    before = busy.probe()
    took = push(busy.port, "FRACTURE_NODE", files)
    after = busy.probe()
    busy.pause()
    cpu = after["cpu_s"] - before["cpu_s"]
    return took, {
        "topped_up": topped_up,
        "queued_before": before["queued"], "queued_after": after["queued"],
        "claimed_before": before["claimed"], "claimed_after": after["claimed"],
        "finished_during": after["finished"] - before["finished"],
        "cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / took, 2),
        "rss_mib": after["rss_mib"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true",
                        help="also push to a full node whose worker is scoring a backlog")
    parser.add_argument("--backlog", type=int, default=300,
                        help="with --busy: instances kept queued before each busy round")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="with --busy: the busy node's [model] engine (default: auto)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fn-ingest-"))
    files = make_instances(tmp / "in", args.instances)
    size = sum(f.stat().st_size for f in files)
    busy = BusyNode(tmp / "busy", args.engine) if args.busy else None
    busy_times: list[float] = []
    busy_rounds: list[dict[str, Any]] = []
    busy_engine = "unknown"

    scp_port, fn_port = free_port(), free_port()
    (tmp / "scp").mkdir()
    storescp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(tmp / "scp"),
                                 str(scp_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    config = tmp / "fn.toml"
    config.write_text(f'[node]\nport = {fn_port}\nbind_address = "127.0.0.1"\n'
                      f'state_dir = "{tmp / "fn"}"\nrole = "receiver"\n'
                      '[logging]\nlevel = "warning"\n[metrics]\nenabled = false\n')
    node = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(scp_port)
        wait_port(fn_port)
        if busy is not None:
            wait_port(busy.port)
            busy.top_up(args.backlog)
            busy.wait_scoring()
            busy.pause()
        times: dict[str, list[float]] = {"storescp": [], "fracture_node": []}
        for r in range(args.rounds):
            times["storescp"].append(push(scp_port, "STORESCP", files))
            shutil.rmtree(tmp / "scp")
            (tmp / "scp").mkdir()
            # New UIDs are not needed: an identical duplicate is acknowledged without a write,
            # which would flatter us; so each round gets a fresh state folder instead.
            times["fracture_node"].append(push(fn_port, "FRACTURE_NODE", files))
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            shutil.rmtree(tmp / "fn")
            if busy is not None:
                took, seen = busy_round(busy, files, args.backlog)
                busy_times.append(took)
                busy_rounds.append(seen)
                busy_engine = busy.engine_used()
            if r + 1 < args.rounds:
                node = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(fn_port)
    finally:
        storescp.terminate()
        if node.poll() is None:
            node.terminate()
        if busy is not None:
            busy.stop()
    scp_med = statistics.median(times["storescp"])
    fn_med = statistics.median(times["fracture_node"])
    result: dict[str, Any] = {
        "benchmark": "ingest", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "instances": len(files), "mib_per_round": round(size / 2**20, 1),
        "rounds": args.rounds,
        "storescp_s": [round(t, 3) for t in times["storescp"]],
        "fracture_node_s": [round(t, 3) for t in times["fracture_node"]],
        "storescp_mib_per_s": round(size / 2**20 / scp_med, 1),
        "fracture_node_mib_per_s": round(size / 2**20 / fn_med, 1),
        "ratio": round(fn_med / scp_med, 3),
        "load_average": os.getloadavg()[0],
    }
    if busy is not None:
        busy_med = statistics.median(busy_times)
        result.update({
            "busy": True, "engine_used": busy_engine, "saliency": "on",
            "backlog": args.backlog,
            "busy_node_s": [round(t, 3) for t in busy_times],
            "busy_node_mib_per_s": round(size / 2**20 / busy_med, 1),
            "ratio_busy_to_idle": round(busy_med / fn_med, 3),
            "ratio_busy_to_storescp": round(busy_med / scp_med, 3),
            "busy_rounds": busy_rounds,
            "worker_busy_every_round": all(
                b["claimed_before"] > 0 and b["claimed_after"] > 0 and b["queued_after"] > 0
                for b in busy_rounds),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        })
    print(json.dumps(result))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
