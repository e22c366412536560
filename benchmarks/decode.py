"""Decode + normalise + letterbox time per DICOM sample file, as JSON on stdout.

Usage::

    .venv/bin/python benchmarks/decode.py [--samples DIR] [--repeat N] [--size 384]
        [--parity DATASET_DIR]

For each ``*.dcm`` under the samples folder (default ``../shared/dicom-samples``) it reports the
median over ``--repeat`` runs of: ``read_ms`` (pydicom.dcmread of the file), ``decode_ms`` (the
pixel decoder alone), ``pixels_ms`` (:func:`read_pixels`: decode, LUTs, normalise), ``letterbox_ms``
and ``total_ms`` (read + pixels + letterbox, what the worker pays per object), plus
``total_shrunk_ms`` with ``max_side`` equal to ``--size``. Refused objects give their reason and the
time to refuse. ``--parity`` adds the max/mean absolute differences between a few dataset JPEGs and
their DICOM encodings (full size and letterboxed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import cpu_name  # noqa: E402
from fracture_node import images  # noqa: E402
from fracture_node.dicom import pixels
from fracture_node.errors import NotProcessable
from fracture_node.logs import configure

REPO = Path(__file__).resolve().parents[1]


def _median_ms(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 2), result


def bench_file(path: Path, root: Path, repeat: int, size: int) -> dict[str, Any]:
    row: dict[str, Any] = {"file": str(path.relative_to(root))}
    read_ms, ds = _median_ms(lambda: pydicom.dcmread(path, force=True), repeat)
    ts = pixels.transfer_syntax(ds)
    row.update(transfer_syntax=str(ts) if ts else None,
               transfer_syntax_name=ts.name if ts else None,
               rows=ds.get("Rows"), columns=ds.get("Columns"), read_ms=read_ms)
    start = time.perf_counter()
    try:
        pixels.check_scope(ds)
    except NotProcessable as exc:
        row.update(refused=exc.reason, refuse_ms=round((time.perf_counter() - start) * 1000, 2))
        return row
    try:
        # the decoder call read_pixels makes (preferred plugin first), to show the decode share
        row["decode_ms"], _ = _median_ms(
            lambda: pixels._decode_frame(ds, ts), repeat)  # type: ignore[arg-type]
    except Exception as exc:  # reported, read_pixels refuses it below
        row["decode_error"] = type(exc).__name__
    start = time.perf_counter()
    try:
        pixels_ms, image = _median_ms(lambda: pixels.read_pixels(ds), repeat)
    except NotProcessable as exc:
        row.update(refused=exc.reason, refuse_ms=round((time.perf_counter() - start) * 1000, 2))
        return row
    letterbox_ms, _ = _median_ms(lambda: images.letterbox(image, size), repeat)
    shrunk_ms, _ = _median_ms(
        lambda: images.letterbox(pixels.read_pixels(ds, max_side=size), size), repeat)
    row.update(pixels_ms=pixels_ms, letterbox_ms=letterbox_ms,
               total_ms=round(read_ms + pixels_ms + letterbox_ms, 2),
               total_shrunk_ms=round(read_ms + shrunk_ms, 2))
    return row


def parity(dataset_dir: Path, size: int) -> dict[str, Any]:
    """Max/mean |DICOM - JPEG| per encoding over three dataset images (the unit-test encodings)."""
    sys.path.insert(0, str(REPO))
    from tests.unit import test_pixels_parity as enc  # the same encodings the tests use

    makers = dict(enc.EXACT)
    makers["monochrome1_jpegls_window_127.5_255"] = enc._monochrome1_jpegls_window
    makers["clinical_window_100_120"] = enc._clinical_window
    out: dict[str, Any] = {}
    for name, make in makers.items():
        worst = [0.0, 0.0, 0.0, 0.0]
        for rel in enc.JPEGS:
            path = dataset_dir / rel
            reference = images.load_image_file(path)
            from PIL import Image

            with Image.open(path) as img:
                px = np.asarray(img.convert("L"))
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, make(px, path.read_bytes()), enforce_file_format=True)
            buf.seek(0)
            image = pixels.read_pixels(pydicom.dcmread(buf))
            d = np.abs(image - reference)
            dl = np.abs(images.letterbox(image, size) - images.letterbox(reference, size))
            for i, v in enumerate((d.max(), d.mean(), dl.max(), dl.mean())):
                worst[i] = max(worst[i], float(v))
        out[name] = {"max_abs": worst[0], "mean_abs": worst[1],
                     "letterbox_max_abs": worst[2], "letterbox_mean_abs": worst[3]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "dicom-samples")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--parity", type=Path, default=None, metavar="DATASET_DIR")
    args = parser.parse_args(argv)
    configure(level="error", json=True)  # stdout carries the JSON result only
    # decode_ms calls the decoder outside read_pixels, where pydicom logs a traceback per plugin.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    files = sorted(args.samples.rglob("*.dcm"))
    rows = [bench_file(path, args.samples, args.repeat, args.size) for path in files]
    result: dict[str, Any] = {
        "benchmark": "decode",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "repeat": args.repeat,
        "letterbox_size": args.size,
        "files": rows,
    }
    if args.parity is not None:
        result["parity"] = parity(args.parity, args.size)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
