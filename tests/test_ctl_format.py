"""``alb-proxy certs ...`` / ``ctl ...`` without a daemon: every command line becomes the right
request, the connection settings come from the right place, canned answers print as readable
tables, and failures print one message (or one JSON object) with the right exit code.

The last section talks HTTP to a stdlib server on port 0, to check what goes on the wire.
"""

from __future__ import annotations

import argparse
import http.server
import json
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certfactory import make_ca, make_server, write_pair, write_pem

from alb_proxy import cli, ctl
from alb_proxy.adminclient import (
    ApiError,
    ApiRequest,
    ApiResponse,
    Endpoint,
    UnreachableError,
    UsageError,
    resolve_endpoint,
    send,
)


def cmd(line: str) -> list[str]:
    return shlex.split(line)


def parser() -> argparse.ArgumentParser:
    """The same registration ``alb_proxy.cli`` does, on a bare root parser."""
    root = argparse.ArgumentParser(prog="alb-proxy")
    commands = root.add_subparsers()
    certs = commands.add_parser("certs").add_subparsers()
    ctl.add_commands(commands, certs)
    return root


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(argv)


def request_of(*argv: str, cwd: Path | None = None) -> ApiRequest:
    return ctl.build_request(parse(*argv), cwd)


# -- command line -> request -----------------------------------------------------------------

L = "/v1/listeners"
REQUESTS: list[tuple[list[str], str, str, Any]] = [
    (["certs", "list"], "GET", "/v1/certificates", None),
    (["certs", "show", "cert-1"], "GET", "/v1/certificates/cert-1", None),
    (["certs", "delete", "cert-1"], "DELETE", "/v1/certificates/cert-1", None),
    (["ctl", "listener", "list"], "GET", L, None),
    (["ctl", "listener", "show", "web"], "GET", f"{L}/web", None),
    (["ctl", "listener", "delete", "web"], "DELETE", f"{L}/web", None),
    (["ctl", "listener", "start", "web"], "POST", f"{L}/web/start", None),
    (["ctl", "listener", "stop", "web"], "POST", f"{L}/web/stop", None),
    (
        cmd("ctl listener create --name h --protocol http --port 80 --server-group sg"),
        "POST",
        L,
        {"name": "h", "protocol": "HTTP", "port": 80, "default_action": {"forward": "sg"}},
    ),
    (
        cmd(
            "ctl listener create --name s --protocol HTTPS --port 443 --bind 127.0.0.1 "
            "--cert c1 --additional c2 --additional c3 --policy tls_cipher_policy_1_2 "
            "--mtls --ca ca1 --ca ca2 --server-group sg"
        ),
        "POST",
        L,
        {
            "name": "s",
            "protocol": "HTTPS",
            "port": 443,
            "bind": "127.0.0.1",
            "certificates": {"default": "c1", "additional": ["c2", "c3"]},
            "security_policy": "tls_cipher_policy_1_2",
            "mutual_authentication": {"enabled": True, "ca_certificates": ["ca1", "ca2"]},
            "default_action": {"forward": "sg"},
        },
    ),
    (
        ["ctl", "cert", "set-default", "web", "c2"],
        "PUT",
        f"{L}/web/default-certificate",
        {"certificate_id": "c2"},
    ),
    (
        ["ctl", "cert", "add", "web", "c2"],
        "POST",
        f"{L}/web/additional-certificates",
        {"certificate_id": "c2"},
    ),
    (["ctl", "cert", "remove", "web", "c2"], "DELETE", f"{L}/web/additional-certificates/c2", None),
    (
        ["ctl", "mtls", "enable", "web", "--ca", "ca1", "--ca", "ca2"],
        "PUT",
        f"{L}/web/mutual-authentication",
        {"enabled": True, "ca_certificates": ["ca1", "ca2"]},
    ),
    (
        ["ctl", "mtls", "disable", "web"],
        "PUT",
        f"{L}/web/mutual-authentication",
        {"enabled": False},
    ),
    (
        ["ctl", "ca", "replace", "web", "ca1", "ca2"],
        "PUT",
        f"{L}/web/ca-certificates",
        {"ca_certificates": ["ca1", "ca2"]},
    ),
    (
        ["ctl", "policy", "set", "web", "tls_cipher_policy_1_2"],
        "PUT",
        f"{L}/web/security-policy",
        {"security_policy": "tls_cipher_policy_1_2"},
    ),
    (
        ["ctl", "server", "add", "sg", "--host", "10.0.0.1", "--port", "8080"],
        "POST",
        "/v1/server-groups/sg/servers",
        {"host": "10.0.0.1", "port": 8080},
    ),
    (
        ["ctl", "server", "add", "sg", "--host", "10.0.0.1", "--port", "8080", "--weight", "0"],
        "POST",
        "/v1/server-groups/sg/servers",
        {"host": "10.0.0.1", "port": 8080, "weight": 0},
    ),
    (
        ["ctl", "server", "remove", "sg", "10.0.0.1:8080"],
        "DELETE",
        "/v1/server-groups/sg/servers/10.0.0.1:8080",
        None,
    ),
    (
        ["ctl", "server", "weight", "sg", "10.0.0.1:8080", "50"],
        "PATCH",
        "/v1/server-groups/sg/servers/10.0.0.1:8080",
        {"weight": 50},
    ),
    (["ctl", "server-group", "list"], "GET", "/v1/server-groups", None),
    (["ctl", "config", "show"], "GET", "/v1/config", None),
]


@pytest.mark.parametrize(
    ("argv", "method", "path", "body"), REQUESTS, ids=[" ".join(r[0][:4]) for r in REQUESTS]
)
def test_each_command_is_one_request(argv: list[str], method: str, path: str, body: Any) -> None:
    request = request_of(*argv)
    assert (request.method, request.path, request.body) == (method, path, body)
    assert request.if_match is None
    assert request.content_type == "application/json"


def test_uploads_send_the_files_named_relative_to_cwd(tmp_path: Path) -> None:
    root = make_ca()
    cert, key = write_pair(tmp_path, "site", make_server(root, ["site.test"]))
    chain = write_pem(tmp_path / "chain.pem", cert.read_bytes())
    request = request_of(
        *("certs", "upload", "--name", "site", "--cert", "site.pem", "--key", "site.key"),
        *("--chain", "chain.pem"),
        cwd=tmp_path,
    )
    assert (request.method, request.path) == ("POST", "/v1/certificates")
    assert request.body == {
        "name": "site",
        "cert_pem": cert.read_text(),
        "key_pem": key.read_text(),
        "chain_pem": chain.read_text(),
    }
    request = request_of("certs", "upload-ca", "--name", "r", "--cert", str(cert))
    assert (request.method, request.path) == ("POST", "/v1/ca-certificates")
    assert request.body == {"name": "r", "cert_pem": cert.read_text()}


def test_apply_sends_the_yaml_text_as_is(tmp_path: Path) -> None:
    text = "# comments and key order survive\ninstance: {name: t}\n"
    (tmp_path / "alb.yaml").write_text(text)
    request = request_of("ctl", "apply", "-f", "alb.yaml", cwd=tmp_path)
    assert (request.method, request.path, request.body) == ("PUT", "/v1/config", text)
    assert request.content_type == "application/yaml"
    assert request.payload() == text.encode()


@pytest.mark.parametrize(
    "argv",
    [
        ["certs", "delete", "c"],
        ["ctl", "listener", "stop", "web"],
        ["ctl", "cert", "set-default", "web", "c"],
        ["ctl", "server", "weight", "sg", "h:1", "5"],
    ],
)
def test_if_match_on_every_mutating_command(argv: list[str]) -> None:
    request = request_of(*argv, "--if-match", "7")
    assert request.if_match == 7
    assert request.headers(Endpoint("http://x", "t"))["If-Match"] == '"7"'


def test_reads_take_no_if_match(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("ctl", "listener", "list", "--if-match", "7")
    assert exit_.value.code == 2
    assert "--if-match" in capsys.readouterr().err


def test_ids_are_percent_encoded_but_host_port_keeps_its_colon() -> None:
    assert request_of("ctl", "listener", "show", "a/b c").path == f"{L}/a%2Fb%20c"
    assert request_of("certs", "show", "ü?#").path == "/v1/certificates/%C3%BC%3F%23"
    assert (
        request_of("ctl", "server", "remove", "s g", "[::1]:8080").path
        == "/v1/server-groups/s%20g/servers/%5B::1%5D:8080"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctl", "server", "remove", "sg", "10.0.0.1"], "expected HOST:PORT"),
        (["ctl", "server", "weight", "sg", "h:99999", "1"], "expected HOST:PORT"),
        (["ctl", "server", "remove", "sg", ":80"], "expected HOST:PORT"),
        (["certs", "show", ".."], "not a valid id"),
        (["certs", "show", ""], "must not be empty"),
        (
            cmd("ctl listener create --name x --protocol HTTPS --port 1 --ca c --server-group s"),
            "add --mtls",
        ),
        (["ctl", "apply", "-f", "missing.yaml"], "cannot read"),
    ],
)
def test_malformed_arguments_are_usage_errors(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=message) as exc:
        request_of(*argv, cwd=tmp_path)
    assert exc.value.exit_code == 2


def test_apply_names_the_file_its_yaml_errors_are_in(tmp_path: Path) -> None:
    (tmp_path / "alb.yaml").write_text("instance: {name: t}\nlisteners: [\n")
    with pytest.raises(UsageError, match=r"alb\.yaml is not valid YAML") as exc:
        request_of("ctl", "apply", "-f", "alb.yaml", cwd=tmp_path)
    assert exc.value.problems and all(
        p.startswith(f"{tmp_path / 'alb.yaml'}: ") for p in exc.value.problems
    )


def test_upload_file_problems_name_the_file_never_the_content(tmp_path: Path) -> None:
    root = make_ca()
    cert, _ = write_pair(tmp_path, "s", make_server(root))
    (tmp_path / "der.key").write_bytes(b"\x30\x82\x01\x00\xff\xfe")
    secret = "c2VjcmV0IGtleSBtYXRlcmlhbA=="
    (tmp_path / "nopem.key").write_text(secret + "\n")
    cases = {
        "missing.key": "--key: cannot read",
        "der.key": "is not PEM (binary content; convert DER with `openssl pkey -inform der`)",
        "nopem.key": "holds no PEM block (expected -----BEGIN PRIVATE KEY-----)",
    }
    for name, message in cases.items():
        with pytest.raises(UsageError) as exc:
            request_of(
                *("certs", "upload", "--name", "n", "--cert", str(cert), "--key", name),
                cwd=tmp_path,
            )
        assert message in exc.value.message
        assert name in exc.value.message
        assert secret not in exc.value.message


def test_groups_without_an_action_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ctl"], ["ctl", "listener"], ["ctl", "mtls"]):
        with pytest.raises(SystemExit) as exit_:
            parse(*argv)
        assert exit_.value.code == 2
        assert "required: ACTION" in capsys.readouterr().err


def test_mtls_enable_needs_a_ca(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("ctl", "mtls", "enable", "web")
    assert "--ca" in capsys.readouterr().err


# -- where and as whom -----------------------------------------------------------------------


def endpoint(*argv: str, env: dict[str, str] | None = None, cwd: Path) -> Endpoint:
    args = parse("ctl", "listener", "list", *argv)
    return resolve_endpoint(args.admin, args.token, args.token_file, env or {}, cwd)


def test_admin_url_flag_then_env_then_default(tmp_path: Path) -> None:
    env = {"ALB_ADMIN": "http://10.0.0.1:9000/"}
    assert endpoint("--admin", "http://h:1", env=env, cwd=tmp_path).url == "http://h:1"
    assert endpoint(env=env, cwd=tmp_path).url == "http://10.0.0.1:9000"
    assert endpoint(cwd=tmp_path).url == "http://127.0.0.1:9900"
    assert endpoint("--admin", "127.0.0.1:9901", cwd=tmp_path).url == "http://127.0.0.1:9901"
    for bad in ("ftp://h:1", "http://:1", "http://h:port"):
        with pytest.raises(UsageError, match="admin URL"):
            endpoint("--admin", bad, cwd=tmp_path)


def test_token_flags_then_env_then_files(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin.token").write_text("from-state\n")
    (tmp_path / "flag.token").write_text("  from-flag-file \n")
    (tmp_path / "env.token").write_text("from-env-file")
    env = {"ALB_ADMIN_TOKEN": "from-env", "ALB_ADMIN_TOKEN_FILE": "env.token"}

    def token(*argv: str, **env_: str) -> tuple[str | None, str]:
        found = endpoint(*argv, env=env_, cwd=tmp_path)
        return found.token, found.token_source

    assert token("--token", "from-flag", **env) == ("from-flag", "--token")
    assert token("--token-file", "flag.token", **env) == (
        "from-flag-file",
        "--token-file flag.token",
    )
    assert token(**env) == ("from-env", "ALB_ADMIN_TOKEN")
    assert token(ALB_ADMIN_TOKEN="", ALB_ADMIN_TOKEN_FILE="env.token")[0] == "from-env-file"
    assert token() == ("from-state", "./state/admin.token")
    (tmp_path / "state" / "admin.token").unlink()
    assert token() == (None, "none")


def test_token_flags_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("ctl", "listener", "list", "--token", "a", "--token-file", "f")


def test_a_named_token_file_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="cannot read the admin token from"):
        endpoint("--token-file", "nope", cwd=tmp_path)
    with pytest.raises(UsageError, match="is empty"):
        endpoint(env={"ALB_ADMIN_TOKEN_FILE": "empty"}, cwd=tmp_path)


def test_the_token_stays_out_of_reprs() -> None:
    assert "s3cret" not in repr(Endpoint("http://h", "s3cret", "--token"))


# -- answers -> text -------------------------------------------------------------------------

SITE: dict[str, Any] = {
    "id": "cert-site",
    "name": "site",
    "kind": "server",
    "source": "config",
    "domains": ["site.example.test", "www.site.example.test"],
    "key_type": "EC P-256",
    "not_before": "2025-01-01T00:00:00+00:00",
    "not_after": "2026-01-01T00:00:00+00:00",
    "days_left": 120,
    "fingerprint_sha256": "ab" * 32,
    "serial": "1f",
    "subject": "CN=site.example.test",
    "issuer": "CN=Test CA",
    "used_by": ["https-8443", "quic-8443"],
    "warnings": [],
}
MANY = SITE | {
    "id": "upload-7f3a",
    "name": "many names",
    "source": "upload",
    "domains": [f"host{i}.example.test" for i in range(10)],
    "key_type": "RSA 2048",
    "not_after": "2024-06-30T12:00:00+00:00",
    "days_left": -3,
    "used_by": [],
    "warnings": ["certificate expired on 2024-06-30 12:00 UTC (3 days ago)"],
}
CA = SITE | {
    "id": "ca-clients",
    "name": "clients",
    "kind": "ca",
    "domains": [],
    "key_type": None,
    "used_by": ["mtls-8444"],
}


def rendered(argv: list[str], body: dict[str, Any], generation: int | None = 7) -> str:
    args = parse(*argv)
    text: str = args.render(args, ApiResponse(200, body, generation))
    return text


def columns(line: str, header: str, name: str) -> str:
    """The cell of column ``name`` in ``line``, cut at the header's column boundaries."""
    start = header.index(name)
    rest = header[start + len(name) :]
    end = start + len(name) + (len(rest) - len(rest.lstrip(" "))) if rest.strip() else None
    return line[start:end].strip()


def test_certs_list_is_an_aligned_table() -> None:
    text = rendered(["certs", "list"], {"certificates": [SITE, MANY, CA]})
    header, *rows = text.splitlines()
    assert header.split("  ")[0] == "ID"
    names = ["ID", "NAME", "KIND", "DOMAINS", "KEY", "NOT AFTER", "DAYS LEFT", "USED BY"]
    assert [n for n in names if n in header] == names
    cell = {n: [columns(r, header, n) for r in rows] for n in names}
    assert cell["ID"] == ["cert-site", "upload-7f3a", "ca-clients"]
    assert cell["NAME"] == ["site", "many names", "clients"]
    assert cell["DOMAINS"][0] == "site.example.test,www.site.example.test"
    assert cell["DOMAINS"][1] == "host0.example.test,host1.example.test +8 more"
    assert cell["DOMAINS"][2] == "-"
    assert cell["KEY"] == ["EC P-256", "RSA 2048", "-"]
    assert cell["NOT AFTER"] == ["2026-01-01", "2024-06-30", "2026-01-01"]
    assert cell["DAYS LEFT"] == ["120", "-3", "120"]
    assert cell["USED BY"] == ["https-8443,quic-8443", "-", "mtls-8444"]
    assert all(line == line.rstrip() for line in text.splitlines())


def test_empty_lists_say_so() -> None:
    assert rendered(["certs", "list"], {"certificates": []}) == "no certificates"
    assert rendered(["ctl", "listener", "list"], {"listeners": []}) == "no listeners"
    assert rendered(["ctl", "server-group", "list"], {"server_groups": []}) == "no server groups"


def test_shorten_always_shows_one_name() -> None:
    assert ctl.shorten(["x" * 60, "y"]) == "x" * 60 + " +1 more"
    assert ctl.shorten([]) == "-"


def test_certs_show_is_key_value_lines() -> None:
    text = rendered(["certs", "show", "upload-7f3a"], MANY)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    values = {k: v.strip() for k, v in lines.items()}
    assert values["id"] == "upload-7f3a"
    assert values["fingerprint (SHA-256)"] == "ab" * 32
    assert values["days left"] == "-3"
    assert values["warning"].startswith("certificate expired on 2024-06-30")
    assert len({len(k) + len(v) - len(v.lstrip()) for k, v in lines.items()}) == 1  # aligned
    assert "key" not in " ".join(values).replace("key type", "")


LISTENERS: list[dict[str, Any]] = [
    {
        "name": "https-8443",
        "protocol": "HTTPS",
        "port": 8443,
        "bind": "0.0.0.0",
        "enabled": True,
        "state": "serving",
        "bound_port": 8443,
        "certificates": {"default": "cert-site", "additional": ["cert-api", "cert-b"]},
        "security_policy": "tls_cipher_policy_1_2",
        "mutual_authentication": {"enabled": True, "ca_certificates": ["ca-a", "ca-b"]},
        "default_action": {"forward": "sg-web"},
        "certificate_expiry": [
            {"id": "cert-site", "not_after": "2026-01-01T00:00:00+00:00", "days_left": 120}
        ],
    },
    {
        "name": "http-8080",
        "protocol": "HTTP",
        "port": 8080,
        "bind": "127.0.0.1",
        "enabled": False,
        "state": "stopped",
        "bound_port": None,
        "certificates": None,
        "security_policy": "tls_cipher_policy_1_2_strict_with_1_3",
        "mutual_authentication": {"enabled": False, "ca_certificates": ["ca-a"]},
        "default_action": {"forward": "sg-web"},
        "certificate_expiry": [],
    },
    {
        "name": "ephemeral",
        "protocol": "HTTPS",
        "port": 9443,
        "bound_port": 41234,
        "state": "serving",
        "certificates": {"default": "c", "additional": []},
        "mutual_authentication": {"enabled": False, "ca_certificates": []},
    },
]


def test_listener_list_is_an_aligned_table() -> None:
    text = rendered(["ctl", "listener", "list"], {"listeners": LISTENERS})
    header, *rows = text.splitlines()
    names = ["NAME", "PROTOCOL", "PORT", "STATE", "DEFAULT CERT", "ADDITIONAL", "POLICY", "MTLS"]
    cell = {n: [columns(r, header, n) for r in rows] for n in [*names, "SERVER GROUP"]}
    assert cell["NAME"] == ["https-8443", "http-8080", "ephemeral"]
    assert cell["PORT"] == ["8443", "8080", "9443 (bound 41234)"]
    assert cell["STATE"] == ["serving", "stopped", "serving"]
    assert cell["DEFAULT CERT"] == ["cert-site", "-", "c"]
    assert cell["ADDITIONAL"] == ["cert-api,cert-b", "-", "-"]
    assert cell["MTLS"] == ["on (ca-a,ca-b)", "off", "off"]
    assert cell["SERVER GROUP"] == ["sg-web", "sg-web", "-"]


def test_listener_show() -> None:
    text = rendered(["ctl", "listener", "show", "https-8443"], LISTENERS[0])
    assert "default certificate:     cert-site" in text
    assert "additional certificates: cert-api, cert-b" in text
    assert "mutual authentication:   enabled" in text
    assert "CA certificates:         ca-a, ca-b" in text
    assert "expiry of cert-site:     2026-01-01 (120 days left)" in text


def test_server_groups_one_row_per_server() -> None:
    body = {
        "server_groups": [
            {
                "id": "sg-web",
                "scheduler": "wrr",
                "servers": [
                    {"host": "127.0.0.1", "port": 8081, "weight": 100},
                    {"host": "127.0.0.1", "port": 8082, "weight": 0},
                ],
            },
            {"id": "sg-empty", "scheduler": "sch", "servers": []},
        ]
    }
    assert rendered(["ctl", "server-group", "list"], body).splitlines() == [
        "SERVER GROUP  SCHEDULER  SERVER          WEIGHT",
        "sg-web        wrr        127.0.0.1:8081  100",
        "sg-web        wrr        127.0.0.1:8082  0",
        "sg-empty      sch        -               -",
    ]


def test_config_show_is_yaml_that_apply_takes_back() -> None:
    config = {"instance": {"name": "t"}, "listeners": [{"name": "x", "port": 1}]}
    text = rendered(["ctl", "config", "show"], {"generation": 4, "config": config})
    assert text.startswith("# running config (generation 4)\n")
    assert yaml.safe_load(text) == config


OPERATIONS: list[tuple[list[str], dict[str, Any], str]] = [
    (
        ["ctl", "cert", "set-default", "https-8443", "cert-x"],
        {"generation": 7},
        "default certificate of https-8443 is now cert-x (generation 7)",
    ),
    (["ctl", "cert", "add", "l", "c"], {"generation": 8}, "l now also serves c (generation 8)"),
    (["ctl", "cert", "remove", "l", "c"], {}, "l no longer serves c (generation 7)"),
    (
        ["ctl", "mtls", "enable", "l", "--ca", "a", "--ca", "b"],
        {"generation": 9},
        "mutual authentication on l is now enabled with a, b (generation 9)",
    ),
    (["ctl", "ca", "replace", "l", "a"], {}, "CA certificates of l are now a (generation 7)"),
    (["ctl", "listener", "stop", "l"], {}, "listener l stopped (generation 7)"),
    (["certs", "delete", "c"], {"deleted": "c"}, "deleted certificate c (generation 7)"),
    (
        ["ctl", "server", "weight", "sg", "h:1", "0"],
        {},
        "weight of h:1 in sg is now 0 (generation 7)",
    ),
    (
        cmd("ctl listener create --name n --protocol HTTP --port 80 --server-group sg"),
        {"generation": 3, "listener": {"bound_port": 40001}},
        "created listener n (HTTP 80), serving on port 40001 (generation 3)",
    ),
    (
        ["ctl", "apply", "-f", "alb.yaml"],
        {"generation": 5, "changed": True},
        "applied alb.yaml (generation 5)",
    ),
    (
        ["ctl", "apply", "-f", "alb.yaml"],
        {"generation": 5, "changed": False},
        "alb.yaml: no change, the running state already matches (generation 5)",
    ),
]


@pytest.mark.parametrize(("argv", "body", "line"), OPERATIONS, ids=[o[2] for o in OPERATIONS])
def test_operations_print_one_line(argv: list[str], body: dict[str, Any], line: str) -> None:
    assert rendered(argv, body) == line


def test_upload_says_what_was_stored() -> None:
    body = {"id": "upload-7f3a", "generation": 2, "certificate": MANY}
    argv = ["certs", "upload", "--name", "many", "--cert", "c", "--key", "k"]
    assert rendered(argv, body) == (
        "uploaded certificate 'many' as upload-7f3a (for host0.example.test,host1.example.test "
        "+8 more, expires 2024-06-30) (generation 2)"
    )
    argv = ["certs", "upload-ca", "--name", "clients", "--cert", "c"]
    assert rendered(argv, {"id": "ca-clients", "generation": 3, "certificate": CA}) == (
        "uploaded CA certificate 'clients' as ca-clients (expires 2026-01-01) (generation 3)"
    )


# -- execute: output streams and exit codes --------------------------------------------------


class Canned:
    """A transport that answers every request with one canned response (or error)."""

    def __init__(self, answer: ApiResponse | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[Endpoint, ApiRequest]] = []

    def __call__(self, endpoint: Endpoint, request: ApiRequest) -> ApiResponse:
        self.calls.append((endpoint, request))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def execute(argv: list[str], answer: ApiResponse | Exception, tmp_path: Path) -> tuple[int, Canned]:
    transport = Canned(answer)
    code = ctl.execute(parse(*argv), env={}, cwd=tmp_path, transport=transport)
    return code, transport


CONFLICT = ApiError(
    409,
    "conflict",
    "certificate 'c1' is in use by listener(s) web",
    ("listeners[web].certificates.default: c1",),
    {
        "error": {
            "status": 409,
            "code": "conflict",
            "message": "certificate 'c1' is in use by listener(s) web",
            "problems": ["listeners[web].certificates.default: c1"],
        }
    },
)


def test_api_errors_exit_1_with_message_and_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = execute(["certs", "delete", "c1"], CONFLICT, tmp_path)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "alb-proxy: certificate 'c1' is in use by listener(s) web (409 conflict)",
        "  listeners[web].certificates.default: c1",
    ]


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (CONFLICT, 1),
        (UnreachableError("cannot reach the admin API at http://h:1: refused"), 3),
        (ApiError(502, "http_502", "HTTP 502 Bad Gateway"), 1),
    ],
)
def test_json_errors_are_one_object(
    answer: Exception, code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got, _ = execute(["certs", "delete", "c1", "--json"], answer, tmp_path)
    out, err = capsys.readouterr()
    assert got == code and err == ""
    error = json.loads(out)["error"]
    assert set(error) == {"status", "code", "message", "problems"}
    if answer is CONFLICT:
        assert error == CONFLICT.body["error"]  # type: ignore[index]


def test_usage_errors_exit_2_in_both_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ctl", "server", "remove", "sg", "nonsense"]
    code, transport = execute(argv, ApiResponse(200, {}), tmp_path)
    assert code == 2 and not transport.calls
    assert capsys.readouterr().err.startswith("alb-proxy: expected HOST:PORT")
    code, _ = execute([*argv, "--json"], ApiResponse(200, {}), tmp_path)
    assert code == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "usage"


def test_unreachable_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answer = UnreachableError("cannot reach the admin API at http://h:1: connection refused")
    code, _ = execute(["ctl", "listener", "list"], answer, tmp_path)
    assert code == 3
    assert capsys.readouterr().err == (
        "alb-proxy: cannot reach the admin API at http://h:1: connection refused\n"
    )


def test_json_success_is_the_body_as_one_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"listeners": LISTENERS}
    code, _ = execute(["ctl", "listener", "list", "--json"], ApiResponse(200, body), tmp_path)
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert json.loads(out) == body
    code, _ = execute(["ctl", "listener", "stop", "l", "--json"], ApiResponse(204, {}, 9), tmp_path)
    assert json.loads(capsys.readouterr().out) == {"generation": 9}


def test_upload_warnings_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = write_pair(tmp_path, "s", make_server(make_ca()))
    argv = ["certs", "upload", "--name", "m", "--cert", str(cert), "--key", str(key)]
    body = {"id": "upload-7f3a", "generation": 2, "certificate": MANY}
    assert execute(argv, ApiResponse(201, body, 2), tmp_path)[0] == 0
    out, err = capsys.readouterr()
    assert out.startswith("uploaded certificate 'm' as upload-7f3a")
    assert err == "alb-proxy: warning: certificate expired on 2024-06-30 12:00 UTC (3 days ago)\n"


def test_connection_settings_reach_the_transport(tmp_path: Path) -> None:
    argv = ["ctl", "listener", "list", "--admin", "http://h:2", "--token", "t"]
    _, transport = execute(argv, ApiResponse(200, {"listeners": []}), tmp_path)
    [(where, request)] = transport.calls
    assert (where.url, where.token, request.path) == ("http://h:2", "t", "/v1/listeners")


# -- the wire --------------------------------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, b"{}")


@pytest.fixture
def server() -> Iterator[tuple[str, Seen]]:
    """A stdlib HTTP server on port 0 that records each request and sends ``seen.answer``."""
    seen = Seen()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            seen.requests.append((self.command, self.path, dict(self.headers.items()), body))
            status, headers, payload = seen.answer
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_what_goes_on_the_wire(server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answer = (200, {"ETag": '"12"', "Content-Type": "application/json"}, b'{"generation": 12}')
    request = ApiRequest("PATCH", "/v1/server-groups/s%20g/servers/h:1", {"weight": 5}, if_match=11)
    response = send(Endpoint(url + "/", "tok"), request)
    assert response == ApiResponse(200, {"generation": 12}, 12)
    [(method, path, headers, body)] = seen.requests
    assert (method, path) == ("PATCH", "/v1/server-groups/s%20g/servers/h:1")
    assert headers["Authorization"] == "Bearer tok"
    assert headers["If-Match"] == '"11"'
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"weight": 5}


def test_yaml_goes_as_yaml_and_reads_send_no_body(server: tuple[str, Seen]) -> None:
    url, seen = server
    send(Endpoint(url), ApiRequest("PUT", "/v1/config", "a: 1\n", "application/yaml"))
    send(Endpoint(url), ApiRequest("GET", "/v1/listeners"))
    (_, _, put_headers, put_body), (_, _, get_headers, get_body) = seen.requests
    assert (put_headers["Content-Type"], put_body) == ("application/yaml", b"a: 1\n")
    assert "Content-Type" not in get_headers and get_body == b""
    assert "Authorization" not in get_headers  # no token: none sent


def test_a_url_prefix_is_kept(server: tuple[str, Seen]) -> None:
    url, seen = server
    send(Endpoint(url + "/alb"), ApiRequest("GET", "/v1/listeners"))
    assert seen.requests[0][1] == "/alb/v1/listeners"


def test_error_bodies_become_api_errors(server: tuple[str, Seen]) -> None:
    url, seen = server
    error = {"status": 422, "code": "invalid", "message": "refused", "problems": ["a: b"]}
    seen.answer = (422, {"ETag": '"3"'}, json.dumps({"error": error}).encode())
    with pytest.raises(ApiError) as exc:
        send(Endpoint(url, "t"), ApiRequest("GET", "/v1/x"))
    assert (exc.value.status, exc.value.code, exc.value.problems) == (422, "invalid", ("a: b",))
    assert exc.value.to_json() == error


def test_foreign_errors_and_bodies_are_still_reported(server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answer = (502, {"Content-Type": "text/html"}, b"<h1>Bad gateway</h1>\n")
    with pytest.raises(ApiError) as exc:
        send(Endpoint(url, "t"), ApiRequest("GET", "/v1/x"))
    assert (exc.value.code, exc.value.message) == (
        "http_502",
        "HTTP 502 Bad Gateway: <h1>Bad gateway</h1>",
    )
    seen.answer = (200, {}, b"not json")
    with pytest.raises(ApiError, match="not a JSON object") as exc:
        send(Endpoint(url, "t"), ApiRequest("GET", "/v1/x"))
    assert exc.value.exit_code == 1


def test_unauthorized_says_where_a_token_comes_from(server: tuple[str, Seen]) -> None:
    url, seen = server
    body = {"error": {"status": 401, "code": "unauthorized", "message": "no", "problems": []}}
    seen.answer = (401, {}, json.dumps(body).encode())
    with pytest.raises(ApiError) as exc:
        send(Endpoint(url), ApiRequest("GET", "/v1/x"))
    assert "pass --token or --token-file, or set ALB_ADMIN_TOKEN" in exc.value.problems[0]
    with pytest.raises(ApiError) as exc:
        send(Endpoint(url, "t", "ALB_ADMIN_TOKEN"), ApiRequest("GET", "/v1/x"))
    assert exc.value.problems == ("the token sent came from ALB_ADMIN_TOKEN",)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_nothing_listening_is_unreachable() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(UnreachableError, match=f"cannot reach the admin API at {url}: conn"):
        send(Endpoint(url), ApiRequest("GET", "/v1/listeners"))


def test_a_peer_that_hangs_up_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"

        def hang_up() -> None:
            conn, _ = listening.accept()
            conn.recv(65536)
            conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        with pytest.raises(UnreachableError, match="closed without an answer") as exc:
            send(Endpoint(url), ApiRequest("GET", "/v1/listeners"))
        thread.join()
    assert exc.value.exit_code == 3


def test_the_real_entry_point_is_wired(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["ctl", "listener", "list", "--admin", url, "--json"]) == 3
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "unreachable" and url in error["message"]
    assert cli.main(["certs", "list", "--admin", url]) == 3
    assert capsys.readouterr().err.startswith(f"alb-proxy: cannot reach the admin API at {url}")
