"""The admin API: JSON over HTTP, one route per console operation, bearer token required.

``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` need no token. Every ``/v1``
response carries ``ETag: "<generation>"``; a write with ``If-Match`` is refused with 412 when
the generation moved on, so read-modify-write clients cannot clobber each other. Browsers are
kept out: a request with an ``Origin`` header is refused (the API is for tools, not pages).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote

from alb_proxy.config.dump import dump_config
from alb_proxy.config.load import parse_config, read_yaml
from alb_proxy.config.model import CertificateKind, Listener, Server
from alb_proxy.control import operations as ops
from alb_proxy.control.openapi import openapi_document
from alb_proxy.control.plane import ControlPlane, Operation
from alb_proxy.control.views import (
    certificate_view,
    expiry_warnings,
    listener_view,
    server_group_view,
)
from alb_proxy.errors import AlbError, CertificateError, ConfigError
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "too_large",
    422: "invalid",
    500: "internal_error",
}


class Runtime(Protocol):
    """What the API needs of the daemon (the daemon sits above this layer)."""

    plane: ControlPlane
    metrics: Metrics

    @property
    def ready(self) -> bool: ...

    def bound_port(self, listener: str) -> int | None: ...

    async def render_metrics(self) -> bytes: ...

    async def worker_status(self) -> list[dict[str, object]]: ...


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


class ApiError(AlbError):
    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []


Handler = Callable[["AdminApi", Request, dict[str, str]], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    summary: str
    body: dict[str, Any] | None = None
    """JSON schema of the request body (for the OpenAPI document)."""

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


ROUTES: list[Route] = []


def route(
    method: str, template: str, summary: str, body: dict[str, Any] | None = None
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        if body is not None and "properties" in body:
            body.setdefault("additionalProperties", False)  # refused in AdminApi._dispatch
        ROUTES.append(Route(method, template, handler, summary, body))
        return handler

    return register


class AdminApi:
    def __init__(self, runtime: Runtime, token: str) -> None:
        self.runtime = runtime
        self._token = token
        self._compiled = [(r, r.pattern) for r in ROUTES]

    @property
    def plane(self) -> ControlPlane:
        return self.runtime.plane

    async def handle(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if request.method == "GET" and path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            return await self._public(path)
        try:
            if "origin" in request.headers:
                raise ApiError(403, "requests from web pages are not accepted")
            if not self._authorized(request.headers.get("authorization", "")):
                raise ApiError(401, "missing or wrong bearer token")
            status, payload = await self._dispatch(request, path)
        except ApiError as exc:
            status, payload = exc.status, _error(exc.status, str(exc), exc.problems)
        except ConfigError as exc:
            status = 422
            payload = _error(
                422, "the change was refused; nothing changed", [str(p) for p in exc.problems]
            )
        except ops.OperationError as exc:
            status, payload = exc.status, _error(exc.status, str(exc))
        except CertificateError as exc:
            status, payload = 422, _error(422, str(exc))
        if status >= 400 and (request.method != "GET" or status in (401, 403)):
            _log_refusal(request.method, path, payload["error"])
        body = json.dumps(payload, indent=1).encode() + b"\n"
        etag = (("ETag", f'"{self.plane.generation}"'),)
        return Response(status, body, headers=etag)

    async def _public(self, path: str) -> Response:
        if path == "/metrics":
            return Response(
                200,
                await self.runtime.render_metrics(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        if path == "/openapi.json":
            return Response(200, json.dumps(openapi_document(ROUTES)).encode())
        if path == "/readyz" and not self.runtime.ready:
            return Response(503, b"not ready\n", "text/plain")
        return Response(200, b"ok\n", "text/plain")

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self._token.encode()
        )

    async def _dispatch(self, request: Request, path: str) -> tuple[int, Any]:
        allowed = []
        for candidate, pattern in self._compiled:
            match = pattern.match(path)
            if match is None:
                continue
            if candidate.method != request.method:
                allowed.append(candidate.method)
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            if candidate.body is not None and candidate.body.get("additionalProperties") is False:
                _refuse_unknown_fields(candidate.body, _json(request))
            return await candidate.handler(self, request, params)
        if allowed:
            raise ApiError(
                405, f"{request.method} not allowed here (allowed: {', '.join(allowed)})"
            )
        raise ApiError(404, f"no such endpoint: {path}")

    # -- helpers ----------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.now(UTC)

    def if_match(self, request: Request) -> int | None:
        value = request.headers.get("if-match", "").strip()
        if not value or value == "*":
            return None
        try:
            return int(value.strip("W/").strip('"'))
        except ValueError as exc:
            raise ApiError(400, f"If-Match must be a generation, got {value!r}") from exc

    def changed(self, **extra: Any) -> dict[str, Any]:
        return {"generation": self.plane.generation, **extra}


def _log_refusal(method: str, path: str, error: dict[str, Any]) -> None:
    """A refused change, or a caller turned away, in the daemon's log as well as in the answer
    (the operator reading the log may not be the one who ran ``ctl``). It says exactly what the
    answer says, which never holds key material."""
    problems = {"problems": "; ".join(error["problems"])} if error["problems"] else {}
    event(
        logging.WARNING,
        "admin request refused",
        method=method,
        path=path,
        status=error["status"],
        error=error["message"],
        **problems,
    )


def _error(status: int, message: str, problems: list[str] | None = None) -> dict[str, Any]:
    return {
        "error": {
            "status": status,
            "code": _CODES.get(status, "error"),
            "message": message,
            "problems": problems or [],
        }
    }


def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(400, "the body is not JSON this API reads: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _refuse_unknown_fields(schema: dict[str, Any], body: dict[str, Any]) -> None:
    """A misspelt optional field would otherwise be ignored without a word, as the config
    file's loader never does."""
    known = schema.get("properties", {})
    unknown = [key for key in body if key not in known]
    if unknown:
        raise ApiError(
            400,
            f"unknown field {unknown[0]!r} (this operation takes: {', '.join(known)})",
            [f"unknown field {key!r}" for key in unknown],
        )


def _str(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty string")
    return value


def _strings(body: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ApiError(400, f"'{name}' must be a list of strings")
    return tuple(value)


def _int(body: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be an integer")
    return value


def _pem(body: dict[str, Any], name: str, *, required: bool = True) -> bytes | None:
    text = _str(body, name, required=required)
    return None if text is None else text.encode()


_ID = {
    "type": "object",
    "required": ["certificate_id"],
    "properties": {"certificate_id": {"type": "string"}},
}

# -- certificates ---------------------------------------------------------------------------------


@route("GET", "/v1/certificates", "List the certificate store (never any key)")
async def list_certificates(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    snapshot, records, now = api.plane.snapshot, api.plane.store.records(), api.now()
    return 200, {
        "certificates": [
            certificate_view(snapshot, records, c.id, now) for c in snapshot.config.certificates
        ]
    }


@route(
    "POST",
    "/v1/certificates",
    "Upload a server certificate with its key (and chain)",
    {
        "type": "object",
        "required": ["name", "cert_pem", "key_pem"],
        "properties": {
            "name": {"type": "string"},
            "cert_pem": {"type": "string"},
            "key_pem": {"type": "string"},
            "chain_pem": {"type": "string"},
        },
    },
)
async def upload_certificate(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    body = _json(request)
    name = _str(body, "name")
    assert name is not None
    cert_id, snapshot = await api.plane.upload(
        name,
        CertificateKind.SERVER,
        _pem(body, "cert_pem") or b"",
        _pem(body, "key_pem"),
        _pem(body, "chain_pem", required=False),
        if_match=api.if_match(request),
    )
    view = certificate_view(snapshot, api.plane.store.records(), cert_id, api.now())
    return 201, api.changed(id=cert_id, certificate=view)


@route(
    "POST",
    "/v1/ca-certificates",
    "Upload a CA certificate (or bundle) for mutual TLS",
    {
        "type": "object",
        "required": ["name", "cert_pem"],
        "properties": {"name": {"type": "string"}, "cert_pem": {"type": "string"}},
    },
)
async def upload_ca(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    body = _json(request)
    name = _str(body, "name")
    assert name is not None
    cert_id, snapshot = await api.plane.upload(
        name, CertificateKind.CA, _pem(body, "cert_pem") or b"", if_match=api.if_match(request)
    )
    view = certificate_view(snapshot, api.plane.store.records(), cert_id, api.now())
    return 201, api.changed(id=cert_id, certificate=view)


@route("GET", "/v1/certificates/{id}", "Show one certificate")
async def show_certificate(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    snapshot = api.plane.snapshot
    if snapshot.config.certificate(p["id"]) is None:
        raise ApiError(404, f"no certificate '{p['id']}'")
    return 200, certificate_view(snapshot, api.plane.store.records(), p["id"], api.now())


@route("DELETE", "/v1/certificates/{id}", "Delete a certificate no listener uses")
async def delete_certificate(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    await api.plane.delete_certificate(p["id"], if_match=api.if_match(request))
    return 200, api.changed(deleted=p["id"])


# -- listeners ----------------------------------------------------------------------------------


def _listener_or_404(api: AdminApi, name: str) -> Listener:
    listener = api.plane.snapshot.config.listener(name)
    if listener is None:
        raise ApiError(404, f"no listener named '{name}'")
    return listener


def _view(api: AdminApi, name: str) -> dict[str, Any]:
    return listener_view(
        api.plane.snapshot, _listener_or_404(api, name), api.runtime.bound_port(name), api.now()
    )


@route("GET", "/v1/listeners", "List listeners with their certificates and expiry")
async def list_listeners(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    return 200, {"listeners": [_view(api, x.name) for x in api.plane.snapshot.config.listeners]}


@route(
    "POST",
    "/v1/listeners",
    "Create a listener (the console's wizard): the body is a listener as in the config file",
    {
        "type": "object",
        "required": ["name", "protocol", "port", "default_action"],
        # Read by the config loader, which names any unknown key; the main ones are listed.
        "additionalProperties": True,
        "properties": {
            "name": {"type": "string"},
            "protocol": {"enum": ["HTTP", "HTTPS", "QUIC"]},
            "port": {"type": "integer"},
            "bind": {"type": "string"},
            "certificates": {"type": "object"},
            "security_policy": {"type": "string"},
            "mutual_authentication": {"type": "object"},
            "default_action": {"type": "object"},
        },
    },
)
async def create_listener(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    body = _json(request)
    current = api.plane.snapshot.config
    listener = parse_config(
        {"instance": {"name": current.instance.name}, "listeners": [body]}
    ).listeners[0]
    name = listener.name
    await api.plane.change(
        f"create listener {name}",
        lambda c: ops.create_listener(c, listener),
        if_match=api.if_match(request),
    )
    view = _view(api, name)
    return 201, api.changed(listener=view, warnings=expiry_warnings(view))


@route("GET", "/v1/listeners/{name}", "Show one listener")
async def show_listener(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    return 200, _view(api, p["name"])


@route("DELETE", "/v1/listeners/{name}", "Delete a listener: stop accepting, drain, release")
async def delete_listener(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = p["name"]
    await api.plane.change(
        f"delete listener {name}",
        lambda c: ops.delete_listener(c, name),
        if_match=api.if_match(request),
    )
    return 200, api.changed(deleted=name)


async def _simple(
    api: AdminApi, request: Request, name: str, what: str, operation: Operation
) -> tuple[int, Any]:
    _listener_or_404(api, name)
    await api.plane.change(f"{what} on {name}", operation, if_match=api.if_match(request))
    view = _view(api, name)
    return 200, api.changed(listener=view, warnings=expiry_warnings(view))


@route("POST", "/v1/listeners/{name}/start", "Start a stopped listener")
async def start_listener(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = p["name"]
    return await _simple(
        api, request, name, "start", lambda c: ops.set_listener_enabled(c, name, True)
    )


@route("POST", "/v1/listeners/{name}/stop", "Stop a listener (keeps its configuration)")
async def stop_listener(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = p["name"]
    return await _simple(
        api, request, name, "stop", lambda c: ops.set_listener_enabled(c, name, False)
    )


@route("PUT", "/v1/listeners/{name}/default-certificate", "Replace the default certificate", _ID)
async def set_default(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    cert_id, name = _str(_json(request), "certificate_id") or "", p["name"]
    return await _simple(
        api,
        request,
        name,
        f"default certificate {cert_id}",
        lambda c: ops.set_default_certificate(c, name, cert_id),
    )


@route("POST", "/v1/listeners/{name}/additional-certificates", "Add an additional certificate", _ID)
async def add_additional(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    cert_id, name = _str(_json(request), "certificate_id") or "", p["name"]
    return await _simple(
        api,
        request,
        name,
        f"add certificate {cert_id}",
        lambda c: ops.add_additional_certificate(c, name, cert_id),
    )


@route(
    "DELETE",
    "/v1/listeners/{name}/additional-certificates/{id}",
    "Delete an additional certificate",
)
async def remove_additional(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    cert_id, name = p["id"], p["name"]
    return await _simple(
        api,
        request,
        name,
        f"remove certificate {cert_id}",
        lambda c: ops.remove_additional_certificate(c, name, cert_id),
    )


@route(
    "PUT",
    "/v1/listeners/{name}/mutual-authentication",
    "Enable or disable mutual authentication",
    {
        "type": "object",
        "required": ["enabled"],
        "properties": {
            "enabled": {"type": "boolean"},
            "ca_certificates": {"type": "array", "items": {"type": "string"}},
        },
    },
)
async def set_mtls(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    body, name = _json(request), p["name"]
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise ApiError(400, "'enabled' must be true or false")
    cas = _strings(body, "ca_certificates")
    what = "enable" if enabled else "disable"
    return await _simple(
        api,
        request,
        name,
        f"{what} mutual authentication",
        lambda c: ops.set_mutual_authentication(c, name, enabled, cas),
    )


@route(
    "PUT",
    "/v1/listeners/{name}/ca-certificates",
    "Replace the CA certificate(s)",
    {
        "type": "object",
        "required": ["ca_certificates"],
        "properties": {"ca_certificates": {"type": "array", "items": {"type": "string"}}},
    },
)
async def replace_cas(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    cas, name = _strings(_json(request), "ca_certificates"), p["name"]
    if not cas:
        raise ApiError(400, "'ca_certificates' must name at least one CA certificate")
    return await _simple(
        api,
        request,
        name,
        f"replace CA certificates with {', '.join(cas)}",
        lambda c: ops.replace_ca_certificates(c, name, cas),
    )


@route(
    "PUT",
    "/v1/listeners/{name}/security-policy",
    "Change the TLS security policy",
    {
        "type": "object",
        "required": ["security_policy"],
        "properties": {"security_policy": {"type": "string"}},
    },
)
async def set_policy(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    policy, name = _str(_json(request), "security_policy") or "", p["name"]
    return await _simple(
        api,
        request,
        name,
        f"security policy {policy}",
        lambda c: ops.set_security_policy(c, name, policy),
    )


# -- server groups --------------------------------------------------------------------------------


@route("GET", "/v1/server-groups", "List server groups")
async def list_groups(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    groups = api.plane.snapshot.config.server_groups
    return 200, {"server_groups": [server_group_view(g) for g in groups]}


@route(
    "POST",
    "/v1/server-groups/{id}/servers",
    "Add a server",
    {
        "type": "object",
        "required": ["host", "port"],
        "properties": {
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "weight": {"type": "integer"},
        },
    },
)
async def add_server(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    body, group = _json(request), p["id"]
    weight = _int(body, "weight", required=False)
    server = Server(
        _str(body, "host") or "", _int(body, "port") or 0, 100 if weight is None else weight
    )
    await api.plane.change(
        f"add server {server.address} to {group}",
        lambda c: ops.add_server(c, group, server),
        if_match=api.if_match(request),
    )
    return 201, api.changed(server_group=_group_view(api, group))


@route("DELETE", "/v1/server-groups/{id}/servers/{address}", "Remove a server (host:port)")
async def remove_server(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    group, address = p["id"], p["address"]
    await api.plane.change(
        f"remove server {address} from {group}",
        lambda c: ops.remove_server(c, group, address),
        if_match=api.if_match(request),
    )
    return 200, api.changed(server_group=_group_view(api, group))


@route(
    "PATCH",
    "/v1/server-groups/{id}/servers/{address}",
    "Change a server's weight",
    {"type": "object", "required": ["weight"], "properties": {"weight": {"type": "integer"}}},
)
async def weigh_server(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    group, address = p["id"], p["address"]
    weight = _int(_json(request), "weight") or 0
    await api.plane.change(
        f"weight {weight} for {address} in {group}",
        lambda c: ops.set_server_weight(c, group, address, weight),
        if_match=api.if_match(request),
    )
    return 200, api.changed(server_group=_group_view(api, group))


def _group_view(api: AdminApi, group_id: str) -> dict[str, Any]:
    group = api.plane.snapshot.config.server_group(group_id)
    return server_group_view(group) if group else {}


# -- the whole config -----------------------------------------------------------------------------


@route("GET", "/v1/config", "The running configuration (the store's latest generation)")
async def get_config(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    return 200, {
        "generation": api.plane.generation,
        "config": dump_config(api.plane.snapshot.config),
    }


@route(
    "PUT",
    "/v1/config",
    "Make the running state match a config (YAML or JSON body)",
    {"type": "object"},
)
async def put_config(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "the body is not UTF-8 text") from exc
    before = api.plane.generation
    config = parse_config(read_yaml(text, "body"))
    await api.plane.apply_config(config, "PUT /v1/config", if_match=api.if_match(request))
    return 200, api.changed(changed=api.plane.generation != before)


# -- processes ----------------------------------------------------------------------------------


@route("GET", "/v1/workers", "The data-plane processes: pid, generation served, listeners")
async def get_workers(api: AdminApi, request: Request, p: dict[str, str]) -> tuple[int, Any]:
    return 200, {"generation": api.plane.generation, "workers": await api.runtime.worker_status()}
