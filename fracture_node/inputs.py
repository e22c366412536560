"""The inputs of offline scoring: files found under the paths given, read as normalised grey images.

``fracture-node predict`` and its overlays read their files here. DICOM files (``.dcm`` or a
``DICM`` preamble) go through :func:`fracture_node.dicom.pixels.load_dicom_file`; other files
through :func:`fracture_node.images.load_image_file`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fracture_node.errors import NotProcessable
from fracture_node.images import FloatImage, load_image_file

_SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "DICOMDIR"})


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
