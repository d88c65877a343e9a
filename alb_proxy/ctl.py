"""``alb-proxy certs upload|upload-ca|list|show|delete`` and ``alb-proxy ctl ...``: a thin client
of the daemon's admin API.

Each command is three small parts chosen when the parser is built: a *builder* that turns the
parsed arguments into an ``ApiRequest`` (no I/O beyond reading the files it names), the one
shared ``execute`` that sends it and turns any failure into an exit code, and a *renderer* that
turns the API's JSON into what a person reads. Builders and renderers are pure, so every
command's method, path, body and output is tested without a daemon.

Output: ``--json`` prints exactly one JSON object on stdout, the API's answer or
``{"error": {...}}``; otherwise tables for lists, ``key: value`` lines for one object, one line
for an operation, and errors as ``alb-proxy: MESSAGE`` with each problem indented on its own
line on stderr. Exit codes: 0 done, 1 the API refused (4xx/5xx), 2 usage (a file that cannot be
read, a malformed argument), 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import yaml

from alb_proxy.adminclient import (
    DEFAULT_ADMIN_URL,
    AdminError,
    ApiRequest,
    ApiResponse,
    Endpoint,
    JsonObject,
    UsageError,
    api_path,
    resolve_endpoint,
    send,
)
from alb_proxy.config.load import read_yaml
from alb_proxy.errors import ConfigError

# typeshed names the type of ``add_subparsers()``'s result only with this private name.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Builder = Callable[[argparse.Namespace], ApiRequest]
Renderer = Callable[[argparse.Namespace, ApiResponse], str]
Transport = Callable[[Endpoint, ApiRequest], ApiResponse]

DOMAINS_WIDTH = 40
"""The DOMAINS column of ``certs list`` shows names up to about this width, then ``+N more``."""


# -- registration ----------------------------------------------------------------------------


def add_commands(commands: Subcommands, certs: Subcommands) -> None:
    """Register the API-client actions under the existing ``certs`` and a new ``ctl``."""
    _certs_commands(certs)
    ctl = _group(commands, "ctl", "change a running daemon through its admin API")
    _listener_commands(_group(ctl, "listener", "listeners"))
    _cert_commands(_group(ctl, "cert", "a listener's server certificates"))
    _mtls_commands(ctl)
    _server_commands(ctl)
    p = _leaf(ctl, "apply", "make the running state match a config file", _apply, _applied, True)
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="YAML config; - is stdin")
    config = _group(ctl, "config", "the running configuration")
    _leaf(config, "show", "print the running config as YAML", _get("config"), _config, False)


def _certs_commands(certs: Subcommands) -> None:
    upload = "upload a server certificate and its private key"
    p = _leaf(certs, "upload", upload, _upload, _uploaded, True)
    p.add_argument("--name", required=True, help="display name; the API assigns the id")
    p.add_argument("--cert", required=True, type=Path, metavar="FILE", help="certificate PEM")
    p.add_argument("--key", required=True, type=Path, metavar="FILE", help="private key PEM")
    p.add_argument("--chain", type=Path, metavar="FILE", help="intermediate certificates PEM")
    upload_ca = "upload a CA certificate for mutual authentication"
    p = _leaf(certs, "upload-ca", upload_ca, _upload_ca, _uploaded, True)
    p.add_argument("--name", required=True, help="display name; the API assigns the id")
    p.add_argument("--cert", required=True, type=Path, metavar="FILE", help="CA certificate PEM")
    _leaf(certs, "list", "list the certificate store", _get("certificates"), _certificates, False)
    show = _get_one("certificates", "id")
    p = _leaf(certs, "show", "show one certificate (never a key)", show, _certificate, False)
    p.add_argument("id", metavar="ID")
    p = _leaf(
        certs,
        "delete",
        "delete a certificate no listener uses",
        _delete_cert,
        _done("deleted certificate {a.id}"),
        True,
    )
    p.add_argument("id", metavar="ID")


def _listener_commands(listener: Subcommands) -> None:
    _leaf(listener, "list", "list listeners", _get("listeners"), _listeners, False)
    show = _get_one("listeners", "name")
    p = _leaf(listener, "show", "show one listener", show, _listener, False)
    p.add_argument("name", metavar="NAME")
    p = _leaf(listener, "create", "add a listener", _listener_create, _created, True)
    p.add_argument("--name", required=True)
    p.add_argument("--protocol", required=True, type=str.upper, choices=["HTTP", "HTTPS", "QUIC"])
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--bind", metavar="ADDR", help="local address (the API's default: 0.0.0.0)")
    p.add_argument("--cert", dest="certificate", metavar="ID", help="default certificate")
    p.add_argument("--additional", action="append", metavar="ID", help="repeatable")
    p.add_argument("--policy", metavar="ID", help="security policy")
    p.add_argument("--mtls", action="store_true", help="require client certificates (with --ca)")
    p.add_argument("--ca", action="append", metavar="ID", help="CA for --mtls; repeatable")
    p.add_argument("--server-group", required=True, metavar="SG", help="where requests go")
    for action, verb, method in (
        ("delete", "deleted", "DELETE"),
        ("start", "started", "POST"),
        ("stop", "stopped", "POST"),
    ):
        build = _listener_action(action, method)
        done = _done(f"listener {{a.name}} {verb}")
        p = _leaf(listener, action, f"{action} a listener", build, done, True)
        p.add_argument("name", metavar="NAME")


def _cert_commands(cert: Subcommands) -> None:
    for action, help_, build, said in (
        (
            "set-default",
            "replace the default server certificate",
            _set_default,
            "default certificate of {a.listener} is now {a.cert_id}",
        ),
        (
            "add",
            "add an additional certificate (chosen by SNI)",
            _cert_add,
            "{a.listener} now also serves {a.cert_id}",
        ),
        (
            "remove",
            "remove an additional certificate",
            _cert_remove,
            "{a.listener} no longer serves {a.cert_id}",
        ),
    ):
        p = _leaf(cert, action, help_, build, _done(said), True)
        p.add_argument("listener", metavar="LISTENER")
        p.add_argument("cert_id", metavar="CERT_ID")


def _mtls_commands(ctl: Subcommands) -> None:
    mtls = _group(ctl, "mtls", "a listener's mutual authentication")
    said = "mutual authentication on {a.listener} is now enabled with {a.ca_list}"
    p = _leaf(mtls, "enable", "require client certificates", _mtls_enable, _done(said), True)
    p.add_argument("listener", metavar="LISTENER")
    p.add_argument("--ca", action="append", required=True, metavar="CA_ID", help="repeatable")
    said = "mutual authentication on {a.listener} is now disabled"
    p = _leaf(mtls, "disable", "stop asking for client certs", _mtls_disable, _done(said), True)
    p.add_argument("listener", metavar="LISTENER")
    ca = _group(ctl, "ca", "a listener's CA certificates")
    said = "CA certificates of {a.listener} are now {a.ca_list}"
    p = _leaf(ca, "replace", "replace a listener's CA certificates", _ca_replace, _done(said), True)
    p.add_argument("listener", metavar="LISTENER")
    p.add_argument("ca", nargs="+", metavar="CA_ID")
    policy = _group(ctl, "policy", "a listener's TLS security policy")
    said = "security policy of {a.listener} is now {a.policy}"
    p = _leaf(policy, "set", "change a listener's security policy", _policy_set, _done(said), True)
    p.add_argument("listener", metavar="LISTENER")
    p.add_argument("policy", metavar="POLICY_ID")


def _server_commands(ctl: Subcommands) -> None:
    server = _group(ctl, "server", "servers of a server group")
    said = "added server {a.host}:{a.port} to {a.group}"
    p = _leaf(server, "add", "add a server to a server group", _server_add, _done(said), True)
    p.add_argument("group", metavar="SG")
    p.add_argument("--host", required=True)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--weight", type=int, help="0-100 (the API's default: 100)")
    said = "removed server {a.address} from {a.group}"
    p = _leaf(server, "remove", "remove a server", _server_remove, _done(said), True)
    p.add_argument("group", metavar="SG")
    p.add_argument("address", metavar="HOST:PORT")
    said = "weight of {a.address} in {a.group} is now {a.weight}"
    p = _leaf(server, "weight", "change a server's weight", _server_weight, _done(said), True)
    p.add_argument("group", metavar="SG")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("weight", type=int, metavar="W", help="0-100; 0 takes no new requests")
    groups = _group(ctl, "server-group", "server groups")
    _leaf(groups, "list", "list server groups", _get("server-groups"), _server_groups, False)


def _group(parent: Subcommands, name: str, help_: str) -> Subcommands:
    parser = parent.add_parser(name, help=help_, description=help_)
    return parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", required=True)


def _leaf(
    parent: Subcommands,
    name: str,
    help_: str,
    build: Builder,
    render: Renderer,
    mutating: bool,
) -> argparse.ArgumentParser:
    parser = parent.add_parser(name, help=help_, description=help_)
    parser.set_defaults(handler=run, build=build, render=render)
    api = parser.add_argument_group("admin API")
    api.add_argument(
        "--admin", metavar="URL", help=f"admin API (default: $ALB_ADMIN, {DEFAULT_ADMIN_URL})"
    )
    token = api.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help="bearer token (default: $ALB_ADMIN_TOKEN; visible to ps, prefer a file)"
    )
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the token (default: $ALB_ADMIN_TOKEN_FILE, else ./state/admin.token)",
    )
    api.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    if mutating:
        api.add_argument(
            "--if-match",
            type=int,
            metavar="GEN",
            help="refuse (412) unless the running config is still at generation GEN",
        )
    return parser


# -- running a command -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The ``handler`` every leaf registers; ``cli.main`` calls it with the parsed arguments."""
    return execute(args, env=os.environ, cwd=Path.cwd())


def execute(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str],
    cwd: Path,
    transport: Transport = send,
) -> int:
    """Build, send, print; every failure becomes one message (or one JSON object) and an exit
    code here and nowhere else."""
    try:
        request = build_request(args, cwd)
        endpoint = resolve_endpoint(args.admin, args.token, args.token_file, env, cwd)
        response = transport(endpoint, request)
    except AdminError as exc:
        if args.json:
            print(json.dumps({"error": exc.to_json()}, indent=2))
        else:
            print(f"alb-proxy: {_error_line(exc)}", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(json_result(response), indent=2))
        return 0
    print(args.render(args, response))
    if request.mutating:
        for warning in _warnings(response.body):
            print(f"alb-proxy: warning: {warning}", file=sys.stderr)
    return 0


def build_request(args: argparse.Namespace, cwd: Path | None = None) -> ApiRequest:
    """The request a parsed command line stands for; files it names are read relative to
    ``cwd`` (default: the process's)."""
    build: Builder = args.build
    request = build(_with_cwd(args, cwd or Path.cwd()))
    if getattr(args, "if_match", None) is not None:
        request = dataclasses.replace(request, if_match=args.if_match)
    return request


def json_result(response: ApiResponse) -> JsonObject:
    """The API's body as is; an empty answer (204) becomes ``{"generation": N}`` from its ETag
    so ``--json`` still prints one object."""
    if response.body or response.generation is None:
        return response.body
    return {"generation": response.generation}


def _with_cwd(args: argparse.Namespace, cwd: Path) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.cwd = cwd
    return copy


def _error_line(exc: AdminError) -> str:
    if exc.status is None:
        return exc.message
    return f"{exc.message} ({exc.status} {exc.code})"


def _warnings(body: JsonObject) -> list[str]:
    found = body.get("warnings") or (body.get("certificate") or {}).get("warnings") or []
    return [str(w) for w in found]


# -- builders: arguments -> request ----------------------------------------------------------


def _get(collection: str) -> Builder:
    return lambda a: ApiRequest("GET", api_path("v1", collection))


def _get_one(collection: str, key: str) -> Builder:
    return lambda a: ApiRequest("GET", api_path("v1", collection, getattr(a, key)))


def _upload(a: argparse.Namespace) -> ApiRequest:
    body: JsonObject = {
        "name": a.name,
        "cert_pem": _read_pem(a.cwd / a.cert, "--cert", "CERTIFICATE"),
        "key_pem": _read_pem(a.cwd / a.key, "--key", "PRIVATE KEY"),
    }
    if a.chain is not None:
        body["chain_pem"] = _read_pem(a.cwd / a.chain, "--chain", "CERTIFICATE")
    return ApiRequest("POST", api_path("v1", "certificates"), body)


def _upload_ca(a: argparse.Namespace) -> ApiRequest:
    body = {"name": a.name, "cert_pem": _read_pem(a.cwd / a.cert, "--cert", "CERTIFICATE")}
    return ApiRequest("POST", api_path("v1", "ca-certificates"), body)


def _delete_cert(a: argparse.Namespace) -> ApiRequest:
    return ApiRequest("DELETE", api_path("v1", "certificates", a.id))


def _listener_action(action: str, method: str) -> Builder:
    if action == "delete":
        return lambda a: ApiRequest(method, api_path("v1", "listeners", a.name))
    return lambda a: ApiRequest(method, api_path("v1", "listeners", a.name, action))


def _listener_create(a: argparse.Namespace) -> ApiRequest:
    if a.ca and not a.mtls:
        raise UsageError("--ca names CA certificates for mutual authentication: add --mtls")
    body: JsonObject = {"name": a.name, "protocol": a.protocol, "port": a.port}
    if a.bind is not None:
        body["bind"] = a.bind
    if a.certificate is not None or a.additional:
        body["certificates"] = {"default": a.certificate, "additional": list(a.additional or [])}
    if a.policy is not None:
        body["security_policy"] = a.policy
    if a.mtls:
        body["mutual_authentication"] = {"enabled": True, "ca_certificates": list(a.ca or [])}
    body["default_action"] = {"forward": a.server_group}
    return ApiRequest("POST", api_path("v1", "listeners"), body)


def _set_default(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "default-certificate")
    return ApiRequest("PUT", path, {"certificate_id": a.cert_id})


def _cert_add(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "additional-certificates")
    return ApiRequest("POST", path, {"certificate_id": a.cert_id})


def _cert_remove(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "additional-certificates", a.cert_id)
    return ApiRequest("DELETE", path)


def _mtls_enable(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "mutual-authentication")
    return ApiRequest("PUT", path, {"enabled": True, "ca_certificates": list(a.ca)})


def _mtls_disable(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "mutual-authentication")
    return ApiRequest("PUT", path, {"enabled": False})


def _ca_replace(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "ca-certificates")
    return ApiRequest("PUT", path, {"ca_certificates": list(a.ca)})


def _policy_set(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "listeners", a.listener, "security-policy")
    return ApiRequest("PUT", path, {"security_policy": a.policy})


def _server_add(a: argparse.Namespace) -> ApiRequest:
    body: JsonObject = {"host": a.host, "port": a.port}
    if a.weight is not None:
        body["weight"] = a.weight
    return ApiRequest("POST", api_path("v1", "server-groups", a.group, "servers"), body)


def _server_remove(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "server-groups", a.group, "servers", _host_port(a.address))
    return ApiRequest("DELETE", path)


def _server_weight(a: argparse.Namespace) -> ApiRequest:
    path = api_path("v1", "server-groups", a.group, "servers", _host_port(a.address))
    return ApiRequest("PATCH", path, {"weight": a.weight})


def _apply(a: argparse.Namespace) -> ApiRequest:
    if a.file == "-":
        text = sys.stdin.read()
    else:
        path = a.cwd / a.file
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_UPLOAD_BYTES + 1)
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {_why(exc)}") from exc
        if len(raw) > MAX_UPLOAD_BYTES:
            raise UsageError(f"{path} is larger than {MAX_UPLOAD_BYTES // 1024} KiB")
    source = "<stdin>" if a.file == "-" else str(a.cwd / a.file)
    try:
        read_yaml(text, source)  # syntax errors here name the file; the daemon would say "body"
    except ConfigError as exc:
        raise UsageError(f"{source} is not valid YAML", tuple(map(str, exc.problems))) from None
    return ApiRequest("PUT", api_path("v1", "config"), text, content_type="application/yaml")


MAX_UPLOAD_BYTES = 1 << 20
"""What the admin API accepts in one request body (``control.admin.MAX_BODY``)."""


def _host_port(address: str) -> str:
    """Check ``HOST:PORT`` here: a typo should be a usage error, not a 404 for a wrong path."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT (e.g. 127.0.0.1:8081), got {address!r}")
    return address


def _read_pem(path: Path, option: str, label: str) -> str:
    """Read a PEM file for upload. The local path is in every message (the API never learns
    it); the content is in none (it may be a private key)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_UPLOAD_BYTES + 1)  # bounded: /dev/zero is not a certificate
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {_why(exc)}") from exc
    if len(data) > MAX_UPLOAD_BYTES:
        raise UsageError(
            f"{option}: {path} is larger than {MAX_UPLOAD_BYTES // 1024} KiB; not a PEM file"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(
            f"{option}: {path} is not PEM (binary content; convert DER with "
            f"`openssl {'pkey' if 'KEY' in label else 'x509'} -inform der`)"
        ) from None
    if "-----BEGIN " not in text:
        raise UsageError(f"{option}: {path} holds no PEM block (expected -----BEGIN {label}-----)")
    return text


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# -- renderers: answer -> text ---------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    grid = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in grid
    )


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{k + ':':<{width}} {v}".rstrip() for k, v in pairs)


def shorten(items: Sequence[str], width: int = DOMAINS_WIDTH) -> str:
    """Comma-joined while it fits ``width`` (always at least one), then ``+N more``."""
    if not items:
        return "-"
    shown = [items[0]]
    for item in items[1:]:
        if len(",".join([*shown, item])) > width:
            break
        shown.append(item)
    hidden = len(items) - len(shown)
    return ",".join(shown) + (f" +{hidden} more" if hidden else "")


def _text(value: Any) -> str:
    if value is None or value == [] or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _date(value: Any) -> str:
    return str(value)[:10] if value else "-"


def _gen(response: ApiResponse) -> str:
    generation = response.body.get("generation", response.generation)
    return f" (generation {generation})" if generation is not None else ""


def _done(template: str) -> Renderer:
    """One line for an operation: ``template`` formatted with the arguments (``a``; ``a.ca_list``
    is the CA ids joined), then the generation the change produced."""

    def render(a: argparse.Namespace, response: ApiResponse) -> str:
        ca_list = ", ".join(getattr(a, "ca", None) or [])
        return template.format(a=argparse.Namespace(**vars(a), ca_list=ca_list)) + _gen(response)

    return render


def _certificates(_: argparse.Namespace, response: ApiResponse) -> str:
    certs: list[JsonObject] = response.body.get("certificates") or []
    if not certs:
        return "no certificates"
    rows = [
        [
            _text(c.get("id")),
            _text(c.get("name")),
            _text(c.get("kind")),
            shorten([str(d) for d in c.get("domains") or []]),
            _text(c.get("key_type")),
            _date(c.get("not_after")),
            _text(c.get("days_left")),
            ",".join(c.get("used_by") or []) or "-",
        ]
        for c in certs
    ]
    headers = ["ID", "NAME", "KIND", "DOMAINS", "KEY", "NOT AFTER", "DAYS LEFT", "USED BY"]
    return table(headers, rows)


def _certificate(_: argparse.Namespace, response: ApiResponse) -> str:
    c = response.body
    pairs = [
        ("id", _text(c.get("id"))),
        ("name", _text(c.get("name"))),
        ("kind", _text(c.get("kind"))),
        ("source", _text(c.get("source"))),
        ("domains", _text(c.get("domains"))),
        ("key type", _text(c.get("key_type"))),
        ("subject", _text(c.get("subject"))),
        ("issuer", _text(c.get("issuer"))),
        ("serial", _text(c.get("serial"))),
        ("fingerprint (SHA-256)", _text(c.get("fingerprint_sha256"))),
        ("not before", _text(c.get("not_before"))),
        ("not after", _text(c.get("not_after"))),
        ("days left", _text(c.get("days_left"))),
        ("used by", _text(c.get("used_by"))),
    ]
    pairs += [("warning", str(w)) for w in c.get("warnings") or []]
    return fields(pairs)


def _uploaded(a: argparse.Namespace, response: ApiResponse) -> str:
    cert: JsonObject = response.body.get("certificate") or {}
    what = "CA certificate" if cert.get("kind") == "ca" else "certificate"
    facts = []
    if cert.get("domains"):
        facts.append(f"for {shorten([str(d) for d in cert['domains']])}")
    if cert.get("not_after"):
        facts.append(f"expires {_date(cert['not_after'])}")
    detail = f" ({', '.join(facts)})" if facts else ""
    ident = _text(response.body.get("id") or cert.get("id"))
    return f"uploaded {what} {a.name!r} as {ident}{detail}{_gen(response)}"


def _mtls(view: JsonObject) -> str:
    mtls: JsonObject = view.get("mutual_authentication") or {}
    if not mtls.get("enabled"):
        return "off"
    return f"on ({','.join(mtls.get('ca_certificates') or [])})"


def _port(view: JsonObject) -> str:
    port, bound = view.get("port"), view.get("bound_port")
    if bound is None or bound == port:
        return _text(port)
    return f"{port} (bound {bound})"


def _listeners(_: argparse.Namespace, response: ApiResponse) -> str:
    listeners: list[JsonObject] = response.body.get("listeners") or []
    if not listeners:
        return "no listeners"
    rows = []
    for x in listeners:
        certs: JsonObject = x.get("certificates") or {}
        rows.append(
            [
                _text(x.get("name")),
                _text(x.get("protocol")),
                _port(x),
                _text(x.get("state")),
                _text(certs.get("default")),
                ",".join(certs.get("additional") or []) or "-",
                _text(x.get("security_policy")),
                _mtls(x),
                _text((x.get("default_action") or {}).get("forward")),
            ]
        )
    headers = ["NAME", "PROTOCOL", "PORT", "STATE", "DEFAULT CERT", "ADDITIONAL", "POLICY"]
    return table([*headers, "MTLS", "SERVER GROUP"], rows)


def _listener(_: argparse.Namespace, response: ApiResponse) -> str:
    x = response.body
    certs: JsonObject = x.get("certificates") or {}
    mtls: JsonObject = x.get("mutual_authentication") or {}
    pairs = [
        ("name", _text(x.get("name"))),
        ("protocol", _text(x.get("protocol"))),
        ("port", _text(x.get("port"))),
        ("bind", _text(x.get("bind"))),
        ("bound port", _text(x.get("bound_port"))),
        ("enabled", _text(x.get("enabled"))),
        ("state", _text(x.get("state"))),
        ("default certificate", _text(certs.get("default"))),
        ("additional certificates", _text(certs.get("additional"))),
        ("security policy", _text(x.get("security_policy"))),
        ("mutual authentication", "enabled" if mtls.get("enabled") else "disabled"),
        ("CA certificates", _text(mtls.get("ca_certificates"))),
        ("server group", _text((x.get("default_action") or {}).get("forward"))),
        ("QUIC upgrade", _text(x.get("quic_upgrade"))),
    ]
    for expiry in x.get("certificate_expiry") or []:
        pairs.append(
            (
                f"expiry of {expiry.get('id')}",
                f"{_date(expiry.get('not_after'))} ({_text(expiry.get('days_left'))} days left)",
            )
        )
    return fields(pairs)


def _created(a: argparse.Namespace, response: ApiResponse) -> str:
    view: JsonObject = response.body.get("listener") or {}
    where = f", serving on port {view['bound_port']}" if view.get("bound_port") else ""
    return f"created listener {a.name} ({a.protocol} {a.port}){where}{_gen(response)}"


def _server_groups(_: argparse.Namespace, response: ApiResponse) -> str:
    groups: list[JsonObject] = response.body.get("server_groups") or []
    if not groups:
        return "no server groups"
    rows = []
    for group in groups:
        servers: list[JsonObject] = group.get("servers") or [{}]
        for server in servers:
            address = f"{server['host']}:{server['port']}" if server else "-"
            rows.append(
                [
                    _text(group.get("id")),
                    _text(group.get("scheduler")),
                    address,
                    _text(server.get("weight")),
                ]
            )
    return table(["SERVER GROUP", "SCHEDULER", "SERVER", "WEIGHT"], rows)


def _applied(a: argparse.Namespace, response: ApiResponse) -> str:
    source = "stdin" if a.file == "-" else a.file
    if response.body.get("changed"):
        return f"applied {source}{_gen(response)}"
    return f"{source}: no change, the running state already matches{_gen(response)}"


def _config(_: argparse.Namespace, response: ApiResponse) -> str:
    """YAML, so the output can be edited and fed back to ``ctl apply -f``."""
    header = f"# running config{_gen(response)}\n"
    config = response.body.get("config") or {}
    return header + yaml.safe_dump(config, sort_keys=False).rstrip()
