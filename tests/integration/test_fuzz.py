"""Bad input through the real Storage SCP, then through the worker's decoder.

The corpus: every file in the shared ``malformed/`` and ``negative_controls/`` folders, plus
mutations of valid files made with a fixed seed (truncations, wrong element lengths, wrong VRs,
huge declared lengths, a transfer syntax that does not match the bytes, garbage after the
header, byte flips). Each case is sent as pre-encoded bytes over a pynetdicom association
(``send_c_store`` with a file path and chunked sending: pynetdicom does not decode it), so the
node receives exactly the broken bytes. A transfer syntax UID that nobody negotiated cannot
travel over DICOM at all (the presentation context fixes it), so the network form of a bogus
transfer syntax is a data set sent under a context whose syntax does not match its encoding.
"""

from __future__ import annotations

import collections
import io
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from fracture_node.db import schema as s
from fracture_node.db.store import ClaimedInstance
from fracture_node.images import letterbox
from fracture_node.stages.score import Decoded, Failed, decode_instance
from tests.support.node import TEST_SCOPE, RunningReceiver, node_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEED = 20261122
# (base file, rounds of mutations): small files many times, one compressed radiograph once
# (its mutations reach the JPEG decoder in the worker pass).
BASES = [("CR_cspine_tiny16x16_explicitVR.dcm", 3), ("negative_controls/CT_small.dcm", 2),
         ("negative_controls/MR_small_RLE.dcm", 2), ("CR_chest_MONO1_implicitVR_nometa.dcm", 1),
         ("CR_hip_RG2_JPLY_fixed.dcm", 1)]
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"FD", b"FL", b"IS", b"LO", b"OB", b"OW",
       b"SQ", b"UI", b"UL", b"UN", b"US", b"UT", b"ZZ", b"\x00\x00"]


@dataclass
class Case:
    name: str
    sop_class: str
    transfer_syntax: str
    body: bytes  # the data set bytes, sent as they are
    sop_instance: str = ""


def _encode(ds: pydicom.Dataset, ts: str) -> bytes:
    """The data set alone (no preamble, no file meta) in ``ts``'s encoding."""
    data = encode(ds, UID(ts).is_implicit_VR, UID(ts).is_little_endian)
    assert data is not None
    return data


def _base_cases(samples: Path) -> list[tuple[str, pydicom.Dataset, str]]:
    out = []
    for name, rounds in BASES:
        ds = pydicom.dcmread(samples / name, force=True)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
        ds.file_meta = FileMetaDataset()
        out += [(Path(name).stem, ds, ts)] * rounds
    return out


def _element_offsets(body: bytes, explicit: bool) -> list[int]:
    """Offsets of top-level element headers (good enough to aim mutations at headers)."""
    offsets, pos = [], 0
    while pos + 8 <= len(body) and len(offsets) < 200:
        offsets.append(pos)
        if explicit:
            vr = body[pos + 4:pos + 6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"UC", b"UR",
                      b"OV"):
                length = struct.unpack("<L", body[pos + 8:pos + 12])[0]
                header = 12
            else:
                length = struct.unpack("<H", body[pos + 6:pos + 8])[0]
                header = 8
        else:
            length = struct.unpack("<L", body[pos + 4:pos + 8])[0]
            header = 8
        if length == 0xFFFFFFFF:
            break
        pos += header + length
    return offsets


def _mutations(rng: random.Random, make: Callable[[], tuple[bytes, str]], ts: str
               ) -> Iterator[tuple[str, bytes, str, str]]:
    """(kind, body, transfer syntax to send under, SOP Instance UID) for one base object."""
    explicit = not UID(ts).is_implicit_VR

    def fresh() -> tuple[bytearray, list[int], str]:
        body, uid = make()
        return bytearray(body), _element_offsets(body, explicit) or [0], uid

    for _ in range(6):
        b, _o, uid = fresh()
        yield "truncated", bytes(b[:rng.randrange(0, len(b))]), ts, uid
    for _ in range(5):
        b, offsets, uid = fresh()
        pos = rng.choice(offsets)
        if explicit and b[pos + 4:pos + 6] not in (b"OB", b"OW", b"SQ", b"UT", b"UN"):
            b[pos + 6:pos + 8] = struct.pack("<H", rng.randrange(0, 0x10000))
        else:
            b[pos + 4:pos + 8] = struct.pack("<L", rng.randrange(0, 1 << 20))
        yield "wrong_length", bytes(b), ts, uid
    if explicit:
        for _ in range(5):
            b, offsets, uid = fresh()
            pos = rng.choice(offsets)
            b[pos + 4:pos + 6] = rng.choice(VRS)
            yield "wrong_vr", bytes(b), ts, uid
    for _ in range(4):
        b, offsets, uid = fresh()
        pos = rng.choice(offsets)
        huge = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFE, 0x10000000])
        if explicit:
            b[pos + 4:pos + 12] = b"OB\x00\x00" + struct.pack("<L", huge)
        else:
            b[pos + 4:pos + 8] = struct.pack("<L", huge)
        yield "huge_length", bytes(b), ts, uid
    for other in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian):
        if other != ts:
            b, _o, uid = fresh()
            yield "mismatched_transfer_syntax", bytes(b), str(other), uid
    for _ in range(3):
        b, _o, uid = fresh()
        cut = rng.randrange(len(b) // 4, len(b))
        yield "garbage_after_header", bytes(b[:cut]) + rng.randbytes(rng.randrange(1, 4096)), \
            ts, uid
    for _ in range(8):
        b, _o, uid = fresh()
        for _ in range(rng.randrange(1, 12)):
            b[rng.randrange(0, len(b))] = rng.randrange(0, 256)
        yield "byte_flips", bytes(b), ts, uid
    _b, _o, uid = fresh()
    yield "empty", b"", ts, uid
    _b, _o, uid = fresh()
    yield "garbage_only", rng.randbytes(2048), ts, uid


def build_corpus(samples: Path) -> list[Case]:
    """The shared bad files, then the seeded mutations of the base files."""
    cases: list[Case] = []
    for folder in ("malformed", "negative_controls"):
        for path in sorted((samples / folder).glob("*.dcm")):
            ds = pydicom.dcmread(path, force=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            raw = path.read_bytes()
            meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
            cases.append(Case(f"{folder}/{path.name}", str(ds.SOPClassUID), ts, raw[meta_end:],
                              str(ds.SOPInstanceUID)))
    rng = random.Random(SEED)
    for stem, ds, ts in _base_cases(samples):
        def make(ds: pydicom.Dataset = ds, ts: str = ts) -> tuple[bytes, str]:
            copy = ds.copy()
            copy.SOPInstanceUID = pydicom.uid.UID(
                f"2.25.{rng.getrandbits(120)}")  # seeded, so the corpus repeats exactly
            return _encode(copy, ts), str(copy.SOPInstanceUID)

        for kind, body, send_ts, uid in _mutations(rng, make, ts):
            cases.append(Case(f"{stem}/{kind}", str(ds.SOPClassUID), send_ts, body, uid))
    return cases


def _write_case(folder: Path, i: int, case: Case) -> Path:
    """A Part 10 file: valid file meta in front of the (broken) data set bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = case.sop_class
    meta.MediaStorageSOPInstanceUID = case.sop_instance
    meta.TransferSyntaxUID = case.transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(buf), meta)
    path = folder / f"{i:04d}.dcm"
    path.write_bytes(buf.getvalue() + case.body)
    return path


@pytest.fixture
def chunked_sending() -> Iterator[None]:
    """pynetdicom sends files as their raw bytes, without decoding them."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


@pytest.fixture
def fuzz_receiver(tmp_path: Path, sqlite_url: str) -> Iterator[RunningReceiver]:
    running = RunningReceiver(node_config(tmp_path, sqlite_url))
    yield running
    running.stop()


def _send_all(port: int, files: list[tuple[Case, Path]]) -> dict[int, int | None]:
    """Send every case, re-associating whenever the node ends an association."""
    statuses: dict[int, int | None] = {}
    contexts = sorted({(c.sop_class, c.transfer_syntax) for c, _ in files})

    def associate() -> object:
        ae = AE(ae_title="FUZZER")
        ae.acse_timeout = ae.dimse_timeout = 30
        by_class: dict[str, set[str]] = collections.defaultdict(set)
        for sop_class, ts in contexts:
            by_class[sop_class].add(ts)
        for sop_class, syntaxes in by_class.items():
            for ts in sorted(syntaxes):  # one context per syntax: each is negotiated
                ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
        assert assoc.is_established
        return assoc

    assoc = associate()
    for i, (_case, path) in enumerate(files):
        if not assoc.is_established:  # type: ignore[attr-defined]
            assoc = associate()
        try:
            rsp = assoc.send_c_store(path)  # type: ignore[attr-defined]
            statuses[i] = int(rsp.Status) if "Status" in rsp else None
        except Exception:
            statuses[i] = None
    assoc.release()  # type: ignore[attr-defined]
    return statuses


def test_fuzz_corpus_through_scp_and_worker(fuzz_receiver: RunningReceiver, samples_dir: Path,
                                            tmp_path: Path, chunked_sending: None) -> None:
    """Every bad case ends in a DICOM status and a recorded reason; the node keeps answering,
    and every stored object then decodes to a result or a recorded not-processed reason."""
    corpus = build_corpus(samples_dir)
    folder = tmp_path / "corpus"
    folder.mkdir()
    files = [(case, _write_case(folder, i, case)) for i, case in enumerate(corpus)]
    statuses = _send_all(fuzz_receiver.port, files)

    # The node is still up.
    ae = AE(ae_title="AFTER_STORM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", fuzz_receiver.port, ae_title="FRACTURE_NODE")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()

    store = fuzz_receiver.store
    instances = {r.sop_instance_uid: r for r in store.rows(s.Instance)}
    failures = collections.defaultdict(list)
    for f in store.rows(s.StoreFailure):
        failures[f.sop_instance_uid].append(f)
    outcomes: collections.Counter[str] = collections.Counter()
    for i, (case, _path) in enumerate(files):
        status = statuses[i]
        assert status is not None, f"{case.name}: no DICOM status"
        uid = case.sop_instance
        if status == 0x0000:
            row = instances.get(uid)
            assert row is not None, f"{case.name}: 0x0000 without an SQL row"
            assert fuzz_receiver.spool.path(row.spool_path).is_file()
            outcomes["0x0000 stored"] += 1
        else:
            recorded = failures.get(uid, [])
            assert [f.status for f in recorded] == [status], f"{case.name}: {status:#06x}"
            assert recorded[0].reason
            assert uid not in instances
            outcomes[f"0x{status:04X} {recorded[0].reason}"] += 1
    assert not [p for p in fuzz_receiver.spool.root.rglob(".tmp-*")]

    # Through the worker's decoder: a result or a reason, never an exception.
    prepare: Callable[[object], object] = lambda image: letterbox(image, 64)  # noqa: E731
    decoded: collections.Counter[str] = collections.Counter()
    for row in instances.values():
        claimed = ClaimedInstance(row.id, row.sop_instance_uid, row.sop_class_uid,
                                  row.study_instance_uid, row.spool_path, 1)
        result = decode_instance(fuzz_receiver.spool, claimed, prepare, TEST_SCOPE)
        if isinstance(result, Decoded):
            decoded["processed"] += 1
        else:
            assert isinstance(result, Failed)
            assert result.state == s.NOT_PROCESSED and result.reason, result
            decoded[f"not_processed {result.reason}"] += 1
    print(f"\nfuzz: {len(files)} cases; SCP outcomes: {dict(sorted(outcomes.items()))}; "
          f"worker: {dict(sorted(decoded.items()))}")
    assert sum(outcomes.values()) == len(files)
    assert outcomes["0x0000 stored"] > 0 and len(outcomes) > 2
