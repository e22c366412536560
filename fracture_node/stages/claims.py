"""Stale claims: work held by a worker that stopped goes back in the queue, in one place.

A worker claims instances and renews its claims while it scores them
(:meth:`fracture_node.stages.score.Worker.keep_claims`). A claim not renewed for
``[model] claim_timeout_s`` belongs to a worker that died: :func:`take_back` requeues it, or
marks the instance ``failed`` (``too_many_attempts``) once it has been claimed
``[model] max_attempts`` times, so an image that crashes workers cannot block the queue.

Three triggers call it, each for its own reason: every live worker's claim keeper (every
``claim_timeout_s / 4``: a dead worker's work moves on quickly), the housekeeping job
``take_back_stale_claims`` (every minute, and by hand with ``fracture-node housekeeping``, also
on a node that runs no worker), and a SQLite node's start (it is the only worker, so every claim
left is from a run that stopped: taken back at once, whatever its age). Each logs
``claims_taken_back`` with its trigger when it took something back.
"""

from __future__ import annotations

import datetime as dt

from fracture_node.config import ModelConfig
from fracture_node.db.store import Store
from fracture_node.logs import get_logger

log = get_logger("claims")


def take_back(store: Store, model: ModelConfig, trigger: str,
              older_than: dt.timedelta | None = None) -> tuple[int, int]:
    """Take back the claims not renewed for ``older_than`` (default ``claim_timeout_s``).

    Returns (requeued, failed). Raises :class:`~fracture_node.errors.DatabaseError`.
    """
    if older_than is None:
        older_than = dt.timedelta(seconds=model.claim_timeout_s)
    requeued, failed = store.take_back_stale_claims(older_than, model.max_attempts)
    if requeued or failed:
        log.warning("claims_taken_back", trigger=trigger, requeued=requeued, failed=failed,
                    older_than_s=older_than.total_seconds())
    return requeued, failed
