"""Ingest: the same large DX instances pushed by DCMTK storescu to fracture-node and to storescp.

    .venv/bin/python benchmarks/ingest.py [--instances 20] [--rounds 3]

Both receivers run on this machine at once; runs alternate (storescp, fracture-node, storescp, ...)
so that a change of machine load hits both. fracture-node runs as ``fracture-node serve --role
receiver`` (no model in the way: the worker's speed is ``benchmarks/pipeline.py``'s subject) and
does more than storescp: it fsyncs every object and commits a SQL row before answering. Prints one
JSON object with the median times and ``ratio`` = fracture-node / storescp (target: at most 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).with_name("fracture-node")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fn-ingest-"))
    files = make_instances(tmp / "in", args.instances)
    size = sum(f.stat().st_size for f in files)

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
            if r + 1 < args.rounds:
                node = subprocess.Popen([str(BIN), "serve", "--config", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(fn_port)
    finally:
        storescp.terminate()
        if node.poll() is None:
            node.terminate()
    scp_med = statistics.median(times["storescp"])
    fn_med = statistics.median(times["fracture_node"])
    print(json.dumps({
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
    }))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
