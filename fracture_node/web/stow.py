"""STOW-RS service (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]`` stores into the node.

Off unless ``[http] stow_rs = true`` (and ``[http] enabled``), on a node that receives (role
``all`` or ``receiver``). Clients authenticate with HTTP Basic as a user of role ``sender``
(:mod:`fracture_node.web.auth`), over TLS when ``[http] tls``; ``[node] allowed_peers`` limits
their addresses as it limits the SCP's callers.

The request is ``multipart/related; type="application/dicom"``: each part one PS3.10 file. The
body is parsed as it arrives by python-multipart (the parser Starlette uses), one part in memory
at a time (at most ``[node] max_object_bytes``); each part goes through the SCP's own store path
(:class:`fracture_node.dicom.intake.Intake`: the same checks, fsync to the spool, the row in SQL
that queues it) before the next is read, so an instance is listed as stored only once it is on
disk and in SQL. Each request is an ``associations`` row (calling AE title: the user; called:
``STOW-RS``), so the study is not reported while the request runs and ``audit sources`` counts it.

The answer is the PS3.18 store response in ``application/dicom+json``: every stored instance in
the Referenced SOP Sequence, every refused part in the Failed SOP Sequence with its Failure
Reason (the SCP's statuses, plus ``0x0122`` for a SOP class the node does not store); HTTP 200
when all were stored, 202 when some, 409 when none; 415 for another media type, 400 for a body
that is not a multipart message. No Retrieve URL: the node offers no WADO-RS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from fracture_node.config import Config
from fracture_node.db.store import Store
from fracture_node.dicom.intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Intake,
    Received,
    peer_allowed,
)
from fracture_node.dicom.scp import node_name
from fracture_node.dicom.stow import DICOM_JSON, InstanceResult, store_response, store_status
from fracture_node.errors import DatabaseError
from fracture_node.logs import get_logger
from fracture_node.spool import Spool
from fracture_node.web.auth import Sender

log = get_logger("stow")

router = APIRouter(prefix="/dicom-web", tags=["STOW-RS"])

CALLED = "STOW-RS"
"""``associations.called_ae_title`` of a STOW-RS request."""


@dataclass
class StowService:
    """What the router needs: the shared store path, and this node's name for SQL rows."""

    intake: Intake
    node: str
    networks: list[Any] = field(default_factory=list)
    """``[node] allowed_peers`` as networks (empty: any address)."""

    @classmethod
    def create(cls, intake: Intake, node: str) -> StowService:
        peers = intake.config.node.allowed_peers
        return cls(intake, node, [ipaddress.ip_network(p, strict=False) for p in peers])

    @property
    def store(self) -> Store:
        return self.intake.store

    def allowed(self, address: str) -> bool:
        return peer_allowed(address, self.networks)


    def refuse_peer(self, request: Request, user: str) -> None:
        """Record a client refused by ``[node] allowed_peers`` as the SCP records a caller."""
        peer = request.client.host if request.client else "-"
        log.warning("stow_peer_refused", peer=peer, user=user)
        if self.intake.metrics:
            self.intake.metrics.associations_rejected.labels("peer_not_allowed").inc()
        try:
            self.store.open_association(
                node=self.node, calling_ae_title=user[:16], called_ae_title=CALLED,
                peer_address=peer[:64], peer_port=request.client.port if request.client else 0,
                outcome="rejected", reason="peer_not_allowed")
        except DatabaseError as exc:
            log.error("stow_refusal_not_recorded", error=str(exc))

    def mount(self) -> tuple[tuple[APIRouter, ...], dict[str, Any]]:
        """The ``routers`` and ``extra`` for :func:`fracture_node.web.server.node_server`."""
        return (router,), {"stow": self}


def stow_service(config: Config, store: Store, spool: Spool, on_stored: Callable[[], None],
                 metrics: Any) -> StowService | None:
    """The STOW-RS service of a node, or ``None`` when ``[http] stow_rs`` is off or the node
    does not receive (role ``worker``)."""
    if not config.http.stow_rs:
        return None
    if config.node.role not in ("all", "receiver"):
        log.warning("stow_not_served", role=config.node.role,
                    fix="run STOW-RS on a node with role 'all' or 'receiver'")
        return None
    intake = Intake(config, store, spool, on_stored=on_stored, metrics=metrics,
                    component="stow")
    return StowService.create(intake, node_name(config.node.port))


def _service(request: Request) -> StowService:
    service = request.app.state.web.extra.get("stow")
    if not isinstance(service, StowService):
        raise HTTPException(404, "STOW-RS is not enabled on this node")
    return service


@router.post("/studies", response_class=JSONResponse)
async def store_instances(request: Request, principal: Sender) -> JSONResponse:
    """Store the instances of a multipart/related request (PS3.18 10.5 Store Instances)."""
    return await _stow(request, principal.name, None)


@router.post("/studies/{study}", response_class=JSONResponse)
async def store_study_instances(study: str, request: Request, principal: Sender
                                ) -> JSONResponse:
    """Store instances that all belong to ``study``; others fail with 0xA900."""
    return await _stow(request, principal.name, study)


async def _stow(request: Request, user: str, study: str | None) -> JSONResponse:
    service = _service(request)
    peer = request.client.host if request.client else "-"
    if not service.allowed(peer):
        await run_in_threadpool(service.refuse_peer, request, user)
        raise HTTPException(403, "this address is not in [node] allowed_peers")
    boundary = _boundary(request.headers.get("content-type", ""))
    try:
        assoc_id: int = await run_in_threadpool(
            service.store.open_association, node=service.node, calling_ae_title=user[:16],
            called_ae_title=CALLED, peer_address=peer[:64],
            peer_port=request.client.port if request.client else 0)
    except DatabaseError as exc:
        log.error("stow_association_not_recorded", error=str(exc))
        raise HTTPException(503, "the database is unavailable; try again later") from None
    reader = _PartReader(boundary, service.intake.config.node.max_object_bytes)
    results: list[InstanceResult] = []
    outcome, reason = "released", None
    try:
        async for chunk in request.stream():
            reader.write(chunk)
            for part in reader.take():
                results.append(await _store_part(service.intake, assoc_id, part, study))
        reader.finish()
        for part in reader.take():
            results.append(await _store_part(service.intake, assoc_id, part, study))
        if not reader.complete:
            outcome, reason = "aborted", "the request body ended inside a multipart part"
            results.append(await _refused(service.intake, assoc_id, CANNOT_UNDERSTAND,
                                          "truncated", reason))
    except MultipartParseError as exc:
        outcome, reason = "aborted", f"malformed multipart body: {type(exc).__name__}"
        results.append(await _refused(service.intake, assoc_id, CANNOT_UNDERSTAND,
                                      "malformed", reason))
    except ClientDisconnect:
        outcome, reason = "aborted", "the client disconnected"
    finally:
        try:
            await run_in_threadpool(service.store.close_association, assoc_id, outcome, reason)
        except DatabaseError as exc:
            log.error("stow_association_not_closed", error=str(exc))
    stored = sum(r.failure_reason is None for r in results)
    log.info("stow_request", user=user, peer=peer, parts=len(results), stored=stored,
             failed=len(results) - stored, outcome=outcome)
    if not results:
        raise HTTPException(400, "the request holds no application/dicom part")
    return JSONResponse(store_response(results), status_code=store_status(results),
                        media_type=DICOM_JSON)


def _boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` request, else 415."""
    media, params = parse_options_header(content_type)
    kind = params.get(b"type", b"").decode("latin-1").strip().lower()
    if media != b"multipart/related" or kind != "application/dicom":
        raise HTTPException(415, 'only multipart/related; type="application/dicom" is '
                                 "accepted (PS3.18 10.5.1.2, DICOM PS3.10 files)")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/related request has no boundary")
    return boundary


async def _store_part(intake: Intake, assoc_id: int | None, part: _Part, study: str | None
                      ) -> InstanceResult:
    if part.too_large:
        limit = intake.config.node.max_object_bytes
        return await _refused(intake, assoc_id, 0xA701, "too_large",
                              f"a part is larger than [node] max_object_bytes = {limit}")
    if part.content_type not in ("", "application/dicom"):
        return await _refused(intake, assoc_id, CANNOT_UNDERSTAND, "not_dicom_part",
                              "a part's Content-Type is not application/dicom")
    try:
        received: Received = await run_in_threadpool(
            intake.receive, bytes(part.data), assoc_id=assoc_id, sop_uid=None, sop_class=None,
            transfer_syntax=None, study_uid=study, supported_only=True)
    except Exception as exc:  # receive never raises; if it did, answer for this part anyway
        return await _refused(intake, assoc_id, OUT_OF_RESOURCES, "internal_error",
                              f"unexpected {type(exc).__name__} while storing")
    return InstanceResult(received.sop_class_uid or "", received.sop_instance_uid or "",
                          None if received.status == 0 else received.status)


async def _refused(intake: Intake, assoc_id: int | None, status: int, reason: str,
                   detail: str) -> InstanceResult:
    await run_in_threadpool(intake.fail, assoc_id, None, None, status, reason, detail)
    return InstanceResult("", "", status)


@dataclass
class _Part:
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)
    too_large: bool = False


class _PartReader:
    """Feeds python-multipart and hands out each part once it is whole."""

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.complete = False
        self._done: list[_Part] = []
        self._part = _Part()
        self._field = bytearray()
        self._value = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data,
            "on_part_end": self._end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_end": self._finished})

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()

    def take(self) -> list[_Part]:
        done, self._done = self._done, []
        return done

    def _begin(self) -> None:
        self._part = _Part()

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.too_large:
            return
        if len(part.data) + (end - start) > self.max_bytes:
            part.too_large, part.data = True, bytearray()
            return
        part.data.extend(data[start:end])

    def _end(self) -> None:
        self._done.append(self._part)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.extend(data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.extend(data[start:end])

    def _header_end(self) -> None:
        if self._field.decode("latin-1").strip().lower() == "content-type":
            media, _ = parse_options_header(bytes(self._value))
            self._part.content_type = media.decode("latin-1").lower()
        self._field.clear()
        self._value.clear()

    def _finished(self) -> None:
        self.complete = True
