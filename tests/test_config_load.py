"""The YAML loader: strict shapes and types, every problem reported with its path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.config.load import load_config, parse_config
from alb_proxy.config.model import (
    Admin,
    Certificate,
    CertificateKind,
    Config,
    Edition,
    ForwardAction,
    HealthCheck,
    Instance,
    Listener,
    ListenerCertificates,
    MutualAuthentication,
    Protocol,
    Scheduler,
    Server,
    ServerGroup,
)
from alb_proxy.config.rules import check_config
from alb_proxy.errors import ConfigError

# DESIGN.md §1, verbatim.
EXAMPLE = """\
instance: {name: alb-demo, edition: Standard}      # Basic | Standard | WAF
admin: {listen: "127.0.0.1:9900"}                  # admin API + /metrics; token via ALB_ADMIN_TOKEN or token_file
state_dir: ./state                                 # certificate store and applied changes live here
certificates:
  - {id: cert-site,  kind: server, cert: certs/site.pem,  key: certs/site.key}   # cert file may hold the chain
  - {id: cert-api,   kind: server, cert: certs/api.pem,   key: certs/api.key}
  - {id: ca-clients, kind: ca,     cert: certs/client-ca.pem}
server_groups:
  - id: sg-web
    scheduler: wrr                                 # wrr | wlc | sch (source-IP consistent hash)
    servers: [{host: 127.0.0.1, port: 8081, weight: 100}]
    health_check: {enabled: true, path: /health, interval_s: 2, healthy_threshold: 2, unhealthy_threshold: 2}
listeners:
  - name: https-8443
    protocol: HTTPS
    port: 8443
    certificates: {default: cert-site, additional: [cert-api]}
    security_policy: tls_cipher_policy_1_2         # predefined or a custom policy id
    mutual_authentication: {enabled: false, ca_certificates: [ca-clients]}
    http2: true
    quic_upgrade: quic-8443                        # HTTPS responses advertise Alt-Svc for this QUIC listener
    default_action: {forward: sg-web}
  - {name: quic-8443, protocol: QUIC, port: 8443, certificates: {default: cert-site}, default_action: {forward: sg-web}}
  - {name: http-8080, protocol: HTTP, port: 8080, default_action: {forward: sg-web}}
"""  # noqa: E501

EXPECTED = Config(
    instance=Instance(name="alb-demo", edition=Edition.STANDARD),
    admin=Admin(listen="127.0.0.1:9900"),
    state_dir=Path("state"),
    certificates=(
        Certificate(
            "cert-site", CertificateKind.SERVER, Path("certs/site.pem"), key=Path("certs/site.key")
        ),
        Certificate(
            "cert-api", CertificateKind.SERVER, Path("certs/api.pem"), key=Path("certs/api.key")
        ),
        Certificate("ca-clients", CertificateKind.CA, Path("certs/client-ca.pem")),
    ),
    server_groups=(
        ServerGroup(
            id="sg-web",
            scheduler=Scheduler.WRR,
            servers=(Server("127.0.0.1", 8081, weight=100),),
            health_check=HealthCheck(
                enabled=True,
                path="/health",
                interval_s=2.0,
                healthy_threshold=2,
                unhealthy_threshold=2,
            ),
        ),
    ),
    listeners=(
        Listener(
            name="https-8443",
            protocol=Protocol.HTTPS,
            port=8443,
            certificates=ListenerCertificates(default="cert-site", additional=("cert-api",)),
            security_policy="tls_cipher_policy_1_2",
            mutual_authentication=MutualAuthentication(False, ca_certificates=("ca-clients",)),
            http2=True,
            quic_upgrade="quic-8443",
            default_action=ForwardAction("sg-web"),
        ),
        Listener(
            name="quic-8443",
            protocol=Protocol.QUIC,
            port=8443,
            certificates=ListenerCertificates(default="cert-site"),
            default_action=ForwardAction("sg-web"),
        ),
        Listener(
            name="http-8080",
            protocol=Protocol.HTTP,
            port=8080,
            default_action=ForwardAction("sg-web"),
        ),
    ),
)


def example() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE)
    assert isinstance(data, dict)
    return data


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return [str(p) for p in info.value.problems]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "alb.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- the example ---------------------------------------------------------------------------------


def test_design_example_loads_to_the_expected_model(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, EXAMPLE)) == EXPECTED


def test_parse_config_converts_types() -> None:
    config = parse_config(example())
    assert config == EXPECTED
    check = config.server_groups[0].health_check
    assert isinstance(check.interval_s, float)  # YAML wrote the int 2
    assert config.instance.edition is Edition.STANDARD
    assert isinstance(config.listeners[0].certificates, ListenerCertificates)
    assert config.listeners[0].certificates.additional == ("cert-api",)


def test_minimal_config_takes_the_model_defaults() -> None:
    assert parse_config({"instance": {"name": "x"}}) == Config(instance=Instance("x"))


def test_optional_path_accepts_null() -> None:
    data = example()
    data["certificates"][2]["key"] = None
    assert parse_config(data).certificates[2].key is None


# --- strictness ----------------------------------------------------------------------------------


def test_unknown_keys_at_every_level() -> None:
    data = example()
    data["foo"] = 1
    data["instance"]["region"] = "eu"
    data["listeners"][2]["sheduler"] = "wrr"
    data["server_groups"][0]["sheduler"] = "wrr"
    data["server_groups"][0]["servers"][0]["wieght"] = 1
    data["listeners"][0]["certificates"]["extra"] = []
    assert problems(data) == [
        "unknown key 'foo'",
        "instance: unknown key 'region'",
        "server_groups[sg-web]: unknown key 'sheduler' (did you mean 'scheduler'?)",
        "server_groups[sg-web].servers[0]: unknown key 'wieght' (did you mean 'weight'?)",
        "listeners[https-8443].certificates: unknown key 'extra'",
        "listeners[http-8080]: unknown key 'sheduler'",
    ]


def test_unknown_keys_and_broken_rules_are_reported_together() -> None:
    data = example()
    data["extra_key"] = 1
    data["listeners"][2]["port"] = 99999
    assert problems(data) == [
        "unknown key 'extra_key'",
        "listeners[http-8080].port: must be between 1 and 65535, got 99999",
    ]


def test_non_string_key_is_unknown() -> None:
    assert problems({"instance": {"name": "x", 1: 2}}) == ["instance: unknown key 1"]


WRONG_TYPES = [
    ("listeners.2.port", "abc", "listeners[http-8080].port", "expected an integer, got 'abc'"),
    ("listeners.2.port", True, "listeners[http-8080].port", "expected an integer, got true"),
    ("listeners.2.port", 80.0, "listeners[http-8080].port", "expected an integer, got 80.0"),
    (
        "listeners.2.port",
        2**70,
        "listeners[http-8080].port",
        "expected an integer, got an out-of-range integer",
    ),
    ("listeners.2.port", None, "listeners[http-8080].port", "expected an integer, got null"),
    ("listeners.2.http2", "yes", "listeners[http-8080].http2", "expected true or false, got 'yes'"),
    ("listeners.2.http2", 1, "listeners[http-8080].http2", "expected true or false, got 1"),
    (
        "listeners.2.idle_timeout_s",
        "5",
        "listeners[http-8080].idle_timeout_s",
        "expected a finite number, got '5'",
    ),
    (
        "listeners.2.idle_timeout_s",
        False,
        "listeners[http-8080].idle_timeout_s",
        "expected a finite number, got false",
    ),
    (
        "listeners.2.idle_timeout_s",
        float("inf"),
        "listeners[http-8080].idle_timeout_s",
        "expected a finite number, got inf",
    ),
    (
        "listeners.2.idle_timeout_s",
        10**400,
        "listeners[http-8080].idle_timeout_s",
        "expected a finite number, got an out-of-range integer",
    ),
    (
        "listeners.2.protocol",
        "http",
        "listeners[http-8080].protocol",
        "expected one of HTTP, HTTPS, QUIC, got 'http'",
    ),
    ("listeners.2.name", 8080, "listeners[2].name", "expected a string, got 8080"),
    (
        "listeners.2.default_action",
        "sg-web",
        "listeners[http-8080].default_action",
        "expected a mapping, got 'sg-web'",
    ),
    (
        "listeners.0.certificates.additional",
        "cert-api",
        "listeners[https-8443].certificates.additional",
        "expected a list, got 'cert-api'",
    ),
    (
        "listeners.0.certificates.additional",
        [7],
        "listeners[https-8443].certificates.additional[0]",
        "expected a string, got 7",
    ),
    (
        "instance.edition",
        "Premium",
        "instance.edition",
        "expected one of Basic, Standard, WAF, got 'Premium'",
    ),
    (
        "certificates.0.kind",
        ["server"],
        "certificates[cert-site].kind",
        "expected one of server, ca, got a list",
    ),
    (
        "certificates.0.cert",
        "",
        "certificates[cert-site].cert",
        "expected a non-empty path, got ''",
    ),
    ("certificates.0.key", 5, "certificates[cert-site].key", "expected a non-empty path, got 5"),
    (
        "server_groups.0.scheduler",
        "rr",
        "server_groups[sg-web].scheduler",
        "expected one of wrr, wlc, sch, got 'rr'",
    ),
    (
        "server_groups.0.servers.0.port",
        "8081",
        "server_groups[sg-web].servers[0].port",
        "expected an integer, got '8081'",
    ),
    (
        "server_groups.0.health_check.enabled",
        "true",
        "server_groups[sg-web].health_check.enabled",
        "expected true or false, got 'true'",
    ),
    (
        "server_groups.0.servers",
        {},
        "server_groups[sg-web].servers",
        "expected a list, got a mapping",
    ),
    ("admin.listen", 9900, "admin.listen", "expected a string, got 9900"),
    ("state_dir", ["x"], "state_dir", "expected a non-empty path, got a list"),
    ("listeners", {"name": "x"}, "listeners", "expected a list, got a mapping"),
]


@pytest.mark.parametrize(("steps", "value", "path", "message"), WRONG_TYPES)
def test_wrong_types(steps: str, value: object, path: str, message: str) -> None:
    data = example()
    keys = [int(k) if k.isdigit() else k for k in steps.split(".")]
    target: Any = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    assert problems(data) == [f"{path}: {message}"]


def test_long_values_are_shortened() -> None:
    [message] = problems({"instance": {"name": "x" * 100, "edition": "y" * 100}})
    assert (
        message
        == "instance.edition: expected one of Basic, Standard, WAF, got '" + "y" * 56 + "..."
    )


def test_missing_required_keys_name_the_field() -> None:
    data = example()
    del data["listeners"][2]["name"]
    del data["listeners"][1]["certificates"]["default"]
    del data["server_groups"][0]["servers"][0]["port"]
    del data["certificates"][2]["cert"]
    assert problems(data) == [
        "certificates[ca-clients].cert: missing required key",
        "server_groups[sg-web].servers[0].port: missing required key",
        "listeners[quic-8443].certificates.default: missing required key",
        "listeners[2].name: missing required key",
    ]


def test_items_without_a_usable_name_are_named_by_index() -> None:
    data = example()
    data["certificates"][1]["id"] = ""
    data["certificates"][1]["kind"] = "rsa"
    data["listeners"].append("http-9090")
    assert problems(data) == [
        "certificates[1].kind: expected one of server, ca, got 'rsa'",
        "listeners[3]: expected a mapping, got 'http-9090'",
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert problems(["instance"]) == ["expected a mapping, got a list"]
    assert problems({}) == ["instance: missing required key"]


def test_many_problems_are_reported_together() -> None:
    data = example()
    data["instance"]["edition"] = "basic"
    data["listeners"][0]["port"] = "8443"
    data["listeners"][1]["protocl"] = "QUIC"
    data["server_groups"][0]["health_check"]["interval_s"] = "2s"
    assert problems(data) == [
        "instance.edition: expected one of Basic, Standard, WAF, got 'basic'",
        "server_groups[sg-web].health_check.interval_s: expected a finite number, got '2s'",
        "listeners[https-8443].port: expected an integer, got '8443'",
        "listeners[quic-8443]: unknown key 'protocl' (did you mean 'protocol'?)",
    ]


# --- load_config: files, YAML, rules -------------------------------------------------------------


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "instance: {name: a}\nlisteners: [\n  {name: x\n")
    assert load_problems(path) == [
        f"{path}: line 4, column 1: expected ',' or '}}', but got '<stream end>'"
    ]


def test_yaml_indentation_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "instance:\n  name: a\n edition: WAF\n")
    assert load_problems(path) == [
        f"{path}: line 3, column 2: expected <block end>, but found '<block mapping start>'"
    ]


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "instance: {name: a}\nlisteners: []\nstate_dir: s\nlisteners: []\n")
    assert load_problems(path) == [
        f"{path}: line 4, column 1: duplicate key 'listeners' (first on line 2)"
    ]


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = "base: &b {name: a, edition: WAF}\n"
    path = write(tmp_path, text + "instance: {<<: *b, name: c}\n")
    assert load_problems(path) == ["unknown key 'base'"]


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "instance: !!python/object/apply:os.system [true]\n")
    [message] = load_problems(path)
    assert message.startswith(f"{path}: line 1, column 11: could not determine a constructor")


def test_unconvertible_scalars_are_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "instance: {name: a}\nstate_dir: 2024-13-45\n")
    assert load_problems(path) == [f"{path}: invalid YAML: month must be in 1..12"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert load_problems(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b"instance: {name: \xff}\n")
    assert load_problems(path) == [f"{path}: not UTF-8 text (byte 17)"]


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    assert load_problems(path) == [f"{path}: the file is empty"]


def test_load_config_applies_the_rules(tmp_path: Path) -> None:
    text = EXAMPLE.replace(
        "{name: http-8080, protocol: HTTP, port: 8080,",
        "{name: http-8080, protocol: HTTP, port: 8443,",
    )
    text = text.replace("{name: alb-demo, edition: Standard}", "{name: alb-demo, edition: Basic}")
    text = text.replace("{enabled: false, ca_certificates", "{enabled: true, ca_certificates")
    assert load_problems(write(tmp_path, text)) == [
        "listeners[http-8080].port: TCP port 8443 is already used by listener 'https-8443'",
        "listeners[https-8443].mutual_authentication: "
        "mutual authentication is not available on Basic instances",
        "listeners[https-8443].quic_upgrade: "
        "cannot be used with mutual authentication (QUIC listeners have none)",
    ]


def test_type_problems_are_reported_before_rules_run(tmp_path: Path) -> None:
    text = EXAMPLE.replace("port: 8080", "port: eighty")
    assert load_problems(write(tmp_path, text)) == [
        "listeners[http-8080].port: expected an integer, got 'eighty'"
    ]


# --- properties ----------------------------------------------------------------------------------

KEYS = st.sampled_from(
    ["instance", "name", "edition", "listeners", "port", "protocol", "certificates", "id",
     "kind", "cert", "key", "servers", "server_groups", "default_action", "forward", "host",
     "health_check", "mutual_authentication", "enabled", "ca_certificates", "default"]
) | st.text(max_size=8)  # fmt: skip
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["HTTP", "QUIC", "server", "ca", "Basic", "wrr", "cert-site", "sg-web"])
)  # fmt: skip
ANY_DATA = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


def parse_and_check(data: object) -> None:
    """The only outcomes: a Config (which the rules can judge without crashing) or ConfigError."""
    try:
        config = parse_config(data)
    except ConfigError as exc:
        assert exc.problems
        return
    assert isinstance(config, Config)
    assert all(isinstance(str(p), str) for p in check_config(config))


@given(ANY_DATA)
def test_arbitrary_data_gives_a_config_or_a_config_error(data: object) -> None:
    parse_and_check(data)


def _subtrees(node: object, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _subtrees(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _subtrees(value, (*path, index))
    return found


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node[step]
    return node


EXAMPLE_PATHS = [p for p in _subtrees(yaml.safe_load(EXAMPLE)) if p]
DELETE = object()
# Values that fit somewhere in the example, so that many mutants still parse and reach the rules.
PLAUSIBLE = st.sampled_from(
    [0, 1, 10, 443, 8443, 65536, 0.5, 601, True, False, None, "HTTP", "HTTPS", "QUIC", "ca",
     "server", "Basic", "WAF", "cert-site", "cert-api", "ca-clients", "sg-web", "quic-8443",
     "https-8443", "http-8080", "tls_cipher_policy_1_0", "tcp", "udp", "::", "127.0.0.1",
     "[::1]:1", [], ["cert-site"], ["ca-clients"], {}, DELETE]
)  # fmt: skip


EXAMPLE_LEAVES = [p for p in EXAMPLE_PATHS if not isinstance(_at(yaml.safe_load(EXAMPLE), p), dict)]
FITTING_CHANGE = st.tuples(st.sampled_from(EXAMPLE_LEAVES), PLAUSIBLE)
CHANGE = st.one_of(
    FITTING_CHANGE,
    FITTING_CHANGE,
    FITTING_CHANGE,
    st.tuples(st.sampled_from(EXAMPLE_PATHS), ANY_DATA),
)


@given(st.lists(CHANGE, min_size=1, max_size=3))
def test_example_with_replaced_parts_gives_a_config_or_a_config_error(
    changes: list[tuple[tuple[Any, ...], object]],
) -> None:
    """Mutating a valid config reaches the deep branches that random data rarely does."""
    data = example()
    for path, value in changes:
        target: Any = data
        try:
            for step in path[:-1]:
                target = target[step]
            if value is DELETE:
                del target[path[-1]]
            else:
                target[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this part
    parse_and_check(data)
