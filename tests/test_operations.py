"""The console's operations as pure functions: what each refuses about the request itself."""

from __future__ import annotations

import pytest
from test_config_rules import BASE

from alb_proxy.control import operations as ops
from alb_proxy.control.operations import OperationError


def test_security_policy_is_refused_on_a_listener_without_tls() -> None:
    with pytest.raises(OperationError, match=r"'http-80' \(HTTP\) terminates no TLS") as exc:
        ops.set_security_policy(BASE, "http-80", "tls_cipher_policy_1_0")
    assert exc.value.status == 409


def test_security_policy_changes_only_the_named_listener() -> None:
    changed = ops.set_security_policy(BASE, "https-443", "tls_cipher_policy_1_2")
    policies = {x.name: x.security_policy for x in changed.listeners}
    assert policies["https-443"] == "tls_cipher_policy_1_2"
    assert policies["quic-443"] == BASE.listeners[1].security_policy


def test_certificates_are_refused_on_a_listener_without_tls() -> None:
    with pytest.raises(OperationError, match="takes no certificates") as exc:
        ops.add_additional_certificate(BASE, "http-80", "cert-api")
    assert exc.value.status == 409


def test_unknown_listener_is_404() -> None:
    with pytest.raises(OperationError) as exc:
        ops.set_security_policy(BASE, "nope", "tls_cipher_policy_1_2")
    assert exc.value.status == 404
