"""Labelled radiograph datasets for training and evaluation, and their pixel cache.

Three layouts are understood (see :func:`load_records`):

* the fracture-xr layout: ``<root>/labels.csv`` with ``file,label,source,group,split,...`` and its
  group-aware splits;
* a folder per label: ``<root>/<label>/*.png|jpg|jpeg|tif|tiff|bmp`` (split assigned
  deterministically from a hash of the file name: 80/10/10);
* a CSV file with ``path,label[,split]`` (paths relative to the CSV's folder, or absolute).

Every image goes through :func:`fracture_node.images.load_image_file` and
:func:`fracture_node.images.letterbox`, exactly as at serving time, and is cached once as uint8
(``round(255 * x)``) in a ``.npy`` array per split and input size, so epochs never decode JPEGs.
Images that cannot be decoded are logged by file name and skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fracture_node.errors import DatasetError, NotProcessable
from fracture_node.images import letterbox, load_image_file
from fracture_node.logs import get_logger

log = get_logger("ml.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
POSITIVE = frozenset({"fractured", "fracture", "positive", "1", "true", "yes"})
NEGATIVE = frozenset({"normal", "negative", "0", "false", "no", "not_fractured"})
SPLITS = ("train", "val", "test")
# Bump when the cached pixels would change (normalisation, resize, quantisation).
CACHE_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One labelled image: where it is and what is known about it (no patient data)."""

    path: Path
    label: int
    split: str
    source: str = "unknown"
    body_part: str = "unknown"
    group: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class CachedSplit:
    """The pixels of one split at one input size, ready for batching."""

    images: NDArray[np.uint8]  # [N, S, S], round(255 * letterboxed normalised image)
    labels: NDArray[np.float32]  # [N], 1 = fractured
    records: list[Record]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def parse_label(value: str) -> int:
    """Map a label string to 1 (fractured) or 0 (normal)."""
    key = value.strip().lower()
    if key in POSITIVE:
        return 1
    if key in NEGATIVE:
        return 0
    raise DatasetError(f"unknown label {value!r}: use 'fractured' or 'normal'")


def _hash_split(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 9 else "val" if bucket == 8 else "train"


def _from_labels_csv(csv_path: Path, base: Path) -> list[Record]:
    records: list[Record] = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        path_col = "file" if "file" in cols else "path" if "path" in cols else None
        if path_col is None or "label" not in cols:
            raise DatasetError(f"{csv_path.name}: needs a 'file' or 'path' column and a 'label' column")
        for row in reader:
            rel = Path(row[path_col])
            path = rel if rel.is_absolute() else base / rel
            split = (row.get("split") or "").strip().lower() or _hash_split(rel.name)
            if split not in SPLITS:
                raise DatasetError(f"{csv_path.name}: unknown split {split!r} for {rel.name}")
            known = {path_col, "label", "split", "source", "body_part", "group"}
            records.append(
                Record(
                    path=path,
                    label=parse_label(row["label"]),
                    split=split,
                    source=(row.get("source") or "unknown").strip() or "unknown",
                    body_part=(row.get("body_part") or "unknown").strip() or "unknown",
                    group=(row.get("group") or "").strip(),
                    extra={k: v for k, v in row.items() if k not in known and v is not None},
                )
            )
    return records


def _from_folders(root: Path) -> list[Record]:
    records: list[Record] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            label = parse_label(label_dir.name)
        except DatasetError:
            log.warning("folder_ignored", folder=label_dir.name, reason="not a label name")
            continue
        for path in sorted(label_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                records.append(Record(path=path, label=label, split=_hash_split(path.name),
                                      source=root.name))
    return records


def load_records(data: str | Path) -> list[Record]:
    """Read the records of a dataset (a fracture-xr folder, a folder per label, or a CSV).

    Raises
    ------
    DatasetError
        When nothing usable is found.
    """
    root = Path(data)
    if root.is_file() and root.suffix.lower() == ".csv":
        records = _from_labels_csv(root, root.parent)
    elif (root / "labels.csv").is_file():
        records = _from_labels_csv(root / "labels.csv", root)
    elif root.is_dir():
        records = _from_folders(root)
    else:
        raise DatasetError(f"{root}: not a folder or a CSV file")
    if not records:
        raise DatasetError(f"{root}: no labelled images found")
    return records


def split_records(records: Sequence[Record], split: str) -> list[Record]:
    """The records of one split, in file order."""
    return [r for r in records if r.split == split]


def _prepare_one(args: tuple[str, int]) -> tuple[NDArray[np.uint8] | None, str]:
    path, size = args
    img, reason = _prepare_float((path, size))
    if img is None:
        return None, reason
    return np.rint(img * 255.0).astype(np.uint8), ""


def _prepare_float(args: tuple[str, int]) -> tuple[NDArray[np.float32] | None, str]:
    path, size = args
    try:
        return letterbox(load_image_file(path), size), ""
    except NotProcessable as exc:
        return None, exc.reason
    except Exception as exc:  # a broken file must never stop a run
        return None, type(exc).__name__


def prepare_exact(records: Sequence[Record], size: int, workers: int = 1,
                  name: str = "split") -> tuple[NDArray[np.float32], list[Record]]:
    """The float32 model inputs of ``records`` exactly as served (no cache, no quantisation)."""
    records = list(records)
    jobs = [(str(r.path), size) for r in records]
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_prepare_float, jobs, chunksize=16))
    else:
        results = [_prepare_float(j) for j in jobs]
    kept: list[Record] = []
    arrays: list[NDArray[np.float32]] = []
    for rec, (arr, reason) in zip(records, results, strict=True):
        if arr is None:
            log.warning("image_skipped", file=rec.path.name, reason=reason, split=name)
            continue
        kept.append(rec)
        arrays.append(arr)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size), np.float32)
    return images, kept


def load_boxes(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """Fracture boxes per image file name from a ``file,x0,y0,x1,y1`` CSV (stored-image pixels).

    The fracture-xr ``boxes.csv`` has this layout. Rows whose numbers do not parse are skipped
    with a warning; the file is keyed by the name of the image file (not its folder).
    """
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"file", "x0", "y0", "x1", "y1"}
        if not need <= set(reader.fieldnames or ()):
            raise DatasetError(f"{Path(path).name}: needs the columns file,x0,y0,x1,y1")
        for row in reader:
            try:
                box = (float(row["x0"]), float(row["y0"]), float(row["x1"]), float(row["y1"]))
            except (TypeError, ValueError):
                log.warning("box_skipped", file=Path(row.get("file") or "").name)
                continue
            if box[2] > box[0] and box[3] > box[1]:
                boxes.setdefault(Path(row["file"]).name, []).append(box)
    return boxes


def _stored_size(record: Record) -> tuple[int, int]:
    """(height, width) of a record's stored image: from ``labels.csv`` when given, else the file."""
    try:
        return int(record.extra["height"]), int(record.extra["width"])
    except (KeyError, TypeError, ValueError):
        from PIL import Image

        with Image.open(record.path) as img:
            return img.height, img.width


def model_boxes(records: Sequence[Record], size: int,
                boxes: dict[str, list[tuple[float, float, float, float]]]
                ) -> list[list[tuple[float, float, float, float]]]:
    """Each record's boxes in model-input pixels (the :func:`letterbox` arithmetic); [] if none."""
    out: list[list[tuple[float, float, float, float]]] = []
    for rec in records:
        found = boxes.get(rec.path.name, [])
        if not found:
            out.append([])
            continue
        h, w = _stored_size(rec)
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        top, left = (size - nh) // 2, (size - nw) // 2
        sx, sy = nw / w, nh / h
        out.append([(x0 * sx + left, y0 * sy + top, x1 * sx + left, y1 * sy + top)
                    for x0, y0, x1, y1 in found])
    return out


def box_masks(boxes: Sequence[Sequence[tuple[float, float, float, float]]], size: int
              ) -> NDArray[np.float32]:
    """``[B, size, size]`` masks, 1 inside any of an image's boxes (model-input pixels)."""
    masks = np.zeros((len(boxes), size, size), np.float32)
    for k, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes:
            c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            c1, r1 = min(size, int(np.ceil(x1))), min(size, int(np.ceil(y1)))
            masks[k, r0:r1, c0:c1] = 1.0
    return masks


def _cache_key(records: Sequence[Record], size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for r in records:
        h.update(f"{r.path}|{r.label}\n".encode())
    return h.hexdigest()[:16]


def cache_split(
    records: Sequence[Record],
    size: int,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    name: str = "split",
) -> CachedSplit:
    """Decode, normalise and letterbox ``records`` once; reuse the ``.npy`` cache when present.

    Parameters
    ----------
    records:
        The images to prepare.
    size:
        The model's input side in pixels.
    cache_dir:
        Where ``<name>-<size>-<key>.npy`` lives; ``None`` keeps everything in memory only.
    workers:
        Decoding processes (1 = in this process).
    name:
        A label for the cache file and the logs (``train``, ``val``...).
    """
    records = list(records)
    npy: Path | None = None
    if cache_dir is not None:
        cdir = Path(cache_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(records, size)
        npy = cdir / f"{name}-{size}-{key}.npy"
        meta = npy.with_suffix(".json")
        if npy.is_file() and meta.is_file():
            cached_idx: list[int] = json.loads(meta.read_text())["kept"]
            images = np.load(npy, mmap_mode=None)
            kept = [records[i] for i in cached_idx]
            log.info("cache_hit", split=name, size=size, images=len(kept))
            return CachedSplit(images, np.array([r.label for r in kept], np.float32), kept)
    jobs = [(str(r.path), size) for r in records]
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_prepare_one, jobs, chunksize=16))
    else:
        results = [_prepare_one(j) for j in jobs]
    arrays: list[NDArray[np.uint8]] = []
    kept_idx: list[int] = []
    for i, (arr, reason) in enumerate(results):
        if arr is None:
            log.warning("image_skipped", file=records[i].path.name, reason=reason, split=name)
            continue
        arrays.append(arr)
        kept_idx.append(i)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8)
    kept = [records[i] for i in kept_idx]
    if npy is not None:
        tmp = npy.with_name(npy.name + f".{os.getpid()}.tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, npy)
        npy.with_suffix(".json").write_text(json.dumps({"kept": kept_idx, "size": size}))
    log.info("cache_built", split=name, size=size, images=len(kept),
             skipped=len(records) - len(kept))
    return CachedSplit(images, np.array([r.label for r in kept], np.float32), kept)
