"""The spool: received objects on disk, byte for byte as they arrived.

A file is written under a temporary name, fsynced, renamed into place and its folder fsynced, so
that a file under its final name is always complete and durable. A failed write leaves nothing.
Layout: ``<spool>/<study uid>/<sop instance uid>.<sha256[:16]>.dcm`` (a UID that is not a plain
UID is replaced by a hash, so no received value can choose a path).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from fracture_node.errors import StorageError

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")


def safe_name(uid: str | None) -> str:
    """A file-name-safe form of a UID: the UID itself when it is well formed, else a hash."""
    if uid and _UID_RE.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256((uid or "").encode("utf-8", "replace")).hexdigest()[:40]


class Spool:
    """Durable storage of received objects under one folder."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def relative_path(self, study_uid: str, sop_uid: str, sha256: str) -> str:
        return f"{safe_name(study_uid)}/{safe_name(sop_uid)}.{sha256[:16]}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write(self, relative: str, data: bytes | memoryview) -> Path:
        """Write ``data`` durably under ``relative``; raise :class:`StorageError` on failure.

        Nothing is left behind when the write fails (out of space, I/O error).
        """
        final = self.root / relative
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes + len(data):
            raise StorageError(
                f"spool has less than {self.min_free_bytes + len(data)} bytes free; "
                "free some space or lower [storage] min_free_bytes"
            )
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            what = "out of disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StorageError(f"cannot write {relative}: {what}") from exc
        return final

    def sweep_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by writes that a crash interrupted; returns how many.

        Such a file was never acknowledged (the answer follows the rename), so nothing refers
        to it; it may hold patient data, so it should not linger. Meant for housekeeping.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def remove(self, relative: str) -> None:
        """Delete a spooled file (best effort; used to undo a store that SQL refused)."""
        try:
            (self.root / relative).unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
