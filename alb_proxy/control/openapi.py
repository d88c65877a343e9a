"""The OpenAPI document of the admin API, generated from the route table so it cannot drift."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alb_proxy import __version__

if TYPE_CHECKING:
    from alb_proxy.control.api import Route

_ERROR = {
    "description": "Refused; nothing changed",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def openapi_document(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = re.findall(r"\{(\w+)\}", r.template)
        operation: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "security": [{"bearer": []}],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in params
            ],
            "responses": {
                "200": {"description": "OK"},
                "201": {"description": "Created"},
                "4XX": _ERROR,
            },
        }
        if r.method in ("PUT", "PATCH", "POST", "DELETE"):
            operation["parameters"].append(
                {
                    "name": "If-Match",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                }
            )
        if r.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": r.body}},
            }
        paths.setdefault(r.template, {})[r.method.lower()] = operation
    for public in ("/healthz", "/readyz", "/metrics"):
        paths[public] = {
            "get": {
                "summary": f"{public[1:]} (no token)",
                "security": [],
                "responses": {"200": {"description": "OK"}},
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "alb-proxy admin API", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "integer"},
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "problems": {"type": "array", "items": {"type": "string"}},
                            },
                        }
                    },
                }
            },
        },
    }
