"""The console's pages: Jinja2 templates (autoescaped) and how a page is rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from fracture_node.web.auth import CSRF_FIELD, Principal

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))


def render(request: Request, template: str, principal: Principal | None,
           status_code: int = 200, **values: Any) -> HTMLResponse:
    """A page, with the user and the CSRF token its forms need."""
    values.update(user=principal, csrf_field=CSRF_FIELD,
                  csrf=principal.csrf if principal else None,
                  operator=bool(principal and principal.may("operator")))
    return templates.TemplateResponse(request, template, values, status_code=status_code)
