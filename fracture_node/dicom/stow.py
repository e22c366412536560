"""STOW-RS (PS3.18 10.5): send objects to a DICOMweb destination, and the store response.

:func:`stow_many` posts every object of one delivery (the SR and its overlays) in one
``multipart/related; type="application/dicom"`` request with ``dicomweb-client`` to
``{dicomweb_url}/studies/{StudyInstanceUID}``, and judges the answer instance by instance, like
:func:`fracture_node.dicom.send.store_many` does for C-STORE: an object is stored only when the
response's Referenced SOP Sequence (0008,1199) lists it and the Failed SOP Sequence (0008,1198)
does not (PS3.18 10.5.3, Table 10.5.3-1); "200 OK" with an object missing, any other HTTP
status, a refused connection, a failed TLS verification or a timeout is a failed object whose
``error`` says why (never a response body, which may carry header values; never the secret).
dicomweb-client's own retries are off: the delivery stage retries with its back-off.

:func:`store_response` builds the same response document (``application/dicom+json``) for our
STOW-RS service.
"""

from __future__ import annotations

import http
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from fracture_node.destination import Destination
from fracture_node.dicom.send import StoreOutcome, load_object
from fracture_node.errors import DeliveryError
from fracture_node.logs import get_logger

log = get_logger("stow")

DICOM_JSON = "application/dicom+json"

_REASONS: dict[int, str] = {
    0x0110: "Processing failure",
    0x0122: "SOP Class not supported",
    0xA700: "Out of resources",
    0xA900: "Data Set does not match SOP Class",
    0xC000: "Cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data Set does not match SOP Class",
}
"""Failure and warning reasons of PS3.18 Table 10.5.3-2 and PS3.4 B.2.3."""

_CHUNK_BYTES = 1 << 30
"""dicomweb-client switches to chunked transfer encoding above its chunk size; a delivery is a
few MB at most, so one request with a Content-Length, which every origin server accepts."""


def reason_text(code: int) -> str:
    """``0xA700 (Out of resources)``: a Failure or Warning Reason for people."""
    text = _REASONS.get(code) or STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown"))[1]
    return f"0x{code:04X} ({text})"


def read_secret(destination: Destination, environ: Mapping[str, str] | None = None) -> str:
    """The password or token of ``destination`` (first line of ``secret_file``, or ``secret_env``).

    Raises
    ------
    DeliveryError
        The file cannot be read, the variable is not set, or the secret is empty (the message
        names the file or variable, never its content).
    """
    if destination.secret_file is not None:
        try:
            lines = destination.secret_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeliveryError(
                f"cannot read secret_file {destination.secret_file} of destination "
                f"{destination.name} ({type(exc).__name__}); fix: check the file and its "
                "permissions") from None
        secret, where = (lines[0].strip() if lines else ""), f"secret_file {destination.secret_file}"
    else:
        env = os.environ if environ is None else environ
        secret, where = env.get(destination.secret_env, ""), f"secret_env {destination.secret_env}"
    if not secret:
        raise DeliveryError(f"{where} of destination {destination.name} is empty or not set; "
                            "fix: put the password or token there")
    return secret


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` (RFC 6750); its repr hides the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"


def stow_many(
    objects: Sequence[str | os.PathLike[str] | pydicom.Dataset],
    destination: Destination,
    *,
    timeout_s: float,
    environ: Mapping[str, str] | None = None,
) -> list[StoreOutcome]:
    """Post ``objects`` to ``destination`` in one STOW-RS request; one outcome per object.

    Never raises for a network or peer problem (see the module docstring). ``status`` is the
    object's Failure or Warning Reason when the response gives one, ``0x0000`` when stored
    without a warning, ``None`` otherwise (the HTTP status is in ``error``).

    Raises
    ------
    DeliveryError
        A file cannot be read (before anything is sent).
    """
    started = time.monotonic()
    datasets = [load_object(item) for item in objects]
    if not datasets:
        return []
    peer = f"{destination.name} ({destination.dicomweb_url})"
    try:
        auth = _auth(destination, environ)
    except DeliveryError as exc:
        return _judge(datasets, None, str(exc), destination, started)
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    study = studies.pop() if len(studies) == 1 else None
    answers: list[requests.Response] = []
    problem: str | None = None
    with _Session(destination.ca_bundle) as session:
        session.auth = auth
        session.hooks["response"].append(lambda rsp, *_a, **_k: answers.append(rsp))
        client = DICOMwebClient(destination.dicomweb_url.rstrip("/"), session=session,
                                timeout=timeout_s, chunk_size=_CHUNK_BYTES)
        client.set_http_retry_params(retry=False)
        try:
            client.store_instances(datasets, study_instance_uid=study or None)
        except requests.exceptions.SSLError:
            problem = (f"TLS with {peer} failed: its certificate is not signed by "
                       f"{destination.ca_bundle or 'the default CA bundle'} or does not name "
                       "the host; fix: set ca_bundle to the CA that signs it")
        except requests.Timeout:
            problem = (f"{peer} did not answer within {timeout_s:g}s; fix: check the server "
                       "and [delivery] timeout_s")
        except requests.ConnectionError:
            problem = (f"cannot connect to {peer}: connection refused, host unreachable or "
                       "closed; fix: check that the server is running and the URL")
        except requests.HTTPError:
            pass  # the response is judged below: a 409 still lists what was stored
        except (requests.RequestException, ValueError, KeyError) as exc:
            if not answers:
                problem = f"STOW-RS to {peer} failed: {type(exc).__name__}"
    if problem is not None or not answers:
        return _judge(datasets, None, problem or f"{peer} sent no answer", destination, started)
    return _judge(datasets, answers[-1], None, destination, started)


class _Session(requests.Session):
    """A session whose ``ca_bundle`` wins over ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE``
    (requests lets those replace ``Session.verify``)."""

    def __init__(self, ca_bundle: os.PathLike[str] | None) -> None:
        super().__init__()
        self._ca_bundle = None if ca_bundle is None else os.fspath(ca_bundle)

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
        if self._ca_bundle is not None:
            settings["verify"] = self._ca_bundle
        return settings


def _auth(destination: Destination, environ: Mapping[str, str] | None
          ) -> requests.auth.AuthBase | None:
    if destination.auth == "basic":
        return requests.auth.HTTPBasicAuth(destination.username,
                                           read_secret(destination, environ))
    if destination.auth == "bearer":
        return BearerAuth(read_secret(destination, environ))
    return None


def parse_response(response: requests.Response) -> pydicom.Dataset | None:
    """The store response document of a DICOM JSON answer, ``None`` for any other body."""
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media not in (DICOM_JSON, "application/json") or not response.content:
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _judge(datasets: list[pydicom.Dataset], response: requests.Response | None,
           problem: str | None, destination: Destination, started: float
           ) -> list[StoreOutcome]:
    """One outcome per dataset from the answer (or from ``problem`` when there is none)."""
    elapsed = time.monotonic() - started
    peer = f"{destination.name} ({destination.dicomweb_url})"
    referenced: dict[str, int | None] = {}
    failed: dict[str, int | None] = {}
    code = response.status_code if response is not None else None
    if response is not None:
        body = parse_response(response)
        for item in (body.get("ReferencedSOPSequence", []) if body else []):
            referenced[str(item.get("ReferencedSOPInstanceUID", ""))] = _int(
                item.get("WarningReason"))
        for item in (body.get("FailedSOPSequence", []) if body else []):
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = _int(
                item.get("FailureReason"))
    outcomes: list[StoreOutcome] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        fields = {"destination": destination.name, "sop_instance_uid": uid,
                  "http_status": code, "duration_s": round(elapsed, 3)}
        if problem is not None:
            outcome = StoreOutcome(False, None, problem, elapsed)
        elif uid in failed:
            reason = failed[uid]
            outcome = StoreOutcome(False, reason, (
                f"{peer} answered HTTP {code} with the instance in FailedSOPSequence, failure "
                f"reason {reason_text(reason) if reason is not None else 'not given'}"), elapsed)
        elif code is not None and not 200 <= code < 300 and uid not in referenced:
            outcome = StoreOutcome(False, None, _http_problem(peer, code), elapsed)
        elif uid not in referenced:
            outcome = StoreOutcome(False, None, (
                f"{peer} answered HTTP {code} but its ReferencedSOPSequence does not list the "
                "instance: not confirmed stored"), elapsed)
        else:
            warning = referenced[uid]
            text = reason_text(warning) if warning else None
            outcome = StoreOutcome(True, warning or 0x0000, None, elapsed, warning=text)
        if outcome.ok:
            log.info("stow_succeeded", warning=outcome.warning, **fields)
        else:
            log.warning("stow_failed", status=outcome.status, error=outcome.error, **fields)
        outcomes.append(outcome)
    return outcomes


def _http_problem(peer: str, code: int) -> str:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = "unknown status"
    fix = {401: "check auth, username and the secret", 403: "check the account's rights",
           404: "check dicomweb_url (the base URL, without /studies)",
           413: "raise the server's request size limit"}.get(
        code, "check the server's log" if code >= 500 else "check the server's configuration")
    return f"{peer} answered HTTP {code} {phrase}; fix: {fix}"


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


# Our service's answer ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceResult:
    """What our STOW-RS service did with one part of a request."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None
    """``None``: stored; otherwise the Failure Reason (PS3.18 Table 10.5.3-2)."""
    retrieve_url: str | None = None


def store_response(results: Sequence[InstanceResult], retrieve_url: str | None = None
                   ) -> dict[str, Any]:
    """The PS3.18 10.5.3 store response as DICOM JSON: every instance stored or failed."""
    ds = pydicom.Dataset()
    if retrieve_url:
        ds.RetrieveURL = retrieve_url
    stored = [_item(r) for r in results if r.failure_reason is None]
    failed = [_item(r) for r in results if r.failure_reason is not None]
    if failed:
        ds.FailedSOPSequence = failed
    if stored:
        ds.ReferencedSOPSequence = stored
    out: dict[str, Any] = ds.to_json_dict()
    return out


def _item(result: InstanceResult) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = result.sop_class_uid
    item.ReferencedSOPInstanceUID = result.sop_instance_uid
    if result.failure_reason is not None:
        item.FailureReason = result.failure_reason
    elif result.retrieve_url:
        item.RetrieveURL = result.retrieve_url
    return item


def store_status(results: Sequence[InstanceResult]) -> int:
    """The HTTP status of a store response: 200 all stored, 409 none, 202 some (PS3.18 10.5.3)."""
    failed = sum(r.failure_reason is not None for r in results)
    if not failed:
        return 200
    return 409 if failed == len(results) else 202
