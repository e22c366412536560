"""The operator's actions from the console and the API, each recorded with who asked.

Every function changes state and writes its :class:`~fracture_node.db.schema.OperatorAction` row
in one transaction, so an action is never done without its record (nor recorded undone).
The same changes as ``fracture-node retry`` and ``fracture-node reprocess``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session

from fracture_node.db import schema as s
from fracture_node.db.reporting import reprocess_in, retry_dead_in
from fracture_node.db.store import Store

RETRY_DELIVERY = "retry_delivery"
REPROCESS_STUDY = "reprocess_study"
VIEW_PATIENT_DATA = "view_patient_data"


@dataclass(frozen=True)
class Actor:
    """Who asked: the authenticated user, their role, how they proved it, from where."""

    name: str
    role: str
    via: str
    peer_address: str | None


def _record(ses: Session, actor: Actor, action: str, target: str, affected: int) -> None:
    ses.add(s.OperatorAction(at=dt.datetime.now(dt.UTC), user_name=actor.name[:64],
                             role=actor.role, via=actor.via,
                             peer_address=(actor.peer_address or None) and
                             str(actor.peer_address)[:64],
                             action=action, target=target[:128], affected=affected))


def retry_delivery(store: Store, delivery_id: int, deadline_s: float, actor: Actor) -> int:
    """Queue one dead delivery again with a fresh deadline (1), or nothing when it is not dead
    (0); recorded either way."""
    def fn(ses: Session) -> int:
        count = retry_dead_in(ses, deadline_s, delivery_ids=[delivery_id])
        _record(ses, actor, RETRY_DELIVERY, str(delivery_id), count)
        return count

    return store.run(fn)


def reprocess_study(store: Store, study_uid: str, actor: Actor) -> int:
    """Make a parked or failing study's report due again, its failure count and back-off
    cleared (1), or nothing when its report did not fail (0); recorded either way."""
    def fn(ses: Session) -> int:
        count = reprocess_in(ses, [study_uid])
        _record(ses, actor, REPROCESS_STUDY, study_uid, count)
        return count

    return store.run(fn)


def record_view(store: Store, study_uid: str, actor: Actor) -> None:
    """Record that ``actor`` was shown the patient data of a study (never the data itself)."""
    store.run(lambda ses: _record(ses, actor, VIEW_PATIENT_DATA, study_uid, 0))
