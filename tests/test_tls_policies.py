"""The predefined security policies: what each context is configured with, and what real
handshakes (two ``MemoryBIO`` peers, RSA and ECDSA certificates) then accept and refuse."""

from __future__ import annotations

import ast
import datetime
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import alb_proxy.tls.policies as policies_module
from alb_proxy.config.model import DEFAULT_SECURITY_POLICY
from alb_proxy.errors import AlbError
from alb_proxy.tls.policies import (
    DEFAULT_POLICY_ID,
    POLICIES,
    TLS13_SUITES_PUBLISHED,
    TLS13_SUITES_SERVED,
    PolicyError,
    TlsPolicy,
    apply_policy,
    unavailable_ciphers,
)

V = ssl.TLSVersion
ALL_VERSIONS = (V.TLSv1, V.TLSv1_1, V.TLSv1_2, V.TLSv1_3)
VERSION_NAMES = {V.TLSv1: "TLSv1", V.TLSv1_1: "TLSv1.1", V.TLSv1_2: "TLSv1.2", V.TLSv1_3: "TLSv1.3"}

# TLS_POLICIES.md, transcribed independently of the module under test.
GCM = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
}
SHA2 = {
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-AES256-SHA384",
}
SHA1 = {"ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES128-SHA"}
SHA1 |= {"ECDHE-RSA-AES256-SHA"}
RSA_KX = {"AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA256", "AES256-SHA256"}
RSA_KX |= {"AES128-SHA", "AES256-SHA", "DES-CBC3-SHA"}
TABLE: dict[str, tuple[set[ssl.TLSVersion], set[str]]] = {
    "tls_cipher_policy_1_0": ({V.TLSv1, V.TLSv1_1, V.TLSv1_2}, GCM | SHA2 | SHA1 | RSA_KX),
    "tls_cipher_policy_1_1": ({V.TLSv1_1, V.TLSv1_2}, GCM | SHA2 | SHA1 | RSA_KX),
    "tls_cipher_policy_1_2": ({V.TLSv1_2}, GCM | SHA2 | SHA1 | RSA_KX),
    "tls_cipher_policy_1_2_strict": ({V.TLSv1_2}, GCM | SHA2 | SHA1),
    "tls_cipher_policy_1_2_strict_with_1_3": ({V.TLSv1_2, V.TLSv1_3}, GCM | SHA2 | SHA1),
    "tls_cipher_policy_1_0_to_1_3": (set(ALL_VERSIONS), GCM),
}
EVERY_TABLE_CIPHER = sorted(GCM | SHA2 | SHA1 | RSA_KX)


def openssl_has_3des() -> bool:
    """Probe the build directly, independently of ``unavailable_ciphers``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.set_ciphers("DES-CBC3-SHA:@SECLEVEL=0")
    except ssl.SSLError:
        return False
    return any(c["name"] == "DES-CBC3-SHA" for c in ctx.get_ciphers())


HAS_3DES = openssl_has_3des()
NOT_IN_THIS_BUILD = set() if HAS_3DES else {"DES-CBC3-SHA"}


# -- certificates and handshakes ---------------------------------------------------------------


@dataclass(frozen=True)
class CertFiles:
    rsa: tuple[Path, Path]
    ecdsa: tuple[Path, Path]


def _self_signed(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, out: Path
) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "policy.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("policy.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = out.with_suffix(".pem"), out.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    out = tmp_path_factory.mktemp("policy-certs")
    return CertFiles(
        rsa=_self_signed(rsa.generate_private_key(65537, 2048), out / "rsa"),
        ecdsa=_self_signed(ec.generate_private_key(ec.SECP256R1()), out / "ecdsa"),
    )


def server_context(policy: TlsPolicy, certs: CertFiles) -> ssl.SSLContext:
    """A server with an RSA and an ECDSA certificate, so every suite of the table can be tried."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, policy)
    ctx.load_cert_chain(*certs.rsa)
    ctx.load_cert_chain(*certs.ecdsa)
    return ctx


def client_context(
    minimum: ssl.TLSVersion, maximum: ssl.TLSVersion, cipher: str = "ALL"
) -> ssl.SSLContext:
    """A client able to speak old versions too (level 0, as TLS_POLICIES.md asks of tests)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    ctx.set_ciphers(f"{cipher}:@SECLEVEL=0")
    return ctx


@dataclass(frozen=True)
class Outcome:
    version: str | None
    cipher: str | None
    server_error: str | None
    """OpenSSL's reason on the server side when the handshake failed there."""


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Outcome:
    """Drive a full handshake between two in-memory peers."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="policy.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}

    def step(name: str, obj: ssl.SSLObject) -> None:
        if not done[name]:
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass

    for _ in range(10):
        try:
            step("client", client)
        except ssl.SSLError:
            return Outcome(None, None, None)  # the client gave up (e.g. on the server's alert)
        s_in.write(c_out.read())
        try:
            step("server", server)
        except ssl.SSLError as exc:
            return Outcome(None, None, exc.reason or str(exc))
        c_in.write(s_out.read())
        if all(done.values()):
            cipher = server.cipher()
            assert cipher is not None and client.version() == server.version()
            return Outcome(server.version(), cipher[0], None)
    raise AssertionError("the handshake did not finish in 10 round trips")


# -- the data ----------------------------------------------------------------------------------


def test_all_six_policies_and_the_default() -> None:
    assert set(POLICIES) == set(TABLE)
    assert all(policy_id == p.id for policy_id, p in POLICIES.items())
    assert DEFAULT_POLICY_ID == "tls_cipher_policy_1_2_strict_with_1_3" == DEFAULT_SECURITY_POLICY
    assert DEFAULT_POLICY_ID in POLICIES


@pytest.mark.parametrize("policy_id", TABLE)
def test_policy_data_matches_the_table(policy_id: str) -> None:
    versions, ciphers = TABLE[policy_id]
    policy = POLICIES[policy_id]
    assert policy.versions == versions
    assert set(policy.ciphers) == ciphers and len(policy.ciphers) == len(ciphers)


def test_tls13_suites_served_are_openssls_defaults_not_the_ccm_ones() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, POLICIES["tls_cipher_policy_1_0_to_1_3"])
    served = tuple(c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3")
    assert served == TLS13_SUITES_SERVED
    assert set(TLS13_SUITES_PUBLISHED) - set(served) == {
        "TLS_AES_128_CCM_SHA256",
        "TLS_AES_128_CCM_8_SHA256",
    }
    assert "CCM" in policies_module.__doc__  # the module says so


@pytest.mark.parametrize(
    ("versions", "ciphers"),
    [
        (frozenset(), ("AES128-SHA",)),
        (frozenset({V.TLSv1, V.TLSv1_2}), ("AES128-SHA",)),
        (frozenset({V.TLSv1_2, V.SSLv3}), ("AES128-SHA",)),
        (frozenset({V.TLSv1_2}), ()),
    ],
)
def test_inconsistent_policies_are_refused(
    versions: frozenset[ssl.TLSVersion], ciphers: tuple[str, ...]
) -> None:
    with pytest.raises(PolicyError) as info:
        TlsPolicy("custom", versions, ciphers)
    assert isinstance(info.value, AlbError)


def test_tls13_only_policy_needs_no_ciphers() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, TlsPolicy("only13", frozenset({V.TLSv1_3}), ()))
    assert ctx.minimum_version == ctx.maximum_version == V.TLSv1_3


def test_a_policy_openssl_cannot_serve_is_refused_not_silently_emptied() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(PolicyError, match="none of its cipher suites"):
        apply_policy(ctx, TlsPolicy("bogus", frozenset({V.TLSv1_2}), ("NO-SUCH-CIPHER",)))


# -- the configured context --------------------------------------------------------------------


@pytest.mark.parametrize("policy_id", TABLE)
def test_context_versions_options_and_level(policy_id: str) -> None:
    versions, _ = TABLE[policy_id]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    default_level = ctx.security_level
    apply_policy(ctx, POLICIES[policy_id])  # warnings are errors here: nothing may leak
    assert ctx.minimum_version == min(versions, key=ALL_VERSIONS.index)
    assert ctx.maximum_version == max(versions, key=ALL_VERSIONS.index)
    for option in (ssl.OP_NO_RENEGOTIATION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_COMPRESSION):
        assert ctx.options & option
    legacy = bool(versions & {V.TLSv1, V.TLSv1_1})
    assert ctx.security_level == (0 if legacy else default_level)


@pytest.mark.parametrize("policy_id", TABLE)
def test_context_ciphers_are_exactly_the_table(policy_id: str) -> None:
    """Exactly the table's TLS ≤ 1.2 suites, except DES-CBC3-SHA when this OpenSSL lacks it."""
    _, expected = TABLE[policy_id]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, POLICIES[policy_id])
    served = {c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"}
    missing = expected - served
    assert missing == expected & NOT_IN_THIS_BUILD, (
        f"served {sorted(served)}; missing {sorted(missing)}"
    )
    assert served == expected - NOT_IN_THIS_BUILD
    assert set(unavailable_ciphers(POLICIES[policy_id])) == missing


def test_des_cbc3_sha_is_reported_unavailable_exactly_when_this_openssl_lacks_it() -> None:
    """Debian's OpenSSL 3.0 has no DES-CBC3-SHA: the policies still list it (as published), and
    ``unavailable_ciphers`` tells the docs and the startup log rather than hiding it."""
    for policy_id in ("tls_cipher_policy_1_0", "tls_cipher_policy_1_1", "tls_cipher_policy_1_2"):
        assert "DES-CBC3-SHA" in POLICIES[policy_id].ciphers
        reported = unavailable_ciphers(POLICIES[policy_id])
        assert reported == (() if HAS_3DES else ("DES-CBC3-SHA",)), ssl.OPENSSL_VERSION


def test_deprecation_filter_does_not_leak() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, POLICIES["tls_cipher_policy_1_0"])
    with pytest.warns(DeprecationWarning, match="TLSv1_1"):
        ctx.minimum_version = V.TLSv1_1


# -- real handshakes ---------------------------------------------------------------------------


def version_cases() -> Iterator[tuple[str, ssl.TLSVersion]]:
    for policy_id in TABLE:
        for version in ALL_VERSIONS:
            yield policy_id, version


@pytest.mark.parametrize(("policy_id", "version"), list(version_cases()))
def test_client_pinned_to_one_version(
    policy_id: str, version: ssl.TLSVersion, certs: CertFiles
) -> None:
    """Every policy × version: accepted iff the table allows it (but see 1_0_to_1_3)."""
    versions, _ = TABLE[policy_id]
    outcome = handshake(
        server_context(POLICIES[policy_id], certs), client_context(version, version)
    )
    if policy_id == "tls_cipher_policy_1_0_to_1_3" and version in (V.TLSv1, V.TLSv1_1):
        # As published this policy has only AES-GCM suites, which TLS 1.0/1.1 do not have.
        assert outcome.server_error == "NO_SHARED_CIPHER", outcome
    elif version in versions:
        assert outcome.version == VERSION_NAMES[version], outcome
    else:
        assert outcome.server_error == "UNSUPPORTED_PROTOCOL", outcome


def test_tls11_refused_by_1_2_but_accepted_by_1_1(certs: CertFiles) -> None:
    """The refusal is the policy's doing: the same client succeeds where TLS 1.1 is allowed."""
    client = client_context(V.TLSv1_1, V.TLSv1_1)
    refused = handshake(server_context(POLICIES["tls_cipher_policy_1_2"], certs), client)
    assert refused.server_error == "UNSUPPORTED_PROTOCOL"
    accepted = handshake(server_context(POLICIES["tls_cipher_policy_1_1"], certs), client)
    assert accepted.version == "TLSv1.1"


def test_tls13_client_gets_tls12_from_a_tls12_policy(certs: CertFiles) -> None:
    client = client_context(V.TLSv1_2, V.TLSv1_3)
    outcome = handshake(server_context(POLICIES["tls_cipher_policy_1_2"], certs), client)
    assert outcome.version == "TLSv1.2"
    assert outcome.cipher in GCM  # server preference: the table's first suites win


@pytest.mark.parametrize(
    "policy_id", ["tls_cipher_policy_1_2_strict_with_1_3", "tls_cipher_policy_1_0_to_1_3"]
)
def test_tls13_handshake_uses_a_served_suite(policy_id: str, certs: CertFiles) -> None:
    outcome = handshake(
        server_context(POLICIES[policy_id], certs), client_context(V.TLSv1_2, V.TLSv1_3)
    )
    assert outcome.version == "TLSv1.3"
    assert outcome.cipher in TLS13_SUITES_SERVED


def cipher_cases() -> Iterator[tuple[str, str]]:
    for policy_id in TABLE:
        for cipher in EVERY_TABLE_CIPHER:
            if cipher not in NOT_IN_THIS_BUILD:
                yield policy_id, cipher


@pytest.mark.parametrize(("policy_id", "cipher"), list(cipher_cases()))
def test_each_tls12_suite_is_accepted_iff_the_policy_lists_it(
    policy_id: str, cipher: str, certs: CertFiles
) -> None:
    _, ciphers = TABLE[policy_id]
    client = client_context(V.TLSv1_2, V.TLSv1_2, cipher)
    outcome = handshake(server_context(POLICIES[policy_id], certs), client)
    if cipher in ciphers:
        assert outcome.version == "TLSv1.2" and outcome.cipher == cipher, outcome
    else:
        assert outcome.server_error == "NO_SHARED_CIPHER", outcome


def test_policy_module_opens_no_sockets() -> None:
    """It configures contexts only; ``ssl`` is its one I/O-capable import."""
    tree = ast.parse(Path(policies_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported.isdisjoint({"asyncio", "socket", "selectors"}), imported
