"""The command line as a user meets it: refused configs exit 2 with one line per problem,
certificates are checked before anything binds, and the example config runs as shipped."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from certfactory import make_ca, make_server, write_pair, write_pem
from conftest import Pki
from harness import Backend, run_cli, start_proxy, write_config

REPO = Path(__file__).resolve().parent.parent


def base_config(pki: Pki, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "instance": {"name": "t"},
        "certificates": [pki.default.entry("c1")],
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": 9}]}],
        "listeners": [
            {
                "name": "https-1",
                "protocol": "HTTPS",
                "port": 18443,
                "certificates": {"default": "c1"},
                "default_action": {"forward": "sg"},
            },
        ],
    }
    config.update(overrides)
    return config


def refused(tmp_path: Path, config: dict[str, Any]) -> str:
    done = run_cli("run", "--config", str(write_config(tmp_path, config)), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def test_http_listener_with_certificates_is_refused(tmp_path: Path, pki: Pki) -> None:
    config = base_config(
        pki,
        listeners=[
            {
                "name": "http-8080",
                "protocol": "HTTP",
                "port": 8080,
                "certificates": {"default": "c1"},
                "default_action": {"forward": "sg"},
            },
        ],
    )
    assert "listeners[http-8080].certificates: HTTP listeners take no certificates" in refused(
        tmp_path, config
    )


def test_every_problem_is_reported_at_once(tmp_path: Path, pki: Pki) -> None:
    config = base_config(
        pki,
        instance={"name": "t", "edition": "Basic"},
        listeners=[
            {
                "name": "a",
                "protocol": "HTTPS",
                "port": 70000,
                "certificates": {"default": "nope"},
                "mutual_authentication": {"enabled": True},
                "default_action": {"forward": "sg-x"},
            },
        ],
    )
    err = refused(tmp_path, config)
    assert "listeners[a].port: must be between 1 and 65535, got 70000" in err
    assert "listeners[a].certificates.default: unknown certificate 'nope'" in err
    assert "mutual authentication is not available on Basic instances" in err
    assert "listeners[a].default_action.forward: unknown server group 'sg-x'" in err


def test_rule_and_certificate_problems_are_reported_together(tmp_path: Path, pki: Pki) -> None:
    other = make_server(make_ca(), ["other.example.test"])
    wrong_key = write_pem(tmp_path / "wrong.key", other.key_pem(), mode=0o600)
    entry = {**pki.default.entry("c1"), "key": str(wrong_key)}
    http = {
        "name": "http-8080",
        "protocol": "HTTP",
        "port": 8080,
        "certificates": {"default": "c1"},
        "default_action": {"forward": "sg"},
    }
    err = refused(tmp_path, base_config(pki, certificates=[entry], listeners=[http]))
    assert "listeners[http-8080].certificates: HTTP listeners take no certificates" in err
    assert "certificates[c1]: the private key does not match the certificate" in err


def test_unknown_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    assert "unknown key 'listner'" in refused(tmp_path, {**base_config(pki), "listner": []})


def test_key_that_does_not_match_is_refused_without_leaking_it(tmp_path: Path, pki: Pki) -> None:
    other = make_server(make_ca(), ["other.example.test"])
    wrong_key = write_pem(tmp_path / "wrong.key", other.key_pem(), mode=0o600)
    entry = {**pki.default.entry("c1"), "key": str(wrong_key)}
    err = refused(tmp_path, base_config(pki, certificates=[entry]))
    assert "certificates[c1]" in err and "does not match" in err
    for line in other.key_pem().decode().splitlines()[1:-1]:
        assert line not in err


def test_server_certificate_given_as_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    config = base_config(pki)
    config["certificates"].append({"id": "not-a-ca", "kind": "ca", "cert": str(pki.exact.cert)})
    err = refused(tmp_path, config)
    assert "certificates[not-a-ca]" in err and "not a CA" in err


def test_file_that_is_not_pem_is_refused(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello, I am not a certificate\n")
    entry = {**pki.default.entry("c1"), "cert": str(junk)}
    assert "certificates[c1]" in refused(tmp_path, base_config(pki, certificates=[entry]))


def test_missing_file_is_refused(tmp_path: Path, pki: Pki) -> None:
    entry = {**pki.default.entry("c1"), "cert": str(tmp_path / "absent.pem")}
    err = refused(tmp_path, base_config(pki, certificates=[entry]))
    assert "certificates[c1]" in err and "absent.pem" in err


def test_reordered_chain_is_accepted_with_a_warning(tmp_path: Path, demo_backend: Backend) -> None:
    root = make_ca()
    inter = make_ca("inter", issuer=root)
    leaf = make_server(inter, ["x.example.test"])
    cert, key = write_pair(tmp_path, "leaf", leaf)
    from certfactory import pem_of

    write_pem(cert, pem_of(inter, leaf))  # intermediate first: the wrong order
    config = {
        "instance": {"name": "t"},
        "certificates": [{"id": "c1", "kind": "server", "cert": str(cert), "key": str(key)}],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            {
                "name": "h",
                "protocol": "HTTPS",
                "port": 1443,
                "bind": "127.0.0.1",
                "certificates": {"default": "c1"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    proxy = start_proxy(tmp_path, config)
    try:
        assert "certificate warning certificate=c1" in proxy.log
    finally:
        assert proxy.stop() == 0


def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path, pki: Pki) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = base_config(pki)
        config["listeners"][0].update(port=port, bind="127.0.0.1")
        done = run_cli("run", "--config", str(write_config(tmp_path, config)), cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot serve" in done.stderr and "address already in use" in done.stderr.lower()


def test_certs_dev_writes_private_keys_0600(tmp_path: Path) -> None:
    done = run_cli("certs", "dev", "--out", str(tmp_path / "certs"))
    assert done.returncode == 0, done.stderr
    keys = sorted((tmp_path / "certs").glob("*.key"))
    assert keys
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_example_config_runs_as_the_readme_says(tmp_path: Path, demo_backend: Backend) -> None:
    """``make run``'s path: dev certificates, the shipped config, curl with the dev CA."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    assert run_cli("certs", "dev", "--out", "certs", cwd=tmp_path).returncode == 0
    example = tmp_path / "configs" / "example.yaml"
    assert run_cli("run", "--config", str(example), "--check", cwd=tmp_path).returncode == 0
    # Point the example's server group at this test's backend, keep everything else.
    import yaml

    config = yaml.safe_load(example.read_text())
    config["server_groups"][0]["servers"][0]["port"] = demo_backend.port
    proxy = start_proxy(tmp_path, config)
    try:
        port = proxy.port("https-8443")
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                "certs/ca.pem",
                "--resolve",
                f"site.example.test:{port}:127.0.0.1",
                f"https://site.example.test:{port}/",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["method"] == "GET"
        api = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "api.example.test",
                "-CAfile",
                "certs/ca.pem",
                "-verify_return_error",
            ],
            input="",
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        assert "subject=CN = api.example.test" in api.stdout
        assert "Verify return code: 0 (ok)" in api.stdout
        mport = proxy.port("https-mtls-8444")
        resolve = ["--resolve", f"site.example.test:{mport}:127.0.0.1"]
        url = f"https://site.example.test:{mport}/"
        with_cert = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                "certs/ca.pem",
                "--cert",
                "certs/client.pem",
                "--key",
                "certs/client.key",
                *resolve,
                url,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        assert with_cert.returncode == 0, with_cert.stderr
        headers = dict(json.loads(with_cert.stdout)["headers"])
        assert headers["x-forwarded-clientcert-clientverify"] == "SUCCESS"
        without = subprocess.run(
            ["curl", "-sS", "--cacert", "certs/ca.pem", *resolve, url],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
        )
        assert without.returncode != 0 and "certificate required" in without.stderr
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["certs", "dev", "--help"]])
def test_help_works(args: list[str]) -> None:
    assert run_cli(*args).returncode == 0


def test_usage_errors_are_one_json_object_with_json() -> None:
    done = run_cli("ctl", "server", "weight", "sg", "127.0.0.1:8081", "abc", "--json")
    assert done.returncode == 2 and done.stderr == ""
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "usage"
    assert error["message"] == "argument W: invalid int value: 'abc'"
    plain = run_cli("ctl", "server", "weight", "sg", "127.0.0.1:8081", "abc")
    assert plain.returncode == 2 and plain.stdout == ""
    assert "invalid int value: 'abc'" in plain.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "afile").write_text(""), "state_dir afile is not a directory"),
        (
            lambda d: (d / "afile").mkdir() or (d / "afile" / "state.db").write_text("garbage"),
            "state_dir afile: state.db cannot be used (file is not a database)",
        ),
    ],
    ids=["state-dir-is-a-file", "damaged-database"],
)
def test_an_unusable_state_dir_is_one_clear_line(
    tmp_path: Path, pki: Pki, make: Any, message: str
) -> None:
    make(tmp_path)
    config = {**base_config(pki), "state_dir": "afile"}  # refused before anything binds
    done = run_cli("run", "--config", str(write_config(tmp_path, config)), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"alb-proxy: cannot serve: {message}" in done.stderr
    assert "Traceback" not in done.stderr
