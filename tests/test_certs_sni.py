"""SNI selection (DESIGN §2) on plain values: exact → wildcard → default, by key type."""

from __future__ import annotations

from datetime import datetime

import pytest
from certfactory import DAY, NOW, make_ca, make_server
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.certs import CertInfo, SniIndex, load_server_certificate


def info(
    cert_id: str,
    *names: str,
    key_type: str = "EC",
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + 90 * DAY,
) -> CertInfo:
    return CertInfo(cert_id, key_type, names, not_before, not_after)


DEFAULT = info("default", "site.example.test", "*.site.example.test")
API = info("api", "api.example.test")
WILD = info("wild", "*.example.test")
INDEX = SniIndex.build(DEFAULT, [API, WILD], NOW)


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("api.example.test", ("api",)),  # exact
        ("www.example.test", ("wild",)),  # wildcard: one label
        ("a.b.example.test", ("default",)),  # two labels under a wildcard: not covered
        ("example.test", ("default",)),  # the wildcard's parent itself: not covered
        ("API.Example.TEST", ("api",)),  # case-insensitive
        ("api.example.test.", ("api",)),  # one trailing dot ignored
        ("WWW.example.test.", ("wild",)),
        ("api.example.test..", ("default",)),  # only one
        ("site.example.test", ("default",)),  # the default's own names count
        ("x.site.example.test", ("default",)),
        ("unknown.test", ("default",)),
        (".example.test", ("default",)),  # an empty label is no label
        ("*.example.test", ("default",)),  # a literal wildcard asked for matches nothing
        ("192.0.2.1", ("default",)),
        ("::1", ("default",)),
        ("2001:db8::1", ("default",)),
        ("", ("default",)),
        (".", ("default",)),
        (None, ("default",)),
    ],
)
def test_select(server_name: str | None, expected: tuple[str, ...]) -> None:
    assert INDEX.select(server_name) == expected


def test_rsa_and_ecdsa_for_one_name_are_served_together_in_listing_order() -> None:
    ec_cert = info("ec", "shop.example.test")
    rsa_cert = info("rsa", "shop.example.test", key_type="RSA")
    index = SniIndex.build(DEFAULT, [rsa_cert, ec_cert], NOW)
    assert index.select("shop.example.test") == ("rsa", "ec")


def test_default_joins_a_group_for_its_own_name() -> None:
    rsa_site = info("rsa-site", "site.example.test", key_type="RSA")
    index = SniIndex.build(DEFAULT, [rsa_site], NOW)
    assert index.select("site.example.test") == ("default", "rsa-site")
    assert index.select(None) == ("default",)


def test_valid_certificate_preferred_over_expired_even_if_expired_lasts_longer() -> None:
    expired = info("expired", "a.test", not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    future = info("future", "a.test", not_before=NOW + DAY, not_after=NOW + 900 * DAY)
    valid = info("valid", "a.test", not_after=NOW + DAY)
    index = SniIndex.build(DEFAULT, [expired, future, valid], NOW)
    assert index.select("a.test") == ("valid",)


def test_later_expiry_preferred_then_earlier_listed() -> None:
    soon = info("soon", "a.test", not_after=NOW + 10 * DAY)
    later = info("later", "a.test", not_after=NOW + 300 * DAY)
    twin = info("twin", "a.test", not_after=NOW + 300 * DAY)
    assert SniIndex.build(DEFAULT, [soon, later, twin], NOW).select("a.test") == ("later",)
    assert SniIndex.build(DEFAULT, [twin, later], NOW).select("a.test") == ("twin",)


def test_among_expired_the_later_expiry_wins() -> None:
    old = info("old", "a.test", not_before=NOW - 90 * DAY, not_after=NOW - 30 * DAY)
    newer = info("newer", "a.test", not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    assert SniIndex.build(DEFAULT, [old, newer], NOW).select("a.test") == ("newer",)


def test_exact_match_rules_out_wildcards_entirely() -> None:
    exact_rsa = info("exact-rsa", "a.example.test", key_type="RSA")
    wild_ec = info("wild-ec", "*.example.test")
    index = SniIndex.build(DEFAULT, [exact_rsa, wild_ec], NOW)
    assert index.select("a.example.test") == ("exact-rsa",)  # not joined by the EC wildcard
    assert index.select("b.example.test") == ("wild-ec",)


def test_names_of_certificates_are_normalized_and_odd_ones_ignored() -> None:
    odd = info("odd", "MiXeD.Example.Test.", "10.0.0.1", "w*.example.test", "*.", "*.0.0.1")
    index = SniIndex.build(DEFAULT, [odd], NOW)
    assert index.select("mixed.example.test") == ("odd",)
    for name in ("10.0.0.1", "w1.example.test", "x.0.0.1"):
        assert index.select(name) == ("default",)
    assert index.groups() == (("default",), ("odd",))


def test_default_listed_again_counts_once() -> None:
    index = SniIndex.build(DEFAULT, [DEFAULT, API], NOW)
    assert index.groups() == (("default",), ("api",))


def test_groups_are_exactly_what_select_can_return() -> None:
    rsa_api = info("rsa-api", "api.example.test", "*.example.test", key_type="RSA")
    index = SniIndex.build(DEFAULT, [API, WILD, rsa_api], NOW)
    assert index.groups() == (
        ("default",),
        ("api", "rsa-api"),
        ("wild", "rsa-api"),
    )
    names = [None, "api.example.test", "x.example.test", "x.site.example.test", "nope"]
    assert {index.select(n) for n in names} == set(index.groups())


def test_built_from_loaded_certificates() -> None:
    ca = make_ca()
    site = make_server(ca, ["site.example.test"])
    site_rsa = make_server(ca, ["site.example.test"], key_type="RSA")
    loaded = [
        load_server_certificate(i, c.cert_pem(), c.key_pem(), now=NOW)
        for i, c in (("cert-site", site), ("cert-site-rsa", site_rsa))
    ]
    index = SniIndex.build(loaded[0].info, [loaded[1].info], NOW)
    assert index.select("Site.Example.Test.") == ("cert-site", "cert-site-rsa")


@given(st.one_of(st.none(), st.text(), st.from_regex(r"[A-Za-z0-9*.:-]{0,40}", fullmatch=True)))
def test_select_never_raises_and_returns_a_known_group(server_name: str | None) -> None:
    assert INDEX.select(server_name) in INDEX.groups()


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(LABEL, min_size=1, max_size=4))
def test_case_and_one_trailing_dot_never_change_the_answer(labels: list[str]) -> None:
    for name in (".".join(labels), ".".join([*labels, "example.test"])):
        assert INDEX.select(name.upper() + ".") == INDEX.select(name)


@given(LABEL, LABEL)
def test_wildcard_covers_exactly_one_label(first: str, second: str) -> None:
    if first != "api":
        assert INDEX.select(f"{first}.example.test") == ("wild",)
    assert INDEX.select(f"{first}.{second}.example.test") == ("default",)


def test_rebuild_at_is_the_next_validity_boundary_and_rebuilding_then_switches() -> None:
    ending = info("ending", "a.test", not_after=NOW + 5 * DAY)
    starting = info("starting", "a.test", not_before=NOW + 2 * DAY, not_after=NOW + 99 * DAY)
    index = SniIndex.build(DEFAULT, [ending, starting], NOW)
    assert (index.select("a.test"), index.rebuild_at) == (("ending",), NOW + 2 * DAY)
    later = SniIndex.build(DEFAULT, [ending, starting], NOW + 2 * DAY)
    assert (later.select("a.test"), later.rebuild_at) == (("starting",), NOW + 5 * DAY)
    assert SniIndex.build(DEFAULT, [], NOW + 900 * DAY).rebuild_at is None
