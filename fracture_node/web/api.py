"""The JSON API (``/api``): what the audit and status commands know, and the operator's actions.

Reads go through :class:`fracture_node.db.audit.Audit` (read-only connection, the same queries as
``fracture-node audit`` and ``status``); actions through the node's store, recorded in the audit
trail with the user who asked.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fracture_node.web.auth import Viewer

router = APIRouter(prefix="/api", tags=["api"])


@router.get("/whoami")
async def whoami(principal: Viewer) -> dict[str, Any]:
    """The authenticated user and role."""
    return {"user": principal.name, "role": principal.role, "via": principal.via}
