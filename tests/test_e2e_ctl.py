"""``alb-proxy certs ...`` and ``alb-proxy ctl ...`` as a user runs them, against the real daemon.

Every command is a subprocess of the real entry point. What a command changed is checked where
it matters: by the certificate the next handshake receives (fingerprint), by the alert a refused
client reads, by the bytes a backend received, by a port that refuses connections. The API has
answered only once the change is live, so no test waits or sleeps after a command. No command
may print key material: every output of every test is checked against the keys' base64 lines.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from certfactory import make_ca, make_client, make_server, pem_of, write_pair, write_pem
from cryptography.hazmat.primitives.serialization import Encoding
from harness import (
    Backend,
    Proxy,
    RecordingBackend,
    client_context,
    fingerprint,
    openssl_s_client,
    served_fingerprint,
    start_proxy,
)

from alb_proxy.certs.issue import Issued

TOKEN = "ctl-test-token-0123456789"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    fingerprint: str


@dataclass(frozen=True)
class CtlPki:
    initial: Pair
    second: Pair
    """Same name as ``initial``, issued via an intermediate (uploaded with ``--chain``)."""
    extra: Pair
    chain: Path
    ca_a: Path
    ca_b: Path
    alice: Pair
    """Client certificate issued by CA A."""
    bob: Pair
    """Client certificate issued by CA B."""
    key_lines: frozenset[str]
    """The base64 lines of every private key above: no command output may contain one."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CtlPki:
    out = tmp_path_factory.mktemp("ctl-pki")
    root = make_ca("ctl server root")
    inter = make_ca("ctl server intermediate", issuer=root)
    ca_a, ca_b = make_ca("ctl client CA A"), make_ca("ctl client CA B")
    keys: set[str] = set()

    def pair(name: str, leaf: Issued) -> Pair:
        cert, key = write_pair(out, name, leaf)
        keys.update(line for line in key.read_text().splitlines() if "-----" not in line)
        return Pair(cert, key, fingerprint(leaf.cert.public_bytes(Encoding.DER)))

    return CtlPki(
        initial=pair("initial", make_server(root, ["site.example.test"])),
        second=pair("second", make_server(inter, ["site.example.test"], key_type="RSA")),
        extra=pair("extra", make_server(root, ["extra.example.test"])),
        chain=write_pem(out / "chain.pem", pem_of(inter)),
        ca_a=write_pem(out / "ca-a.pem", pem_of(ca_a)),
        ca_b=write_pem(out / "ca-b.pem", pem_of(ca_b)),
        alice=pair("alice", make_client(ca_a, "alice")),
        bob=pair("bob", make_client(ca_b, "bob")),
        key_lines=frozenset(keys),
    )


def https(name: str, port: int, policy: str) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "HTTPS",
        "port": port,
        "bind": "127.0.0.1",
        "certificates": {"default": "initial"},
        "security_policy": policy,
        "default_action": {"forward": "sg"},
    }


def config_of(pki: CtlPki, backend: Backend) -> dict[str, Any]:
    return {
        "instance": {"name": "ctl", "edition": "Standard"},
        "certificates": [
            {
                "id": "initial",
                "kind": "server",
                "cert": str(pki.initial.cert),
                "key": str(pki.initial.key),
            }
        ],
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": backend.port}]}],
        "listeners": [
            https("web", 7601, "tls_cipher_policy_1_2_strict_with_1_3"),
            https("legacy", 7602, "tls_cipher_policy_1_1"),
        ],
    }


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a developer's own ``ALB_ADMIN*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALB_ADMIN")}
    return env | extra


@pytest.fixture
def proxy(tmp_path: Path, pki: CtlPki, demo_backend: Backend) -> Iterator[Proxy]:
    p = start_proxy(tmp_path, config_of(pki, demo_backend), env=clean_env(ALB_ADMIN_TOKEN=TOKEN))
    yield p
    assert p.stop() == 0


@dataclass
class Ctl:
    """Runs ``python -m alb_proxy ARGS`` with the admin URL and token in the environment."""

    cwd: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "alb_proxy", *args],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=self.env if env is None else env,
            input=stdin,
            timeout=60,
        )
        self.outputs.append(done.stdout + done.stderr)
        return done

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stderr == ""
        return done.stdout

    def json(self, *args: str, code: int = 0) -> dict[str, Any]:
        """``--json`` output: exactly one JSON object on stdout, nothing on stderr."""
        done = self(*args, "--json")
        assert done.returncode == code, done.stdout + done.stderr
        assert done.stderr == ""
        value = json.loads(done.stdout)  # refuses trailing data: one object, nothing else
        assert isinstance(value, dict)
        if code:
            assert set(value) == {"error"}
        return value

    def refused(self, *args: str, code: int = 1) -> tuple[str, dict[str, Any]]:
        """A failing command twice: its human message (stderr) and its ``--json`` error."""
        done = self(*args)
        assert done.returncode == code, done.stdout + done.stderr
        assert done.stdout == ""
        assert done.stderr.startswith("alb-proxy: ")
        error: dict[str, Any] = self.json(*args, code=code)["error"]
        return done.stderr, error


@pytest.fixture
def ctl(proxy: Proxy, pki: CtlPki, tmp_path: Path) -> Iterator[Ctl]:
    url = f"http://127.0.0.1:{proxy.admin_port}"
    runner = Ctl(tmp_path, clean_env(ALB_ADMIN=url, ALB_ADMIN_TOKEN=TOKEN))
    yield runner
    for output in runner.outputs:
        assert "PRIVATE KEY" not in output
        leaked = [line for line in pki.key_lines if line in output]
        assert not leaked, f"key material in command output:\n{output}"


def upload(ctl: Ctl, name: str, pair: Pair, *extra: str) -> str:
    args = ("certs", "upload", "--name", name, "--cert", str(pair.cert), "--key", str(pair.key))
    answer = ctl.json(*args, *extra)
    assert answer["certificate"]["fingerprint_sha256"] == pair.fingerprint
    return str(answer["id"])


def upload_ca(ctl: Ctl, name: str, cert: Path) -> str:
    answer = ctl.json("certs", "upload-ca", "--name", name, "--cert", str(cert))
    assert answer["certificate"]["kind"] == "ca"
    return str(answer["id"])


def bound_port(ctl: Ctl, listener: str) -> int:
    port = ctl.json("ctl", "listener", "show", listener)["bound_port"]
    assert isinstance(port, int)
    return port


def request(port: int, client: Pair | None = None, path: str = "/") -> str:
    """One HTTPS request: ``ok``, ``http NNN``, or the reason of the TLS alert the client read
    (TLS 1.3 refuses a client certificate after the client's handshake is done, so the request
    is what surfaces it)."""
    ctx = client_context()
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="site.example.test") as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
                while chunk := tls.recv(65536):
                    reply += chunk
        except ssl.SSLError as exc:
            return str(exc.reason)
    status = reply.split(b" ", 2)[1].decode() if reply else "none"
    return "ok" if status == "200" else f"http {status}"


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


GENERATION = r"\(generation \d+\)"


def cells(line: str) -> list[str]:
    """The cells of a table line: columns are at least two spaces apart, cells never are."""
    return re.split(r" {2,}", line.strip())


def rows_of(table: str) -> dict[str, dict[str, str]]:
    """A human table as {first cell: {column: cell}}, checking every row has every column."""
    header, *rows = map(cells, table.splitlines())
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


# -- certificates ----------------------------------------------------------------------------


def test_upload_list_show_and_no_key_anywhere(ctl: Ctl, pki: CtlPki) -> None:
    args = ("--name", "second", "--cert", str(pki.second.cert), "--key", str(pki.second.key))
    answer = ctl.json("certs", "upload", *args, "--chain", str(pki.chain))
    cert_id = answer["id"]
    assert isinstance(answer["generation"], int)
    view = answer["certificate"]
    assert view["kind"] == "server" and view["source"] == "upload"
    assert view["domains"] == ["site.example.test"]
    assert view["fingerprint_sha256"] == pki.second.fingerprint

    args = ("--name", "again", "--cert", str(pki.extra.cert), "--key", str(pki.extra.key))
    said = ctl.ok("certs", "upload", *args)
    assert re.fullmatch(
        rf"uploaded certificate 'again' as \S+ \(for extra\.example\.test, expires "
        rf"\d{{4}}-\d\d-\d\d\) {GENERATION}\n",
        said,
    ), said

    table = ctl.ok("certs", "list")
    assert cells(table.splitlines()[0]) == [
        *("ID", "NAME", "KIND", "DOMAINS", "KEY", "NOT AFTER", "DAYS LEFT", "USED BY")
    ]
    by_id = rows_of(table)
    assert by_id[cert_id]["NAME"] == "second"
    assert by_id[cert_id]["KEY"] == "RSA 2048"
    assert by_id[cert_id]["DOMAINS"] == "site.example.test"
    assert by_id[cert_id]["USED BY"] == "-"
    assert by_id["initial"]["USED BY"] == "web,legacy"
    listed = {c["id"]: c for c in ctl.json("certs", "list")["certificates"]}
    assert set(listed) >= {"initial", cert_id}
    assert listed[cert_id] == ctl.json("certs", "show", cert_id)

    shown = ctl.ok("certs", "show", cert_id)
    assert f"fingerprint (SHA-256): {pki.second.fingerprint}\n" in shown
    assert re.search(r"^key type: +RSA 2048$", shown, re.M), shown
    assert re.search(r"^source: +upload$", shown, re.M)


def test_upload_refuses_a_key_of_another_certificate(ctl: Ctl, pki: CtlPki) -> None:
    before = ctl.json("certs", "list")
    args = ("--name", "mixed", "--cert", str(pki.second.cert), "--key", str(pki.extra.key))
    message, error = ctl.refused("certs", "upload", *args)
    assert "does not match" in message
    assert (error["status"], error["code"]) == (422, "invalid")
    assert ctl.json("certs", "list") == before


def test_a_certificate_in_use_cannot_be_deleted(ctl: Ctl, proxy: Proxy, pki: CtlPki) -> None:
    message, error = ctl.refused("certs", "delete", "initial")
    assert re.fullmatch(r"alb-proxy: .*in use.*web.* \(409 conflict\)\n", message), message
    assert error["code"] == "conflict"
    assert served_fingerprint(proxy.port("web"), None) == pki.initial.fingerprint

    unused = upload(ctl, "unused", pki.extra)
    assert re.fullmatch(
        rf"deleted certificate {unused} {GENERATION}\n", ctl.ok("certs", "delete", unused)
    )
    assert unused not in {c["id"] for c in ctl.json("certs", "list")["certificates"]}
    _, error = ctl.refused("certs", "show", unused)
    assert error["code"] == "not_found"


# -- a listener's certificates, mutual authentication, policy --------------------------------


def test_set_default_reaches_the_next_handshake(ctl: Ctl, proxy: Proxy, pki: CtlPki) -> None:
    port = proxy.port("web")
    assert served_fingerprint(port, "site.example.test") == pki.initial.fingerprint
    second = upload(ctl, "second", pki.second, "--chain", str(pki.chain))
    said = ctl.ok("ctl", "cert", "set-default", "web", second)
    assert re.fullmatch(rf"default certificate of web is now {second} {GENERATION}\n", said)
    assert served_fingerprint(port, "site.example.test") == pki.second.fingerprint
    assert served_fingerprint(port, None) == pki.second.fingerprint
    assert ctl.json("ctl", "listener", "show", "web")["certificates"]["default"] == second


def test_additional_certificate_is_chosen_by_sni_until_removed(
    ctl: Ctl, proxy: Proxy, pki: CtlPki
) -> None:
    port = proxy.port("web")
    extra = upload(ctl, "extra", pki.extra)
    assert served_fingerprint(port, "extra.example.test") == pki.initial.fingerprint
    said = ctl.ok("ctl", "cert", "add", "web", extra)
    assert re.fullmatch(rf"web now also serves {extra} {GENERATION}\n", said)
    assert served_fingerprint(port, "extra.example.test") == pki.extra.fingerprint
    assert served_fingerprint(port, "site.example.test") == pki.initial.fingerprint
    web = rows_of(ctl.ok("ctl", "listener", "list"))["web"]
    assert (web["DEFAULT CERT"], web["ADDITIONAL"]) == ("initial", extra)
    ctl.json("ctl", "cert", "remove", "web", extra)
    assert served_fingerprint(port, "extra.example.test") == pki.initial.fingerprint
    assert ctl.json("ctl", "listener", "show", "web")["certificates"]["additional"] == []


def test_mtls_enable_ca_replace_disable(ctl: Ctl, proxy: Proxy, pki: CtlPki) -> None:
    port = proxy.port("web")
    ca_a, ca_b = upload_ca(ctl, "clients A", pki.ca_a), upload_ca(ctl, "clients B", pki.ca_b)
    assert request(port) == "ok"

    said = ctl.ok("ctl", "mtls", "enable", "web", "--ca", ca_a)
    assert re.fullmatch(
        rf"mutual authentication on web is now enabled with {ca_a} {GENERATION}\n", said
    )
    assert request(port) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert request(port, pki.alice) == "ok"
    assert request(port, pki.bob) == "TLSV1_ALERT_UNKNOWN_CA"

    said = ctl.ok("ctl", "ca", "replace", "web", ca_b)
    assert re.fullmatch(rf"CA certificates of web are now {ca_b} {GENERATION}\n", said)
    assert request(port, pki.bob) == "ok"
    assert request(port, pki.alice) == "TLSV1_ALERT_UNKNOWN_CA"
    shown = ctl.json("ctl", "listener", "show", "web")["mutual_authentication"]
    assert shown == {"enabled": True, "ca_certificates": [ca_b]}

    message, error = ctl.refused("certs", "delete", ca_b)
    assert error["code"] == "conflict" and "web" in message

    said = ctl.ok("ctl", "mtls", "disable", "web")
    assert re.fullmatch(rf"mutual authentication on web is now disabled {GENERATION}\n", said)
    assert request(port) == "ok"


TLS11 = ("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-servername", "site.example.test")


def test_policy_set_refuses_tls11(ctl: Ctl, proxy: Proxy) -> None:
    port = proxy.port("legacy")
    allowed = openssl_s_client(port, *TLS11)
    assert "Protocol  : TLSv1.1" in allowed.stdout, allowed.stdout + allowed.stderr
    said = ctl.ok("ctl", "policy", "set", "legacy", "tls_cipher_policy_1_2")
    assert re.fullmatch(
        rf"security policy of legacy is now tls_cipher_policy_1_2 {GENERATION}\n", said
    )
    refused = openssl_s_client(port, *TLS11)
    assert "alert protocol version" in refused.stderr, refused.stderr
    _, error = ctl.refused("ctl", "policy", "set", "legacy", "no_such_policy")
    assert error["code"] == "invalid" and error["problems"], error


# -- servers ---------------------------------------------------------------------------------


def test_servers_add_weight_remove(ctl: Ctl, proxy: Proxy, demo_backend: Backend) -> None:
    port = proxy.port("web")
    recording = RecordingBackend()
    try:
        demo, rec = f"127.0.0.1:{demo_backend.port}", f"127.0.0.1:{recording.port}"
        said = ctl.ok(
            "ctl", "server", "add", "sg", "--host", "127.0.0.1", "--port", str(recording.port)
        )
        assert re.fullmatch(rf"added server {rec} to sg {GENERATION}\n", said)
        said = ctl.ok("ctl", "server", "weight", "sg", demo, "0")
        assert re.fullmatch(rf"weight of {demo} in sg is now 0 {GENERATION}\n", said)
        rows = [cells(r) for r in ctl.ok("ctl", "server-group", "list").splitlines()]
        assert rows == [
            ["SERVER GROUP", "SCHEDULER", "SERVER", "WEIGHT"],
            ["sg", "wrr", demo, "0"],
            ["sg", "wrr", rec, "100"],
        ]
        for _ in range(3):  # weight 0 takes no new requests: all go to the new server
            assert request(port, path="/to-the-new-server") == "ok"
        assert recording.received.count(b"GET /to-the-new-server ") == 3

        ctl.json("ctl", "server", "weight", "sg", demo, "100")
        said = ctl.ok("ctl", "server", "remove", "sg", rec)
        assert re.fullmatch(rf"removed server {rec} from sg {GENERATION}\n", said)
        [group] = ctl.json("ctl", "server-group", "list")["server_groups"]
        assert group["servers"] == [{"host": "127.0.0.1", "port": demo_backend.port, "weight": 100}]
        assert request(port, path="/not-to-the-removed-one") == "ok"
        assert b"/not-to-the-removed-one" not in recording.received

        _, error = ctl.refused("ctl", "server", "remove", "sg", rec)
        assert error["code"] == "not_found", error
        _, error = ctl.refused("ctl", "server", "remove", "sg", "no-port", code=2)
        assert error["code"] == "usage"
    finally:
        recording.close()


# -- listeners -------------------------------------------------------------------------------


def test_listener_create_stop_start_delete(ctl: Ctl, pki: CtlPki) -> None:
    extra = upload(ctl, "extra", pki.extra)
    ca_a = upload_ca(ctl, "clients A", pki.ca_a)
    args = ("--name", "made", "--protocol", "https", "--port", "7603", "--bind", "127.0.0.1")
    answer = ctl.json(
        "ctl",
        "listener",
        "create",
        *args,
        *("--cert", "initial", "--additional", extra, "--policy", "tls_cipher_policy_1_2"),
        *("--mtls", "--ca", ca_a, "--server-group", "sg"),
    )
    view = answer["listener"]
    assert (view["state"], view["protocol"], view["port"]) == ("serving", "HTTPS", 7603)
    assert view["certificates"] == {"default": "initial", "additional": [extra]}
    assert view["mutual_authentication"] == {"enabled": True, "ca_certificates": [ca_a]}
    assert view["security_policy"] == "tls_cipher_policy_1_2"
    port = view["bound_port"]
    assert request(port) == "SSLV3_ALERT_HANDSHAKE_FAILURE"  # TLS 1.2: no certificate_required
    assert request(port, pki.alice) == "ok"
    as_alice = client_context()
    as_alice.load_cert_chain(pki.alice.cert, pki.alice.key)
    assert served_fingerprint(port, "extra.example.test", as_alice) == pki.extra.fingerprint
    made = rows_of(ctl.ok("ctl", "listener", "list"))["made"]
    assert made == {
        "NAME": "made",
        "PROTOCOL": "HTTPS",
        "PORT": f"7603 (bound {port})",
        "STATE": "serving",
        "DEFAULT CERT": "initial",
        "ADDITIONAL": extra,
        "POLICY": "tls_cipher_policy_1_2",
        "MTLS": f"on ({ca_a})",
        "SERVER GROUP": "sg",
    }

    said = ctl.ok("ctl", "listener", "stop", "made")
    assert re.fullmatch(rf"listener made stopped {GENERATION}\n", said)
    assert refuses_connections(port)
    stopped = ctl.json("ctl", "listener", "show", "made")
    assert (stopped["state"], stopped["bound_port"], stopped["enabled"]) == ("stopped", None, False)

    said = ctl.ok("ctl", "listener", "start", "made")
    assert re.fullmatch(rf"listener made started {GENERATION}\n", said)
    port = bound_port(ctl, "made")
    assert request(port, pki.alice) == "ok"

    answer = ctl.json("ctl", "listener", "delete", "made")
    assert answer["deleted"] == "made"
    assert refuses_connections(port)
    message, error = ctl.refused("ctl", "listener", "show", "made")
    assert error["code"] == "not_found" and "made" in message
    # ... and what it used is free again.
    assert ctl.json("certs", "delete", extra)["deleted"] == extra


def test_a_refused_listener_lists_every_problem(ctl: Ctl) -> None:
    args = ("--name", "bad", "--protocol", "HTTPS", "--port", "7601", "--server-group", "nope")
    message, error = ctl.refused("ctl", "listener", "create", *args)
    assert error["code"] == "invalid"
    assert len(error["problems"]) >= 2, error
    for problem in error["problems"]:
        assert f"\n  {problem}\n" in message + "\n"
    assert "bad" not in {x["name"] for x in ctl.json("ctl", "listener", "list")["listeners"]}


# -- the whole config, If-Match --------------------------------------------------------------


def test_config_show_then_apply(ctl: Ctl, proxy: Proxy, tmp_path: Path) -> None:
    shown = ctl.json("ctl", "config", "show")
    text = ctl.ok("ctl", "config", "show")
    assert text.startswith(f"# running config (generation {shown['generation']})\n")
    config = yaml.safe_load(text)
    assert config == shown["config"]

    legacy = next(x for x in config["listeners"] if x["name"] == "legacy")
    legacy["security_policy"] = "tls_cipher_policy_1_2"
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    said = ctl.ok("ctl", "apply", "-f", "edited.yaml")
    assert re.fullmatch(rf"applied edited\.yaml {GENERATION}\n", said), said
    assert "alert protocol version" in openssl_s_client(proxy.port("legacy"), *TLS11).stderr

    done = ctl("ctl", "apply", "-f", "-", "--json", stdin=(tmp_path / "edited.yaml").read_text())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] is False

    (tmp_path / "broken.yaml").write_text("instance: {name: t}\nlisteners: [{name: x}]\n")
    _, error = ctl.refused("ctl", "apply", "-f", "broken.yaml")
    assert error["problems"], error


def test_uploads_belong_to_the_store_and_survive_apply_and_an_edited_file(
    ctl: Ctl, proxy: Proxy, pki: CtlPki, tmp_path: Path
) -> None:
    extra_id = upload(ctl, "extra", pki.extra)
    ctl.ok("ctl", "cert", "add", "web", extra_id)
    key_file = tmp_path / "state" / "keys" / f"{extra_id}.key"
    # A file that does not mention the upload: its listeners win, the upload stays stored.
    (tmp_path / "plain.yaml").write_text(proxy.config_path.read_text())
    ctl.ok("ctl", "apply", "-f", "plain.yaml")
    assert extra_id in rows_of(ctl.ok("certs", "list"))
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert extra_id not in ctl.json("ctl", "listener", "show", "web")["certificates"]["additional"]
    # A file may name an uploaded certificate by id.
    config = yaml.safe_load(proxy.config_path.read_text())
    config["listeners"][0]["certificates"]["additional"] = [extra_id]
    (tmp_path / "named.yaml").write_text(yaml.safe_dump(config))
    ctl.ok("ctl", "apply", "-f", "named.yaml")
    assert served_fingerprint(proxy.port("web"), "extra.example.test") == pki.extra.fingerprint
    # An edited file imported at the next start keeps the store's uploads too.
    assert proxy.stop() == 0
    edited = yaml.safe_load(proxy.config_path.read_text())
    edited["listeners"][1]["security_policy"] = "tls_cipher_policy_1_2"
    again = start_proxy(tmp_path, edited, env=clean_env(ALB_ADMIN_TOKEN=TOKEN))
    try:
        assert "config file changed since it was imported" in again.log
        admin = ("--admin", f"http://127.0.0.1:{again.admin_port}")
        listed = ctl.json("certs", "list", *admin)
        assert extra_id in {c["id"] for c in listed["certificates"]}
        assert key_file.exists()
    finally:
        assert again.stop() == 0


def test_if_match_refuses_a_stale_generation(ctl: Ctl) -> None:
    generation = ctl.json("ctl", "config", "show")["generation"]
    args = ("ctl", "policy", "set", "legacy")
    answer = ctl.json(*args, "tls_cipher_policy_1_2", "--if-match", str(generation))
    assert answer["generation"] > generation
    _, error = ctl.refused(*args, "tls_cipher_policy_1_0", "--if-match", str(generation))
    assert (error["status"], error["code"]) == (412, "precondition_failed")
    policy = ctl.json("ctl", "listener", "show", "legacy")["security_policy"]
    assert policy == "tls_cipher_policy_1_2"


# -- who may talk, and to what ---------------------------------------------------------------


def test_a_wrong_token_is_unauthorized(ctl: Ctl) -> None:
    message, error = ctl.refused("ctl", "listener", "list", "--token", "wrong")
    assert "(401 unauthorized)" in message
    assert "\n  the token sent came from --token\n" in message
    assert error["code"] == "unauthorized"
    env = ctl.env | {"ALB_ADMIN_TOKEN": "also-wrong"}
    assert ctl("certs", "list", env=env).returncode == 1


def test_the_generated_token_is_found_in_state(
    tmp_path: Path, pki: CtlPki, demo_backend: Backend
) -> None:
    proxy = start_proxy(tmp_path, config_of(pki, demo_backend), env=clean_env())
    try:
        token_file = tmp_path / "state" / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        url = f"http://127.0.0.1:{proxy.admin_port}"
        ctl = Ctl(tmp_path, clean_env(ALB_ADMIN=url))  # cwd holds ./state/admin.token
        listeners = ctl.json("ctl", "listener", "list")["listeners"]
        assert {x["name"] for x in listeners} == {"web", "legacy"}
        elsewhere = Ctl(tmp_path / "state", ctl.env)
        message, error = elsewhere.refused("ctl", "listener", "list")
        assert error["code"] == "unauthorized"
        assert "no token was sent" in message
        token_elsewhere = ctl.json("certs", "list", "--token-file", str(token_file))
        assert token_elsewhere["certificates"]
        assert token_file.read_text().strip() not in "".join(ctl.outputs + elsewhere.outputs)
    finally:
        assert proxy.stop() == 0


def test_a_daemon_that_is_down_is_exit_3(ctl: Ctl, proxy: Proxy) -> None:
    url = ctl.env["ALB_ADMIN"]
    assert proxy.stop() == 0
    message, error = ctl.refused("ctl", "listener", "list", code=3)
    assert message.startswith(f"alb-proxy: cannot reach the admin API at {url}: ")
    assert error["code"] == "unreachable"
    assert ctl("certs", "list", "--admin", url).returncode == 3


def test_json_everywhere(ctl: Ctl, pki: CtlPki) -> None:
    """Every read prints one object; writes were covered above; errors are one object too."""
    for read in (
        ("certs", "list"),
        ("certs", "show", "initial"),
        ("ctl", "listener", "list"),
        ("ctl", "listener", "show", "web"),
        ("ctl", "server-group", "list"),
        ("ctl", "config", "show"),
    ):
        ctl.json(*read)
    assert ctl.json("certs", "show", "nope", code=1)["error"]["code"] == "not_found"
    assert ctl.json("ctl", "cert", "add", "nope", "initial", code=1)["error"]["status"] == 404
    args = ("certs", "upload", "--name", "x", "--cert", "missing.pem", "--key", str(pki.extra.key))
    assert ctl.json(*args, code=2)["error"]["code"] == "usage"
