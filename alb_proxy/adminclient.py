"""Client of the daemon's admin HTTP API: where it is, which token to send, one request each.

A request is a value (``ApiRequest``) built without any I/O, so every command's method, path and
body can be checked without a daemon; ``send`` is the only function that touches the network.

``http.client`` rather than ``urllib.request``: urllib honours ``http_proxy`` from the environment
and would route a call to the loopback admin API through a corporate proxy, and it turns every
4xx into an exception whose body has to be fished out again. Here every answer comes back the
same way and is translated once: 2xx into ``ApiResponse``, anything else into ``ApiError`` (the
API's ``{"error": {...}}`` body, or a synthesized one when something else answered), and a
connection that never got an HTTP answer into ``UnreachableError``.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from alb_proxy import __version__
from alb_proxy.errors import AlbError

DEFAULT_ADMIN_URL = "http://127.0.0.1:9900"
DEFAULT_TOKEN_FILE = Path("state/admin.token")
"""Where the daemon writes the token it generated when none was configured (relative to cwd)."""
TIMEOUT_S = 60.0
"""Upload and apply rebuild TLS contexts before answering; give them time."""

JsonObject = dict[str, Any]

_ETAG = re.compile(r'^(?:W/)?"(\d+)"$')


# -- errors ----------------------------------------------------------------------------------


class AdminError(AlbError):
    """A command could not be done; ``exit_code`` and the JSON form are what the user sees."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems

    @property
    def status(self) -> int | None:
        return None

    def to_json(self) -> JsonObject:
        """The ``error`` object of ``--json`` output, shaped like the API's own error body."""
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "problems": list(self.problems),
        }


class UsageError(AdminError):
    """The command line cannot become a request (unreadable file, malformed ``HOST:PORT``)."""

    exit_code = 2
    code = "usage"


class UnreachableError(AdminError):
    """No HTTP answer at all: refused, timed out, name unknown, TLS failed, garbage back."""

    exit_code = 3
    code = "unreachable"


class ApiError(AdminError):
    """The API answered 4xx/5xx; carries its status, code and the problems it listed."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: tuple[str, ...] = (),
        body: JsonObject | None = None,
    ) -> None:
        super().__init__(message, problems)
        self._status = status
        self.code = code
        self.body = body
        """The API's error body as received, when it sent one; ``--json`` prints it unchanged."""

    @property
    def status(self) -> int:
        return self._status

    def to_json(self) -> JsonObject:
        if self.body is not None:
            error: JsonObject = self.body["error"]
            return error
        return super().to_json()


# -- where, and as whom ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    """Base URL of the admin API, without a trailing slash."""
    token: str | None = field(default=None, repr=False)
    """Bearer token; kept out of ``repr`` so a traceback or a test failure does not show it."""
    token_source: str = "none"
    """Where the token came from (``--token``, ``ALB_ADMIN_TOKEN``, a file), for error hints."""


def resolve_endpoint(
    admin: str | None,
    token: str | None,
    token_file: Path | None,
    env: Mapping[str, str],
    cwd: Path,
) -> Endpoint:
    """Flags beat the environment, the environment beats files: ``--token``, ``--token-file``,
    ``ALB_ADMIN_TOKEN``, ``ALB_ADMIN_TOKEN_FILE``, then ``./state/admin.token`` if it exists.
    An explicitly named token file that cannot be read is a usage error; no token at all is
    not (the API answers 401 and the message says where a token would come from)."""
    url = _normalise_url(admin or env.get("ALB_ADMIN") or DEFAULT_ADMIN_URL)
    if token:
        return Endpoint(url, token, "--token")
    if token_file is not None:
        return Endpoint(url, _read_token(cwd / token_file), f"--token-file {token_file}")
    if env.get("ALB_ADMIN_TOKEN"):
        return Endpoint(url, env["ALB_ADMIN_TOKEN"], "ALB_ADMIN_TOKEN")
    if env.get("ALB_ADMIN_TOKEN_FILE"):
        path = Path(env["ALB_ADMIN_TOKEN_FILE"])
        return Endpoint(url, _read_token(cwd / path), f"ALB_ADMIN_TOKEN_FILE={path}")
    if (cwd / DEFAULT_TOKEN_FILE).is_file():
        return Endpoint(url, _read_token(cwd / DEFAULT_TOKEN_FILE), f"./{DEFAULT_TOKEN_FILE}")
    return Endpoint(url)


def _normalise_url(url: str) -> str:
    """Accept ``127.0.0.1:9900`` as well as ``http://127.0.0.1:9900/``; refuse other schemes."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"admin URL must be http://HOST:PORT or https://HOST:PORT, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise UsageError(f"admin URL {url!r}: {exc}") from exc
    return url.rstrip("/")


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the admin token from {path}: {exc}") from exc
    if not token:
        raise UsageError(f"the admin token file {path} is empty")
    return token


# -- requests and responses ------------------------------------------------------------------


def api_path(*segments: str) -> str:
    """``/seg/seg/...`` with each segment percent-encoded; ``:`` stays literal (``HOST:PORT``
    ids), ``/`` and everything else unsafe is encoded so an id can never add a path level."""
    for segment in segments:
        if not segment:
            raise UsageError("an id in the request path must not be empty")
        if segment in (".", ".."):
            raise UsageError(f"{segment!r} is not a valid id")
    return "/" + "/".join(quote(s, safe=":") for s in segments)


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    """Already percent-encoded (see ``api_path``), relative to the admin URL."""
    body: JsonObject | str | None = None
    """A JSON object, or text sent as is with ``content_type`` (``ctl apply``'s YAML)."""
    content_type: str = "application/json"
    if_match: int | None = None
    """Sent as ``If-Match: "N"``: the API refuses with 412 if the generation moved on."""

    @property
    def mutating(self) -> bool:
        return self.method not in ("GET", "HEAD")

    def payload(self) -> bytes | None:
        if self.body is None:
            return None
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()

    def headers(self, endpoint: Endpoint) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"alb-proxy/{__version__}"}
        if endpoint.token:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        if self.body is not None:
            headers["Content-Type"] = self.content_type
        if self.if_match is not None:
            headers["If-Match"] = f'"{self.if_match}"'
        return headers


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: JsonObject
    """The decoded JSON object; ``{}`` when the API answered without a body (204)."""
    generation: int | None = None
    """From the ``ETag`` header, which every answer of the API carries."""


def send(endpoint: Endpoint, request: ApiRequest, timeout: float = TIMEOUT_S) -> ApiResponse:
    """One request, one connection. Raises ``ApiError`` for 4xx/5xx, ``UnreachableError`` when
    no HTTP answer came back."""
    parts = urlsplit(endpoint.url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(
            request.method,
            parts.path + request.path,
            body=request.payload(),
            headers=request.headers(endpoint),
        )
        resp = conn.getresponse()
        raw = resp.read()
        etag = resp.getheader("ETag")
    except (OSError, http.client.HTTPException) as exc:
        raise UnreachableError(
            f"cannot reach the admin API at {endpoint.url}: {_reason(exc)}"
        ) from exc
    finally:
        conn.close()
    return _interpret(resp.status, resp.reason, raw, etag, endpoint)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is `alb-proxy run` up, and is this its admin address?)"
    return str(exc) or type(exc).__name__


def _interpret(
    status: int, reason: str, raw: bytes, etag: str | None, endpoint: Endpoint
) -> ApiResponse:
    match = _ETAG.match(etag.strip()) if etag else None
    generation = int(match.group(1)) if match else None
    body = _decode(raw)
    if 200 <= status < 300:
        if body is None and raw.strip():
            raise ApiError(
                status,
                "bad_response",
                f"the admin API at {endpoint.url} answered {status} with a body that is not "
                "a JSON object",
            )
        return ApiResponse(status, body or {}, generation)
    error = body.get("error") if body is not None else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        assert body is not None
        problems = error.get("problems") or []
        refused = ApiError(
            status,
            str(error.get("code") or f"http_{status}"),
            error["message"],
            tuple(str(p) for p in problems) if isinstance(problems, list) else (),
            body,
        )
    else:  # not our API's error shape: a proxy in between, an old daemon, a wrong port
        text = raw.decode(errors="replace").strip().splitlines()
        detail = f": {text[0][:200]}" if text else ""
        refused = ApiError(status, f"http_{status}", f"HTTP {status} {reason}{detail}")
    if status == 401 and endpoint.token is None:
        refused.problems += (
            "no token was sent: pass --token or --token-file, or set ALB_ADMIN_TOKEN",
        )
    elif status == 401:
        refused.problems += (f"the token sent came from {endpoint.token_source}",)
    raise refused


def _decode(raw: bytes) -> JsonObject | None:
    try:
        value = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
