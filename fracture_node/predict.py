"""``fracture-node predict``: score image and DICOM files offline and write a CSV.

Every input gets one row; an input that cannot be read gets ``status=not_processed`` and the
reason, never a crash. DICOM files (``.dcm`` or a ``DICM`` preamble) go through
:func:`fracture_node.dicom.pixels.load_dicom_file`; other files through
:func:`fracture_node.images.load_image_file`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fracture_node.errors import FractureNodeError, NotProcessable
from fracture_node.images import FloatImage, load_image_file
from fracture_node.logs import configure, get_logger

log = get_logger("predict")

COLUMNS = ("path", "probability", "label", "threshold", "operating_point", "model_sha256",
           "status", "reason")
_SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "DICOMDIR"})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fracture-node predict", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path,
                   help="files or folders (recursed); PNG/JPEG exported as a viewer shows them, "
                        "bone bright")
    p.add_argument("--output", type=Path, default=Path("-"),
                   help="CSV to write; - (the default) is standard output, with the log on "
                        "standard error")
    p.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--operating-point", default="balanced",
                   help="balanced, high_sensitivity, or a probability threshold")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--saliency", type=Path, default=None, metavar="DIR",
                   help="also write an overlay PNG per image (heat map and regions) into DIR")
    return p.parse_args(argv)


def iter_inputs(paths: list[Path]) -> Iterator[Path]:
    """Files named directly, then every file under each folder (sorted), hidden files skipped."""
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and f.name not in _SKIP_NAMES:
                    yield f
        else:
            yield path


def is_dicom(path: Path) -> bool:
    """A ``.dcm`` suffix or the ``DICM`` magic at byte 128 (PS3.10 7.1)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def load_any(path: Path) -> FloatImage:
    """A normalised grey image from an image or DICOM file; raises :class:`NotProcessable`."""
    if not path.exists():
        raise NotProcessable("not_found", f"{path.name}: no such file")
    if is_dicom(path):
        try:
            from fracture_node.dicom.pixels import load_dicom_file
        except ImportError as exc:
            raise NotProcessable("dicom_unsupported",
                                 f"{path.name}: DICOM decoding is not available ({exc})") from None
        return load_dicom_file(path)
    return load_image_file(path)


def _prepare(args: tuple[Path, object]) -> tuple[np.ndarray | None, str, str]:
    path, clf = args
    try:
        img = load_any(path)
        return clf.prepare(img), "", ""  # type: ignore[attr-defined]
    except NotProcessable as exc:
        return None, exc.reason, str(exc)
    except Exception as exc:  # one bad input never stops the others
        return None, "error", f"{path.name}: {type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> tuple[int, int]:
    """Write the CSV; return (processed, not processed)."""
    from fracture_node.ml.infer import Classifier

    clf = Classifier.load(args.model, device=args.device)
    threshold = clf.threshold(args.operating_point)
    files = list(iter_inputs(args.paths))
    to_stdout = str(args.output) == "-"
    if not to_stdout:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    ok = bad = 0
    with (contextlib.nullcontext(sys.stdout) if to_stdout
          else args.output.open("w", newline="")) as fh, \
            ThreadPoolExecutor(max(1, args.workers)) as pool:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            prepared = list(pool.map(_prepare, [(f, clf) for f in chunk]))
            good = [i for i, (arr, _, _) in enumerate(prepared) if arr is not None]
            probs: dict[int, float] = {}
            if good:
                batch = np.stack([prepared[i][0] for i in good])  # type: ignore[misc]
                for i, prob in zip(good, clf.predict_batch(batch), strict=True):
                    probs[i] = float(prob)
            for i, path in enumerate(chunk):
                row = {"path": str(path), "threshold": f"{threshold:.6f}",
                       "operating_point": args.operating_point, "model_sha256": clf.sha256}
                if i in probs:
                    row.update(probability=f"{probs[i]:.6f}",
                               label="fractured" if probs[i] >= threshold else "normal",
                               status="ok", reason="")
                    ok += 1
                else:
                    _, reason, message = prepared[i]
                    row.update(probability="", label="", status="not_processed", reason=reason)
                    log.warning("input_not_processed", file=path.name, reason=reason,
                                detail=message)
                    bad += 1
                writer.writerow(row)
    log.info("predict_done", processed=ok, not_processed=bad,
             output="stdout" if to_stdout else str(args.output), model_sha256=clf.sha256, operating_point=args.operating_point, threshold=threshold)
    if args.saliency is not None:
        from fracture_node.predict_saliency import write_overlays

        written = write_overlays(files, clf, args.saliency, batch_size=args.batch_size,
                                 operating_point=args.operating_point)
        log.info("saliency_written", images=len(written), folder=str(args.saliency))
    return ok, bad


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # The log goes to stderr: stdout may be the CSV (and is a terminal's, for people).
    configure(stream=sys.stderr)
    try:
        run(args)
    except FractureNodeError as exc:
        log.error("predict_failed", error=str(exc))
        print(f"fracture-node predict: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
